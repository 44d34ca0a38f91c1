"""Frozen-backbone training (``catsdogs train --freeze backbone``): features once, then a logistic head.

The pretrained backbone never changes, so its pooled features are computed ONCE per image (one
streaming pass over the shards, batched), and only the linear head is trained on them: a logistic
regression that takes seconds instead of epochs of backbone forward passes. The result is written
as an ordinary checkpoint of the full model (backbone + head), so evaluate/predict/serve load it
like any trained run. The run folder follows the loop's contract (:mod:`catsdogs.train.contract`): an
existing run is refused without ``--resume`` (nothing left to do: the head is fitted in one go) or
``--overwrite``, and the checkpoint's model config is the loop's.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from catsdogs.checkpoint import CKPT_ENGINE, CKPT_METRICS, build_checkpoint, save_checkpoint
from catsdogs.config import TrainConfig, need, require, save_config, to_dict
from catsdogs.engines import feature_cache
from catsdogs.engines.base import Engine
from catsdogs.engines.batches import SplitImages, calibration_images
from catsdogs.engines.factory import create_engine, record_checkpoint
from catsdogs.engines.guard import GuardResult, save_record, screened_check
from catsdogs.engines.names import engine_for, is_quantized, runtime_of
from catsdogs.engines.select import reference_features
from catsdogs.errors import ConfigError, InputError
from catsdogs.io import storage
from catsdogs.io.checksum import sha256_file
from catsdogs.models.factory import create_model
from catsdogs.models.heads import num_logits
from catsdogs.models.registry import input_normalization, pretrained_names
from catsdogs.rundir import MetricsLog, RunDir
from catsdogs.runtime import setup
from catsdogs.shards.cache import fetch_manifest, local_shards, partial_copy
from catsdogs.shards.manifest import Manifest, load_manifest
from catsdogs.spark import is_local
from catsdogs.train.confidence import fit_confidence
from catsdogs.train.contract import claim, model_config, model_kwargs
from catsdogs.train.features import extract_features
from catsdogs.train.head import Head, fit_head

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

def train_frozen(cfg: TrainConfig, size: int | None = None, cache_splits: tuple[str, ...] = ()
                 ) -> dict[str, float]:
    """Train only the head of a pretrained ``cfg.model`` on frozen features; write the run folder.

    Writes ``best.pt`` and ``last.pt`` (full model, normal checkpoint format), ``config.json`` and
    ``metrics.csv`` into ``cfg.output``; returns the validation metrics (those recorded in the checkpoint
    when ``--resume`` finds the run complete). The features of ``cache_splits`` are computed by the same
    engine and written to the run's feature cache (for evaluate) -- never read here. The feature pass
    runs in this process, or as Spark tasks on the executors (:func:`on_spark`); the head is fitted here.
    """
    cfg, state = claim(cfg)
    if state is not None:  # a frozen run is complete once last.pt exists: nothing to continue
        print(f"catsdogs train: --resume: the frozen-backbone run in {cfg.output} is complete; nothing to do "
              f"(--overwrite fits it again)", file=sys.stderr)
        return dict(state.get(CKPT_METRICS, {}))
    if cfg.model not in pretrained_names():
        raise ConfigError(f"--freeze backbone needs a pretrained --model ({', '.join(pretrained_names())}), "
                          f"got {cfg.model!r}; use --freeze none to train it from scratch")
    require(cfg, "output", "data")
    if not on_spark(cfg):
        return _train_frozen(cfg, size, cache_splits=cache_splits)
    from catsdogs.cluster.session import NEEDED, runtime_modules, spark_session  # lazy: pyspark

    # Before the JVM starts: a wrong value is the only line.
    check_spark_plan(cfg, fetch_manifest(need(cfg, "data")))
    modules = NEEDED + runtime_modules(engine_for(cfg.backend))
    with spark_session(cfg.master, "catsdogs-train", cfg.spark_conf, modules) as spark:
        try:
            return _train_frozen(cfg, size, spark)  # no feature cache: the driver may hold no test shard
        finally:
            # The streamed features.
            shutil.rmtree(RunDir(Path(need(cfg, "output"))).feature_shards, ignore_errors=True)


def on_spark(cfg: TrainConfig) -> bool:
    """Whether the feature pass runs as Spark tasks: with ``--distributed N``, or a cluster ``--master``.

    A local master without ``--distributed`` keeps the single-process pass: on this machine it was as
    fast with the same cores (docs/cluster.md), without a JVM to start.
    """
    return cfg.distributed > 0 or not is_local(cfg.master)


def check_spark_plan(cfg: TrainConfig, manifest: Manifest) -> None:
    """Refuse ``--distributed N`` above the number of train and val shards (a task reads whole shards)."""
    shards = len(manifest.split_shards("train")) + len(manifest.split_shards("val"))
    if cfg.distributed > shards:
        raise ConfigError(f"--distributed {cfg.distributed} exceeds the {shards} train and val shards of "
                          f"{cfg.data!r} (each Spark task reads whole shards); lower --distributed or re-run "
                          f"catsdogs preprocess with a smaller --shard-rows")


def executor_data(cfg: TrainConfig) -> str:
    """``--data`` as the executors open it: a URI as given, a path made absolute (their cwd differs)."""
    data = need(cfg, "data")
    return data if storage.is_remote(data) else str(Path(data).resolve())


def _open_shards(cfg: TrainConfig, spark: SparkSession | None) -> tuple[Path, Manifest]:
    """The local shards folder and its manifest (on Spark with remote shards, only the calibration copy)."""
    source = need(cfg, "data")
    if spark is not None and storage.is_remote(source):
        # The executors read the shards; the driver copies only what int8 calibration reads.
        manifest = fetch_manifest(source)
        data = partial_copy(source, manifest, "train", cfg.calibration_images, cfg.cache_dir)
    else:
        data = local_shards(source, cfg.cache_dir)  # remote shards: a verified local copy
        manifest = load_manifest(data)
    if manifest.split_rows("train") == 0:
        raise InputError(f"shards {cfg.data!r} have no train rows (fix --data)")
    return data, manifest


def _guard_int8(cfg: TrainConfig, model: nn.Module, data: Path, manifest: Manifest, mean: tuple[float, ...],
                std: tuple[float, ...], device: torch.device, engine: Engine, feats: dict[str, Any],
                head: Head, spark: SparkSession | None,
                size: int, run: RunDir) -> tuple[GuardResult, Engine, dict[str, Any],
                                                  Head]:
    """The int8 guard: the head on fp32 validation features must score within --int8-max-drop.

    Returns the guard's record and the engine, features and head to keep: the int8 ones when it passes,
    else the fp32 reference's, refitted.
    """
    w, b, metrics = head
    # The guard: the same head on fp32 validation features must score within --int8-max-drop. Only
    # the images whose prediction could flip run in fp32 (engines/guard.py: screened_check); on Spark
    # the executors compute every validation image's (the driver may hold no validation shard).
    reference = create_engine(runtime_of(engine.name), model, size, run, threads=cfg.threads,
                              fp32_sha256=engine.fp32_sha256)
    ref_val: tuple[np.ndarray, np.ndarray] | None = None
    if spark is not None:
        ref_val = features_of(cfg, model, data, manifest, mean, std, device, reference, {"val": False},
                              spark, size)["val"]
        fp32_val = ref_val[0]
        fp32_features: Callable[[np.ndarray], np.ndarray] = lambda index: fp32_val[index]  # noqa: E731
    else:
        fp32_features = reference_features(reference, SplitImages(data, manifest, "val", mean, std,
                                                                  cfg.batch_size, size))
    record = screened_check(engine.name, linear(w, b), *feats["val"], fp32_features, cfg.int8_max_drop)
    log.info("int8 guard: val acc %.4f (int8) vs %.4f (fp32), %d of %d images in fp32",
             record.int8_acc, record.fp32_acc, record.fp32_rows, record.rows)
    if not record.passed:
        print(record.refusal(), file=sys.stderr)
        feats = frozen_features(cfg, model, data, manifest, mean, std, device, reference, ref_val, spark,
                                size)
        w, b, metrics = fit_head(*feats["train"], *feats["val"], num_classes=len(manifest.classes),
                                 seed=cfg.seed)
        engine = reference
    return record, engine, feats, (w, b, metrics)


def _train_frozen(cfg: TrainConfig, size: int | None = None, spark: SparkSession | None = None,
                  cache_splits: tuple[str, ...] = ()) -> dict[str, float]:
    """:func:`train_frozen` itself; with ``spark``, the feature passes run there."""
    t0 = time.perf_counter()
    device = setup(cfg.threads, cfg.device, cfg.seed)
    data, manifest = _open_shards(cfg, spark)
    size = size or manifest.size
    num_classes = len(manifest.classes)
    model = create_model(cfg.model, num_classes, size, pretrained=True, **model_kwargs(cfg))
    model = model.to(device).to(memory_format=torch.channels_last)
    mean, std = input_normalization(cfg.model, tuple(manifest.mean), tuple(manifest.std))
    run = RunDir(Path(need(cfg, "output")))
    calibration = lambda: calibration_images(data, manifest, mean, std,  # noqa: E731
                                             cfg.calibration_images, cfg.batch_size, size)
    stages: dict[str, float] = {}
    clock = Stopwatch(stages)
    backend = engine_for(cfg.backend)  # the engine asked for (train has no run to record one yet)
    engine = create_engine(backend, model, size, run, threads=cfg.threads, device=device,
                           calibration=calibration, calibration_rows=cfg.calibration_images)
    clock.lap("engine_seconds")  # model load, graph export and int8 calibration when not cached
    feats = frozen_features(cfg, model, data, manifest, mean, std, device, engine, spark=spark, size=size)
    clock.lap("feature_pass_seconds")
    feature_s = time.perf_counter() - t0
    w, b, metrics = fit_head(*feats["train"], *feats["val"], num_classes=num_classes, seed=cfg.seed)
    clock.lap("head_seconds")
    record: GuardResult | None = None
    if is_quantized(engine.name):
        record, engine, feats, (w, b, metrics) = _guard_int8(
            cfg, model, data, manifest, mean, std, device, engine, feats, (w, b, metrics), spark, size, run)
        clock.lap("int8_check_seconds")
    # With the final engine (int8, or fp32 after a refusal), while it is compiled: for evaluate only.
    cached = {split: extract_features(model, data, manifest, split, mean, std, cfg.batch_size, device=device,
                                      size=size, engine=engine)
              for split in cache_splits
              if split not in ("train", "val") and manifest.split_rows(split)}
    clock.lap("cached_features_seconds")
    _install_head(model, w, b, num_classes)
    # Detector, threshold and temperature from the features already in memory: no second pass.
    val_logits = feats["val"][0] @ w.numpy().T + b.numpy()
    entries, conf_metrics = fit_confidence(cfg, num_classes, *feats["train"], feats["val"][0], val_logits,
                                           feats["val"][1])
    clock.lap("confidence_seconds")
    seconds = time.perf_counter() - t0
    metrics.update({"feature_seconds": feature_s, "seconds": seconds, **conf_metrics, **stages})
    entries[CKPT_ENGINE] = engine.name
    write_run(cfg, model.cpu().to(memory_format=torch.contiguous_format), manifest, size, mean, std,
              metrics, entries)
    checkpoint_sha256 = sha256_file(run.best)
    _record_engine(run, engine, record, checkpoint_sha256)
    for split, (split_feats, split_labels) in cached.items():
        base = feature_cache.base_key(data, manifest, split, checkpoint_sha256, backend,
                                      cfg.int8_max_drop, mean, std, size)
        feature_cache.save(run.feature_cache(split, backend), split_feats, split_labels, base, engine)
    clock.lap("write_seconds")
    rows = sum(len(f[1]) for f in feats.values()) + sum(len(f[1]) for f in cached.values())
    print(_summary(engine.name, time.perf_counter() - t0, stages, rows, record), file=sys.stderr)
    return metrics


def _record_engine(run: RunDir, engine: Engine, record: GuardResult | None, checkpoint_sha256: str) -> None:
    """Key the engine's graph, and a passed int8 guard, to the checkpoint just written."""
    # evaluate, predict and serve load this checkpoint: its graph is the one on disk, no tracing needed.
    record_checkpoint(run, engine.fp32_sha256, checkpoint_sha256)
    if record is not None and record.passed:
        # Recorded with the int8 graph, keyed by this checkpoint: evaluate, predict and serve reuse it.
        record.checkpoint_sha256, record.graph_sha256 = checkpoint_sha256, engine.graph_sha256
        save_record(run.int8_guard, record)
        engine.guard = record.to_dict()


