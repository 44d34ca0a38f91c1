"""Typed configuration for every command.

Each command has one dataclass. The string literal under each field is its documentation: the CLI
turns it into the flag's ``--help`` text (adding the choices and the default), so flags, config files
and docs never drift apart. Each field's rules sit in its :func:`setting` next to it: the choices
(imported from the light module that defines them), bounds, and what a required field is for.
Cross-field rules are a class's ``check`` method. Groups of settings that several commands share
(:class:`ComputeConfig`, :class:`EngineConfig`, :class:`InferenceConfig`, :class:`TrackingConfig`) are
declared once and inherited.

Resolution order: dataclass default < config file (``--config``, TOML or JSON; relative paths in it are
relative to the file's own folder) < explicit flag. :func:`build_config` also records which settings
were given at all (:attr:`Config.given`), so a later stage can tell "typed 0.001" from "left at the
default 0.001": a given value always wins over a checkpoint or a preset, and an untyped one never
overrides anything. A ``None`` default means "not given: take it from the run, the preset or the
stage" (as timm's ``resolve_data_config``). The resolved config is saved next to every output
(``config.json``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from catsdogs import rundir, schema
from catsdogs.devices import AUTO, DEVICES
from catsdogs.download.source import MAX_UNPACKED_BYTES
from catsdogs.engines.names import CALIBRATION_IMAGES, DEFAULT_ENGINE, ENGINES, MAX_DROP_PT
from catsdogs.errors import ConfigError
from catsdogs.io.atomic import atomic_write_text
from catsdogs.io.storage import SCHEMES, scheme_of
from catsdogs.models.ood_names import OOD_CHOICES
from catsdogs.models.registry import model_names, pretrained_names
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS, RESIZE_POLICIES
from catsdogs.presets import find_config, preset_names, preset_path
from catsdogs.shards.writer import FORMATS
from catsdogs.track.registry import mlflow_scheme
from catsdogs.train.names import FREEZE_MODES, FREEZE_NONE, OPTIMIZERS
from catsdogs.train.schedule import SCHEDULES

C = TypeVar("C")

Choices = tuple[Any, ...] | Callable[[], tuple[Any, ...]]
"""A choice list, or a function returning one (e.g. the model registry's names), from a light module."""


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            choices: Choices | None = None, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, required: str = "",
            like: type | None = None, unset: str = "") -> Any:
    """Declare a config field with its rules: allowed values, bounds, and (if required) what it is for.

    ``required`` is the rest of the error sentence "--FLAG is required: ...", checked by
    :func:`check_required` where the command needs the value (not at parse time: ``--resume`` takes
    ``--data`` from the checkpoint, for example). ``like`` names the config class whose field of the
    same name this one forwards (``catsdogs run --epochs`` is ``train --epochs``): it takes that field's
    rules, and its own default is None (not given: the other command's default applies), so the
    default is said once. ``unset`` says what a None default stands for, for the help text (e.g. the
    run's recorded setting).
    """
    meta = {k: v for k, v in (("choices", choices), ("gt", gt), ("ge", ge), ("lt", lt), ("le", le),
                              ("required", required), ("like", like), ("unset", unset))
            if v not in (None, "")}
    return field(default=default, default_factory=default_factory, metadata=meta)


INTERNAL = "internal"
"""Field metadata key of bookkeeping fields: no flag, not in config files, not in config.json."""


@dataclass
class Config:
    """Base of every command's settings: the bookkeeping that is not a setting itself."""

    given: Mapping[str, str] | None = field(default=None, repr=False, compare=False,
                                            metadata={INTERNAL: True})
    """The settings that were given, each with how: :data:`TYPED` (a flag on the command line) or
    :data:`SET` (a config file, or a command setting it for the next stage); set by :func:`build_config`.
    None when the object was built directly: then every setting that differs from its default counts
    as typed."""


TYPED = "typed"
"""A setting given by a flag the user typed."""
SET = "set"
"""A setting given by a config file (``--config``, ``--train-config``) or set by a command for the next."""


def given_names(cfg: Config) -> frozenset[str]:
    """The settings given at all (typed or set): they win over a checkpoint, a preset or a default."""
    if cfg.given is not None:
        return frozenset(cfg.given)
    return _differing(cfg)


def typed_names(cfg: Config) -> frozenset[str]:
    """The settings the user typed as flags: one that cannot apply is refused rather than ignored."""
    if cfg.given is not None:
        return frozenset(k for k, how in cfg.given.items() if how == TYPED)
    return _differing(cfg)


