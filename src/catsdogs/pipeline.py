"""``catsdogs run``: preprocess -> train -> evaluate in one go, reusing shards that are still valid.

Layout of ``--output`` (OUT is itself the run folder, so ``catsdogs evaluate/predict/serve --run OUT``
work on it directly)::

    OUT/shards/          shards + manifest.json (unless --shards points elsewhere)
    OUT/config.json      resolved TrainConfig, metrics.csv, best.pt, last.pt (written by train)
    OUT/run_config.json  the resolved RunConfig of this command
    OUT/eval/            metrics, plots and report.html (written by evaluate)

Re-running with the same ``--output`` is cheap and safe: shards made from the same input and settings
are reused, training resumes from ``OUT/last.pt`` (``catsdogs train --resume``: an interrupted run
continues, a finished one is kept as is; a larger ``--epochs`` trains on) and evaluation is redone.
Changing the preprocessing (size, input) or a training setting for an existing OUT is refused:
choose a new ``--output``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from catsdogs.config import (
    DownloadConfig,
    EvaluateConfig,
    PreprocessConfig,
    RunConfig,
    TrainConfig,
    build_config,
    check_required,
    given_names,
    need,
    read_config_file,
    save_config,
    typed_names,
)
from catsdogs.download.source import DATA_DIR
from catsdogs.errors import ConfigError, InputError, OutputExistsError, SchemaError
from catsdogs.preprocess.listing import scan_input
from catsdogs.presets import find_config, preset_names
from catsdogs.rundir import BEST_CKPT, LAST_CKPT, RunDir
from catsdogs.shards.manifest import load_manifest
from catsdogs.spark import is_local
from catsdogs.train.names import FREEZE_BACKBONE

CONTENT_KEYS: tuple[str, ...] = ("size", "resize", "val_frac", "test_frac", "seed", "shard_rows", "format",
                                 "max_pixels", "labels_from")
"""PreprocessConfig settings that change the shards' content; all must match to reuse shards."""

_DOWNLOADED = f"{DownloadConfig().output}/{DATA_DIR}"
DOWNLOAD_HELP = (
    f"run 'catsdogs download' (fetches and verifies Microsoft's \"Kaggle Cats and Dogs Dataset\" into "
    f"{_DOWNLOADED}, with Cat/ and Dog/ inside), then "
    f"'catsdogs run --data {_DOWNLOADED} --output runs/NAME'; "
    "'make run' does both. Your own photos: a folder with one subfolder per class, or a flat folder of "
    "<class>.<n>.jpg files (Kaggle's train/)"
)


def check_data(data: str) -> Path:
    """Return ``--data`` as an absolute path; a missing folder explains how to get the images."""
    if not data:
        raise InputError(f"no --data given: {DOWNLOAD_HELP}")
    path = Path(data).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise InputError(f"--data {data!r} {what}: {DOWNLOAD_HELP}")
    return path.resolve()


FORWARDED: dict[type, tuple[str, ...]] = {PreprocessConfig: ("size", "master"),
                                          TrainConfig: ("model", "epochs", "seed")}
"""RunConfig settings that are another command's (``setting(like=...)``), by that command's config."""


def forwarded(cfg: RunConfig, target: type, typed: bool) -> dict[str, Any]:
    """The run's given settings for ``target`` that were ``typed`` (flags), or set (its --config file).

    None is "not given": the stage's own default applies. Typed ones stay typed for the stage, so one
    that cannot apply there (``--epochs`` for a frozen backbone) is refused, not ignored.
    """
    names = typed_names(cfg) if typed else given_names(cfg) - typed_names(cfg)
    return {k: getattr(cfg, k) for k in FORWARDED[target] if getattr(cfg, k) is not None and k in names}


def preprocess_config(cfg: RunConfig, data: Path, shards: Path) -> PreprocessConfig:
    """Return the preprocessing settings of this run (defaults except input, output and the given ones)."""
    return build_config(PreprocessConfig, {"input": str(data), "output": str(shards),
                                           **forwarded(cfg, PreprocessConfig, typed=False)},
                        typed=forwarded(cfg, PreprocessConfig, typed=True))


def reuse_reason(shards: Path, wanted: PreprocessConfig) -> str | None:
    """Return None when ``shards`` can be reused for ``wanted``, else why they must be re-made."""
    if not shards.exists():
        return "no shards yet"
    try:
        manifest = load_manifest(shards)
    except SchemaError as exc:
        return str(exc)
    made = manifest.config
    wanted_input = Path(need(wanted, "input"))
    if not made.get("input") or Path(str(made["input"])).expanduser().resolve() != wanted_input:
        return f"they were made from input {made.get('input')!r}, not {wanted.input!r}"
    for key in CONTENT_KEYS:
        if made.get(key) != getattr(wanted, key):
            return f"they were made with {key}={made.get(key)!r}, this run wants {getattr(wanted, key)!r}"
    missing = [f for s in manifest.shards for f in s.files() if not (shards / f).is_file()]
    if missing:
        return f"shard file {missing[0]!r} is missing"
    # Same settings but a changed image folder (files added or removed) needs new shards too.
    listing = scan_input(need(wanted, "input"), wanted.labels_from)
    candidates = manifest.stats.get("candidates")
    if list(listing.classes) != list(manifest.classes) or candidates != len(listing.candidates):
        return (f"the input changed ({len(listing.candidates)} candidate images in classes "
                f"{listing.classes}, the shards were made from {candidates} in {manifest.classes})")
    return None


