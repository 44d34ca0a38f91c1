"""Crash safety: a SIGKILL at any moment leaves nothing that looks complete, and a rerun (preprocess)
or ``--resume`` (train) ends exactly where an uninterrupted run ends.

The victims run as real subprocesses and are killed from outside with SIGKILL (no cleanup code
runs), at moments chosen by watching their output folders.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from catsdogs import checkpoint as ckpt
from catsdogs import rundir, schema
from catsdogs.checkpoint import load_checkpoint
from catsdogs.cli import main as cli_main
from tests.fixtures import make_image_tree, make_shards

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "PYTHONWARNINGS": "ignore"}


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 180.0,
             poll: float = 0.002) -> bool:
    """Poll ``cond`` until true (True) or the process exits first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out after {timeout} s waiting for the victim")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ preprocess


def preprocess_argv(src: Path, out: Path) -> list[str]:
    # 320 images in shards of 8 = 40 Spark tasks: seconds of work on 2 cores, a wide window to kill in.
    return [sys.executable, "-m", "catsdogs.cli", "preprocess", "--input", str(src), "--output", str(out),
            "--size", "16", "--shard-rows", "8", "--master", "local[2]"]


def snapshot(out: Path) -> dict[str, object]:
    """What must be identical between two complete outputs (stats and the output path may differ)."""
    m = json.loads((out / schema.MANIFEST_NAME).read_text())
    return {
        "files": {p.relative_to(out).as_posix(): sha(p) for p in sorted(out.rglob("*.npy"))},
        "files_csv": (out / schema.FILES_CSV_NAME).read_bytes(),
        "manifest": {k: m[k] for k in ("classes", "shards", "counts", "skipped", "ignored", "normalization",
                                       "image", "schema_version")},
    }


