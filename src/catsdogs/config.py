"""Typed configuration for every command.

Each command has one dataclass. The string literal under each field is its documentation: the CLI
turns it into the flag's ``--help`` text, so flags, config files and docs never drift apart.
Resolution order: dataclass default < config file (``--config``, TOML or JSON) < explicit flag.
The resolved config is saved next to every output (``config.json``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from catsdogs.errors import ConfigError

C = TypeVar("C")


@dataclass
class PreprocessConfig:
    """Settings of ``catsdogs preprocess``."""

    input: str = ""
    """Folder with one subfolder per class, e.g. PetImages/ with Cat/ and Dog/; a path, file://,
    s3a:// or hdfs:// URI."""
    output: str = ""
    """Folder to write the shards, files.csv and manifest.json into; a path or URI like --input."""
    size: int = 64
    """Side of the square output image in pixels."""
    resize: str = "stretch"
    """Aspect policy: stretch (whole photo, squeezed), crop (centre square) or pad (letterbox)."""
    val_frac: float = 0.1
    """Fraction of each class put in the validation split."""
    test_frac: float = 0.1
    """Fraction of each class put in the test split."""
    seed: int = 1337
    """Seed of the split hash and of the row shuffle: same seed, same splits and shards."""
    shard_rows: int = 1500
    """Maximum rows per shard (about 14 shards for 18,000 images)."""
    format: str = "npy"
    """Shard format: npy (X_part/y_part pairs) or parquet (pixels, label and split columns)."""
    master: str = "local[*]"
    """Spark master URL: local[*], spark://host:7077, yarn, k8s://..."""
    read_threads: int = 16
    """Concurrent file reads per Spark task for s3a:// or hdfs:// input, which wait on network round
    trips, not the CPU: with 20 ms added per request, 16 threads ran 3.8x faster than 1
    (docs/benchmarks/remote_storage.md). Local input is read by one thread."""
    max_pixels: int = 89_478_485
    """Images with more pixels than this are skipped as decompression bombs (Pillow's default)."""
    max_skip_frac: float = 0.5
    """Fail (exit 2) when more than this fraction of candidate images cannot be decoded."""
    overwrite: bool = False
    """Replace an existing output folder (it is swapped in only once the new one is complete)."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings, key=value (config file or repeated --spark-conf)."""


@dataclass
class TrainConfig:
    """Settings of ``catsdogs train``."""

    data: str = ""
    """Shards folder written by ``catsdogs preprocess``: a path, or an s3a:// / hdfs:// URI."""
    cache_dir: str = ""
    """Local copy of remote --data, checked against the manifest's sha256 (default:
    $CATSDOGS_CACHE, else ~/.cache/catsdogs). Training streams from local disk, not the network."""
    out: str = ""
    """Run folder for checkpoints, metrics.csv and config.json."""
    model: str = "seed"
    """Model name: seed, cnn, effnet_lite0, effnet_lite1, effnet_lite2."""
    epochs: int = 10
    """Number of passes over the training split."""
    batch_size: int = 64
    """Images per optimiser step."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    optimizer: str = "adam"
    """Optimiser: adam, adamw or sgd (Nesterov momentum 0.9)."""
    schedule: str = "constant"
    """Learning-rate schedule: constant, cosine or onecycle."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (cosine/onecycle)."""
    label_smoothing: float = 0.0
    """Label smoothing for the loss (0 disables)."""
    augment: bool = False
    """Random flips and small translations applied to training batches."""
    ema: float = 0.0
    """Decay of an exponential moving average of the weights, evaluated instead of the raw ones."""
    width: int = 64
    """Base channel width of the from-scratch ``cnn`` model."""
    depth: int = 1
    """Residual blocks per stage of the from-scratch ``cnn`` model."""
    dropout: float = 0.5
    """Dropout before the classifier head."""
    freeze: str = "none"
    """Transfer learning: none (fine-tune all) or backbone (train the head only)."""
    tta: bool = False
    """Average predictions over horizontal flips when validating."""
    seed: int = 0
    """Seed of weights init, data order and augmentation."""
    threads: int = 0
    """Torch intra-op threads (0 = all cores)."""
    workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""
    buffer_rows: int = 4096
    """Rows in the shuffle buffer: bounds loader memory (plus one shard per worker)."""
    patience: int = 0
    """Stop when validation loss has not improved for this many epochs (0 = never)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    amp: bool = True
    """Mixed precision (bfloat16) on CUDA; ignored on CPU."""
    checkpoint_every: int = 0
    """Also write last.pt every N optimiser steps (0 = only at epoch ends)."""
    resume: bool = False
    """Continue the run in --out from its last.pt (optimizer, schedule, RNG and data order restored)."""
    distributed: int = 0
    """Train with N processes through Spark's TorchDistributor (0 = single process)."""
    master: str = "local[*]"
    """Spark master for --distributed: local[*] runs the N processes here, spark://... on executors."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings for --distributed, key=value (config file or repeated --spark-conf)."""
    max_steps: int = 0
    """Stop after this many optimiser steps in total (0 = no limit); for smoke tests."""


