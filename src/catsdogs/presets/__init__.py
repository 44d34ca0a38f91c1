"""The presets: TOML config files shipped inside the package, given by name to ``--config``.

``catsdogs run --config effnet_lite12_frozen`` (or ``make run MODEL=effnet_lite12_frozen``) reads
``effnet_lite12_frozen.toml`` from this folder, so a preset works from an installed wheel as well as
from a checkout. A path to an existing file always wins over a preset of the same name.
"""

from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent
"""Where the preset files live (package data of the wheel)."""

SUFFIX = ".toml"


def preset_names() -> list[str]:
    """Return the names of the presets, sorted (``cnn``, ``effnet_lite0``, ...)."""
    return sorted(p.stem for p in PRESETS_DIR.glob(f"*{SUFFIX}"))


def preset_path(name: str) -> Path | None:
    """Return the file of preset ``name`` (a bare name, no folder or suffix), or None if there is none."""
    if not name or "/" in name or "\\" in name or name.endswith(SUFFIX) or name.startswith("."):
        return None
    path = PRESETS_DIR / f"{name}{SUFFIX}"
    return path if path.is_file() else None


def find_config(value: str) -> Path | None:
    """Return the config file ``value`` names: an existing file, else the preset of that name, else None."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    return preset_path(value)
