"""``catsdogs train``: launch the loop in one process, the frozen-backbone head, or N DDP processes.

With ``--distributed N`` the driver checks the settings, starts (or reuses) a SparkSession on
``--master`` and hands
:func:`rank_main` to ``pyspark.ml.torch.distributor.TorchDistributor``: with a local master it runs
N processes on this machine (``torchrun --standalone``), with a cluster master N barrier tasks on
the executors. Every rank runs :func:`catsdogs.train.loop.train_worker` with DDP (gloo on CPU, nccl on
CUDA), streams a disjoint set of train/val shards (:mod:`catsdogs.train.stream`), averages metrics with
``all_reduce``; only rank 0 writes metrics.csv, best.pt and last.pt.

TorchDistributor returns the value of whichever local rank finished last, so the driver reads rank
0's outcome from the run folder (metrics.csv) instead of trusting the return value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from catsdogs import runtime
from catsdogs.config import TrainConfig, need, require
from catsdogs.errors import ConfigError
from catsdogs.rundir import RunDir, read_metrics
from catsdogs.runtime import select_device
from catsdogs.shards.cache import fetch_manifest, local_shards
from catsdogs.shards.manifest import load_manifest
from catsdogs.spark import get_spark, is_local
from catsdogs.track.mlflow_run import ending
from catsdogs.train.contract import check_applicable, claim, planned
from catsdogs.train.ddp import backend_for
from catsdogs.train.frozen import train_frozen
from catsdogs.train.loop import train_worker
from catsdogs.train.names import FREEZE_BACKBONE
from catsdogs.train.tracking import finish_training_run, log_epoch, open_training_run


@dataclass(frozen=True)
class LaunchPlan:
    """How the N training processes are started; decided on the driver from the config."""

    processes: int
    """World size (``--distributed``)."""
    local_mode: bool
    """True for a local master: the processes run on this machine, not on executors."""
    use_gpu: bool
    """One CUDA device per process (``--device cuda``, or ``auto`` with a GPU)."""
    backend: str
    """torch.distributed backend: nccl on CUDA, gloo on CPU."""
    threads: int | None
    """Torch threads per process (None: leave to the process, ``OMP_NUM_THREADS`` or all cores)."""


def plan_launch(cfg: TrainConfig, cores: int | None = None) -> LaunchPlan:
    """Validate ``--distributed`` settings and decide how to launch; raise :class:`ConfigError`.

    ``--device cuda`` without a GPU fails here, on the driver, with one clear line (not N tracebacks).
    """
    n = cfg.distributed
    if n < 1:
        raise ConfigError(f"--distributed must be >= 1 to launch distributed training, got {n}")
    if cfg.freeze == FREEZE_BACKBONE:
        raise ConfigError("--freeze backbone --distributed N runs the feature pass as N Spark tasks "
                          "(train.frozen), not N DDP processes; launch it through catsdogs train")
    check_applicable(cfg)
    device = select_device(cfg.device)
    local = is_local(cfg.master)
    use_gpu = device.type == "cuda"
    if use_gpu and local and n > torch.cuda.device_count():
        raise ConfigError(f"--distributed {n} needs {n} GPUs with a local --master, this machine has "
                          f"{torch.cuda.device_count()}; lower --distributed")
    threads = cfg.threads
    if not threads and local and not use_gpu:
        # N processes share this machine's cores: without this each would start one thread per core.
        threads = max(1, (cores or runtime.cores()) // n)
    return LaunchPlan(processes=n, local_mode=local, use_gpu=use_gpu, backend=backend_for(device),
                      threads=threads)


def preflight(cfg: TrainConfig) -> None:
    """Fail on the driver for mistakes every rank would hit (bad --data/--output, too few shards)."""
    require(cfg, "output", "data")  # after claim(): a resumed run has its --data from the checkpoint
    if cfg.data:
        # In local mode the ranks share this machine: fetch remote shards once, here, so the N
        # ranks find them cached instead of downloading them N times at once.
        manifest = (load_manifest(local_shards(need(cfg, "data"), cfg.cache_dir)) if is_local(cfg.master)
                    else fetch_manifest(need(cfg, "data")))
        shards = len(manifest.split_shards("train"))
        if shards < cfg.distributed:
            raise ConfigError(f"--distributed {cfg.distributed} exceeds the {shards} train shards of "
                              f"{cfg.data!r} (each process reads whole shards); lower --distributed or "
                              f"re-run catsdogs preprocess with a smaller --shard-rows")


def rank_main(cfg: TrainConfig, plan: LaunchPlan) -> dict[str, Any]:
    """Body of one training process (started by torchrun): join the group, train, leave.

    Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set by torchrun.
    """
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if plan.use_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    threads = plan.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or None
    cfg = dataclasses.replace(cfg, threads=threads)
    dist.init_process_group(plan.backend)
    try:
        progress = train_worker(cfg, rank, world)
    finally:
        dist.destroy_process_group()
    return {"rank": rank, "world_size": world, "step": progress.step, "epoch": progress.epoch}


def _gpu_discovery_conf(n: int) -> dict[str, str]:
    """Driver GPU resources for a local master (TorchDistributor reads them to pin one GPU per rank)."""
    script = Path(tempfile.gettempdir()) / f"catsdogs-gpus-{os.getpid()}.sh"
    addresses = json.dumps({"name": "gpu", "addresses": [str(i) for i in range(torch.cuda.device_count())]})
    script.write_text(f"#!/bin/sh\necho '{addresses}'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {"spark.driver.resource.gpu.amount": str(n),
            "spark.driver.resource.gpu.discoveryScript": str(script)}


def train_distributed(cfg: TrainConfig) -> list[dict[str, str]]:
    """Run ``--distributed N`` training; return rank 0's metrics rows read from the run folder."""
    # The run-folder contract once, here: --overwrite clears the folder before any rank starts, and a
    # resumed run's settings (--distributed included) come from its checkpoint.
    cfg, state = claim(cfg)
    if state is None:
        cfg = dataclasses.replace(cfg, resume=False)  # said once, here: the ranks start a new run
    plan = plan_launch(cfg)
    preflight(cfg)
    # Lazy: pyspark costs ~1 s at import and single-process training never needs it.
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    conf = dict(cfg.spark_conf)
    if plan.use_gpu and plan.local_mode:
        conf = {**_gpu_discovery_conf(plan.processes), **conf}
    owned = SparkSession.getActiveSession() is None
    spark = get_spark(cfg.master, "catsdogs-train", conf)
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    t0 = time.perf_counter()
    try:
        if plan.threads:
            # torchrun would force OMP_NUM_THREADS=1 per process (and warn); give each its share.
            os.environ["OMP_NUM_THREADS"] = str(plan.threads)
        distributor = TorchDistributor(num_processes=plan.processes, local_mode=plan.local_mode,
                                       use_gpu=plan.use_gpu)
        distributor.run(rank_main, cfg, plan)
    finally:
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp
        if owned:
            spark.stop()
    run = RunDir(Path(need(cfg, "output")))
    rows = read_metrics(run.metrics)
    where = "this machine" if plan.local_mode else cfg.master
    last = rows[-1] if rows else {}
    print(f"distributed training: {plan.processes} processes ({plan.backend}, {where}) in "
          f"{time.perf_counter() - t0:.1f} s; last epoch val_acc {last.get('val_acc', 'n/a')}; "
          f"metrics in {run.metrics}", flush=True)
    return rows


