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
from catsdogs.engines.names import CALIBRATION_IMAGES, DEFAULT_ENGINE, ENGINES, MAX_DROP_PT
from catsdogs.errors import ConfigError
from catsdogs.io.atomic import atomic_write_text
from catsdogs.io.storage import SCHEMES, scheme_of
from catsdogs.models.registry import model_names, pretrained_names
from catsdogs.models.transforms import DEFAULT_MAX_PIXELS, RESIZE_POLICIES
from catsdogs.shards.writer import FORMATS
from catsdogs.track.registry import mlflow_scheme
from catsdogs.train.schedule import SCHEDULES

C = TypeVar("C")

Choices = tuple[Any, ...] | Callable[[], tuple[Any, ...]] | str
"""A choice list, a function returning one, or ``"module:NAME"`` of one in a module that imports
torch (resolved only when a value is checked: importing torch costs ~1.7 s at every CLI start)."""

DEVICES = "catsdogs.runtime:DEVICES"
OPTIMIZERS = "catsdogs.train.loop:OPTIMIZERS"
FREEZE_MODES = "catsdogs.train.launch:FREEZE_MODES"
OOD_METHODS = "catsdogs.models.ood:OOD_CHOICES"
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
class TrackingConfig:
    """MLflow settings shared by the commands that log to or load from a tracking server."""

    tracking_uri: str = ""
    """MLflow tracking server (http://HOST:PORT) or store URI to log runs to and load models:/ from;
    default: $MLFLOW_TRACKING_URI; neither set = tracking off (nothing imported, nothing sent)."""
    experiment: str = ""
    """MLflow experiment the runs go into (default: $MLFLOW_EXPERIMENT_NAME, else catsdogs)."""


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
    exclude: str = ""
    """File of input paths to leave out: one path per line, or a CSV with a ``path`` column such as
    ``catsdogs audit``'s issues.csv (paths relative to --input). Recorded in the manifest's
    ``excluded`` list, apart from the skipped files."""

    def check(self) -> None:
        """The splits must leave images for training."""
        if self.val_frac + self.test_frac >= 1.0:
            raise ConfigError(f"--val-frac + --test-frac must leave room for training, got "
                              f"{self.val_frac} + {self.test_frac}")


@dataclass
class TrainConfig(TrackingConfig):
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
    backend: str = setting(DEFAULT_ENGINE, choices=ENGINES)
    """Engine of the frozen-backbone feature pass (--freeze backbone): torch (eager fp32), onnx
    (onnxruntime), openvino, or their int8 forms onnx-int8 / openvino-int8, used only within
    --int8-max-drop of fp32 on validation (else the features are made again in fp32)."""
    calibration_images: int = setting(CALIBRATION_IMAGES, gt=0)
    """Training images that calibrate the int8 graph's activation ranges (int8 --backend only)."""
    int8_max_drop: float = setting(MAX_DROP_PT, ge=0.0)
    """Largest validation-accuracy drop (percentage points) an int8 --backend may cost against fp32."""
    tta: bool = False
    """Average predictions over horizontal flips when validating; recorded in the checkpoint as the
    run's inference setting (evaluate, predict and serve follow it unless --tta/--no-tta)."""
    reject: bool = True
    """Record that images the out-of-distribution detector rejects are answered "unknown" (evaluate,
    predict and serve follow it unless --reject/--no-reject). The detector is fitted either way."""
    ood_method: str = setting("auto", choices=OOD_METHODS)
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
class EngineConfig:
    """The forward-pass engine of evaluate, predict and serve (``engines/``)."""

    backend: str = setting(DEFAULT_ENGINE, choices=ENGINES)
    """Engine of every forward pass: torch (eager fp32), onnx (onnxruntime), openvino, or their int8
    forms onnx-int8 / openvino-int8, used only within --int8-max-drop of fp32 on validation."""
    int8_max_drop: float = setting(MAX_DROP_PT, ge=0.0)
    """Largest validation-accuracy drop (percentage points) an int8 --backend may cost against fp32;
    beyond it the same runtime runs in fp32, with a one-line note."""


@dataclass
class EvaluateConfig(EngineConfig, TrackingConfig):
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
    tta: bool | None = None
    """Average predictions over horizontal flips (default: the run's recorded setting)."""
    reject: bool | None = None
    """Answer "unknown" for images the run's detector rejects (default: the run's recorded setting)."""
    calibrate: bool | None = None
    """Apply the run's fitted temperature to the probabilities (default: the run's recorded setting)."""
    device: str = setting("auto", choices=DEVICES)
    """auto, cpu or cuda."""
    threads: int = setting(0, ge=0)
    """Torch intra-op threads (0 = all cores)."""
    checkpoint: str = rundir.BEST_CKPT
    """Checkpoint file name inside the run folder."""
    grid: int = setting(16, gt=0)
    """Number of most confidently wrong images shown in the grid."""


