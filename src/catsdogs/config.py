"""Typed configuration for every command.

Each command has one dataclass. The string literal under each field is its documentation: the CLI
turns it into the flag's ``--help`` text, so flags, config files and docs never drift apart. Each
field's rules sit in its :func:`setting` next to it: the choices (imported from the module that
defines them), bounds, and what a required field is for. Cross-field rules are a class's
``check`` method. Resolution order: dataclass default < config file (``--config``, TOML or JSON) <
explicit flag. The resolved config is saved next to every output (``config.json``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from catsdogs import rundir, schema
from catsdogs.download.source import MAX_UNPACKED_BYTES
from catsdogs.errors import ConfigError
from catsdogs.io.atomic import atomic_write_text
from catsdogs.io.storage import SCHEMES, scheme_of
from catsdogs.models.registry import model_names
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS, RESIZE_POLICIES
from catsdogs.shards.writer import FORMATS
from catsdogs.train.schedule import SCHEDULES

C = TypeVar("C")

Choices = tuple[Any, ...] | Callable[[], tuple[Any, ...]] | str
"""A choice list, a function returning one, or ``"module:NAME"`` of one in a module that imports
torch (resolved only when a value is checked: importing torch costs ~1.7 s at every CLI start)."""

DEVICES = "catsdogs.runtime:DEVICES"
OPTIMIZERS = "catsdogs.train.loop:OPTIMIZERS"
FREEZE_MODES = "catsdogs.train.launch:FREEZE_MODES"
SERVE_BACKENDS = "catsdogs.serve.backends:BACKENDS"
LABELS_FROM = "catsdogs.preprocess.listing:LABELS_FROM"
"""By reference too: importing preprocess/ here would make every command (serve included) reach it."""


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            choices: Choices | None = None, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, required: str = "") -> Any:
    """Declare a config field with its rules: allowed values, bounds, and (if required) what it is for.

    ``required`` is the rest of the error sentence "--FLAG is required: ...", checked by
    :func:`check_required` where the command needs the value (not at parse time: ``--resume`` takes
    ``--data`` from the checkpoint, for example).
    """
    meta = {k: v for k, v in (("choices", choices), ("gt", gt), ("ge", ge), ("lt", lt), ("le", le),
                              ("required", required)) if v not in (None, "")}
    return field(default=default, default_factory=default_factory, metadata=meta)


@dataclass
class DownloadConfig:
    """Settings of ``catsdogs download``."""

    output: str = "data"
    """Folder to download into; the images appear in OUTPUT/PetImages once complete."""
    url: str = ""
    """URL of the zip archive (default: $CATSDOGS_DATA_URL, else Microsoft's official
    kagglecatsanddogs_5340.zip); needs --sha256."""
    sha256: str = ""
    """Expected sha256 of the archive at --url (default: $CATSDOGS_DATA_SHA256, else the official one's)."""
    archive_bytes: int = setting(0, ge=0)
    """Expected size in bytes of the archive at --url, checked before its sha256 (0: $CATSDOGS_DATA_SIZE,
    else unchecked; the official archive's size is known)."""
    keep_archive: bool = False
    """Keep the verified zip next to the images instead of deleting it after unpacking."""
    max_unpacked_bytes: int = setting(MAX_UNPACKED_BYTES, gt=0)
    """Refuse an archive whose members add up to more bytes than this (a zip bomb)."""


@dataclass
class PreprocessConfig:
    """Settings of ``catsdogs preprocess``."""

    input: str = setting("", required="no input folder given; set --input to a folder with one subfolder "
                                       "per class")
    """Folder with one subfolder per class, e.g. PetImages/ with Cat/ and Dog/, or a flat folder of
    <class>.<n>.jpg files like Kaggle's train/; a path, file://, s3a:// or hdfs:// URI."""
    labels_from: str = setting("auto", choices=LABELS_FROM)
    """Where each image's class comes from: folder (the class subfolder), name (the file name up to
    its first dot: cat.0.jpg is a cat) or auto (name when --input has no subfolder and every image
    in it is named <class>.<rest>, else folder)."""
    output: str = setting("", required="no output folder given (set --output)")
    """Folder to write the shards, files.csv and manifest.json into; a path or URI like --input."""
    size: int = setting(64, gt=0)
    """Side of the square output image in pixels."""
    resize: str = setting("stretch", choices=RESIZE_POLICIES)
    """Aspect policy: stretch (whole photo, squeezed), crop (centre square) or pad (letterbox)."""
    val_frac: float = setting(0.1, ge=0.0, lt=1.0)
    """Fraction of each class put in the validation split."""
    test_frac: float = setting(0.1, ge=0.0, lt=1.0)
    """Fraction of each class put in the test split."""
    seed: int = 1337
    """Seed of the split hash and of the row shuffle: same seed, same splits and shards."""
    shard_rows: int = setting(1500, gt=0)
    """Maximum rows per shard (about 14 shards for 18,000 images)."""
    format: str = setting("npy", choices=FORMATS)
    """Shard format: npy (X_part/y_part pairs) or parquet (pixels, label and split columns)."""
    master: str = "local[*]"
    """Spark master URL: local[*], spark://host:7077, yarn, k8s://..."""
    read_threads: int = setting(16, gt=0)
    """Concurrent file reads per Spark task for s3a:// or hdfs:// input, which wait on network round
    trips, not the CPU: with 20 ms added per request, 16 threads ran 3.8x faster than 1
    (docs/benchmarks/remote_storage.md). Local input is read by one thread."""
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, gt=0)
    """Images with more pixels than this are skipped as decompression bombs (Pillow's default)."""
    max_skip_frac: float = setting(0.5, ge=0.0, lt=1.0)
    """Fail (exit 2) when more than this fraction of candidate images cannot be decoded."""
    overwrite: bool = False
    """Replace an existing output folder (it is swapped in only once the new one is complete)."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings, key=value (config file or repeated --spark-conf)."""

    def check(self) -> None:
        """The splits must leave images for training."""
        if self.val_frac + self.test_frac >= 1.0:
            raise ConfigError(f"--val-frac + --test-frac must leave room for training, got "
                              f"{self.val_frac} + {self.test_frac}")


