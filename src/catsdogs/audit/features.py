"""Everything the audit knows about each image, computed in one pass per split.

Every image of every split gets one row: its path (from ``files.csv``), split, label, location in the
shards, pooled backbone features (computed ONCE, by :func:`catsdogs.train.features.extract_features`),
a hash of its pixels and their spread (:func:`catsdogs.models.ood.pixel_spread`, the predictor's
flat-image measure). Every check in :mod:`catsdogs.audit` works on these
arrays; only the gallery goes back to the shards, for the few images it shows.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from catsdogs import checkpoint as ckpt
from catsdogs import schema
from catsdogs.audit.outliers import FEATURE_METHODS
from catsdogs.checkpoint import build_from_checkpoint, load_checkpoint
from catsdogs.cluster.work import FeatureWork
from catsdogs.engines.base import Engine
from catsdogs.engines.eager import TorchEngine
from catsdogs.engines.factory import EngineUnavailable, create_engine
from catsdogs.engines.names import TORCH
from catsdogs.errors import ConfigError, InputError
from catsdogs.models.factory import create_model
from catsdogs.models.ood import Detector, pixel_spread
from catsdogs.models.registry import input_normalization, pretrained_names
from catsdogs.rundir import RunDir, resolve_checkpoint
from catsdogs.shards.manifest import Manifest
from catsdogs.shards.reader import load_rows
from catsdogs.train.features import extract_features

log = logging.getLogger(__name__)

TINY_SIDE = 8
"""Side of the tiny-image duplicate descriptor (area-averaged pixels, 8 x 8 x 3 = 192 values): coarse
enough that re-encoding and resizing barely move it (docs/audit.md)."""

CROP_VARIANTS: tuple[float, ...] = (1.0, 0.9, 0.8)
"""Central crops (fraction of the side) whose tiny descriptors are also kept: a copy cropped to 90 %
matches the original's 0.9 crop far better than the original itself (0.88 -> 0.99 on generated images)."""

DEFAULT_BACKBONE = "effnet_lite0"
"""Backbone of the audit without ``--run``: EfficientNet-Lite0 ImageNet weights, the fastest
pretrained model here (one feature pass over 18,000 64 px images takes about a minute on 2 cores)."""

DEFAULT_SIDE = 180
"""Side (px) the ImageNet backbone sees when ``--size`` is 0, whatever the shards' size (resized in
torch). Measured on the 18,000 dev images (docs/audit.md): at the 64 px of ``preprocess``'s default
the K-fold heads were 82.9 % accurate and confident learning flagged 1,654 label errors, mostly clean;
at 180 px 93.2 % and 451, the top of them real faults, and 87 % of injected flips found instead of 74 %.
Fixed rather than "the shards' size" also bounds the time: 260 px shards (``make run``) cost the same
feature pass as 64 px ones."""


@dataclass
class AuditData:
    """One row per image of every split, in split then shard then row order."""

    classes: list[str]
    path: np.ndarray
    """``(n,)`` str: the file's path relative to the input folder, as in ``files.csv``."""
    split: np.ndarray
    """``(n,)`` str: train, val or test."""
    label: np.ndarray
    """``(n,)`` int64 given label."""
    shard: np.ndarray
    """``(n,)`` int: position of the image's shard among its split's shards."""
    row: np.ndarray
    """``(n,)`` int: row inside that shard."""
    features: np.ndarray
    """``(n, d)`` float32 pooled backbone features."""
    pixel_hash: np.ndarray
    """``(n,)`` str: sha1 of the stored pixels (equal hashes = identical images at the shards' size)."""
    pixel_std: np.ndarray
    """``(n,)`` float: largest per-channel standard deviation of the stored pixels (0..255 units),
    :func:`~catsdogs.models.ood.pixel_spread`."""
    tiny: np.ndarray
    """``(n, len(CROP_VARIANTS), 192)`` float32: the image (and its central crops) area-averaged to
    8 x 8 RGB, the near-duplicate descriptor."""
    backbone: str = DEFAULT_BACKBONE
    detector: Detector | None = None
    """The ``--run`` checkpoint's out-of-distribution detector, when it has one and the features were
    computed at the run's own size (so they live in the space it was fitted in)."""
    notes: tuple[str, ...] = ()
    """What the report should say about how the features were made (e.g. why a run's detector is
    not used)."""

    def __len__(self) -> int:
        return len(self.label)


