"""`catsdogs train`: learning, run-folder outputs, checkpoints, exact resume, schedules, user errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from catsdogs import checkpoint as ckpt
from catsdogs import rundir, schema
from catsdogs.checkpoint import build_from_checkpoint, load_checkpoint
from catsdogs.cli import main as cli
from catsdogs.config import TrainConfig
from catsdogs.rundir import METRICS_COLUMNS
from catsdogs.train.loop import Trainer
from catsdogs.train.schedule import lr_at
from tests.fixtures import make_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 train / 60 val rows of 16x16 in shards of 50: 12 steps per epoch at batch 16."""
    root = tmp_path_factory.mktemp("tiny") / "shards"
    make_shards(root, counts={"train": 200, "val": 60, "test": 20}, size=16, shard_rows=50)
    return root


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(out), "--batch-size", "16", "--threads", "1",
            "--buffer-rows", "48", *extra]


# Exercises every source of state: dropout, augmentation RNG, EMA, a warm-up + cosine schedule, Adam.
RICH = ("--epochs", "2", "--augment", "--ema", "0.9", "--schedule", "cosine", "--warmup-epochs", "0.5",
        "--seed", "5", "--label-smoothing", "0.1", "--tta")


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / rundir.METRICS_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_run(a: Path, b: Path) -> None:
    """Final weights (deployed, raw, EMA), optimiser state and metrics are bit-identical."""
    sa, sb = load_checkpoint(a / rundir.LAST_CKPT), load_checkpoint(b / rundir.LAST_CKPT)
    assert sa["step"] == sb["step"] and sa[ckpt.CKPT_EPOCH] == sb[ckpt.CKPT_EPOCH]
    for key in (ckpt.CKPT_MODEL_STATE, "raw_model_state"):
        for name, t in sa[key].items():
            assert torch.equal(t, sb[key][name]), f"{key}.{name} differs"
    for i, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), f"optimizer state {i}.{k} differs"
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        x.pop("seconds"), y.pop("seconds")
        assert x == y
    best_a, best_b = load_checkpoint(a / rundir.BEST_CKPT), load_checkpoint(b / rundir.BEST_CKPT)
    assert best_a[ckpt.CKPT_EPOCH] == best_b[ckpt.CKPT_EPOCH]
    for name, t in best_a[ckpt.CKPT_MODEL_STATE].items():
        assert torch.equal(t, best_b[ckpt.CKPT_MODEL_STATE][name])


