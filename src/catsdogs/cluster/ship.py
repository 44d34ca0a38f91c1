"""What the driver ships to the executors, and how each executor process builds it ONCE.

The driver builds the engine the command asked for exactly as a local run does (exporting the fp32
graph, calibrating the int8 graph on its training images, running the int8 guard), then ships the
graph file itself through ``SparkContext.addFile``: every executor runs the very bytes the driver
checked, nothing is calibrated twice and no executor needs the training shards. Files are named by
content (``features-int8-<sha>.onnx``), so two runs in one session never collide and an executor that
already holds a file skips the copy.

On the executor a spec builds its engine (or predictor) on first use and keeps it in a per-process
cache: Python workers are reused between tasks (``spark.python.worker.reuse``), so a worker compiles
the graph once however many tasks it runs. :func:`builds` counts the builds for the job's report.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from catsdogs import checkpoint as ckpt
from catsdogs.engines.base import Engine
from catsdogs.engines.eager import TorchEngine
from catsdogs.engines.names import ONNX, OPENVINO, TORCH, runtime_of
from catsdogs.io.checksum import sha256_file
from catsdogs.runtime import cores, tune_malloc

if TYPE_CHECKING:
    from pyspark import SparkContext

    from catsdogs.infer.predictor import Predictor

_CACHE: dict[Any, Any] = {}
"""This process's built engines and predictors, by spec (an executor's Python worker keeps them)."""
_BUILDS: list[str] = []
"""What this process built, in order: the proof that a worker built each spec once."""


def builds() -> list[str]:
    """The specs this process has built (``repr`` of each), in build order."""
    return list(_BUILDS)


def _cached(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        if not _CACHE:
            tune_malloc()  # as every command does at start (reused activation buffers, docs/engines.md)
        _CACHE[key] = make()
        _BUILDS.append(repr(key))
    return _CACHE[key]


def task_threads(threads: int | None) -> int:
    """Threads for a task's forward passes: ``threads``, else the cores Spark gave the task."""
    if threads:
        return threads
    from pyspark import TaskContext  # lazy: only inside a Spark task

    ctx = TaskContext.get()
    return int(ctx.cpus()) if ctx is not None else cores()


def local_file(name: str) -> str:
    """The local path of a shipped file (inside a task: SparkFiles; on the driver: the staged copy)."""
    from pyspark import SparkFiles  # lazy: only where Spark runs

    return SparkFiles.get(name)


@dataclass(frozen=True)
class EngineSpec:
    """How an executor builds the driver's feature engine: the shipped file and the runtime for it."""

    name: str
    """The engine that runs (``engines.names.ENGINES``), after the driver's int8 guard."""
    file: str
    """Shipped file: the ONNX graph (onnx/openvino engines) or a weights-only model file (torch)."""
    threads: int | None = None
    """Forward-pass threads per task (None: the task's cores, ``spark.task.cpus``)."""

    def build(self) -> Engine:
        """This process's engine for the spec, built on first use."""
        return _cached(self, self._make)

    def _make(self) -> Engine:
        threads = task_threads(self.threads)
        torch.set_num_threads(threads)
        path = Path(local_file(self.file))
        runtime = runtime_of(self.name)
        if runtime == TORCH:
            state = torch.load(path, map_location="cpu", weights_only=True)
            from catsdogs.models.factory import create_from_config

            model = create_from_config(state[ckpt.CKPT_MODEL_CONFIG], state[ckpt.CKPT_MODEL_STATE])
            return TorchEngine(model)
        if runtime == ONNX:
            from catsdogs.engines.onnx_runtime import OnnxEngine  # lazy: loads onnxruntime

            return OnnxEngine(self.name, path, threads)
        if runtime == OPENVINO:
            from catsdogs.engines.openvino_runtime import OpenVinoEngine  # lazy: loads OpenVINO

            return OpenVinoEngine(self.name, path, threads)
        raise ValueError(f"engine {self.name!r} cannot be shipped")


@dataclass(frozen=True)
class PredictorSpec:
    """How an executor builds the driver's predictor: the run's checkpoint, its settings and engine."""

    checkpoint: str
    """Shipped checkpoint file (the run's ``best.pt``)."""
    tta: bool
    reject: bool
    calibrate: bool
    """The driver's resolved inference settings (the run's, overridden by flags)."""
    engine: EngineSpec | None
    """The feature engine; None: torch eager on the checkpoint's own model."""
    threads: int | None = None

    def build(self) -> Predictor:
        """This process's predictor for the spec, built on first use."""
        return _cached(self, self._make)

    def _make(self) -> Predictor:
        from catsdogs.infer.predictor import Predictor  # lazy: predictor tasks only

        torch.set_num_threads(task_threads(self.threads))
        predictor = Predictor.from_run(local_file(self.checkpoint), "cpu", tta=self.tta, reject=self.reject,
                                       calibrate=self.calibrate, backend=TORCH)
        predictor.note = ""  # said once, on the driver
        if self.engine is not None:
            predictor.engine = self.engine.build()
        return predictor


class Shipment:
    """Files the driver sends to this application's executors, staged under content-addressed names.

    The staging folder belongs to the application (:func:`catsdogs.cluster.session.staging_dir`, removed
    when the session stops): a file shipped by one job (the int8 graph, then the fp32 one for the
    guard) is registered once and served to every later job.
    """

    def __init__(self, sc: SparkContext) -> None:
        from catsdogs.cluster.session import staging_dir

        self.sc = sc
        self.stage = staging_dir(sc)

    def __enter__(self) -> Shipment:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def file(self, path: Path) -> str:
        """Ship ``path``; return the name executors open it by (``<stem>-<sha256[:16]><suffix>``)."""
        digest = sha256_file(path)
        name = f"{path.stem}-{digest[:16]}{path.suffix}"
        staged = self.stage / name
        if not staged.exists():
            try:
                os.link(path, staged)  # same file system: no copy
            except OSError:
                shutil.copyfile(path, staged)
            self.sc.addFile(str(staged))
        return name

    def engine(self, engine: Engine, model: nn.Module | None = None,
               model_config: dict[str, Any] | None = None, threads: int | None = None) -> EngineSpec:
        """Ship what builds ``engine`` on an executor: its graph, or (torch) ``model``'s weights."""
        if engine.name == TORCH:
            if model is None or model_config is None:
                raise ValueError("the torch engine ships its model: pass model and model_config")
            path = self.stage / f"model-{os.getpid()}.pt"
            state = {ckpt.CKPT_MODEL_CONFIG: dict(model_config),
                     ckpt.CKPT_MODEL_STATE: {k: v.detach().cpu() for k, v in model.state_dict().items()}}
            ckpt.save_checkpoint(path, state)
            name = self.file(path)
            path.unlink()
            return EngineSpec(TORCH, name, threads)
        graph = engine.path
        if graph is None:
            raise ValueError(f"engine {engine.name!r} has no graph file to ship")
        return EngineSpec(engine.name, self.file(graph), threads)

    def predictor(self, predictor: Predictor, threads: int | None = None) -> PredictorSpec:
        """Ship a loaded predictor: its checkpoint and the engine the driver selected (guard included)."""
        engine = predictor.feature_engine  # built here: calibration and the int8 guard run on the driver
        spec = None if isinstance(engine, TorchEngine) else self.engine(engine, threads=threads)
        return PredictorSpec(self.file(predictor.path), predictor.settings.tta, predictor.settings.reject,
                             predictor.settings.calibrate, spec, threads)