def _install_head(model: nn.Module, w: torch.Tensor, b: torch.Tensor, num_classes: int) -> None:
    """Copy the fitted logistic head into the model's final layer."""
    head: nn.Linear = model._fc  # type: ignore[assignment]
    if head.out_features != num_logits(num_classes) or w.shape != head.weight.shape:
        raise RuntimeError(f"head shape {tuple(head.weight.shape)} does not match fitted {tuple(w.shape)}")
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)


def _summary(engine: str, seconds: float, stages: dict[str, float], rows: int, record: GuardResult | None
             ) -> str:
    """The one line that says where a frozen run's time went."""
    return (f"catsdogs: frozen head ({engine} features) in {seconds:.0f} s: "
            + ", ".join(f"{k.removesuffix('_seconds').replace('_', ' ')} {v:.1f} s"
                        for k, v in stages.items())
            + f"; {rows:,} images through the engine"
            + (f"; int8 check: {record.fp32_rows or record.rows} of {record.rows} validation images in fp32"
               if record is not None else ""))


class Stopwatch:
    """Seconds between successive ``lap`` calls, recorded by name (one line of stage timings)."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.last
        self.last = now


def frozen_features(cfg: TrainConfig, model: nn.Module, data: Path, manifest: Manifest,
                    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, engine: Engine,
                    val: tuple[np.ndarray, np.ndarray] | None = None, spark: SparkSession | None = None,
                    size: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features of the train split (plus mirrored rows with --augment) and of val (unless given)."""
    feats = features_of(cfg, model, data, manifest, mean, std, device, engine,
                        {"train": cfg.augment, **({} if val is not None else {"val": False})}, spark, size)
    if val is not None:
        feats["val"] = val
    return feats