@dataclass
class PredictConfig(EngineConfig, TrackingConfig):
    """Settings of ``catsdogs predict``."""

    paths: list[str] = field(default_factory=list)
    """Image files, folders (searched recursively) or glob patterns."""
    run: str = setting("", required="the run folder (or .pt checkpoint) with the trained model")
    """Run folder (or a .pt checkpoint) with the trained model, or an MLflow model: models:/NAME/VERSION,
    models:/NAME@ALIAS or runs:/RUN_ID/model (downloaded once into the cache folder)."""
    output: str = ""
    """Write results here: .csv or .json (default: print CSV to stdout)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass."""
    tta: bool | None = None
    """Average predictions over horizontal flips (default: the run's recorded setting)."""
    reject: bool | None = None
    """Answer "unknown" for images the run's detector rejects (default: the run's recorded setting)."""
    calibrate: bool | None = None
    """Apply the run's fitted temperature to the probabilities (default: the run's recorded setting)."""
    device: str = setting("auto", choices=DEVICES)
    """auto, cpu or cuda."""
    threads: int = setting(0, ge=0)
    """Torch intra-op threads (0 = all cores)."""
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, gt=0)
    """Images with more pixels than this are rejected as decompression bombs."""
    explain: str = ""
    """Folder to write, per image, a Grad-CAM heatmap of what drove the answer: <stem>.png (the photo with
    the heatmap overlaid) and <stem>.npy (float32, the photo's height x width, values 0..1); files
    sharing a stem get -1, -2, ... (see explanations.csv there). Empty: no explanations."""


@dataclass
class ServeConfig(EngineConfig, TrackingConfig):
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
    """How long the batcher waits for more requests once one is queued, in milliseconds."""
    max_files: int = setting(64, gt=0)
    """Most files accepted by one /predict/batch request (more gets 413)."""
    workers: int = setting(0, ge=0)
    """Forward passes run in parallel (0 = torch on CPU: one per core, since its batch-1 forward barely
    uses a second core; onnx or CUDA: 1, since they parallelise one image well)."""
    threads: int = setting(0, ge=0)
    """Intra-op threads per forward worker (0 = cores / workers)."""
    tta: bool | None = None
    """Average predictions over horizontal flips (default: the run's recorded setting)."""
    reject: bool | None = None
    """Answer "unknown" for images the run's detector rejects (default: the run's recorded setting)."""
    calibrate: bool | None = None
    """Apply the run's fitted temperature to the probabilities (default: the run's recorded setting)."""
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
class ExportConfig:
    """Settings of ``catsdogs export``."""

    run: str = setting("", required="the run folder (or .pt checkpoint) to export")
    """Run folder (or a .pt checkpoint) to export."""
    format: str = setting("onnx", choices=tuple(rundir.EXPORT_NAMES))
    """onnx or torchscript."""
    output: str = ""
    """Output file (default: RUN/model.onnx or RUN/model.ts)."""


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
class AuditConfig:
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
        body = ast.parse(inspect.getsource(klass)).body[0].body  # type: ignore[attr-defined]
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
            mlflow_ok = key in MLFLOW_FIELDS.get(cls.__name__, ())
            setattr(cfg, key, local_path(value, flag(key), remote_ok, mlflow_ok))
    validate(cfg)
    return cfg


PATH_FIELDS = ("input", "output", "data", "out", "run", "shards", "train_config", "cache_dir", "exclude")
"""Settings holding a folder or file; they accept plain paths and ``file://`` URIs."""

REMOTE_FIELDS: dict[str, tuple[str, ...]] = {
    "PreprocessConfig": ("input", "output"),
    "TrainConfig": ("data",),
    "EvaluateConfig": ("data",),
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
        where = ("only --input/--output of preprocess and --data of train and evaluate take "
                 "s3a:// or hdfs:// URIs" if scheme in SCHEMES else f"{scheme}:// is not supported")
        raise ConfigError(f"{flag_name} {value!r}: {where}; for other storage, mount it on every node "
                          f"and pass the mounted path or a file:// URI (see docs/cluster.md)")
    return value


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    """Coerce a config-file value to the field's type, with an error naming the flag."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "bool | None" and value is None:
            return None
        if typ in ("bool", "bool | None") and not isinstance(value, bool):
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