@pytest.mark.slow
def test_preprocess_sigkill_leaves_no_complete_output_and_rerun_is_identical(tmp_path: Path) -> None:
    src = tmp_path / "PetImages"
    make_image_tree(src, per_class=160, odd=False, size=48)
    out = tmp_path / "shards"

    victim = subprocess.Popen(preprocess_argv(src, out), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)

    def part_way() -> bool:  # the temporary folder exists and holds at least one finished shard
        return any(tmp.is_dir() and any(tmp.rglob("X_part_*.npy")) for tmp in tmp_path.glob("shards.tmp-*"))

    assert wait_for(part_way, victim), "preprocess finished before any shard appeared"
    os.kill(victim.pid, signal.SIGKILL)  # the driver only, as the OOM killer would
    assert victim.wait(timeout=60) == -signal.SIGKILL
    tmps = list(tmp_path.glob("shards.tmp-*"))
    n_written = len(list(tmps[0].rglob("X_part_*.npy")))
    assert 0 < n_written < 40, f"killed after {n_written} of ~40 shards: not part-way"
    # No output that looks complete: no OUTPUT folder (the temporary one has no manifest either).
    assert not out.exists()
    assert not (tmps[0] / schema.MANIFEST_NAME).exists()
    # Spark's JVM and Python workers notice the dead driver and exit on their own.
    deadline = time.monotonic() + 60
    while group_alive(victim.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(victim.pid), "Spark processes outlived the killed driver"

    # The rerun (same command) and an uninterrupted reference run share one Spark session here,
    # which saves a JVM start; `catsdogs preprocess` picks up the active session.
    from catsdogs.spark import get_spark

    reference = tmp_path / "reference"
    spark = get_spark("local[2]", "catsdogs-crash-tests", {"spark.sql.shuffle.partitions": "2"})
    try:
        assert cli_main(preprocess_argv(src, out)[3:]) == 0
        assert cli_main(preprocess_argv(src, reference)[3:]) == 0
    finally:
        spark.stop()
    assert not list(tmp_path.glob("shards.tmp-*")), "the killed run's temporary folder was not removed"
    a, b = snapshot(out), snapshot(reference)
    assert len(a["files"]) == 2 * 40  # X and y of every shard
    assert a == b


def test_stale_temp_folders_of_dead_runs_only_are_removed(tmp_path: Path) -> None:
    """A rerun deletes temp folders of killed runs on this host, never a live run's or another host's."""
    import socket

    from catsdogs.io.outputs import remove_stale_tmp as _remove_stale_tmp

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        names = {"dead": f"shards.tmp-{host}-{dead.pid}-aaaa", "live": f"shards.tmp-{host}-{live.pid}-bbbb",
                 "other_host": f"shards.tmp-elsewhere-{dead.pid}-cccc", "unrelated": "shards.tmp-x"}
        for name in names.values():
            (tmp_path / name / "train").mkdir(parents=True)
        _remove_stale_tmp(tmp_path / "shards")
        left = {k for k, name in names.items() if (tmp_path / name).exists()}
        assert left == {"live", "other_host", "unrelated"}
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 train / 60 val rows of 16x16: 12 steps per epoch at batch 16 (36 in 3 epochs)."""
    root = tmp_path_factory.mktemp("tiny") / "shards"
    make_shards(root, counts={"train": 200, "val": 60, "test": 20}, size=16, shard_rows=50)
    return root


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    # Every source of state: dropout, augmentation RNG, EMA, warm-up + cosine schedule, Adam moments.
    return ["train", "--data", str(data), "--output", str(out), "--batch-size", "16", "--threads", "1",
            "--buffer-rows", "48", "--epochs", "3", "--augment", "--ema", "0.9", "--schedule", "cosine",
            "--warmup-epochs", "0.5", "--seed", "5", "--label-smoothing", "0.1", "--checkpoint-every", "1",
            *extra]


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli_main(train_argv(tiny, out)) == 0
    return out


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / rundir.METRICS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r.pop("seconds")  # wall time is the only column allowed to differ
    return rows


def assert_same_run(a: Path, b: Path) -> None:
    """Weights (deployed EMA and raw), optimiser moments, best.pt and metrics are bit-identical."""
    sa, sb = load_checkpoint(a / rundir.LAST_CKPT), load_checkpoint(b / rundir.LAST_CKPT)
    assert (sa["step"], sa[ckpt.CKPT_EPOCH]) == (sb["step"], sb[ckpt.CKPT_EPOCH])
    for key in (ckpt.CKPT_MODEL_STATE, "raw_model_state"):
        for name, t in sa[key].items():
            assert torch.equal(t, sb[key][name]), f"{key}.{name} differs"
    for i, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), f"optimizer {i}.{k} differs"
    assert metrics(a) == metrics(b)
    ba, bb = load_checkpoint(a / rundir.BEST_CKPT), load_checkpoint(b / rundir.BEST_CKPT)
    assert ba[ckpt.CKPT_EPOCH] == bb[ckpt.CKPT_EPOCH]
    for name, t in ba[ckpt.CKPT_MODEL_STATE].items():
        assert torch.equal(t, bb[ckpt.CKPT_MODEL_STATE][name]), f"best.pt {name} differs"


def assert_every_checkpoint_loads(run: Path) -> list[Path]:
    """Every visible .pt is complete; return the leftover temporary files (never named *.pt)."""
    for pt in run.glob("*.pt"):
        state = load_checkpoint(pt)  # raises CheckpointError on a partial file
        assert ckpt.CKPT_MODEL_STATE in state
    leftovers = [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert all(not p.name.endswith(".pt") for p in leftovers)
    return leftovers


def test_train_killed_at_random_moments_resumes_bit_identical(tiny: Path, reference: Path,
                                                              tmp_path: Path) -> None:
    """SIGKILL from outside, twice, while last.pt is rewritten every step; then --resume to the end."""
    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = 0
    log = tmp_path / "victim.log"
    for attempt in range(2):
        last = run / rundir.LAST_CKPT
        # Wait for a checkpoint written by THIS process (a newer last.pt), then kill.
        since = last.stat().st_mtime_ns if last.exists() else -1
        argv = [sys.executable, "-m", "catsdogs.cli", *train_argv(tiny, run, "--resume")]
        with open(log, "w") as fh:
            victim = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=fh)

        def saved_again(last: Path = last, since: int = since) -> bool:
            try:
                return last.stat().st_mtime_ns > since
            except FileNotFoundError:
                return False

        started = wait_for(saved_again, victim, timeout=300)
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere: mid-step, mid-save, between saves
        victim.send_signal(signal.SIGKILL)
        rc = victim.wait(timeout=60)
        assert started
        if rc == -signal.SIGKILL:
            kills += 1
        else:
            assert rc == 0, log.read_text()[-3000:]
        leftovers = assert_every_checkpoint_loads(run)
        print(f"kill {attempt}: rc {rc}, step {load_checkpoint(run / rundir.LAST_CKPT)['step']}, "
              f"leftover temp files {len(leftovers)}")
    assert kills >= 1, "no kill landed before the run finished"
    assert cli_main(train_argv(tiny, run, "--resume")) == 0
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "--resume keeps stale temp files"
    assert_same_run(reference, run)


def test_train_killed_while_writing_a_checkpoint_keeps_the_previous_one(tiny: Path, reference: Path,
                                                                       tmp_path: Path) -> None:
    """The 6th checkpoint write dies half-way (bytes on disk, process killed): last.pt is still the
    5th, complete; the half file is a hidden .tmp, never a .pt; --resume ends bit-identical."""
    run = tmp_path / "run"
    script = textwrap.dedent("""
        import io, os, signal, sys, torch
        real_save, calls = torch.save, [0]
        def half_then_die(obj, f, *a, **kw):
            calls[0] += 1
            if calls[0] < 6:
                return real_save(obj, f, *a, **kw)
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half_then_die
        from catsdogs.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, *train_argv(tiny, run)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = assert_every_checkpoint_loads(run)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.pt."), leftovers
    assert leftovers[0].stat().st_size > 0  # the half-written bytes really hit the disk
    assert load_checkpoint(run / rundir.LAST_CKPT)["step"] == 5
    assert not (run / rundir.BEST_CKPT).exists()  # no epoch finished: nothing else was published
    assert cli_main(train_argv(tiny, run, "--resume")) == 0
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "--resume keeps stale temp files"
    assert_same_run(reference, run)