def _differing(cfg: Config) -> frozenset[str]:
    return frozenset(f.name for f in settings_of(type(cfg)) if getattr(cfg, f.name) != default_of(f))


def settings_of(cls: type) -> list[dataclasses.Field]:  # type: ignore[type-arg]
    """The fields of a config class that are settings (flags, config-file keys), in declaration order."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get(INTERNAL)]  # type: ignore[arg-type]


def default_of(f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    """A field's own default value (its ``default_factory`` called)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def rules_of(f: dataclasses.Field) -> dict[str, Any]:  # type: ignore[type-arg]
    """A field's choices and bounds: its own, or those of the field it forwards (``like``)."""
    like = f.metadata.get("like")
    if like is not None:
        return rules_of({g.name: g for g in dataclasses.fields(like)}[f.name])
    return dict(f.metadata)


def effective_default(f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    """The value a field stands for when not given: its default, or the forwarded field's."""
    like = f.metadata.get("like")
    if like is not None:
        return effective_default({g.name: g for g in dataclasses.fields(like)}[f.name])
    return default_of(f)


def choices_of(f: dataclasses.Field) -> tuple[Any, ...] | None:  # type: ignore[type-arg]
    """A field's allowed values (resolving a function of them), or None when any value goes."""
    spec = rules_of(f).get("choices")
    if spec is None:
        return None
    return tuple(spec() if callable(spec) else spec)


@dataclass
class TrackingConfig(Config):
    """MLflow settings shared by the commands that log to or load from a tracking server."""

    tracking_uri: str = ""
    """MLflow tracking server (http://HOST:PORT) or store URI to log runs to and load models:/ from;
    default: $MLFLOW_TRACKING_URI; neither set = tracking off (nothing imported, nothing sent)."""
    experiment: str = ""
    """MLflow experiment the runs go into (default: $MLFLOW_EXPERIMENT_NAME, else catsdogs)."""


@dataclass
class DownloadConfig(Config):
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
class PreprocessConfig(Config):
    """Settings of ``catsdogs preprocess``."""

    input: str = setting("", required="no input folder given; set --input to a folder with one subfolder "
                                       "per class")
    """Folder with one subfolder per class, e.g. PetImages/ with Cat/ and Dog/, or a flat folder of
    <class>.<n>.jpg files like Kaggle's train/; a path, file://, s3a:// or hdfs:// URI."""
    labels_from: str = setting(schema.LABELS_AUTO, choices=schema.LABELS_FROM)
    """Where each image's class comes from: its class subfolder, or its file name up to the first dot
    (cat.0.jpg is a cat); auto takes the file name when --input has no subfolder and every image in it
    is named <class>.<rest>."""
    output: str = setting("", required="no output folder given (set --output)")
    """Folder to write the shards, files.csv and manifest.json into; a path or URI like --input."""
    size: int = setting(64, gt=0)
    """Side of the square output image in pixels."""
    resize: str = setting("stretch", choices=RESIZE_POLICIES)
    """Aspect policy: stretch keeps the whole photo, squeezed to a square; the others cut its centre
    square or letterbox it on black."""
    val_frac: float = setting(0.1, ge=0.0, lt=1.0)
    """Fraction of each class put in the validation split."""
    test_frac: float = setting(0.1, ge=0.0, lt=1.0)
    """Fraction of each class put in the test split."""
    seed: int = 1337
    """Seed of the split hash and of the row shuffle: same seed, same splits and shards."""
    shard_rows: int = setting(1500, gt=0)
    """Maximum rows per shard (about 14 shards for 18,000 images)."""
    format: str = setting("npy", choices=FORMATS)
    """Shard format: pairs of NumPy X_part/y_part arrays, or Parquet tables of pixels, label and split
    (one per shard)."""
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
    exclude: str = ""
    """File of input paths to leave out: one path per line, or a CSV with a ``path`` column such as
    ``catsdogs audit``'s issues.csv (paths relative to --input). Recorded in the manifest's
    ``excluded`` list, apart from the skipped files."""

    def check(self) -> None:
        """The splits must leave images for training."""
        if self.val_frac + self.test_frac >= 1.0:
            raise ConfigError(f"--val-frac + --test-frac must leave room for training, got "
                              f"{self.val_frac} + {self.test_frac}")


RUN_SETTING = "the run's recorded setting"
"""What an inference setting left unset means (evaluate, predict, serve and ``catsdogs.load`` alike)."""


@dataclass
class ComputeConfig(Config):
    """Where torch computes: shared by train, evaluate, predict and serve."""

    device: str = setting(AUTO, choices=DEVICES)
    """Device of the torch computations (auto takes a CUDA GPU when there is one; the onnx and openvino
    engines run on the CPU)."""
    threads: int = setting(0, ge=0)
    """Intra-op threads (0 = all cores; serve: the cores divided among its forward workers)."""


@dataclass
class EngineConfig(Config):
    """The forward-pass engine (``engines/``): train's frozen feature pass, evaluate, predict and serve."""

    backend: str | None = setting(None, choices=ENGINES,
                                  unset=f"the engine the run records (a frozen run's feature engine), "
                                        f"else {DEFAULT_ENGINE}")
    """Engine of the forward pass (train: of the frozen-backbone feature pass). An int8 engine is used only
    within --int8-max-drop of fp32 on the validation split, else its runtime runs in fp32 with a one-line
    note (docs/engines.md)."""
    int8_max_drop: float = setting(MAX_DROP_PT, ge=0.0)
    """Largest validation-accuracy drop (percentage points) an int8 --backend may cost against fp32."""


@dataclass
class InferenceConfig(EngineConfig, ComputeConfig):
    """How a trained run answers: shared by evaluate, predict, serve and the Python API (``catsdogs.load``).

    Unset (None) settings are the run's own, recorded in its checkpoint by training, so every entry point
    gives the same answer unless told otherwise.
    """

    tta: bool | None = setting(None, unset=RUN_SETTING)
    """Average predictions over horizontal flips."""
    reject: bool | None = setting(None, unset=RUN_SETTING)
    """Answer "unknown" for images the run's out-of-distribution detector rejects."""
    calibrate: bool | None = setting(None, unset=RUN_SETTING)
    """Apply the run's fitted temperature to the probabilities."""


@dataclass
class TrainConfig(EngineConfig, ComputeConfig, TrackingConfig):
    """Settings of ``catsdogs train``."""

    data: str = setting("", required="the shards folder written by catsdogs preprocess")
    """Shards folder written by ``catsdogs preprocess``: a path, or an s3a:// / hdfs:// URI."""
    cache_dir: str = ""
    """Local copy of remote --data, checked against the manifest's sha256 (default:
    $CATSDOGS_CACHE, else ~/.cache/catsdogs). Training streams from local disk, not the network."""
    out: str = setting("", required="the run folder for checkpoints and metrics")
    """Run folder for checkpoints, metrics.csv and config.json."""
    model: str = setting("seed", choices=model_names)
    """Model to train: seed is the classic small CNN, cnn a residual CNN from scratch, effnet_* start from
    ImageNet weights (docs/models.md)."""
    epochs: int = setting(10, gt=0)
    """Number of passes over the training split."""
    batch_size: int = setting(64, gt=0)
    """Images per optimiser step."""
    lr: float = setting(1e-3, gt=0.0)
    """Peak learning rate."""
    weight_decay: float = setting(0.0, ge=0.0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    optimizer: str = setting("adam", choices=OPTIMIZERS)
    """Optimiser (sgd: with Nesterov momentum 0.9)."""
    schedule: str = setting("constant", choices=SCHEDULES)
    """Learning-rate schedule."""
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
    freeze: str = setting(FREEZE_NONE, choices=FREEZE_MODES)
    """Transfer learning: backbone fits only a logistic head on features of the frozen pretrained backbone
    (one feature pass, no backpropagation); the default fine-tunes every layer."""
    calibration_images: int = setting(CALIBRATION_IMAGES, gt=0)
    """Training images that calibrate the int8 graph's activation ranges (int8 --backend only)."""
    tta: bool = False
    """Average predictions over horizontal flips when validating; recorded in the checkpoint as the
    run's inference setting (evaluate, predict and serve follow it unless --tta/--no-tta)."""
    reject: bool = True
    """Record that images the out-of-distribution detector rejects are answered "unknown" (evaluate,
    predict and serve follow it unless --reject/--no-reject). The detector is fitted either way."""
    ood_method: str = setting("auto", choices=OOD_CHOICES)
    """Out-of-distribution detector fitted on train features: auto (concepts for the ImageNet models,
    knn for those trained from scratch), concepts (the ImageNet concepts the training images occupy),
    knn, mahalanobis or energy; compared on real data in docs/models.md."""
    accept_rate: float = setting(0.995, gt=0.0, le=1.0)
    """Share of validation images the detector's threshold accepts (the rest would be "unknown"): the
    trade of real pets refused against other things let through. At 0.995 the default preset refused
    0.4 % of test photos and 0.5 % of other people's pet photos; 0.99 refused 1.2 % and 13 %
    (docs/models.md)."""
    seed: int = 0
    """Seed of weights init, data order and augmentation."""
    workers: int = setting(0, ge=0)
    """DataLoader worker processes (0 = load in the main process)."""
    buffer_rows: int = setting(4096, gt=0)
    """Rows in the shuffle buffer: bounds loader memory (plus one shard per worker)."""
    patience: int = setting(0, ge=0)
    """Stop when validation loss has not improved for this many epochs (0 = never)."""
    amp: bool = True
    """Mixed precision (bfloat16) on CUDA; ignored on CPU."""
    checkpoint_every: int = setting(0, ge=0)
    """Also write last.pt every N optimiser steps (0 = only at epoch ends)."""
    resume: bool = False
    """Continue the run in --out from its last.pt (optimizer, schedule, RNG and data order restored);
    settings not given are the run's, a given one that would change the trained model is refused."""
    overwrite: bool = False
    """Replace the run in --out (checkpoints, metrics, engine graphs, evaluation) instead of refusing it."""
    distributed: int = setting(0, ge=0)
    """Train with N processes through Spark's TorchDistributor (0 = single process). With --freeze
    backbone: run the feature pass as N Spark tasks on --master (docs/cluster.md)."""
    master: str = "local[*]"
    """Spark master for --distributed: local[*] runs the N processes here, spark://... on executors. With
    --freeze backbone a cluster master (spark://, yarn, k8s://) runs the feature pass on its executors,
    one task per shard."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings for --distributed or a cluster --master, key=value (config file or repeated
    --spark-conf)."""
    max_steps: int = setting(0, ge=0)
    """Stop after this many optimiser steps in total (0 = no limit); for smoke tests."""
    register: str = ""
    """With tracking on: register the trained model in the MLflow model registry under this name (a new
    version each run); load it back with --run models:/NAME/VERSION."""

    def check(self) -> None:
        """The concepts detector needs ImageNet heads: refused before any work for a scratch model."""
        if self.ood_method == "concepts" and self.model not in pretrained_names():
            raise ConfigError(f"--ood-method concepts needs a model with ImageNet weights "
                              f"({', '.join(pretrained_names())}); --model {self.model} has none "
                              f"(use --ood-method knn, or auto)")


@dataclass
class SparkConfig(Config):
    """Where the forward passes of evaluate, predict and audit run (``catsdogs.cluster``)."""

    master: str = ""
    """Spark master to run the forward passes on, as one task per shard (evaluate, audit) or per batch
    of files (predict): local[N], spark://host:7077, yarn or k8s://...; empty = in this process, no JVM."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings with --master, key=value (config file or repeated --spark-conf)."""


@dataclass
class EvaluateConfig(InferenceConfig, SparkConfig, TrackingConfig):
    """Settings of ``catsdogs evaluate``."""

    run: str = setting("", required="the run folder written by 'catsdogs train'")
    """Run folder written by ``catsdogs train``."""
    data: str = ""
    """Shards folder to evaluate on (default: the run's own --data); a path or s3a:// / hdfs:// URI."""
    cache_dir: str = ""
    """Local copy of remote --data (default: $CATSDOGS_CACHE, else ~/.cache/catsdogs)."""
    split: str = setting("test", choices=schema.SPLITS)
    """Split to evaluate."""
    out: str = ""
    """Folder for the report (default: RUN/eval)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass. Activations grow with it: with 256, `make run` of effnet_lite12 at
    260 px peaked at 8 GB RSS; with 64 at 2.5 GB (docs/models.md)."""
    checkpoint: str = rundir.BEST_CKPT
    """Checkpoint file name inside the run folder."""
    grid: int = setting(16, gt=0)
    """Number of most confidently wrong images shown in the grid."""


@dataclass
class PredictConfig(InferenceConfig, SparkConfig, TrackingConfig):
    """Settings of ``catsdogs predict``."""

    paths: list[str] = field(default_factory=list)
    """Image files, folders (searched recursively) or glob patterns."""
    run: str = setting("", required="the run folder (or .pt checkpoint) with the trained model")
    """Run folder (or a .pt checkpoint) with the trained model, or an MLflow model: models:/NAME/VERSION,
    models:/NAME@ALIAS or runs:/RUN_ID/model (downloaded once into the cache folder)."""
    output: str = ""
    """Write results here: .csv, .json or .parquet, a path or (with --master) an s3a:// / hdfs:// URI;
    written whole or not at all (default: print CSV to stdout)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass."""
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, gt=0)
    """Images with more pixels than this are rejected as decompression bombs."""
    explain: str = ""
    """Folder to write, per image, a Grad-CAM heatmap of what drove the answer: <stem>.png (the photo with
    the heatmap overlaid) and <stem>.npy (float32, the photo's height x width, values 0..1); files
    sharing a stem get -1, -2, ... (see explanations.csv there). Empty: no explanations."""


@dataclass
class ServeConfig(InferenceConfig, TrackingConfig):
    """Settings of ``catsdogs serve``."""

    run: str = setting("", required="the run folder (or .pt checkpoint) with the trained model")
    """Run folder (or a .pt checkpoint) with the trained model, or an MLflow model: models:/NAME/VERSION,
    models:/NAME@ALIAS or runs:/RUN_ID/model (downloaded once into the cache folder)."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default so nothing is exposed by accident."""
    port: int = setting(8000, ge=1, le=65535)
    """TCP port."""
    max_bytes: int = setting(10 * 1024 * 1024, gt=0)
    """Largest accepted upload in bytes (larger gets 413)."""
    drain_bytes: int = setting(100 * 1024 * 1024, ge=0)
    """Largest upload over --max-bytes still read to its end (and thrown away, chunk by chunk) before the
    413, so clients that send the whole body before reading the answer (Python's urllib, requests) get
    the JSON refusal instead of a reset connection; a larger one is cut off at once (0: every one is).
    100 MiB covers a 50 MB camera RAW or short video sent by mistake; draining keeps no memory, takes
    0.12 s for 100 MiB from urllib on loopback (2 cores) and is bounded in time by --body-timeout-s."""
    max_pixels: int = setting(40_000_000, gt=0)
    """Images with more pixels are rejected (400): 40 MP admits usual camera and phone photos while
    capping a hostile PNG's decode memory per request (~0.5 GB; Pillow's 89 MP default allows ~1 GB)."""
    max_batch: int = setting(32, gt=0)
    """Largest micro-batch of concurrent requests run as one forward pass."""
    batch_wait_ms: float = setting(2.0, ge=0.0)
    """How long the batcher waits for more requests once one is queued, in milliseconds. 6 ms was tried
    on the default preset at c=16 (0.86x and 0.64x of the engine's rate in two runs, against 0.77x and
    0.73x with 2 ms; ``python -m benchmarks.serve --run RUN --requests 150 --seconds 15 --threads 0
    --backends openvino-int8 --batch-wait-ms 6``): within the noise of a 15 s load test, so 2 stays."""
    max_files: int = setting(64, gt=0)
    """Most files accepted by one /predict/batch request (more gets 413)."""
    workers: int = setting(0, ge=0)
    """Forward passes run in parallel (0 = torch on CPU: one per core, since its batch-1 forward barely
    uses a second core; onnx or CUDA: 1, since they parallelise one image well)."""
    api_key_file: str = ""
    """File holding the API key (one line, e.g. from `python -c "import secrets;
    print(secrets.token_urlsafe(32))"`); else $CATSDOGS_API_KEY. With a key, every endpoint but /healthz,
    the page and the API docs needs `Authorization: Bearer KEY`. No --api-key flag: it would show in ps."""
    insecure: bool = False
    """Allow a non-loopback --host without an API key: anyone who reaches the port can use the API."""
    rate_limit: int = setting(100, ge=0)
    """Requests per second per client (more get 429; /healthz is exempt; 0 = no limit). 100/s is an
    eighth of the 822 req/s measured at 16 clients on 2 cores (docs/benchmarks/serve.md): one client
    cannot take all the cores."""
    max_uploads: int = setting(32, ge=0)
    """Concurrent uploads (POST requests in progress) per client; more get 429 (0 = no limit). 32 lets
    one client fill one default --max-batch micro-batch and caps its buffered uploads at 32 x --max-bytes."""
    cors_origin: str = ""
    """Comma-separated origins (https://app.example.com) whose pages may call the API from a browser;
    empty = no CORS headers, so only this server's own page can."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Comma-separated addresses of reverse proxies trusted to name the client in X-Forwarded-For
    (rate limits are per client); '*' trusts everyone, which lets any client pick its own identity."""
    header_timeout_s: float = setting(10.0, gt=0.0)
    """Seconds a client has to send a request's headers (then 408 and the connection is closed), so
    a client trickling header bytes cannot hold a connection for ever."""
    body_timeout_s: float = setting(60.0, gt=0.0)
    """Seconds a client has to send an upload's body (then 408): 10 MiB at 1.4 Mbit/s."""
    keep_alive_s: int = setting(5, gt=0)
    """Seconds an idle keep-alive connection stays open (uvicorn's default)."""
    max_header_bytes: int = setting(16 * 1024, gt=0)
    """Largest request line plus headers in bytes (more gets 431); 16 KiB as h11 and Node."""

    def check(self) -> None:
        """CORS origins are full origins (scheme://host[:port]), never a wildcard."""
        for origin in filter(None, (o.strip() for o in self.cors_origin.split(","))):
            parsed = urlparse(origin)
            if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
                raise ConfigError(f"--cors-origin {origin!r} is not an origin; name each one as "
                                  f"https://host[:port], separated by commas")


@dataclass
class ExportConfig(Config):
    """Settings of ``catsdogs export``."""

    run: str = setting("", required="the run folder (or .pt checkpoint) to export")
    """Run folder (or a .pt checkpoint) to export."""
    format: str = setting("onnx", choices=tuple(rundir.EXPORT_NAMES))
    """Export format."""
    output: str = ""
    """Output file; empty: the format's file in the run folder (model.onnx, model.ts)."""


@dataclass
class RunConfig(TrackingConfig):
    """Settings of ``catsdogs run`` (preprocess, train, evaluate in one go)."""

    data: str = ""
    """Image folder with one subfolder per class (e.g. PetImages), or a flat folder of <class>.<n>.jpg
    files; without it, what to download."""
    out: str = setting("", required="the run folder to create (e.g. runs/latest)")
    """Run folder; shards go to OUT/shards unless --shards is given."""
    shards: str = ""
    """Shards folder (default OUT/shards); reused when made from the same input and settings."""
    model: str | None = setting(None, like=TrainConfig)
    """Model to train (``catsdogs train --help`` describes them)."""
    size: int | None = setting(None, like=PreprocessConfig)
    """Image side in pixels for preprocessing."""
    epochs: int | None = setting(None, like=TrainConfig)
    """Training epochs."""
    train_config: str = ""
    """Optional TOML/JSON file of train settings (e.g. written by ``catsdogs tune``), or a preset's
    name; the run's own --model, --epochs and --seed, when given, win over it."""
    master: str | None = setting(None, like=PreprocessConfig)
    """Spark master URL for preprocessing; a cluster master (spark://, yarn, k8s://) also runs the frozen
    feature pass and evaluate on its executors."""
    seed: int | None = setting(None, like=TrainConfig)
    """Training seed."""
    register: str = ""
    """With tracking on: register the trained model in the MLflow model registry under this name."""


@dataclass
class TuneConfig(TrackingConfig):
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


@dataclass
class AuditConfig(SparkConfig):
    """Settings of ``catsdogs audit``."""

    data: str = setting("", required="the shards folder written by catsdogs preprocess")
    """Shards folder written by ``catsdogs preprocess`` (every split is audited together)."""
    output: str = setting("", required="the folder for issues.csv and audit.html")
    """Folder for issues.csv, audit.html and config.json (each file replaced atomically; issues.csv
    is written last)."""
    run: str = ""
    """Run folder (or .pt checkpoint) of a trained EfficientNet-Lite model whose backbone gives the
    features and, when it has one, the out-of-distribution detector for outliers (default:
    EfficientNet-Lite0 ImageNet weights and a detector fitted here)."""
    size: int = setting(0, ge=0)
    """Side the backbone sees, resized in torch from the shards (0 = 180 px for the ImageNet backbone,
    the run's size with --run). On the dev data 180 px found 87 % of injected label flips with 451
    suspects flagged, the shards' 64 px 74 % with 1,654, mostly clean (docs/audit.md)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass of the feature extractor."""
    threads: int = setting(0, ge=0)
    """Torch intra-op threads (0 = all cores)."""
    folds: int = setting(5, ge=2)
    """K of the K-fold logistic heads that give every image an out-of-sample predicted probability."""
    head_c: float = setting(0.1, gt=0.0)
    """Inverse L2 strength of the K-fold logistic heads on standardised features."""
    dup_threshold: float = setting(0.94, gt=0.0, le=1.0)
    """Cosine similarity of two images' tiny descriptors (8 x 8 RGB, mean-centred) at or above which they
    are near duplicates. On 30 copies injected into the 18,000 dev images, 0.94 found every re-encode
    and downscale and 7 of 10 crops with 26 other pairs reported (0.92: all 30, 77 others, most of
    them look-alikes, not copies); docs/audit.md."""
    dup_neighbours: int = setting(5, gt=0)
    """Most near duplicates reported per image (the nearest ones), so a cluster of k copies costs
    O(k) pairs per member, not O(k^2) output."""
    chunk_rows: int = setting(1024, gt=0)
    """Rows per block of the chunked similarity product: memory is chunk_rows x images x 4 bytes
    (75 MB for 18,000 images)."""
    accept_rate: float = setting(0.99, gt=0.0, le=1.0)
    """Outliers: share of validation images the audit's kNN detector (fitted on train) accepts; the images
    scoring above it are reported (on the dev data: 152 flagged, 18 of the top 20 non-pets,
    docs/audit.md). Not used with a --run detector, whose own threshold is."""
    blank_std: float = setting(8.0, ge=0.0)
    """Images whose pixel standard deviation (0..255 units, shard pixels) is below this are
    near-blank."""
    min_side: int = setting(32, ge=0)
    """Original images with a side shorter than this (pixels) are undersized; needs the input folder
    named in the shards' config to be readable."""
    max_aspect: float = setting(3.0, ge=1.0)
    """Original images whose long side exceeds this multiple of the short side are flagged."""
    gallery: int = setting(60, gt=0)
    """Images shown per issue kind in audit.html (all of them are in issues.csv)."""
    seed: int = 0
    """Seed of the fold assignment."""


def field_docs(cls: type) -> dict[str, str]:
    """Return each field's docstring (the string literal placed under it) for CLI help."""
    docs: dict[str, str] = {}
    # Base classes first (shared fields such as TrackingConfig's), so a subclass could re-document one.
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        docs.update(_module_field_docs(klass.__module__).get(klass.__qualname__, {}))
    return docs


@functools.cache
def _module_field_docs(module: str) -> dict[str, dict[str, str]]:
    """Field docstrings of every top-level class of a module, from one parse of its source.

    Once per module: ``inspect.getsource(cls)`` re-parses the whole file for every class, which made
    building the parser (every ``--help`` and flag error) take ~1.7 s instead of ~0.1 s.
    """
    found: dict[str, dict[str, str]] = {}
    for klass in ast.parse(inspect.getsource(sys.modules[module])).body:
        if not isinstance(klass, ast.ClassDef):
            continue
        docs = found.setdefault(klass.name, {})
        for node, nxt in zip(klass.body, klass.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = nxt.value.value.strip()
    return found


def states_default(doc: str) -> bool:
    """True when a field's docstring already says what its default is ("default: ...", "(default ...")."""
    return "default:" in doc or "(default " in doc


def help_text(f: dataclasses.Field, doc: str) -> str:  # type: ignore[type-arg]
    """A flag's help: its docstring, then the choices and the default, each said once.

    The choices come from the field's choice list, never from the docstring; the default is left out
    when the docstring says it (computed defaults such as "$MLFLOW_TRACKING_URI, else tracking off").
    """
    parts = []
    choices = choices_of(f)
    if choices is not None:
        parts.append("one of: " + ", ".join(map(str, choices)))
    if not states_default(doc):
        parts.append("default: " + default_text(f))
    return f"{doc} ({'; '.join(parts)})" if parts else doc


def default_text(f: dataclasses.Field) -> str:  # type: ignore[type-arg]
    """What a flag's default is, in words: the value, the forwarded command's, or what unset means."""
    like = f.metadata.get("like")
    if like is not None:
        command = like.__name__.removesuffix("Config").lower()
        return f"{effective_default(f)!r}, as catsdogs {command} {flag(f.name)}"
    if default_of(f) is None and f.metadata.get("unset"):
        return str(f.metadata["unset"])
    return repr(default_of(f))


def flag(name: str) -> str:
    """Return the CLI flag spelling of a config field name."""
    return "--" + name.replace("_", "-")


def read_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML or JSON config file, or a preset by name; take ``[section]`` when present, else the top.

    Relative paths in a file (:data:`FILE_PATH_FIELDS`) are relative to the file's own folder, so a
    config names the files next to it from whatever folder the command runs in; a bare preset name
    (``train_config = "seed"``) stays a name.
    """
    found = find_config(str(path))
    if found is None:
        raise ConfigError(f"config file {str(path)!r} does not exist and is no preset "
                          f"({', '.join(preset_names())}) (fix --config)")
    p = found
    try:
        data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a table/object of settings")
    if section and isinstance(data.get(section), dict):
        data = dict(data[section])
    return {k: relative_to(p.parent, v) if k.replace("-", "_") in FILE_PATH_FIELDS else v
            for k, v in data.items()}


def relative_to(folder: Path, value: Any) -> Any:
    """Resolve a relative local path ``value`` against ``folder``; URIs, absolute and empty ones stay."""
    if not isinstance(value, str) or not value or value.startswith("~") or os.path.isabs(value):
        return value
    if mlflow_scheme(value) or scheme_of(value):
        return value
    beside = folder / value
    if not beside.exists() and preset_path(value) is not None:
        return value  # a preset's name; a file of that name beside the config would win, as in find_config
    return str(beside)


def build_config(cls: type[C], *layers: Mapping[str, Any], typed: Mapping[str, Any] | None = None
                 ) -> C:
    """Build ``cls`` from dict layers (later wins), then ``typed`` flags; reject unknown keys, wrong types.

    Every key counts as given (:attr:`Config.given`): ``typed`` ones as :data:`TYPED`, the layers' (a
    config file, or what a command sets on purpose for the next stage) as :data:`SET`.
    """
    names = {f.name: f for f in settings_of(cls)}
    merged: dict[str, Any] = {}
    given: dict[str, str] = {}
    for layer, how in [*((layer, SET) for layer in layers), (typed or {}, TYPED)]:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in names:
                raise ConfigError(
                    f"unknown setting {key!r} for {cls.__name__}; known: {', '.join(sorted(names))}"
                )
            merged[key] = _coerce(key, value, names[key])
            given[key] = how
    cfg = cls(**merged, given=given)
    for key in PATH_FIELDS:
        value = getattr(cfg, key, None)
        if isinstance(value, str) and value:
            remote_ok = key in REMOTE_FIELDS.get(cls.__name__, ())
            mlflow_ok = key in MLFLOW_FIELDS.get(cls.__name__, ())
            setattr(cfg, key, local_path(value, flag(key), remote_ok, mlflow_ok))
    validate(cfg)
    return cfg


PATH_FIELDS = ("input", "output", "data", "out", "run", "shards", "train_config", "cache_dir", "exclude")
"""Settings holding a folder or file; they accept plain paths and ``file://`` URIs."""
FILE_PATH_FIELDS = (*PATH_FIELDS, "api_key_file", "explain")
"""Settings holding a path, resolved against a config file's folder when the file names them."""

REMOTE_FIELDS: dict[str, tuple[str, ...]] = {
    "PreprocessConfig": ("input", "output"),
    "TrainConfig": ("data",),
    "EvaluateConfig": ("data",),
    "PredictConfig": ("output",),
}
"""Settings that also take s3a://, s3:// and hdfs:// URIs (:mod:`catsdogs.io.storage`): the image folder
and the shards, the data that outgrows one machine. Runs and models stay on local disk."""


MLFLOW_FIELDS: dict[str, tuple[str, ...]] = {
    "PredictConfig": ("run",),
    "ServeConfig": ("run",),
}
"""Settings that also take MLflow model URIs (models:/NAME/VERSION, runs:/ID/model): the commands that
only read a model. Evaluate and export write into the run folder, which a registry model does not have."""


def local_path(value: str, flag_name: str, remote_ok: bool = False, mlflow_ok: bool = False) -> str:
    """Turn a ``file://`` URI into a path; keep remote URIs where ``remote_ok``, MLflow's where ``mlflow_ok``.

    s3a:// and hdfs:// are the remote ones; MLflow's are models:/ and runs:/ model URIs.

    Any other scheme is refused with a hint: storage that every node mounts works through its path.
    """
    scheme = mlflow_scheme(value)
    if scheme:
        if mlflow_ok:
            return value
        raise ConfigError(f"{flag_name} {value!r}: only --run of predict and serve loads {scheme}:/ "
                          f"models from MLflow; download it first or pass a run folder")
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
        where = (("only --input/--output of preprocess, --data of train and evaluate and --output of "
                  "predict take s3a:// or hdfs:// URIs") if scheme in SCHEMES
                 else f"{scheme}:// is not supported")
        raise ConfigError(f"{flag_name} {value!r}: {where}; for other storage, mount it on every node "
                          f"and pass the mounted path or a file:// URI (see docs/cluster.md)")
    return value


def type_of(f: dataclasses.Field) -> tuple[str, bool]:  # type: ignore[type-arg]
    """A field's type name without ``| None``, and whether None ("not given") is allowed."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = typ.removesuffix(" | None")
    return base, base != typ


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    """Coerce a config-file value to the field's type, with an error naming the flag."""
    typ, optional = type_of(f)
    try:
        if optional and value is None:
            return None
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
    for f in settings_of(type(cfg)):
        meta, value = rules_of(f), getattr(cfg, f.name)
        if value is None:  # not given: the run's, the preset's or the next stage's default applies
            continue
        choices = choices_of(f)
        if choices is not None:
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
    """Return a JSON-ready dict of a config dataclass's settings (bookkeeping fields left out)."""
    full = dataclasses.asdict(cfg)
    return {f.name: full[f.name] for f in settings_of(type(cfg))}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as JSON next to an output, atomically."""
    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
