"""Progress bars that read well on a terminal and in a log file alike.

On a terminal a tqdm bar redraws itself in place with carriage returns. Sent to a file or a pipe
(``make run > log``) those redraws piled up into one line of 22,628 characters, so there every bar is
a plain line at most every :data:`PLAIN_INTERVAL_S` seconds, plus its first and last state.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

PLAIN_INTERVAL_S = 10.0
"""Seconds between two plain progress lines when the output is not a terminal: a 2-minute stage
writes about a dozen lines."""


class _Lines(tqdm):  # type: ignore[type-arg]
    """A tqdm bar that writes each state as its own line, never a carriage return."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fp = _NoBareControl(self.fp)  # tqdm's close() ends a bar with a bare "\n" (or "\r")

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = (self.__str__() if msg is None else msg).strip("\r\n")
        if text:
            self.fp.write(text + "\n")
            self.fp.flush()
        return True


class _NoBareControl:
    """A stream that drops writes of a lone newline or carriage return (each line ends its own)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> Any:
        return None if text in ("", "\n", "\r") else self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a real stream
        return False


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:  # type: ignore[type-arg]
    """A tqdm bar (same arguments) on stderr unless ``file`` says otherwise; plain lines off a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if kwargs.get("disable") or _is_terminal(stream):
        return tqdm(*args, **kwargs)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval") or 0.0), PLAIN_INTERVAL_S)
    kwargs.update(file=stream, disable=False, dynamic_ncols=False)  # None would mean "off a terminal"
    kwargs.setdefault("ncols", 100)  # a fixed width: a pipe has none to measure
    kwargs.setdefault("ascii", True)  # "#" bars: a log viewer may not show block characters
    return _Lines(*args, **kwargs)
