"""What both trainers (the loop and the frozen-backbone head) share: the run-folder contract and the model.

The run folder ``--output``:

* without ``last.pt`` it is a new run (``--resume`` there says so and starts one, so re-running the
  same command after any crash is safe);
* with ``last.pt`` it is refused, unless ``--resume`` (continue it: settings not given are the run's,
  a given one must equal the run's unless it is harmless to change, :data:`RESUME_CHANGEABLE`) or
  ``--overwrite`` (what training and the later stages wrote there is deleted first, then a new run);
* both trainers write the resolved config as ``config.json`` and checkpoints whose ``model_config`` is
  :func:`model_config` of that config.

Flags that were typed (:func:`catsdogs.config.typed_names`) but cannot apply to the chosen way of
training are refused with one line naming the flag (:func:`check_applicable`); a config file may hold
every setting (a run's own config.json does), so its values are not held against the trainer.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from catsdogs.checkpoint import CKPT_TRAIN_CONFIG, load_checkpoint
from catsdogs.config import TrainConfig, flag, given_names, need, require, to_dict, typed_names
from catsdogs.errors import ConfigError, OutputExistsError
from catsdogs.rundir import RunDir
from catsdogs.train.names import FREEZE_BACKBONE

PER_INVOCATION = frozenset({"resume", "overwrite", "max_steps", "output", "tracking_uri", "experiment",
                            "register"})
"""Settings that belong to one command invocation and are never taken over from the checkpoint."""
RESUME_CHANGEABLE = frozenset({"master", "spark_conf", "epochs", "checkpoint_every", "workers", "threads",
                               "device", "patience", "amp"})
"""Settings a resumed run may change (others would silently make a different model)."""
LOOP_ONLY = frozenset({"epochs", "lr", "weight_decay", "optimizer", "schedule", "warmup_epochs",
                       "label_smoothing", "ema", "patience", "checkpoint_every", "max_steps", "workers",
                       "buffer_rows", "amp"})
"""Settings of the training loop that the frozen-backbone head has no use for (one feature pass, then a
logistic regression chosen on validation)."""
FROZEN_ONLY = frozenset({"backend", "calibration_images", "int8_max_drop"})
"""Settings of the frozen-backbone feature pass that the loop has no use for."""


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Model keyword arguments taken from the config (builders ignore the ones they do not use)."""
    return {"dropout": cfg.dropout, "width": cfg.width, "depth": cfg.depth}


def model_config(cfg: TrainConfig, num_classes: int, size: int) -> dict[str, Any]:
    """The checkpoint's ``model_config``: everything ``create_model`` needs to rebuild the model."""
    return {"name": cfg.model, "num_classes": num_classes, "size": size, **model_kwargs(cfg)}


def check_applicable(cfg: TrainConfig) -> None:
    """Refuse, in one line naming the flag, a typed setting that the chosen way of training cannot apply."""
    given = typed_names(cfg)
    if cfg.freeze == FREEZE_BACKBONE:
        # --distributed N is the feature pass as N Spark tasks here (train.frozen), not N loops.
        unused = sorted(given & LOOP_ONLY)
        if unused:
            raise ConfigError(f"{flag(unused[0])} does not apply with --freeze backbone (one feature pass, "
                              f"then a logistic head chosen on validation); drop {flag(unused[0])}")
    else:
        unused = sorted(given & FROZEN_ONLY)
        if unused:
            raise ConfigError(f"{flag(unused[0])} applies to the frozen-backbone feature pass only "
                              f"(--freeze backbone); drop {flag(unused[0])}")


def resolve_resume_config(cfg: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
    """Merge the command line with the config saved in ``last.pt`` for ``--resume``.

    A setting not given is taken from the checkpoint; one given must equal it unless it is harmless to
    change (:data:`RESUME_CHANGEABLE`): ``--lr 0.001`` on a run trained at 0.01 is refused, even though
    0.001 is the default.
    """
    given = given_names(cfg)
    merged = to_dict(cfg)
    for name, new in to_dict(cfg).items():
        if name in PER_INVOCATION or name not in saved:
            continue
        old = saved[name]
        if name == "data":
            if new and old and Path(new).resolve() != Path(old).resolve():
                raise ConfigError(f"--resume: the run was trained on --data {old!r}, not {new!r}; "
                                  f"drop --data or start a new --output")
            merged[name] = new or old
        elif name not in given:
            merged[name] = old
        elif new != old and name not in RESUME_CHANGEABLE:
            raise ConfigError(f"--resume: {flag(name)} was {old!r} in the run being resumed, now {new!r}; "
                              f"drop {flag(name)} or start a new --output")
    return TrainConfig(**merged, given=cfg.given)


def planned(cfg: TrainConfig) -> TrainConfig:
    """The config as a ``--resume`` will see it, from the run's saved config.json (no checkpoint load).

    For choosing the trainer and checking flags on the driver; the trainer itself merges with last.pt.
    """
    run = RunDir(Path(need(cfg, "output"))) if cfg.output else None
    if not cfg.resume or run is None or not run.last.is_file():
        return cfg
    saved = run.read_config()
    return resolve_resume_config(cfg, saved) if saved else cfg


def claim(cfg: TrainConfig, is_main: bool = True) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Apply the run-folder contract to ``--output``; return the config to train with and ``last.pt``'s state.

    The state is None for a new run. Only ``is_main`` (rank 0) prints or deletes anything.
    """
    require(cfg, "output")
    run = RunDir(Path(need(cfg, "output")))
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in --output and --overwrite replaces it: "
                          "pass one of them")
    if not run.last.is_file():
        if cfg.resume and is_main:
            print(f"catsdogs train: --resume: no {run.last} yet, starting a new run", file=sys.stderr)
        return cfg, None
    if cfg.overwrite:
        if is_main:
            run.clear_training()
            print(f"catsdogs train: --overwrite: replacing the run in {run.root}", file=sys.stderr)
        return dataclasses.replace(cfg, overwrite=False), None
    if not cfg.resume:
        raise OutputExistsError(f"run folder {str(run.root)!r} already has {run.last.name}; pass --resume to "
                                f"continue it, --overwrite to replace it, or choose a new --output")
    if is_main:  # half-written checkpoints of a killed save (io.atomic.atomic_open), never loaded
        for tmp in run.root.glob(".*.pt.*.tmp"):
            tmp.unlink(missing_ok=True)
    state = load_checkpoint(run.last)
    return resolve_resume_config(cfg, state[CKPT_TRAIN_CONFIG]), state
