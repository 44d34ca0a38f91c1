"""Tests of ``catsdogs run``: missing data help, train-config layering, shard reuse, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catsdogs import cli
from catsdogs.config import RunConfig, to_dict
from catsdogs.errors import ConfigError
from catsdogs.pipeline import preprocess_config, reuse_reason, train_config
from catsdogs.shards.manifest import load_manifest, save_manifest
from tests.fixtures import make_image_tree, make_shards


def test_missing_data_explains_the_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = cli.main(["run", "--data", str(tmp_path / "PetImages"), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err and "Kaggle Cats and Dogs Dataset" in err
    assert "'catsdogs download'" in err and "--data data/PetImages" in err and "make run" in err
    assert "Cat" in err and "Dog" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_train_config_layers(tmp_path: Path) -> None:
    shards, out = tmp_path / "s", tmp_path / "o"
    # Without a file the run flags (defaults included) apply; data/out always come from the run.
    t = train_config(RunConfig(model="seed", epochs=3, seed=5), shards, out)
    assert (t.model, t.epochs, t.seed, t.data, t.output) == ("seed", 3, 5, str(shards), str(out))
    tuned = tmp_path / "best.json"
    tuned.write_text(json.dumps({"model": "cnn", "epochs": 7, "lr": 0.01, "data": "/elsewhere"}))
    t = train_config(RunConfig(train_config=str(tuned)), shards, out)
    assert (t.model, t.epochs, t.lr, t.data) == ("cnn", 7, 0.01, str(shards))  # file beats defaults
    t = train_config(RunConfig(train_config=str(tuned), epochs=2), shards, out)
    assert (t.model, t.epochs) == ("cnn", 2)  # an explicit run flag beats the file
    toml = tmp_path / "t.toml"
    toml.write_text("[train]\nbatch_size = 16\naugment = true\n")
    t = train_config(RunConfig(train_config=str(toml)), shards, out)
    assert t.batch_size == 16 and t.augment is True


@pytest.mark.parametrize("content,needle", [
    (None, "--train-config"),
    ('{"learning_rate": 1}', "learning_rate"),
    ('{"lr": -1}', "--lr"),
])
def test_bad_train_config_names_the_flag(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=needle) as info:
        train_config(RunConfig(train_config=str(path)), tmp_path / "s", tmp_path / "o")
    assert "--train-config" in str(info.value)


def test_reuse_reason(tmp_path: Path) -> None:
    data = tmp_path / "pets"
    make_image_tree(data, per_class=4, odd=False)
    shards = tmp_path / "shards"
    wanted = preprocess_config(RunConfig(size=32), data.resolve(), shards)
    assert reuse_reason(shards, wanted) == "no shards yet"
    manifest = make_shards(shards, counts={"train": 6, "test": 2}, size=32)
    assert "made from input None" in str(reuse_reason(shards, wanted))
    manifest.config = to_dict(wanted)  # as preprocess records it
    manifest.stats["candidates"] = 8
    save_manifest(manifest, shards)
    assert reuse_reason(shards, wanted) is None
    bigger = preprocess_config(RunConfig(size=48), data.resolve(), shards)
    assert "size=32" in str(reuse_reason(shards, bigger))
    (data / "Cat" / "extra.jpg").write_bytes((data / "Cat" / "0.jpg").read_bytes())
    assert "input changed" in str(reuse_reason(shards, wanted))
    (data / "Cat" / "extra.jpg").unlink()
    (shards / load_manifest(shards).shards[0].x).unlink()
    assert "missing" in str(reuse_reason(shards, wanted))
    (shards / "manifest.json").unlink()
    assert "no manifest.json" in str(reuse_reason(shards, wanted))


@pytest.mark.slow
def test_run_end_to_end_then_reuses_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = tmp_path / "PetImages", tmp_path / "run"
    make_image_tree(data, per_class=40, odd=False)
    tuned = tmp_path / "train.toml"
    tuned.write_text("batch_size = 16\nthreads = 1\n")
    argv = ["run", "--data", str(data), "--output", str(out), "--size", "32", "--epochs", "1",
            "--master", "local[2]", "--train-config", str(tuned)]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    report = out / "eval" / "report.html"
    assert "making shards" in first and str(report) in first
    assert report.is_file() and "data:image/png;base64," in report.read_text()
    for name in ("confusion_matrix", "roc_curve", "loss_curve", "accuracy_curve", "misclassified"):
        assert (out / "eval" / f"{name}.png").stat().st_size > 1000
    for name in ("best.pt", "last.pt", "metrics.csv", "config.json", "run_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["batch_size"] == 16  # from --train-config
    manifest_path = out / "shards" / "manifest.json"
    assert load_manifest(out / "shards").config["input"] == str(data.resolve())
    stamp = manifest_path.stat().st_mtime_ns
    metrics_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(metrics_lines) == 2  # header + one epoch

    # Second run: same input and settings -> shards reused, the finished run kept, report redone.
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert "reusing shards" in second and "resuming" in second
    assert manifest_path.stat().st_mtime_ns == stamp
    assert (out / "metrics.csv").read_text().splitlines() == metrics_lines

    # Other preprocessing for a folder that already holds a model is refused, before any work.
    assert cli.main([*argv[:6], "48", *argv[7:]]) == 2
    assert "choose a new --output" in capsys.readouterr().err
    assert manifest_path.stat().st_mtime_ns == stamp