@dataclass
class EvaluateConfig:
    """Settings of ``catsdogs evaluate``."""

    run: str = ""
    """Run folder written by ``catsdogs train``."""
    data: str = ""
    """Shards folder to evaluate on (default: the run's own --data); a path or s3a:// / hdfs:// URI."""
    cache_dir: str = ""
    """Local copy of remote --data (default: $CATSDOGS_CACHE, else ~/.cache/catsdogs)."""
    split: str = "test"
    """Split to evaluate: test, val or train."""
    out: str = ""
    """Folder for the report (default: RUN/eval)."""
    batch_size: int = 64
    """Images per forward pass. Activations grow with it: with 256, `make run` of effnet_lite12 at
    260 px peaked at 8 GB RSS; with 64 at 2.5 GB (docs/models.md)."""
    tta: bool = False
    """Average predictions over horizontal flips."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """Torch intra-op threads (0 = all cores)."""
    checkpoint: str = "best.pt"
    """Checkpoint file name inside the run folder."""
    grid: int = 16
    """Number of most confidently wrong images shown in the grid."""


@dataclass
class PredictConfig:
    """Settings of ``catsdogs predict``."""

    paths: list[str] = field(default_factory=list)
    """Image files, folders (searched recursively) or glob patterns."""
    run: str = ""
    """Run folder (or a .pt checkpoint) with the trained model."""
    output: str = ""
    """Write results here: .csv or .json (default: print CSV to stdout)."""
    batch_size: int = 64
    """Images per forward pass."""
    tta: bool = False
    """Average predictions over horizontal flips."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int = 0
    """Torch intra-op threads (0 = all cores)."""
    max_pixels: int = 89_478_485
    """Images with more pixels than this are rejected as decompression bombs."""


@dataclass
class ServeConfig:
    """Settings of ``catsdogs serve``."""

    run: str = ""
    """Run folder (or a .pt checkpoint) with the trained model."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default so nothing is exposed by accident."""
    port: int = 8000
    """TCP port."""
    backend: str = "torch"
    """Inference backend: torch or onnx (onnxruntime)."""
    max_bytes: int = 10 * 1024 * 1024
    """Largest accepted upload in bytes (larger gets 413)."""
    max_pixels: int = 40_000_000
    """Images with more pixels are rejected (400): 40 MP admits usual camera and phone photos while
    capping a hostile PNG's decode memory per request (~0.5 GB; Pillow's 89 MP default allows ~1 GB)."""
    max_batch: int = 32
    """Largest micro-batch of concurrent requests run as one forward pass."""
    batch_wait_ms: float = 2.0
    """How long the batcher waits for more requests once one is queued, in milliseconds."""
    max_files: int = 64
    """Most files accepted by one /predict/batch request (more gets 413)."""
    workers: int = 0
    """Forward passes run in parallel (0 = torch on CPU: one per core, since its batch-1 forward barely
    uses a second core; onnx or CUDA: 1, since they parallelise one image well)."""
    threads: int = 0
    """Intra-op threads per forward worker (0 = cores / workers)."""
    tta: bool = False
    """Average predictions over horizontal flips."""


