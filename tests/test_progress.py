"""Progress off a terminal: plain lines at intervals, never one endless line of carriage returns."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from catsdogs import progress
from catsdogs.progress import progress_bar


def test_off_a_terminal_each_state_is_a_short_line_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # every update may print: the worst case
    out = io.StringIO()
    with progress_bar(total=500, desc="features train (openvino-int8)", unit="img", file=out) as bar:
        for _ in range(500):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and lines[-1].startswith("features train (openvino-int8): 100%")
    assert max(len(line) for line in lines) <= 300


def test_off_a_terminal_lines_come_at_intervals_not_per_update() -> None:
    out = io.StringIO()
    with progress_bar(total=10_000, desc="predict", unit="img", file=out) as bar:
        for _ in range(10_000):
            bar.update(1)  # all within a fraction of PLAIN_INTERVAL_S
    assert len(out.getvalue().splitlines()) <= 3  # the first state, maybe one more, the last


def test_a_disabled_bar_prints_nothing() -> None:
    out = io.StringIO()
    with progress_bar(total=3, file=out, disable=True) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_a_whole_stage_piped_to_a_file_has_no_long_line() -> None:
    """The same code as a real command's bar, stderr redirected as ``make run > log 2>&1`` does."""
    code = ("from catsdogs.progress import progress_bar\n"
            "with progress_bar(total=200, desc='epoch 1/1', unit='batch') as bar:\n"
            "    for _ in range(200): bar.update(1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "\r" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith("epoch 1/1: 100%")
