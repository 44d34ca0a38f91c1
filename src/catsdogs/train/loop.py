"""The training loop: train a model on the shards with exact, resumable state.

One process (or one DDP rank: :func:`train_worker` takes ``rank``/``world_size``; only rank 0 writes
files) streams batches from :mod:`catsdogs.train.stream`, augments them (:mod:`catsdogs.train.augment`),
normalises them on the fly and takes optimiser steps; every epoch it validates, appends a row to
``RUN/metrics.csv`` and writes ``best.pt`` (lowest val loss) and ``last.pt`` atomically.

Run folder rules (:mod:`catsdogs.train.contract`, shared with the frozen-backbone head): a folder that
already holds ``last.pt`` is refused unless ``--resume`` (then training continues from it) or
``--overwrite`` is given; ``--resume`` on a folder without ``last.pt`` starts from scratch, so
``catsdogs train --resume ...`` can simply be re-run after any crash or preemption. On resume, settings
not given are taken from the checkpoint; given settings that would change the trained model (model,
lr, batch size, seed, ...) must match.

Resume is exact: ``last.pt`` carries the weights, optimiser, schedule step, EMA, every RNG state
(torch, NumPy, Python, augmentation) and the number of batches consumed in the current epoch, and the
loader replays the epoch's order up to that point. On CPU with the same ``--threads`` and
``--workers`` a resumed run ends with the same weights and metrics as an uninterrupted one, bit for
bit (see the tests). ``--max-steps`` stops early without compressing the schedule, which makes it a
clean interruption point too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from catsdogs import checkpoint as ckpt
from catsdogs.checkpoint import build_checkpoint, build_from_checkpoint, load_checkpoint, save_checkpoint
from catsdogs.config import TrainConfig, need, require, save_config, to_dict
from catsdogs.errors import CheckpointError, ConfigError
from catsdogs.models.factory import create_model
from catsdogs.models.heads import log_probs, loss_fn, predictions
from catsdogs.models.registry import input_normalization
from catsdogs.models.transforms import hflip, normalize
from catsdogs.progress import progress_bar
from catsdogs.rundir import MetricsLog, RunDir
from catsdogs.runtime import setup
from catsdogs.shards.cache import local_shards
from catsdogs.shards.manifest import Manifest, load_manifest
from catsdogs.track.mlflow_run import TrackedRun, ending
from catsdogs.train.augment import augment_batch
from catsdogs.train.confidence import TRAIN_FEATURE_ROWS, feature_pass, fit_confidence
from catsdogs.train.contract import claim, model_config, model_kwargs
from catsdogs.train.ddp import all_reduce_sum, check_replicas
from catsdogs.train.ema import EMA
from catsdogs.train.names import OPTIMIZERS
from catsdogs.train.rng import rng_state, set_rng_state
from catsdogs.train.schedule import lr_at
from catsdogs.train.stream import split_stream
from catsdogs.train.tracking import finish_training_run, log_epoch, open_training_run

AUGMENT_MAX_SHIFT = 4
"""Largest random translation in pixels (6% of a 64 px image), reflect-padded."""
AUGMENT_SEED_OFFSET = 7919
"""Added to --seed for the augmentation generator so it is independent of weight init."""


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Build the optimiser named by ``--optimizer``.

    Adam/AdamW use the fused kernel (one pass over each tensor instead of ~10 elementwise ops):
    measured ~1-2% faster steps for the seed CNN on CPU, and it is deterministic like the loop version.
    """
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
                for p in params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")