@dataclass
class ExportConfig:
    """Settings of ``catsdogs export``."""

    run: str = ""
    """Run folder (or a .pt checkpoint) to export."""
    format: str = "onnx"
    """onnx or torchscript."""
    output: str = ""
    """Output file (default: RUN/model.onnx or RUN/model.ts)."""


@dataclass
class RunConfig:
    """Settings of ``catsdogs run`` (preprocess, train, evaluate in one go)."""

    data: str = ""
    """Image folder with one subfolder per class (e.g. PetImages)."""
    out: str = ""
    """Run folder; shards go to OUT/shards unless --shards is given."""
    shards: str = ""
    """Shards folder (default OUT/shards); reused when made from the same input and settings."""
    model: str = "seed"
    """Model name (see ``catsdogs train --help``)."""
    size: int = 64
    """Image side in pixels for preprocessing."""
    epochs: int = 10
    """Training epochs."""
    train_config: str = ""
    """Optional TOML/JSON file with further train settings (e.g. written by ``catsdogs tune``)."""
    master: str = "local[*]"
    """Spark master URL for preprocessing."""
    seed: int = 0
    """Training seed."""


@dataclass
class TuneConfig:
    """Settings of ``catsdogs tune``."""

    data: str = ""
    """Shards folder written by ``catsdogs preprocess``."""
    out: str = ""
    """Folder for best_config.json, study.csv and plots."""
    model: str = "cnn"
    """Model whose hyperparameters are searched."""
    minutes: float = 30.0
    """Total search budget in minutes."""
    trials: int = 50
    """Maximum number of trials."""
    epochs: int = 5
    """Epochs per trial (pruned early when hopeless)."""
    seed: int = 0
    """Seed of the sampler."""
    threads: int = 0
    """Torch intra-op threads (0 = all cores)."""


def field_docs(cls: type) -> dict[str, str]:
    """Return each field's docstring (the string literal placed under it) for CLI help."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def flag(name: str) -> str:
    """Return the CLI flag spelling of a config field name."""
    return "--" + name.replace("_", "-")


def read_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML or JSON config file; take ``[section]`` when present, else the top level."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (fix --config)")
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a table/object of settings")
    if section and isinstance(data.get(section), dict):
        return dict(data[section])
    return data


def build_config(cls: type[C], *layers: dict[str, Any]) -> C:
    """Build ``cls`` from dict layers (later wins), rejecting unknown keys and wrong types."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in names:
                raise ConfigError(
                    f"unknown setting {key!r} for {cls.__name__}; known: {', '.join(sorted(names))}"
                )
            merged[key] = _coerce(key, value, names[key])
    cfg = cls(**merged)
    for key in PATH_FIELDS:
        value = getattr(cfg, key, None)
        if isinstance(value, str) and value:
            remote_ok = key in REMOTE_FIELDS.get(cls.__name__, ())
            setattr(cfg, key, local_path(value, flag(key), remote_ok))
    validate(cfg)
    return cfg


PATH_FIELDS = ("input", "output", "data", "out", "run", "shards", "train_config", "cache_dir")
"""Settings holding a folder or file; they accept plain paths and ``file://`` URIs."""

REMOTE_FIELDS: dict[str, tuple[str, ...]] = {
    "PreprocessConfig": ("input", "output"),
    "TrainConfig": ("data",),
    "EvaluateConfig": ("data",),
}
"""Settings that also take s3a://, s3:// and hdfs:// URIs (:mod:`catsdogs.storage`): the image folder
and the shards, the data that outgrows one machine. Runs and models stay on local disk."""