def read_paths(root: Path, manifest: Manifest) -> dict[tuple[str, int, int], str]:
    """Return ``(split, shard index, row) -> path`` from ``files.csv`` (empty when the file is absent)."""
    path = root / schema.FILES_CSV_NAME
    if not path.is_file():
        return {}
    out: dict[tuple[str, int, int], str] = {}
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            out[(rec["split"], int(rec["shard"]), int(rec["row"]))] = rec["path"]
    return out


@dataclass
class Backbone:
    """The model whose pooled features the audit uses, how to feed it, and the run's detector."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    side: int
    name: str
    """For the report, e.g. "effnet_lite0 (ImageNet) at 180 px"."""
    detector: Detector | None = None
    note: str = ""
    engine: Engine | None = None
    """The engine the run's training features came from (its kNN bank holds them); None: torch."""
    config: dict[str, Any] = field(default_factory=dict)
    """The model's ``create_model`` arguments (how Spark executors rebuild it for a torch pass)."""


def load_backbone(run: str | None, manifest: Manifest, size: int | None = None) -> Backbone:
    """Return the feature model, its input mean/std and side, a name for the report and its detector.

    Without ``run``: EfficientNet-Lite0 with ImageNet weights at :data:`DEFAULT_SIDE`. With ``run``: the
    trained run's model (any model with a ``features`` method, i.e. the EfficientNet-Lite family) at
    the size it was trained at, and its out-of-distribution detector (only at that size: elsewhere
    the features move and its threshold no longer holds). A given ``size`` overrides either side.
    """
    if not run:
        side = size or DEFAULT_SIDE
        model = create_model(DEFAULT_BACKBONE, len(manifest.classes), side, pretrained=True)
        mean, std = input_normalization(DEFAULT_BACKBONE, tuple(manifest.mean), tuple(manifest.std))
        return Backbone(model, mean, std, side, f"{DEFAULT_BACKBONE} (ImageNet) at {side} px",
                        config={"name": DEFAULT_BACKBONE, "num_classes": len(manifest.classes), "size": side})
    path = resolve_checkpoint(run)
    state = load_checkpoint(path)
    model = build_from_checkpoint(state)
    name = str(state[ckpt.CKPT_MODEL_CONFIG].get("name"))
    # The audit compares pooled ImageNet-style backbone features (the EfficientNet-Lite family); the
    # from-scratch CNNs' head inputs are not such features, so they are refused.
    if name not in pretrained_names():
        raise ConfigError(f"--run {run!r} holds a {name!r} model, which has no pooled features; "
                          "use a run of an effnet_lite model or leave --run out")
    if list(state[ckpt.CKPT_CLASSES]) != list(manifest.classes):
        raise ConfigError(f"--run {run!r} was trained on classes {state[ckpt.CKPT_CLASSES]}, the shards "
                          f"hold {manifest.classes} (fix --run or --data)")
    norm = state[ckpt.CKPT_NORM]
    trained = int(state[ckpt.CKPT_IMAGE]["size"])
    side = size or trained
    detector, note = None, ""
    if ckpt.CKPT_OOD not in state:
        note = f"{path} has no out-of-distribution detector: one is fitted here."
    elif side != trained:
        note = (f"--size {side} is not the run's {trained} px, where its detector was fitted: one is "
                "fitted here on these features instead.")
    else:
        detector = Detector.from_state(state[ckpt.CKPT_OOD])
        if detector.method not in FEATURE_METHODS:
            note = (f"the run's {detector.method} detector scores the head's logits, not features: a "
                    "detector is fitted here on the features instead.")
            detector = None
    engine = None
    recorded = str(state.get(ckpt.CKPT_ENGINE, TORCH))
    if detector is not None and recorded != TORCH:
        # The run's kNN bank holds features of its own engine: computing them the same way keeps a
        # training image's own bank entry recognisable (the leave-one-out) and the threshold valid.
        try:
            engine = create_engine(recorded, model, side, RunDir(path.parent))
        except (EngineUnavailable, OSError) as exc:
            note = (f"the run's training features came from {recorded}, which cannot run here ({exc}); "
                    "torch fp32 features are compared with its detector instead.")
    return Backbone(model, tuple(norm["mean"]), tuple(norm["std"]), side, f"{name} ({path}) at {side} px",
                    detector, note, engine, dict(state[ckpt.CKPT_MODEL_CONFIG]))