def features_of(cfg: TrainConfig, model: nn.Module, data: Path, manifest: Manifest, mean: tuple[float, ...],
                std: tuple[float, ...], device: torch.device, engine: Engine, splits: dict[str, bool],
                spark: SparkSession | None = None, size: int | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features of each split in ``splits`` (value: also its mirror images), here or on Spark.

    On Spark (``spark`` given) one job runs every split, one task per shard or ``--distributed N``
    tasks; the arrays are the ones this process would compute (same rows, same order).
    """
    if spark is not None:
        from catsdogs.cluster.features import spark_features  # lazy: only the Spark pass needs it

        config = model_config(cfg, len(manifest.classes), size or manifest.size)
        feats, _report = spark_features(
            spark, cfg.master, executor_data(cfg), manifest, engine, model, config, mean, std, splits,
            batch_size=cfg.batch_size, threads=cfg.threads, groups=cfg.distributed,
            spill=RunDir(Path(need(cfg, "output"))).feature_shards, stream_above=cfg.head_memory_mb << 20)
        return feats
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, flip in splits.items():
        ts = time.perf_counter()
        feats[split] = extract_features(model, data, manifest, split, mean, std, cfg.batch_size,
                                        flip=flip, device=device, engine=engine, size=size)
        log.info("features %s (%s): %d rows in %.1f s", split, engine.name, len(feats[split][1]),
                 time.perf_counter() - ts)
    return feats


def linear(w: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fitted head as a function of features (logits = x @ W.T + b)."""
    return lambda f: f @ w.T + b


def write_run(cfg: TrainConfig, model: nn.Module, manifest: Manifest, size: int,
              mean: tuple[float, ...], std: tuple[float, ...], metrics: dict[str, float],
              confidence: dict[str, Any] | None = None) -> None:
    """Write best.pt/last.pt, config.json and metrics.csv in the layout ``catsdogs train`` uses.

    ``confidence`` holds the detector, temperature and inference-settings checkpoint entries.
    """
    run = RunDir(Path(need(cfg, "output")))
    run.root.mkdir(parents=True, exist_ok=True)  # also made by train_frozen for the engine graphs
    state = build_checkpoint(model_state=model.state_dict(),
                             model_config=model_config(cfg, len(manifest.classes), size),
                             classes=manifest.classes, mean=mean, std=std, size=size,
                             resize=manifest.resize, train_config=to_dict(cfg), epoch=1, metrics=metrics)
    state.update(confidence or {})
    save_checkpoint(run.best, state)
    save_checkpoint(run.last, state)
    save_config(cfg, run.config)
    log = MetricsLog(run.metrics)
    log.start(keep_epochs=None)
    log.append({"epoch": 1, "step": 1, "train_acc": metrics["train_acc"], "val_loss": metrics["val_loss"],
                "val_acc": metrics["val_acc"], "seconds": round(metrics["seconds"], 2)})