def local_path(value: str, flag_name: str, remote_ok: bool = False) -> str:
    """Turn a ``file://`` URI into a path; keep s3a:// and hdfs:// URIs where ``remote_ok``.

    Any other scheme is refused with a hint: storage that every node mounts works through its path.
    """
    from urllib.parse import unquote, urlparse

    from catsdogs.storage import SCHEMES, scheme_of

    if value.startswith("file:"):
        parsed = urlparse(value)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{flag_name} {value!r}: file:// URIs must name a local path "
                              f"(file:///abs/path), not host {parsed.netloc!r}")
        return unquote(parsed.path)
    scheme = scheme_of(value)
    if scheme in SCHEMES and remote_ok:
        return value
    if scheme and scheme.isalnum():
        where = ("only --input/--output of preprocess and --data of train and evaluate take "
                 "s3a:// or hdfs:// URIs" if scheme in SCHEMES else f"{scheme}:// is not supported")
        raise ConfigError(f"{flag_name} {value!r}: {where}; for other storage, mount it on every node "
                          f"and pass the mounted path or a file:// URI (see docs/cluster.md)")
    return value


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    """Coerce a config-file value to the field's type, with an error naming the flag."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "bool" and not isinstance(value, bool):
            if str(value).lower() in {"1", "true", "yes", "on"}:
                return True
            if str(value).lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if typ == "int" and not isinstance(value, bool):
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "str":
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(key)} expects {typ}, got {value!r}") from None
    return value


_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "PreprocessConfig": {"resize": ("stretch", "crop", "pad"), "format": ("npy", "parquet")},
    "TrainConfig": {
        "optimizer": ("adam", "adamw", "sgd"),
        "schedule": ("constant", "cosine", "onecycle"),
        "freeze": ("none", "backbone"),
        "device": ("auto", "cpu", "cuda"),
    },
    "EvaluateConfig": {"split": ("train", "val", "test"), "device": ("auto", "cpu", "cuda")},
    "PredictConfig": {"device": ("auto", "cpu", "cuda")},
    "ServeConfig": {"backend": ("torch", "onnx")},
    "ExportConfig": {"format": ("onnx", "torchscript")},
}


def validate(cfg: Any) -> None:
    """Check ranges and choices; raise :class:`ConfigError` naming the flag to fix."""
    for key, choices in _CHOICES.get(type(cfg).__name__, {}).items():
        value = getattr(cfg, key)
        if value not in choices:
            raise ConfigError(f"{flag(key)} must be one of {', '.join(choices)}, got {value!r}")
    positive = ("size", "shard_rows", "read_threads", "epochs", "batch_size", "buffer_rows", "max_pixels",
                "max_bytes", "max_batch", "max_files", "trials", "grid")
    for key in positive:
        if hasattr(cfg, key) and getattr(cfg, key) <= 0:
            raise ConfigError(f"{flag(key)} must be positive, got {getattr(cfg, key)!r}")
    non_negative = ("threads", "workers", "patience", "checkpoint_every", "distributed", "max_steps",
                    "weight_decay", "warmup_epochs", "label_smoothing", "ema", "minutes")
    for key in non_negative:
        if hasattr(cfg, key) and getattr(cfg, key) < 0:
            raise ConfigError(f"{flag(key)} must be >= 0, got {getattr(cfg, key)!r}")
    if isinstance(cfg, PreprocessConfig):
        for key in ("val_frac", "test_frac", "max_skip_frac"):
            if not 0.0 <= getattr(cfg, key) < 1.0:
                raise ConfigError(f"{flag(key)} must be in [0, 1), got {getattr(cfg, key)!r}")
        if cfg.val_frac + cfg.test_frac >= 1.0:
            raise ConfigError(
                f"--val-frac + --test-frac must leave room for training, got "
                f"{cfg.val_frac} + {cfg.test_frac}"
            )
    if isinstance(cfg, TrainConfig):
        if cfg.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {cfg.lr!r}")
        if not 0.0 <= cfg.ema < 1.0:
            raise ConfigError(f"--ema must be in [0, 1), got {cfg.ema!r}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout!r}")
    if isinstance(cfg, ServeConfig) and not 0 < cfg.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {cfg.port!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as JSON next to an output, atomically."""
    from catsdogs.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