@dataclass
class Progress:
    """Training position and bookkeeping saved in ``last.pt`` (all plain numbers)."""

    epoch: int = 0
    """Completed epochs; also the 0-based index of the epoch in progress."""
    batches: int = 0
    """Batches consumed in the epoch in progress."""
    step: int = 0
    """Optimiser steps taken in total."""
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    """Wall time spent in the epoch in progress before the checkpoint."""
    best_val_loss: float = math.inf
    best_val_acc: float = float("nan")
    best_epoch: int = 0
    bad_epochs: int = 0
    """Epochs since the val loss last improved (early stopping)."""
    lr: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    """Holds the model, optimiser, streams and run state of one training process."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> None:
        self.run = RunDir(Path(need(cfg, "output")))
        self.out = self.run.root
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        cfg, resume_state = self._resume_state(cfg)
        require(cfg, "data")  # after the merge: a resumed run may take --data from its checkpoint
        self.cfg = cfg
        self.device = setup(cfg.threads, cfg.device, cfg.seed)
        # Remote shards (s3a://, hdfs://) are streamed from a verified local copy.
        self.data = local_shards(need(cfg, "data"), cfg.cache_dir, quiet=not self.is_main)
        self.manifest: Manifest = load_manifest(self.data)
        m = self.manifest
        self.num_classes = len(m.classes)
        self.mean, self.std = input_normalization(cfg.model, tuple(m.mean), tuple(m.std))
        self.train_ds = split_stream(self.data, m, "train", cfg.batch_size, shuffle=True, seed=cfg.seed,
                                     buffer_rows=cfg.buffer_rows, rank=rank, world_size=world_size,
                                     num_workers=cfg.workers)
        self.val_ds = split_stream(self.data, m, "val", cfg.batch_size, shuffle=False, rank=rank,
                                   world_size=world_size, num_workers=cfg.workers)
        self.model_config = model_config(cfg, self.num_classes, m.size)
        model = create_model(cfg.model, self.num_classes, m.size, **model_kwargs(cfg))
        # channels_last: the fast layout for CPU (oneDNN) and CUDA (tensor core) convolutions.
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.train_model: nn.Module = self.model
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.train_model = nn.parallel.DistributedDataParallel(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, params)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.eval_model = self.model
        if self.ema is not None:
            self.eval_model = copy.deepcopy(self.model)  # holds the EMA weights for validation
        # One augmentation stream per rank: ranks see different images, they should not share flips.
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + AUGMENT_SEED_OFFSET + 1_000_003 * rank)
        self.steps_per_epoch = [self.train_ds.batches_in_epoch(e) for e in range(cfg.epochs)]
        self.total_steps = sum(self.steps_per_epoch)
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch[0])
        self.amp = cfg.amp and self.device.type == "cuda"
        self.p = Progress(lr=self.lr(0))
        self.on_epoch: Callable[[dict[str, float | int]], None] | None = None
        """Called with each epoch's metrics row (``catsdogs tune`` reports to Optuna and may prune)."""
        if resume_state is not None:
            self.load_state_dict(resume_state)

    # ------------------------------------------------------------------ state in/out
    def _resume_state(self, cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
        """Apply the run-folder contract; return the config and ``last.pt``'s state when resuming."""
        cfg, state = claim(cfg, self.is_main)
        if state is not None and ("progress" not in state or "optimizer" not in state):
            raise CheckpointError(f"{str(self.run.last)!r} was not written by a resumable 'catsdogs train' "
                                  f"run; choose a new --output")
        return cfg, state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs beyond ``best.pt``'s keys: optimiser, EMA, RNG and progress.

        The one resume contract (as mosaicml/streaming's): :meth:`load_state_dict` takes exactly this.
        """
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(self.aug_gen),
            "step": self.p.step,  # also in progress; said at the top for people reading last.pt
            "progress": dataclasses.asdict(self.p),
        }
        if self.ema is not None:
            state["raw_model_state"] = self.model.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load weights, optimiser, EMA, progress and RNG states from a ``last.pt`` dict."""
        raw = state.get("raw_model_state", state[ckpt.CKPT_MODEL_STATE])
        self.model.load_state_dict(raw, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state.get("ema_state") is None:
                raise CheckpointError("--resume: the run was trained without --ema; drop --ema")
            self.ema.load_state_dict(state["ema_state"])
        known = {f.name for f in dataclasses.fields(Progress)}
        self.p = Progress(**{k: v for k, v in state["progress"].items() if k in known})
        set_rng_state(state["rng"], self.aug_gen)

    def lr(self, step: int) -> float:
        """Learning rate of optimiser step ``step``."""
        return lr_at(step, kind=self.cfg.schedule, base_lr=self.cfg.lr, total_steps=self.total_steps,
                     warmup_steps=self.warmup_steps)

    def _deploy_state(self) -> dict[str, torch.Tensor]:
        """Weights evaluated and served: the EMA when enabled, else the trained ones."""
        return self.ema.state if self.ema is not None else self.model.state_dict()

    def checkpoint(self, last: bool) -> dict[str, Any]:
        """Build a checkpoint dict (``last`` adds everything needed to resume)."""
        state = build_checkpoint(
            model_state=self._deploy_state(), model_config=self.model_config,
            classes=self.manifest.classes, mean=self.mean, std=self.std, size=self.manifest.size,
            resize=self.manifest.resize, train_config=to_dict(self.cfg), epoch=self.p.epoch,
            metrics=self.p.metrics)
        if last:
            state.update(self.state_dict())
        return state

    def save_last(self) -> None:
        if self.is_main:
            save_checkpoint(self.run.last, self.checkpoint(last=True))

    def save_best(self) -> None:
        if self.is_main:
            save_checkpoint(self.run.best, self.checkpoint(last=False))

    # ------------------------------------------------------------------ steps
    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.train_ds.load_state_dict({"epoch": epoch, "batches": self.p.batches})
        yield from self.train_ds.loader(pin_memory=self.device.type == "cuda")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One optimiser step on a uint8 NHWC batch; return (summed loss, correct predictions)."""
        cfg = self.cfg
        if cfg.augment:
            x = augment_batch(x, self.aug_gen, max_shift=AUGMENT_MAX_SHIFT)
        xb = normalize(x, self.mean, self.std).to(self.device, non_blocking=True)
        yb = y.to(self.device, non_blocking=True)
        lr = self.lr(self.p.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.p.lr = lr
        self.train_model.train()
        with self._autocast():
            logits = self.train_model(xb)
        loss = loss_fn(logits, yb, cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        n = len(yb)
        return float(loss.detach()) * n, int((predictions(logits.detach()) == yb).sum())

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Return (val loss, val accuracy) of the deployed weights, flip-averaged with ``--tta``."""
        model = self.eval_model
        if self.ema is not None:
            self.ema.copy_to(model)
        model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in self.val_ds.loader(pin_memory=self.device.type == "cuda"):
            xb = normalize(x, self.mean, self.std).to(self.device, non_blocking=True)
            yb = y.to(self.device, non_blocking=True)
            with self._autocast():
                lp = log_probs(model(xb))
                if self.cfg.tta:
                    lp = torch.logaddexp(lp, log_probs(model(hflip(xb)))) - math.log(2.0)
            loss_sum += float(-lp.gather(1, yb[:, None]).sum())
            correct += int((lp.argmax(1) == yb).sum())
            seen += len(yb)
        loss_sum, correct_f, seen_f = all_reduce_sum([loss_sum, float(correct), float(seen)], self.device)
        return loss_sum / max(seen_f, 1.0), correct_f / max(seen_f, 1.0)

    # ------------------------------------------------------------------ loop
    def fit(self) -> Progress:
        """Train until ``--epochs``, ``--max-steps`` or early stopping; return the final progress."""
        cfg, p = self.cfg, self.p
        metrics = MetricsLog(self.run.metrics)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run.config)
            metrics.start(keep_epochs=p.epoch if cfg.resume else None)
        stop = ""
        if cfg.patience and p.bad_epochs >= cfg.patience:
            stop = "early stopping"
        if cfg.max_steps and p.step >= cfg.max_steps:
            stop = "max steps"
        while p.epoch < cfg.epochs and not stop:
            e = p.epoch
            t0 = time.perf_counter() - p.seconds
            stop, t_session, seen_session = self._train_epoch(e, t0)
            partial = p.batches < self.steps_per_epoch[e]
            if partial:
                # --max-steps inside an epoch: save the position first, so --resume continues exactly
                # here; the row and best.pt below are for the user only and dropped/replaced on resume.
                p.seconds = time.perf_counter() - t0
                self.save_last()
            row = self._epoch_row(e, t0)
            if self.is_main:
                metrics.append(row)
                ips = seen_session / max(time.perf_counter() - t_session, 1e-9)
                print(f"epoch {e + 1}/{cfg.epochs} step {p.step}: train_loss {row['train_loss']:.4f} "
                      f"train_acc {row['train_acc']:.4f} val_loss {row['val_loss']:.4f} "
                      f"val_acc {row['val_acc']:.4f} lr {p.lr:.3g} {row['seconds']:.1f}s ({ips:.0f} img/s "
                      f"train)" + (" [partial epoch]" if partial else ""), flush=True)
            if self.on_epoch is not None:
                self.on_epoch(row)
            summary = {k: row[k] for k in ("val_loss", "val_acc", "train_loss", "train_acc", "step")}
            if partial:
                if not (self.run.best).is_file():
                    p.metrics = summary
                    self.save_best()
                break
            p.metrics = summary
            self._close_epoch(e, row["val_loss"], row["val_acc"])
            if cfg.patience and p.bad_epochs >= cfg.patience:
                stop = "early stopping"
        self.stop_reason = stop
        return p

    def _train_epoch(self, e: int, t0: float) -> tuple[str, float, int]:
        """Run epoch ``e``'s batches (from the saved position); return the stop reason, start and images."""
        cfg, p = self.cfg, self.p
        t_session, seen_session, stop = time.perf_counter(), 0, ""
        total = self.steps_per_epoch[e]
        bar = progress_bar(total=total, initial=p.batches, desc=f"epoch {e + 1}/{cfg.epochs}",
                           unit="batch", disable=not self.is_main, leave=False, file=sys.stderr)
        for x, y in self._batches(e):
            loss_sum, correct = self.train_step(x, y)
            p.loss_sum += loss_sum
            p.correct += correct
            p.seen += len(y)
            seen_session += len(y)
            p.batches += 1
            p.step += 1
            bar.update(1)
            if p.batches % 10 == 0 or p.batches == total:
                ips = seen_session / max(time.perf_counter() - t_session, 1e-9)
                bar.set_postfix(loss=f"{p.loss_sum / p.seen:.4f}", acc=f"{p.correct / p.seen:.3f}",
                                img_s=f"{ips:.0f}", refresh=False)
            if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0 and p.batches < total:
                p.seconds = time.perf_counter() - t0
                self.save_last()
            if cfg.max_steps and p.step >= cfg.max_steps:
                stop = "max steps"
                break
        bar.close()
        return stop, t_session, seen_session

    def _epoch_row(self, e: int, t0: float) -> dict[str, Any]:
        """Validate and return epoch ``e``'s metrics row (train figures summed over DDP ranks)."""
        p = self.p
        val_loss, val_acc = self.validate()
        # Summed over DDP ranks (each saw a disjoint part of the data); identity in one process.
        t_loss, t_correct, t_seen = all_reduce_sum([p.loss_sum, float(p.correct), float(p.seen)], self.device)
        return {"epoch": e + 1, "step": p.step, "train_loss": t_loss / max(t_seen, 1.0),
                "train_acc": t_correct / max(t_seen, 1.0), "val_loss": val_loss, "val_acc": val_acc,
                "lr": p.lr, "seconds": round(time.perf_counter() - t0, 3)}

    def _close_epoch(self, e: int, val_loss: float, val_acc: float) -> None:
        """Move to the next epoch: keep the best weights, count epochs without improvement, save last.pt."""
        p = self.p
        p.epoch, p.batches = e + 1, 0
        p.loss_sum, p.correct, p.seen, p.seconds = 0.0, 0, 0, 0.0
        if val_loss < p.best_val_loss:
            p.best_val_loss, p.best_val_acc, p.best_epoch, p.bad_epochs = val_loss, val_acc, e + 1, 0
            self.save_best()
        else:
            p.bad_epochs += 1
        self.save_last()


def train_worker(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> Progress:
    """Run the training loop as one of ``world_size`` processes (DDP wraps this); only rank 0 writes."""
    trainer = Trainer(cfg, rank, world_size)
    # Rank 0 alone talks to MLflow; a refused --output (Trainer above) never opens an MLflow run.
    # The resolved settings (a --resume takes --data and the rest from its checkpoint) are what is tracked.
    cfg = trainer.cfg
    tracked = open_training_run(cfg, trainer.manifest, trainer.data) if rank == 0 else TrackedRun()
    trainer.on_epoch = lambda row: log_epoch(tracked, row)
    start_epoch = trainer.p.epoch
    with ending(tracked):
        progress = trainer.fit()
        if world_size > 1:
            check_replicas(trainer.model)  # every rank must end with rank 0's weights
        if rank == 0 and trainer.run.best.is_file():
            add_confidence(trainer)  # before the model is logged: the logged best.pt carries the detector
        finish_training_run(tracked, cfg, {"best_val_loss": progress.best_val_loss,
                                           "best_val_acc": progress.best_val_acc,
                                           "best_epoch": progress.best_epoch, "epochs": progress.epoch},
                            log_model=progress.epoch > start_epoch or start_epoch == 0)
    if rank == 0:
        best = trainer.run.best
        why = f" (stopped: {trainer.stop_reason})" if trainer.stop_reason else ""
        if progress.best_epoch:
            print(f"best checkpoint: {best} (epoch {progress.best_epoch}, "
                  f"val_acc {progress.best_val_acc:.4f}, val_loss {progress.best_val_loss:.4f}){why}")
        else:
            print(f"best checkpoint: {best} (from a partial epoch; no full epoch finished yet){why}")
    return progress


def add_confidence(trainer: Trainer) -> None:
    """Fit the detector (train features) and temperature (val) with the best weights; add them to best.pt.

    One bounded feature pass (:data:`~catsdogs.train.confidence.TRAIN_FEATURE_ROWS` train rows) plus
    one over val, so every run, however trained, answers "unknown" and carries calibrated probabilities.
    """
    path = trainer.run.best
    state = load_checkpoint(path)
    model = build_from_checkpoint(state).to(trainer.device).to(memory_format=torch.channels_last)
    cfg, m = trainer.cfg, trainer.manifest
    args = (model, trainer.data, m)
    kw: dict[str, Any] = {"mean": trainer.mean, "std": trainer.std, "batch_size": cfg.batch_size,
                          "device": trainer.device}
    train_f, _train_z, train_y = feature_pass(*args, "train", max_rows=TRAIN_FEATURE_ROWS, **kw)
    val_f, val_z, val_y = feature_pass(*args, "val", **kw)
    entries, metrics = fit_confidence(cfg, trainer.num_classes, train_f, train_y, val_f, val_z, val_y)
    state.update(entries)
    state[ckpt.CKPT_METRICS] = {**state.get(ckpt.CKPT_METRICS, {}), **metrics}
    save_checkpoint(path, state)