def test_train_learns_and_writes_the_run_folder(tiny: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(args(tiny, run, "--epochs", "2", "--dropout", "0.2")) == 0
    out = capsys.readouterr().out
    assert f"best checkpoint: {run / rundir.BEST_CKPT}" in out
    r = rows(run)
    assert list(r[0]) == list(METRICS_COLUMNS)
    assert [int(x["epoch"]) for x in r] == [1, 2] and [int(x["step"]) for x in r] == [12, 24]
    assert float(r[-1]["val_acc"]) > 0.9, r  # the fixture task is learnable: bright left vs right
    cfg = json.loads((run / schema.CONFIG_NAME).read_text())
    assert cfg["batch_size"] == 16 and cfg["data"] == str(tiny)
    best = load_checkpoint(run / rundir.BEST_CKPT)
    mc = best[ckpt.CKPT_MODEL_CONFIG]
    assert mc.items() >= {"name": "seed", "num_classes": 2, "size": 16, "dropout": 0.2, "width": 64}.items()
    assert best[ckpt.CKPT_IMAGE] == {"size": 16, "resize": "stretch"}
    assert best[ckpt.CKPT_NORM] == {"mean": [120.0] * 3, "std": [60.0] * 3}
    assert best[ckpt.CKPT_CLASSES] == ["Cat", "Dog"]
    assert set(best[ckpt.CKPT_METRICS]) >= {"val_loss", "val_acc"}
    last = torch.load(run / rundir.LAST_CKPT, weights_only=True)
    assert {"optimizer", "ema_state", "rng", "step", "progress"} <= set(last)
    assert not {"scheduler", "batches_done", "best", "early_stopping"} & set(last)  # nothing reads them


def test_train_and_evaluate_read_parquet_shards(tmp_path: Path) -> None:
    data = tmp_path / "pq"
    make_shards(data, counts={"train": 200, "val": 60, "test": 40}, size=16, shard_rows=50, fmt="parquet")
    assert not list(data.rglob("*.npy"))
    run = tmp_path / "run"
    assert cli(args(data, run, "--epochs", "2")) == 0
    assert float(rows(run)[-1]["val_acc"]) > 0.9  # learns from Parquet exactly as from npy
    ev = tmp_path / "eval"
    assert cli(["evaluate", "--run", str(run), "--data", str(data), "--output", str(ev),
                "--threads", "1"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 40 and metrics["accuracy"] > 0.9
    assert (ev / "misclassified.png").is_file()


def test_checkpoint_rebuilds_identical_model(tiny: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(tiny), output=str(tmp_path / "run"), epochs=1, batch_size=16, threads=1,
                      ema=0.5, max_steps=5)
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.ema.copy_to(trainer.eval_model)
    model = build_from_checkpoint(load_checkpoint(tmp_path / "run" / rundir.BEST_CKPT))
    x = torch.randn(4, 3, 16, 16)
    # Same memory format on both sides: channels_last picks other conv kernels (last-bit differences).
    trainer.eval_model.eval().to(memory_format=torch.contiguous_format)
    trainer.model.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        assert torch.equal(model(x), trainer.eval_model(x))
        raw = trainer.model.eval()(x)
    assert not torch.equal(model(x), raw), "with --ema the checkpoint must hold the EMA weights"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_max_steps_matches_uninterrupted(tiny: Path, tmp_path: Path, workers: int) -> None:
    w = ("--workers", str(workers))
    assert cli(args(tiny, tmp_path / "a", *RICH, *w)) == 0
    b = tmp_path / "b"
    assert cli(args(tiny, b, *RICH, *w, "--max-steps", "7")) == 0
    state = load_checkpoint(b / rundir.LAST_CKPT)
    assert state["step"] == 7 and state["progress"]["batches"] == 7 and state[ckpt.CKPT_EPOCH] == 0
    assert [x["epoch"] for x in rows(b)] == ["1"]  # the partial epoch's row, replaced on resume
    # Only --output and --resume: every other setting comes from the checkpoint.
    assert cli(["train", "--output", str(b), "--resume"]) == 0
    assert_same_run(tmp_path / "a", b)


def test_resume_after_sigkill_matches_uninterrupted(tiny: Path, tmp_path: Path) -> None:
    """SIGKILL right after best.pt of epoch 1: its metrics row is written, last.pt is mid-epoch."""
    extra = (*RICH, "--checkpoint-every", "5")
    assert cli(args(tiny, tmp_path / "a", *extra)) == 0
    b = tmp_path / "b"
    script = textwrap.dedent("""
        import os, signal, sys
        import catsdogs.train.loop as tr
        save = tr.save_checkpoint
        def save_then_die(path, state):
            save(path, state)
            if path.name == "best.pt":
                os.kill(os.getpid(), signal.SIGKILL)
        tr.save_checkpoint = save_then_die
        from catsdogs.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-c", script, *args(tiny, b, *extra)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert load_checkpoint(b / rundir.LAST_CKPT)["step"] == 10
    assert [x["epoch"] for x in rows(b)] == ["1"]
    assert cli(args(tiny, b, *extra, "--resume")) == 0
    assert_same_run(tmp_path / "a", b)


def test_resume_of_finished_run_is_a_no_op(tiny: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli(args(tiny, run, "--epochs", "1")) == 0
    before = (run / rundir.LAST_CKPT).read_bytes()
    assert cli(args(tiny, run, "--epochs", "1", "--resume")) == 0
    assert (run / rundir.LAST_CKPT).read_bytes() == before
    assert len(rows(run)) == 1


def test_multiclass_uses_softmax_head(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    make_shards(data, counts={"train": 60, "val": 30}, size=16, shard_rows=30, classes=("a", "b", "c"))
    run = tmp_path / "run"
    assert cli(args(data, run, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.01",
                    "--schedule", "onecycle")) == 0
    state = load_checkpoint(run / rundir.BEST_CKPT)
    assert state[ckpt.CKPT_MODEL_CONFIG]["num_classes"] == 3
    assert build_from_checkpoint(state)(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_early_stopping(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Trainer, "validate", lambda self: (0.5, 0.75))
    run = tmp_path / "run"
    assert cli(args(tiny, run, "--epochs", "10", "--patience", "2", "--max-steps", "0")) == 0
    assert len(rows(run)) == 3  # epoch 1 sets the best, epochs 2 and 3 do not improve
    assert "stopped: early stopping" in capsys.readouterr().out
    assert load_checkpoint(run / rundir.LAST_CKPT)["progress"]["bad_epochs"] == 2


def test_schedules() -> None:
    kw = {"base_lr": 1.0, "total_steps": 100}
    assert lr_at(0, kind="constant", **kw) == 1.0
    warm = [lr_at(s, kind="cosine", warmup_steps=10, **kw) for s in range(100)]
    assert warm[0] < warm[5] < warm[9] < 1.0 and warm[10] == 1.0
    assert all(a >= b for a, b in zip(warm[10:], warm[11:], strict=False)) and warm[-1] < 0.01
    one = [lr_at(s, kind="onecycle", **kw) for s in range(100)]
    assert math.isclose(one[0], 1 / 25) and max(one) == one[30] == 1.0 and one[-1] < 1e-3
    assert lr_at(500, kind="cosine", **kw) == lr_at(99, kind="cosine", **kw)


def test_user_errors_exit_2(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(args(tmp_path / "nope", run)) == 2
    assert "--data" in capsys.readouterr().err
    bad = tmp_path / "bad"
    make_shards(bad, counts={"train": 20, "val": 10}, size=16, shard_rows=20)
    manifest = json.loads((bad / schema.MANIFEST_NAME).read_text())
    (bad / schema.MANIFEST_NAME).write_text(json.dumps({**manifest, "schema_version": 99}))
    assert cli(args(bad, run)) == 2
    assert "schema_version" in capsys.readouterr().err
    (bad / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    (bad / "train" / "y_part_00000.npy").unlink()
    assert cli(args(bad, run)) == 2
    assert "y_part_00000" in capsys.readouterr().err
    assert cli(["train", "--output", str(run)]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_existing_run_needs_resume_and_matching_settings(tiny: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(args(tiny, run, "--epochs", "1", "--max-steps", "2")) == 0
    capsys.readouterr()
    assert cli(args(tiny, run, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "--output" in err
    assert cli(args(tiny, run, "--epochs", "1", "--resume", "--lr", "0.5")) == 2
    assert "--lr was 0.001" in capsys.readouterr().err


def test_resume_refuses_a_typed_value_even_when_it_is_the_default(tiny: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(args(tiny, run, "--epochs", "1", "--max-steps", "2", "--lr", "0.01")) == 0
    capsys.readouterr()
    # 0.001 is --lr's default: it was typed all the same, and this run was trained at 0.01.
    assert cli(args(tiny, run, "--epochs", "1", "--resume", "--lr", str(TrainConfig().lr))) == 2
    err = capsys.readouterr().err.strip()
    assert "--lr was 0.01" in err and "now 0.001" in err and len(err.splitlines()) == 1
    assert cli(args(tiny, run, "--epochs", "2", "--resume")) == 0  # untyped: the run's own lr goes on
    state = load_checkpoint(run / rundir.LAST_CKPT)
    assert state[ckpt.CKPT_TRAIN_CONFIG]["lr"] == 0.01 and state[ckpt.CKPT_EPOCH] == 2


def test_overwrite_replaces_a_finished_run_not_with_resume(tiny: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(args(tiny, run, "--epochs", "2")) == 0
    (run / rundir.EVAL_DIR).mkdir()
    (run / rundir.EVAL_DIR / rundir.REPORT_NAME).write_text("stale report of the old model")
    capsys.readouterr()
    assert cli(args(tiny, run, "--epochs", "1", "--resume", "--overwrite")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(args(tiny, run, "--epochs", "1", "--overwrite")) == 0
    assert len(rows(run)) == 1 and not (run / rundir.EVAL_DIR).exists()
    assert load_checkpoint(run / rundir.LAST_CKPT)[ckpt.CKPT_TRAIN_CONFIG]["overwrite"] is False