def tiny_images(x: np.ndarray) -> np.ndarray:
    """Return tiny descriptors ``(n, len(CROP_VARIANTS), TINY_SIDE**2 * 3)`` float32 of uint8 NHWC images.

    Each variant is a central crop (:data:`CROP_VARIANTS`) area-averaged to ``TINY_SIDE`` square.
    """
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    side = t.shape[-1]
    out = []
    for keep in CROP_VARIANTS:
        a = (side - max(TINY_SIDE, round(side * keep))) // 2
        crop = t[:, :, a:side - a, a:side - a]
        out.append(F.adaptive_avg_pool2d(crop, TINY_SIDE).permute(0, 2, 3, 1).reshape(len(x), -1))
    return torch.stack(out, 1).numpy()


def pixel_facts(x: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-image sha1 of the stored pixels, their spread and tiny descriptors, of a uint8 NHWC batch."""
    hashes = [hashlib.sha1(x[i].tobytes(), usedforsecurity=False).hexdigest() for i in range(len(x))]
    return hashes, pixel_spread(x), tiny_images(x)


@dataclass(frozen=True)
class AuditWork(FeatureWork):
    """The feature pass plus :func:`pixel_facts`, in one Spark task per shard (``audit --master``)."""

    def __call__(self, x: np.ndarray, y: np.ndarray, split: str) -> dict[str, np.ndarray]:
        out = super().__call__(x, y, split)
        hashes, stds, tiny = pixel_facts(x)
        out.update({"hash": np.array(hashes, dtype=object), "std": np.asarray(stds, np.float64),
                    "tiny": tiny})
        return out


class _PixelFacts:
    """Per-image pixel hash, pixel std, tiny descriptor, label, shard position and row, batch by batch.

    Fed by the local feature pass as it reads each batch (``extract_features(each_batch=...)``), so the
    shards are read once for both.
    """

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.stds: list[float] = []
        self.tiny: list[np.ndarray] = []
        self.labels: list[int] = []
        self.shards: list[int] = []
        self.rows: list[int] = []

    def add(self, pos: int, start: int, x: np.ndarray, y: np.ndarray) -> None:
        h, spread, small = pixel_facts(x)
        self.hashes.extend(h)
        self.stds.extend(spread.tolist())
        self.tiny.append(small)
        self.labels.extend(y.tolist())
        self.shards.extend([pos] * len(y))
        self.rows.extend(range(start, start + len(y)))

    def lists(self) -> tuple[list[str], list[float], list[np.ndarray], list[int], list[int], list[int]]:
        return self.hashes, self.stds, self.tiny, self.labels, self.shards, self.rows


def _spark_pass(root: Path, manifest: Manifest, bb: Backbone, batch_size: int, master: str,
                spark_conf: dict[str, str] | None, threads: int | None
                ) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[list, list, list, list, list, list]]]:
    """Features and pixel facts of every split in one Spark job (``audit --master``).

    Per split: the features, labels and :class:`_PixelFacts`' lists, as the local pass returns them.
    """
    from catsdogs.cluster.session import NEEDED, runtime_modules, spark_session  # lazy: pyspark
    from catsdogs.cluster.shardjob import in_shard_order, run_shards
    from catsdogs.cluster.ship import Shipment

    engine = bb.engine or TorchEngine(bb.model)
    splits = tuple(s for s in schema.SPLITS if manifest.split_rows(s))
    modules = NEEDED + runtime_modules(engine.name)
    with spark_session(master, "catsdogs-audit", spark_conf, modules) as spark, \
            Shipment(spark.sparkContext) as shipment:
        work = AuditWork(shipment.engine(engine, bb.model, bb.config, threads), bb.mean, bb.std, size=bb.side)
        results, _ = run_shards(spark, master, str(root.resolve()), manifest, splits, work,
                                batch_size=batch_size, desc=f"audit features ({engine.name})")
    out = {}
    for split in splits:
        parts = in_shard_order(results, split, len(manifest.split_shards(split)))
        y = np.concatenate([r["labels"] for r in parts])
        lists = ([h for r in parts for h in r["hash"].tolist()], [float(v) for r in parts for v in r["std"]],
                 [r["tiny"] for r in parts], y.tolist(),
                 [pos for pos, r in enumerate(parts) for _ in range(len(r["labels"]))],
                 [i for r in parts for i in range(len(r["labels"]))])
        out[split] = (np.concatenate([r["features"] for r in parts]), y, lists)
    return out


def compute(root: Path, manifest: Manifest, run: str | None = None, batch_size: int = 64,
            progress: bool = True, size: int | None = None, master: str | None = None,
            spark_conf: dict[str, str] | None = None, threads: int | None = None) -> AuditData:
    """Compute the audit rows of every split: features once per image, pixel hash and std.

    With ``master`` both passes run as one Spark job on it, one task per shard.
    """
    bb = load_backbone(run, manifest, size)
    model = bb.model.to(memory_format=torch.channels_last)
    paths = read_paths(root, manifest)
    if not paths:
        log.warning("%s has no %s: images are named split/shard/row", root, schema.FILES_CSV_NAME)
    cols: dict[str, list] = {k: [] for k in ("path", "split", "label", "shard", "row", "hash", "std",
                                                 "tiny")}
    feats: list[np.ndarray] = []
    on_spark = _spark_pass(root, manifest, bb, batch_size, master, spark_conf, threads) if master else {}
    for split in schema.SPLITS:
        if manifest.split_rows(split) == 0:
            continue
        if master:
            f, y, (hashes, stds, tiny, labels, shards, rows) = on_spark[split]
        else:
            t0, facts = time.perf_counter(), _PixelFacts()
            f, y = extract_features(model, root, manifest, split, bb.mean, bb.std, batch_size,
                                    progress=progress, size=bb.side, engine=bb.engine, each_batch=facts.add)
            log.info("features and pixel facts %s: %d images in %.1f s", split, len(y),
                     time.perf_counter() - t0)
            hashes, stds, tiny, labels, shards, rows = facts.lists()
        if labels != y.tolist():
            raise InputError(f"shards of split {split!r} changed while being read (fix --data)")
        index = [info.index for info in manifest.split_shards(split)]
        for pos, row in zip(shards, rows, strict=True):
            key = (split, index[pos], row)
            cols["path"].append(paths.get(key, f"{split}/{index[pos]}/{row}"))
        cols["split"] += [split] * len(y)
        cols["label"] += labels
        cols["shard"] += shards
        cols["row"] += rows
        cols["hash"] += hashes
        cols["std"] += stds
        cols["tiny"] += tiny
        feats.append(f)
    if not feats:
        raise InputError(f"shards {str(root)!r} hold no images (fix --data)")
    return AuditData(classes=list(manifest.classes), path=np.array(cols["path"], dtype=object),
                     split=np.array(cols["split"], dtype=object),
                     label=np.array(cols["label"], dtype=np.int64),
                     shard=np.array(cols["shard"], dtype=np.int64), row=np.array(cols["row"], dtype=np.int64),
                     features=np.concatenate(feats).astype(np.float32),
                     pixel_hash=np.array(cols["hash"], dtype=object),
                     pixel_std=np.array(cols["std"], dtype=np.float64),
                     tiny=np.concatenate(cols["tiny"]).astype(np.float32), backbone=bb.name,
                     detector=bb.detector, notes=(bb.note,) if bb.note else ())


def images(root: Path, manifest: Manifest, data: AuditData, idx: np.ndarray) -> np.ndarray:
    """Return the stored pixels ``(len(idx), size, size, 3)`` uint8 of the images at ``idx``."""
    out = np.zeros((len(idx), manifest.size, manifest.size, 3), dtype=np.uint8)
    for split in schema.SPLITS:
        sel = np.nonzero(data.split[idx] == split)[0]
        if len(sel):
            rows = idx[sel]
            out[sel] = load_rows(root, manifest, split, data.shard[rows], data.row[rows])
    return out
