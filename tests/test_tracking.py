"""MLflow tracking and registry against a real ``mlflow server`` (127.0.0.1, sqlite backend in tmp).

One server per module (it takes ~10 s to start); the test that loses the server mid-run comes last and
the fixture restarts the server for anything selected after it.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import catsdogs
from catsdogs import rundir, schema
from catsdogs.cli import main as cli
from catsdogs.io.checksum import sha256_file
from tests.fixtures import jpeg_bytes, make_shards, synthetic_image
from tests.mlflow_server import MlflowServer, free_port
from tests.ood_set import png_bytes, sample_photos

mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is not installed (pip install -e '.[dev]')")
from mlflow import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def live(server: MlflowServer) -> MlflowServer:
    if server.proc is None:  # stopped by the lost-server test
        server.start()
    return server


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "shards"
    make_shards(root, counts={"train": 64, "val": 32, "test": 32}, size=16, shard_rows=32)
    with open(root / schema.FILES_CSV_NAME, "w", newline="") as fh:  # the data's identity is its hash
        w = csv.writer(fh)
        w.writerow(schema.FILES_CSV_COLUMNS)
        w.writerows([[f"Cat/{i}.jpg", "train", 0, i, "Cat"] for i in range(5)])
    return root


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(out), "--batch-size", "16", "--threads", "1",
            "--buffer-rows", "32", "--epochs", str(EPOCHS), *extra]


def images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(synthetic_image(i % 2, 40 + 4 * i, seed=i)))
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def tracked(server: MlflowServer, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One tracked, registered and evaluated training run, shared by the checks below."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    uri = server.uri
    assert cli(train_args(shards, out, "--tracking-uri", uri, "--experiment", "tests",
                          "--register", "tiny-seed")) == 0
    # No --experiment: the evaluation joins its training run's experiment.
    assert cli(["evaluate", "--run", str(out), "--threads", "1", "--tracking-uri", uri]) == 0
    link = json.loads((out / rundir.MLFLOW_LINK_NAME).read_text())
    return {"uri": uri, "out": str(out), "run_id": link["run_id"]}


def test_train_logs_params_one_metric_point_per_epoch_lineage_and_artifacts(tracked: dict[str, str],
                                                                            shards: Path) -> None:
    client = MlflowClient(tracked["uri"])
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "seed" and params["epochs"] == str(EPOCHS) and params["batch_size"] == "16"
    assert params["data"] == str(shards) and params["register"] == "tiny-seed"
    rows = list(csv.DictReader(open(Path(tracked["out"]) / rundir.METRICS_CSV)))
    for key in ("val_acc", "val_loss", "train_loss", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows]), key
    assert run.data.metrics["best_epoch"] >= 1
    tags = run.data.tags
    assert tags["catsdogs.data"] == str(shards)
    assert tags["catsdogs.data.files_csv_sha256"] == sha256_file(shards / schema.FILES_CSV_NAME)
    assert tags["catsdogs.data.schema_version"] == str(schema.SCHEMA_VERSION)
    assert tags["catsdogs.data.count.train"] == "64" and tags["catsdogs.data.count.val.Cat"] == "16"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {schema.CONFIG_NAME, rundir.METRICS_CSV, "model", rundir.EVAL_DIR} <= top
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/MLmodel" in model_files and "model/artifacts" in model_files
    assert f"model/artifacts/{rundir.BEST_CKPT}" in {
        a.path for a in client.list_artifacts(run.info.run_id, "model/artifacts")}


def test_evaluation_is_its_own_run_linked_both_ways_with_report_and_plots(tracked: dict[str, str]) -> None:
    client = MlflowClient(tracked["uri"])
    training = client.get_run(tracked["run_id"])
    eval_id = training.data.tags["catsdogs.evaluation_run_id"]
    evaluation = client.get_run(eval_id)
    assert evaluation.data.tags["catsdogs.training_run_id"] == tracked["run_id"]
    assert evaluation.data.tags["mlflow.parentRunId"] == tracked["run_id"]
    assert evaluation.info.experiment_id == training.info.experiment_id
    saved = json.loads((Path(tracked["out"]) / rundir.EVAL_DIR / rundir.EVAL_METRICS_NAME).read_text())
    assert evaluation.data.metrics["accuracy"] == pytest.approx(saved["accuracy"])
    assert training.data.metrics["test_accuracy"] == pytest.approx(saved["accuracy"])
    names = {a.path for a in client.list_artifacts(eval_id)}
    assert {rundir.REPORT_NAME, "confusion_matrix.png", "roc_curve.png", "loss_curve.png"} <= names
    local = Path(mlflow.artifacts.download_artifacts(run_id=eval_id, artifact_path=rundir.REPORT_NAME,
                                                     tracking_uri=tracked["uri"]))
    assert local.read_bytes() == (Path(tracked["out"]) / rundir.EVAL_DIR / rundir.REPORT_NAME).read_bytes()


def predictions(run: str, folder: Path, out: Path, *extra: str) -> dict[str, dict[str, object]]:
    assert cli(["predict", str(folder), "--run", run, "--threads", "1", "--output", str(out), *extra]) == 0
    return {Path(r["path"]).name: r for r in json.loads(out.read_text())}


def test_registered_model_predicts_like_the_run_folder(tracked: dict[str, str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATSDOGS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    folder = images(tmp_path / "imgs")
    # One engine for all three: a downloaded model has no RUN/engine/ graphs or validation shards, so
    # an int8 default would run it in fp32 while the local run folder may run int8.
    torch_engine = ("--backend", "torch")
    local = predictions(tracked["out"], folder, tmp_path / "local.json", *torch_engine)
    registry = predictions("models:/tiny-seed/1", folder, tmp_path / "registry.json", *torch_engine)
    by_run = predictions(f"runs:/{tracked['run_id']}/model", folder, tmp_path / "runs.json", *torch_engine)
    assert local == registry == by_run
    assert local["broken.jpg"]["error"] and local["0.jpg"]["label"] in ("Cat", "Dog")
    assert any((tmp_path / "cache" / "mlflow").iterdir())  # downloaded once into the cache


def test_registered_model_answers_like_the_run_folder_on_its_own_engine(
        tracked: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --backend on either side: the same engine (the default, behind its guard), the same answers."""
    monkeypatch.setenv("CATSDOGS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    folder = images(tmp_path / "imgs")
    assert predictions("models:/tiny-seed/1", folder, tmp_path / "r.json") == predictions(
        tracked["out"], folder, tmp_path / "l.json")
    assert catsdogs.load("models:/tiny-seed/1").engine == catsdogs.load(tracked["out"]).engine


def test_pyfunc_by_uri_and_scoring_server_answer_like_the_api(tracked: dict[str, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``mlflow models serve`` runs: the scoring app, fed base64 image bytes as JSON, "unknown" too."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    folder = images(tmp_path / "imgs")
    rocket = next(a for name, a in sample_photos() if name == "rocket")
    (folder / "rocket.png").write_bytes(png_bytes(rocket))
    files = sorted(folder.glob("*.*"))
    want = {Path(p.path).name: p for p in catsdogs.load(tracked["out"]).predict(files)}
    assert want["rocket.png"].label == "unknown"  # no cat, no dog: the run's detector rejects it
    # Through the environment, restored after the test: mlflow.set_tracking_uri would also set
    # $MLFLOW_TRACKING_URI for the rest of the session, and later tests would track to a stopped server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    model = mlflow.pyfunc.load_model("models:/tiny-seed/1")
    import pandas as pd

    direct = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in files]}))
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in files]}}
    response = TestClient(scoring_server.init(model)).post("/invocations", json=body)
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    for i, path in enumerate(files):
        expected = want[path.name]
        assert direct["error"][i] == served[i]["error"] == expected.error
        if expected.error:
            assert expected.error == "not_an_image"
            continue
        assert direct["label"][i] == served[i]["label"] == expected.label
        assert direct["ood_score"][i] == pytest.approx(expected.ood_score, abs=1e-6)
        for name in expected.classes:
            assert direct[f"p_{name}"][i] == pytest.approx(expected.probabilities[name], abs=1e-6)
            assert served[i][f"p_{name}"] == pytest.approx(expected.probabilities[name], abs=1e-6)


