"""``make run`` of the default preset, timed stage by stage, against a 150 s target.

Runs ``make run DATA=<real data> OUT=<out>`` (a fresh OUT: preprocess included), timestamps every
output line as it arrives, and reads the stage boundaries from the pipeline's own lines ([1/3], [2/3],
[3/3], the frozen trainer's stage line). In the same run it measures the machine's int8 peak
(``benchmarks.engines.peak_gops``) and the operations per image, to state the floor the feature pass
cannot beat: images through the engine x GOP per image / peak GOP/s.

Usage: ``.venv/bin/python -m benchmarks.make_run [--output DIR]`` (holds the heavy-job lock).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import PROJECT_ROOT, REAL_DATA, heavy_lock, machine, write_fragment

DEFAULT_MODEL = "effnet_lite12_frozen"
"""The preset ``make run`` trains without MODEL= (fragment make_run.md; another's: make_run_<model>.md)."""
TARGET_S = 150.0
"""Target: make run of the default preset in at most 150 s."""
STAGE_LINE = re.compile(r"frozen head \((?P<engine>[^)]*) features\) in (?P<total>[\d.]+) s: "
                        r"(?P<stages>[^;]*); (?P<images>[\d,]+) images through the engine")


def run_timed(cmd: list[str], log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd``; return its wall seconds and every output line (split at \\r too) with its time."""
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with open(log, "w") as fh, subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None  # nosec B101 # type narrowing
        for raw in proc.stdout:
            fh.write(raw)
            for part in raw.replace("\r", "\n").splitlines():
                if part.strip():
                    lines.append((time.perf_counter() - t0, part))
        proc.wait()
    if proc.returncode:
        raise SystemExit(f"make run failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0, lines


def stages(wall: float, lines: list[tuple[float, str]]) -> dict[str, Any]:
    """Stage seconds from the pipeline's marker lines."""
    def first(prefix: str) -> float:
        return next(t for t, text in lines if text.startswith(prefix))

    pre, train, evaluate = first("[1/3]"), first("[2/3]"), first("[3/3]")
    out: dict[str, Any] = {"setup (venv check, imports)": pre, "preprocess": train - pre,
                           "train": evaluate - train, "evaluate": wall - evaluate}
    found = next((STAGE_LINE.search(text) for _t, text in lines if STAGE_LINE.search(text)), None)
    if found:
        out["train_stages"] = {k.strip().rsplit(" ", 2)[0]: float(k.strip().rsplit(" ", 2)[1])
                               for k in found["stages"].split(",")}
        out["images"] = int(found["images"].replace(",", ""))
        out["engine"] = found["engine"]
    wall_line = next((text for _t, text in lines if "wall time" in text.lower()), "")
    at = wall_line.lower().find("wall time")
    out["preprocess_line"] = wall_line[at:].split(")")[0] + ")" if wall_line else ""
    acc = next((text for _t, text in lines if text.strip().startswith("accuracy ")), "")
    out["accuracy_line"] = acc.strip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="", help="run folder to make (default: a temporary one, removed)")
    parser.add_argument("--log", default="", help="where to keep make run's output (default: OUT.log)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the preset (make run MODEL=...)")
    args = parser.parse_args()
    if not REAL_DATA.is_dir():
        print(f"skipped: no real data at {REAL_DATA}")
        return
    from benchmarks.engines import gflop_per_image, peak_gops
    from catsdogs.infer.predictor import Predictor

    tmp = None if args.output else tempfile.mkdtemp(prefix="catsdogs-bench-run-")
    out = Path(args.output or Path(str(tmp)) / "run")
    log = Path(args.log) if args.log else out.with_suffix(".log")
    if out.exists():
        raise SystemExit(f"--output {out} exists: give a fresh folder (make run must preprocess too)")
    with heavy_lock():
        cmd = ["make", "run", f"DATA={REAL_DATA}", f"OUT={out}", f"MODEL={args.model}"]
        wall, lines = run_timed(cmd, log)
        gop = gflop_per_image(Predictor.from_run(out, "cpu", backend="torch"))
        peak = peak_gops()
    st = stages(wall, lines)
    images = st.get("images", 0)
    floor = images * gop / peak["int8"]
    rows = [f"| {name} | {sec:.0f} |" for name, sec in st.items() if isinstance(sec, float)]
    inner = st.get("train_stages", {})
    md = "\n".join([
        f"## `make run` of the `{args.model}` preset, stage by stage", "",
        f"`.venv/bin/python -m benchmarks.make_run --model {args.model}` on {machine()}: `make run "
        f"DATA={REAL_DATA} OUT=<fresh> MODEL={args.model}` (preprocess included) on the 18,000-photo "
        "development copy, under /tmp/catsdogs-heavy.lock; output lines timestamped as they arrive.", "",
        f"**Wall: {wall:.0f} s** (target <= {TARGET_S:.0f} s: {'met' if wall <= TARGET_S else 'NOT met'}); "
        f"{st['accuracy_line']}; preprocess: {st['preprocess_line']}.", "",
        "| stage | seconds |", "|---|---|", *rows, "",
        "Inside train (the frozen trainer's own stage line): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in inner.items()) + f"; engine {st.get('engine', '?')}.", "",
        f"**Floor of the feature pass on this machine**: {images:,} images through the engine x "
        f"{gop:.2f} GOP per image = {images * gop / 1000:.1f} TOP; at the measured int8 peak of "
        f"{peak['int8']:.0f} GOP/s "
        f"({peak['best']['int8']}) that is {floor:.0f} s even at 100 % of peak, before preprocess "
        f"({st['preprocess']:.0f} s here) and everything else.",
    ])
    print(md)
    write_fragment("make_run" if args.model == DEFAULT_MODEL else f"make_run_{args.model}", md)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