@dataclass
class TrainConfig:
    """Settings of ``catsdogs train``."""

    data: str = setting("", required="the shards folder written by catsdogs preprocess")
    """Shards folder written by ``catsdogs preprocess``: a path, or an s3a:// / hdfs:// URI."""
    cache_dir: str = ""
    """Local copy of remote --data, checked against the manifest's sha256 (default:
    $CATSDOGS_CACHE, else ~/.cache/catsdogs). Training streams from local disk, not the network."""
    out: str = setting("", required="the run folder for checkpoints and metrics")
    """Run folder for checkpoints, metrics.csv and config.json."""
    model: str = setting("seed", choices=model_names)
    """Model name: seed (the classic small CNN), cnn, effnet_lite0/1/2 or effnet_lite12."""
    epochs: int = setting(10, gt=0)
    """Number of passes over the training split."""
    batch_size: int = setting(64, gt=0)
    """Images per optimiser step."""
    lr: float = setting(1e-3, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = setting(0.0, ge=0.0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    optimizer: str = setting("adam", choices=OPTIMIZERS)
    """Optimiser: adam, adamw or sgd (Nesterov momentum 0.9)."""
    schedule: str = setting("constant", choices=SCHEDULES)
    """Learning-rate schedule: constant, cosine or onecycle."""
    warmup_epochs: float = setting(0.0, ge=0.0)
    """Linear warm-up length in epochs (cosine/onecycle)."""
    label_smoothing: float = setting(0.0, ge=0.0)
    """Label smoothing for the loss (0 disables)."""
    augment: bool = False
    """Random flips and small translations applied to training batches."""
    ema: float = setting(0.0, ge=0.0, lt=1.0)
    """Decay of an exponential moving average of the weights, evaluated instead of the raw ones."""
    width: int = 64
    """Base channel width of the from-scratch ``cnn`` model."""
    depth: int = 1
    """Residual blocks per stage of the from-scratch ``cnn`` model."""
    dropout: float = setting(0.5, ge=0.0, lt=1.0)
    """Dropout before the classifier head."""
    freeze: str = setting("none", choices=FREEZE_MODES)
    """Transfer learning: none (fine-tune all) or backbone (train the head only)."""
    tta: bool = False
    """Average predictions over horizontal flips when validating."""
    seed: int = 0
    """Seed of weights init, data order and augmentation."""
    threads: int = setting(0, ge=0)
    """Torch intra-op threads (0 = all cores)."""
    workers: int = setting(0, ge=0)
    """DataLoader worker processes (0 = load in the main process)."""
    buffer_rows: int = setting(4096, gt=0)
    """Rows in the shuffle buffer: bounds loader memory (plus one shard per worker)."""
    patience: int = setting(0, ge=0)
    """Stop when validation loss has not improved for this many epochs (0 = never)."""
    device: str = setting("auto", choices=DEVICES)
    """auto, cpu or cuda."""
    amp: bool = True
    """Mixed precision (bfloat16) on CUDA; ignored on CPU."""
    checkpoint_every: int = setting(0, ge=0)
    """Also write last.pt every N optimiser steps (0 = only at epoch ends)."""
    resume: bool = False
    """Continue the run in --out from its last.pt (optimizer, schedule, RNG and data order restored)."""
    distributed: int = setting(0, ge=0)
    """Train with N processes through Spark's TorchDistributor (0 = single process)."""
    master: str = "local[*]"
    """Spark master for --distributed: local[*] runs the N processes here, spark://... on executors."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings for --distributed, key=value (config file or repeated --spark-conf)."""
    max_steps: int = setting(0, ge=0)
    """Stop after this many optimiser steps in total (0 = no limit); for smoke tests."""


@dataclass
class EvaluateConfig:
    """Settings of ``catsdogs evaluate``."""

    run: str = setting("", required="the run folder written by 'catsdogs train'")
    """Run folder written by ``catsdogs train``."""
    data: str = ""
    """Shards folder to evaluate on (default: the run's own --data); a path or s3a:// / hdfs:// URI."""
    cache_dir: str = ""
    """Local copy of remote --data (default: $CATSDOGS_CACHE, else ~/.cache/catsdogs)."""
    split: str = setting("test", choices=schema.SPLITS)
    """Split to evaluate: test, val or train."""
    out: str = ""
    """Folder for the report (default: RUN/eval)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass. Activations grow with it: with 256, `make run` of effnet_lite12 at
    260 px peaked at 8 GB RSS; with 64 at 2.5 GB (docs/models.md)."""
    tta: bool = False
    """Average predictions over horizontal flips."""
    device: str = setting("auto", choices=DEVICES)
    """auto, cpu or cuda."""
    threads: int = setting(0, ge=0)
    """Torch intra-op threads (0 = all cores)."""
    checkpoint: str = rundir.BEST_CKPT
    """Checkpoint file name inside the run folder."""
    grid: int = setting(16, gt=0)
    """Number of most confidently wrong images shown in the grid."""


@dataclass
class PredictConfig:
    """Settings of ``catsdogs predict``."""

    paths: list[str] = field(default_factory=list)
    """Image files, folders (searched recursively) or glob patterns."""
    run: str = setting("", required="the run folder (or .pt checkpoint) with the trained model")
    """Run folder (or a .pt checkpoint) with the trained model."""
    output: str = ""
    """Write results here: .csv or .json (default: print CSV to stdout)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass."""
    tta: bool = False
    """Average predictions over horizontal flips."""
    device: str = setting("auto", choices=DEVICES)
    """auto, cpu or cuda."""
    threads: int = setting(0, ge=0)
    """Torch intra-op threads (0 = all cores)."""
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, gt=0)
    """Images with more pixels than this are rejected as decompression bombs."""


@dataclass
class ServeConfig:
    """Settings of ``catsdogs serve``."""

    run: str = setting("", required="the run folder (or .pt checkpoint) with the trained model")
    """Run folder (or a .pt checkpoint) with the trained model."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default so nothing is exposed by accident."""
    port: int = setting(8000, ge=1, le=65535)
    """TCP port."""
    backend: str = setting("torch", choices=SERVE_BACKENDS)
    """Inference backend: torch or onnx (onnxruntime)."""
    max_bytes: int = setting(10 * 1024 * 1024, gt=0)
    """Largest accepted upload in bytes (larger gets 413)."""
    max_pixels: int = setting(40_000_000, gt=0)
    """Images with more pixels are rejected (400): 40 MP admits usual camera and phone photos while
    capping a hostile PNG's decode memory per request (~0.5 GB; Pillow's 89 MP default allows ~1 GB)."""
    max_batch: int = setting(32, gt=0)
    """Largest micro-batch of concurrent requests run as one forward pass."""
    batch_wait_ms: float = setting(2.0, ge=0.0)
    """How long the batcher waits for more requests once one is queued, in milliseconds."""
    max_files: int = setting(64, gt=0)
    """Most files accepted by one /predict/batch request (more gets 413)."""
    workers: int = setting(0, ge=0)
    """Forward passes run in parallel (0 = torch on CPU: one per core, since its batch-1 forward barely
    uses a second core; onnx or CUDA: 1, since they parallelise one image well)."""
    threads: int = setting(0, ge=0)
    """Intra-op threads per forward worker (0 = cores / workers)."""
    tta: bool = False
    """Average predictions over horizontal flips."""


@dataclass
class ExportConfig:
    """Settings of ``catsdogs export``."""

    run: str = setting("", required="the run folder (or .pt checkpoint) to export")
    """Run folder (or a .pt checkpoint) to export."""
    format: str = setting("onnx", choices=tuple(rundir.EXPORT_NAMES))
    """onnx or torchscript."""
    output: str = ""
    """Output file (default: RUN/model.onnx or RUN/model.ts)."""


@dataclass
class RunConfig:
    """Settings of ``catsdogs run`` (preprocess, train, evaluate in one go)."""

    data: str = ""
    """Image folder with one subfolder per class (e.g. PetImages), or a flat folder of <class>.<n>.jpg
    files; without it, what to download."""
    out: str = setting("", required="the run folder to create (e.g. runs/latest)")
    """Run folder; shards go to OUT/shards unless --shards is given."""
    shards: str = ""
    """Shards folder (default OUT/shards); reused when made from the same input and settings."""
    model: str = setting("seed", choices=model_names)
    """Model name (see ``catsdogs train --help``)."""
    size: int = setting(64, gt=0)
    """Image side in pixels for preprocessing."""
    epochs: int = setting(10, gt=0)
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

    data: str = setting("", required="the shards folder written by catsdogs preprocess")
    """Shards folder written by ``catsdogs preprocess``."""
    out: str = setting("", required="the folder for best_config.json, study.csv and plots")
    """Folder for best_config.json, study.csv and plots."""
    model: str = setting("cnn", choices=model_names)
    """Model whose hyperparameters are searched."""
    minutes: float = setting(30.0, ge=0.0)
    """Total search budget in minutes."""
    trials: int = setting(50, gt=0)
    """Maximum number of trials."""
    epochs: int = setting(5, gt=0)
    """Epochs per trial (pruned early when hopeless)."""
    seed: int = 0
    """Seed of the sampler."""
    threads: int = setting(0, ge=0)
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
"""Settings that also take s3a://, s3:// and hdfs:// URIs (:mod:`catsdogs.io.storage`): the image folder
and the shards, the data that outgrows one machine. Runs and models stay on local disk."""


def local_path(value: str, flag_name: str, remote_ok: bool = False) -> str:
    """Turn a ``file://`` URI into a path; keep s3a:// and hdfs:// URIs where ``remote_ok``.

    Any other scheme is refused with a hint: storage that every node mounts works through its path.
    """
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


def _choices(spec: Choices) -> tuple[Any, ...]:
    """Resolve a field's choices (a tuple, a function, or a ``"module:NAME"`` reference)."""
    if isinstance(spec, str):
        module, name = spec.split(":")
        return tuple(getattr(importlib.import_module(module), name))
    return tuple(spec() if callable(spec) else spec)


def _interval(meta: dict[str, Any]) -> str:
    """Describe a field's bounds for an error message, e.g. ``[0, 1)`` or ``1..65535``."""
    lo, hi = meta.get("ge", meta.get("gt")), meta.get("le", meta.get("lt"))
    if lo is not None and hi is not None and "ge" in meta and "le" in meta:
        return f"in {lo}..{hi}"
    left = "[" if "ge" in meta else "("
    right = "]" if "le" in meta else ")"
    return f"in {left}{lo:g}, {hi:g}{right}"


def _bound_error(meta: dict[str, Any], value: float) -> str | None:
    """Return what is wrong with ``value`` under a field's bounds, or None when it is inside them."""
    ok = all((("gt" not in meta or value > meta["gt"]), ("ge" not in meta or value >= meta["ge"]),
              ("lt" not in meta or value < meta["lt"]), ("le" not in meta or value <= meta["le"])))
    if ok:
        return None
    if ("lt" in meta or "le" in meta) and ("gt" in meta or "ge" in meta):
        return f"must be {_interval(meta)}"
    if meta.get("gt") == 0:
        return "must be positive"
    if "ge" in meta:
        return f"must be >= {meta['ge']:g}"
    return f"must be > {meta['gt']:g}"


def validate(cfg: Any) -> None:
    """Check every field's declared choices and bounds, then the class's own ``check``."""
    for f in dataclasses.fields(cfg):
        meta, value = f.metadata, getattr(cfg, f.name)
        if "choices" in meta:
            choices = _choices(meta["choices"])
            if value not in choices:
                raise ConfigError(f"unknown {flag(f.name)} {value!r}: {flag(f.name)} must be one of "
                                  f"{', '.join(map(str, choices))}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            problem = _bound_error(dict(meta), value)
            if problem:
                raise ConfigError(f"{flag(f.name)} {problem}, got {value!r}")
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def require(cfg: Any, *names: str) -> None:
    """Raise :class:`ConfigError` "--FLAG is required: ..." for the first of ``names`` left empty."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(f"{flag(name)} is required: {fields[name].metadata.get('required', name)}")


def check_required(cfg: Any) -> None:
    """Apply :func:`require` to every field declared ``required`` in ``cfg``'s class."""
    require(cfg, *(f.name for f in dataclasses.fields(cfg) if f.metadata.get("required")))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as JSON next to an output, atomically."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