def test_frozen_head_logs_its_one_epoch_and_model(live: MlflowServer, tmp_path: Path) -> None:
    shards = tmp_path / "shards32"  # EfficientNet-Lite needs >= 32 px
    make_shards(shards, counts={"train": 60, "val": 20, "test": 20}, size=32, shard_rows=25)
    out = tmp_path / "frozen"
    assert cli(["train", "--data", str(shards), "--output", str(out), "--model", "effnet_lite0", "--freeze",
                "backbone", "--batch-size", "32", "--threads", "1", "--tracking-uri", live.uri,
                "--register", "tiny-frozen", "--int8-max-drop", "100"]) == 0
    client = MlflowClient(live.uri)
    run = client.get_run(json.loads((out / rundir.MLFLOW_LINK_NAME).read_text())["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["freeze"] == "backbone"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [1]
    assert run.data.metrics["C"] > 0 and run.data.metrics["best_val_acc"] == history[0].value
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}

    # The registered model carries the run's engine (graphs and int8 check) and runs it: on another
    # machine, without the shards to calibrate and check one, a models:/ copy would fall back to fp32.
    downloaded = catsdogs.load("models:/tiny-frozen/1", tracking_uri=live.uri)
    local = sorted(p.name for p in (out / rundir.ENGINE_DIR).iterdir())
    copied = sorted(p.name for p in (Path(downloaded.predictor.path).parent / rundir.ENGINE_DIR).iterdir())
    assert rundir.INT8_GUARD_NAME in local and copied == local
    assert downloaded.engine == catsdogs.load(out).engine  # int8, or its fp32 runtime if refused: recorded


def test_tune_logs_the_study_with_each_trial_nested(live: MlflowServer, shards: Path, tmp_path: Path) -> None:
    assert cli(["tune", "--data", str(shards), "--output", str(tmp_path / "study"), "--model", "seed",
                "--trials", "2", "--epochs", "2", "--threads", "1", "--tracking-uri", live.uri,
                "--experiment", "tune-tests"]) == 0
    client = MlflowClient(live.uri)
    exp = client.get_experiment_by_name("tune-tests")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.params["trials"] == "2"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(trials) == 2
    for trial in trials:
        assert trial.data.params["augment"] == "True"  # the trial's own TrainConfig
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_acc")]
        assert steps and steps == list(range(1, len(steps) + 1))
    assert "study.csv" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_resume_continues_the_same_mlflow_run(live: MlflowServer, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    base = ["train", "--data", str(shards), "--output", str(out), "--batch-size", "16", "--threads", "1",
            "--buffer-rows", "32", "--tracking-uri", live.uri]
    assert cli([*base, "--epochs", "2"]) == 0
    first = json.loads((out / rundir.MLFLOW_LINK_NAME).read_text())["run_id"]
    assert cli([*base, "--epochs", "3", "--resume"]) == 0
    assert json.loads((out / rundir.MLFLOW_LINK_NAME).read_text())["run_id"] == first
    client = MlflowClient(live.uri)
    assert [m.step for m in client.get_metric_history(first, "val_loss")] == [1, 2, 3]
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"  # params are write-once


def test_uri_helpers() -> None:
    from catsdogs.track.mlflow_run import flatten_params
    from catsdogs.track.registry import mlflow_scheme

    assert [mlflow_scheme(v) for v in ("models:/m/1", "models:/m@prod", "runs:/abc/model", "/runs/x",
                                       "s3a://b/k", "")] == ["models", "models", "runs", "", "", ""]
    assert flatten_params({"a": 1, "b": {"c": "x", "d": {}}, "e": [1]}) == {"a": "1", "b.c": "x", "b.d": "{}",
                                                                         "e": "[1]"}


def test_tracking_off_logs_nothing_and_imports_no_mlflow(shards: Path, tmp_path: Path) -> None:
    code = ("import sys; from catsdogs.cli import main; "
            f"rc = main({train_args(shards, tmp_path / 'run', '--epochs', '1')!r}); "
            "print('MLFLOW' if 'mlflow' in sys.modules else 'NONE', rc)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "NONE 0", out.stderr[-2000:]
    assert not (tmp_path / "run" / rundir.MLFLOW_LINK_NAME).exists()


def test_server_down_at_start_warns_once_and_trains(shards: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert cli(train_args(shards, tmp_path / "run", "--tracking-uri", dead, "--epochs", "2",
                          "--register", "never")) == 0
    err = capsys.readouterr().err
    assert err.count("catsdogs: warning: MLflow tracking") == 1, err
    assert dead in err and "carries on" in err
    assert (tmp_path / "run" / rundir.BEST_CKPT).is_file()
    assert not (tmp_path / "run" / rundir.MLFLOW_LINK_NAME).exists()


def test_predict_from_registry_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = images(tmp_path / "imgs")
    assert cli(["predict", str(folder), "--run", "models:/x/1"]) == 2
    assert "set MLFLOW_TRACKING_URI or --tracking-uri" in capsys.readouterr().err
    assert cli(["evaluate", "--run", "models:/x/1"]) == 2
    assert "only --run of predict and serve" in capsys.readouterr().err


def test_missing_model_version_is_a_user_error(live: MlflowServer, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = images(tmp_path / "imgs")
    assert cli(["predict", str(folder), "--run", "models:/no-such-model/7", "--tracking-uri", live.uri]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-model" in err and "fix --run" in err


def test_server_lost_mid_run_does_not_fail_training(server: MlflowServer, shards: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The server is stopped right after epoch 1 was logged; epochs 2 and 3 still train and save."""
    import catsdogs.train.loop as loop

    if server.proc is None:
        server.start()
    logged = loop.log_epoch
    reached: list[int] = []

    def log_then_lose_server(tracked: object, row: dict[str, float]) -> None:
        logged(tracked, row)  # type: ignore[arg-type]
        if row["epoch"] == 1:
            history = MlflowClient(server.uri).get_metric_history(tracked.run_id, "val_acc")  # type: ignore[attr-defined]
            reached.extend(m.step for m in history)
            server.stop()

    monkeypatch.setattr(loop, "log_epoch", log_then_lose_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; the default path is above
    out = tmp_path / "run"
    assert cli(train_args(shards, out, "--tracking-uri", server.uri, "--register", "lost")) == 0
    err = capsys.readouterr().err
    assert err.count("catsdogs: warning: MLflow tracking") == 1, err
    rows = list(csv.DictReader(open(out / rundir.METRICS_CSV)))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, EPOCHS + 1)]
    assert (out / rundir.BEST_CKPT).is_file() and (out / rundir.LAST_CKPT).is_file()
    assert reached == [1]  # epoch 1 was tracked before the server went away
    assert (out / rundir.MLFLOW_LINK_NAME).is_file()
