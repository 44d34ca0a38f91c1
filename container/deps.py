"""Print the requirements of catsdogs' base install plus the given extras, one per line, from pyproject.toml.

The images install these (pinned by constraints.txt) in a layer of their own, before the source is
copied: a change to the code rebuilds only the last, small layer. Self-references such as
``catsdogs[train]`` inside an extra are expanded. Standard library only (it runs in the bare image).

    python3 container/deps.py serve          # base + [serve]
    python3 container/deps.py all            # base + everything
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^catsdogs\[([^\]]+)\]$")


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The base dependencies and those of ``extras`` (recursively), in order, without duplicates."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            nested = SELF.match(req.replace(" ", ""))
            if nested:
                for extra in nested.group(1).split(","):
                    if extra not in seen:
                        seen.add(extra)
                        add(optional[extra])
            elif req not in out:
                out.append(req)

    add(list(project.get("dependencies", [])))
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"deps.py: no extra {extra!r}; pyproject.toml has {', '.join(sorted(optional))}")
        seen.add(extra)
        add(optional[extra])
    return out


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent  # container/ of a checkout, or the image's build folder
    path = next(p for p in (here / "pyproject.toml", here.parent / "pyproject.toml", Path("pyproject.toml"))
                if p.is_file())
    pyproject = tomllib.loads(path.read_text())
    print("\n".join(requirements(pyproject, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