def cluster_master(cfg: RunConfig) -> dict[str, str]:
    """``{"master": ...}`` for train and evaluate when --master is a cluster, else nothing.

    Their forward passes then run there too; a local master keeps them in this process (as fast here,
    without a JVM).
    """
    return {} if cfg.master is None or is_local(cfg.master) else {"master": cfg.master}


def train_config(cfg: RunConfig, shards: Path, out: Path) -> TrainConfig:
    """Build the TrainConfig: defaults < --train-config file < the run's given --model/--epochs/--seed.

    A run setting that was given (typed, or in the run's --config) wins over the file whatever its
    value; one not given never overrides it (so a tuned ``epochs`` survives unless --epochs is given).
    """
    layers: list[dict[str, Any]] = []
    if cfg.train_config:
        path = find_config(cfg.train_config)
        if path is None:
            raise ConfigError(f"--train-config {cfg.train_config!r} does not exist and is no preset "
                              f"({', '.join(preset_names())}) (fix --train-config)")
        try:
            layers.append(read_config_file(path, "train"))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (fix --train-config)") from None
    layers.append(forwarded(cfg, TrainConfig, typed=False))
    layers.append({"data": str(shards), "output": str(out), "tracking_uri": cfg.tracking_uri,
                   "experiment": cfg.experiment, "register": cfg.register, **cluster_master(cfg)})
    try:
        return build_config(TrainConfig, *layers, typed=forwarded(cfg, TrainConfig, typed=True))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in --train-config {cfg.train_config!r})" if cfg.train_config
                          else str(exc)) from None


def main(cfg: RunConfig) -> int:
    """Run preprocess (or reuse its shards), train into OUT and evaluate into OUT/eval."""
    data = check_data(cfg.data or "")  # first: a missing download gets its help before any import
    check_required(cfg)
    # Lazy: the stages import torch and pyspark (~3 s), which a wrong --data should not wait for.
    from catsdogs.evaluate import command as evaluate
    from catsdogs.preprocess import command as preprocess
    from catsdogs.train import launch as train
    from catsdogs.train.contract import check_applicable

    out = Path(need(cfg, "output")).expanduser().resolve()
    shards = Path(cfg.shards).expanduser().resolve() if cfg.shards else out / "shards"
    pre_cfg = preprocess_config(cfg, data, shards)
    tr_cfg = train_config(cfg, shards, out)  # before any work: a bad file fails fast
    check_applicable(tr_cfg)  # likewise a flag that cannot apply (--epochs with a frozen backbone)
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out)
    save_config(cfg, run.run_config)

    reason = reuse_reason(shards, pre_cfg)
    resume = run.last.is_file()
    if reason is not None and resume and shards.exists():
        # The model in OUT was trained on the old shards: continuing it on new ones would mix data.
        raise OutputExistsError(f"run folder {str(out)!r} holds a model trained on shards that must be "
                                f"re-made ({reason}); choose a new --output")
    if reason is None:
        print(f"[1/3] preprocess: reusing shards in {shards} (same input and settings)", flush=True)
    else:
        print(f"[1/3] preprocess: making shards in {shards} ({reason})", flush=True)
        code = preprocess.main(dataclasses.replace(pre_cfg, overwrite=shards.exists()))
        if code:
            return code

    how = "a head on frozen features" if tr_cfg.freeze == FREEZE_BACKBONE else f"{tr_cfg.epochs} epochs"
    if resume:
        print(f"[2/3] train: resuming the run in {out} from {LAST_CKPT} ({how})", flush=True)
    else:
        print(f"[2/3] train: {tr_cfg.model}, {how}, into {out}", flush=True)
    # A frozen-backbone pass computes the test split's features too, with the engine it already
    # compiled, and caches them for the evaluation below (engines/feature_cache.py); training never
    # reads them.
    code = train.main(dataclasses.replace(tr_cfg, resume=resume), cache_splits=(EvaluateConfig().split,))
    if code:
        return code

    eval_out = run.eval_dir
    print(f"[3/3] evaluate: test split into {eval_out}", flush=True)
    ev_cfg = build_config(EvaluateConfig, {"run": str(out), "data": str(shards), "output": str(eval_out),
                                           "device": tr_cfg.device, "threads": tr_cfg.threads,
                                           "checkpoint": BEST_CKPT,  # TTA, reject, temperature: the run's own
                                           "tracking_uri": cfg.tracking_uri, "experiment": cfg.experiment,
                                           **cluster_master(cfg)})
    code = evaluate.main(ev_cfg)
    if code:
        return code
    print(f"done: open {run.report}\n"
          f"      serve the model with 'catsdogs serve --run {out}'", flush=True)
    return 0