def main(cfg: TrainConfig, cache_splits: tuple[str, ...] = ()) -> int:
    """Entry point of ``catsdogs train``: frozen head, N DDP processes, or the loop in this process.

    Given flags that cannot apply are refused first, on the settings a ``--resume`` would continue with.
    ``cache_splits``: with ``--freeze backbone``, splits whose features the feature pass also computes
    and caches for the evaluation that follows (``catsdogs run``: test); training never reads them.
    """
    plan = planned(cfg)
    check_applicable(plan)
    if plan.freeze == FREEZE_BACKBONE:
        claimed, state = claim(cfg)
        if state is not None:
            train_frozen(cfg)  # says that the run is complete
            return 0
        cfg = dataclasses.replace(claimed, resume=False)  # a new run: nothing left to resume or replace
        tracked = open_training_run(cfg)
        with ending(tracked):
            metrics = train_frozen(cfg, cache_splits=cache_splits)
            log_epoch(tracked, {"epoch": 1, **metrics})
            # The loop's final names (one column across runs), plus the head's own facts.
            finish_training_run(tracked, cfg, {"best_val_loss": metrics["val_loss"],
                                               "best_val_acc": metrics["val_acc"], "best_epoch": 1,
                                               "epochs": 1, "C": metrics["C"],
                                               "feature_seconds": metrics["feature_seconds"]})
        best = RunDir(Path(need(cfg, "output"))).best
        print(f"best checkpoint: {best} (val_acc {metrics['val_acc']:.4f})")
        return 0
    if plan.distributed:
        train_distributed(cfg)
        return 0
    train_worker(cfg, 0, 1)
    return 0
