"""The settings of each ``catsdogs`` command, composed from the shared groups.

Each command has one dataclass; the string literal under each field is its ``--help`` text. Cross-field
rules are a class's ``check`` method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlparse

from catsdogs import rundir, schema
from catsdogs.config._fields import FILE, LOCAL, MODEL, REMOTE, Config, setting
from catsdogs.config.groups import (
    ComputeConfig,
    EngineConfig,
    InferenceConfig,
    SparkConfig,
    TrackingConfig,
)
from catsdogs.download.source import MAX_UNPACKED_BYTES
from catsdogs.engines.names import CALIBRATION_IMAGES
from catsdogs.errors import ConfigError
from catsdogs.models.ood_names import OOD_CHOICES
from catsdogs.models.registry import model_names, pretrained_names
from catsdogs.train.names import FREEZE_MODES, FREEZE_NONE, OPTIMIZERS
from catsdogs.train.schedule import SCHEDULES


@dataclass
class DownloadConfig(Config):
    """Settings of ``catsdogs download``."""

    output: str = setting("data", path=LOCAL)
    """Folder to download into; the images appear in OUTPUT/PetImages once complete."""
    url: str | None = None
    """URL of the zip archive (default: $CATSDOGS_DATA_URL, else Microsoft's official
    kagglecatsanddogs_5340.zip); needs --sha256."""
    sha256: str | None = None
    """Expected sha256 of the archive at --url (default: $CATSDOGS_DATA_SHA256, else the official one's)."""
    archive_bytes: int | None = setting(None, ge=0)
    """Expected size in bytes of the archive at --url, checked before its sha256 (not set:
    $CATSDOGS_DATA_SIZE, else unchecked; the official archive's size is known)."""
    keep_archive: bool = False
    """Keep the verified zip next to the images instead of deleting it after unpacking."""
    max_unpacked_bytes: int = setting(MAX_UNPACKED_BYTES, gt=0)
    """Refuse an archive whose members add up to more bytes than this (a zip bomb)."""


@dataclass
class PreprocessConfig(Config):
    """Settings of ``catsdogs preprocess``."""

    input: str | None = setting(None, required="no input folder given; set --input to a folder with one "
                                "subfolder per class", path=REMOTE)
    """Folder with one subfolder per class, e.g. PetImages/ with Cat/ and Dog/, or a flat folder of
    <class>.<n>.jpg files like Kaggle's train/; a path, file://, s3a:// or hdfs:// URI."""
    labels_from: str = setting(schema.LABELS_AUTO, choices=schema.LABELS_FROM)
    """Where each image's class comes from: its class subfolder, or its file name up to the first dot
    (cat.0.jpg is a cat); auto takes the file name when --input has no subfolder and every image in it
    is named <class>.<rest>."""
    output: str | None = setting(None, required="no output folder given (set --output)", path=REMOTE)
    """Folder to write the shards, files.csv and manifest.json into; a path or URI like --input."""
    size: int = setting(64, gt=0)
    """Side of the square output image in pixels."""
    resize: str = setting("stretch", choices=schema.RESIZE_POLICIES)
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
    format: str = setting("npy", choices=schema.SHARD_FORMATS)
    """Shard format: pairs of NumPy X_part/y_part arrays, or one Parquet table of pixels, label and split
    per shard, with raw pixels (parquet) or each image as JPEG or PNG (compact, for clusters)."""
    master: str = "local[*]"
    """Spark master URL: local[*], spark://host:7077, yarn, k8s://..."""
    read_threads: int = setting(16, gt=0)
    """Concurrent file reads per Spark task for s3a:// or hdfs:// input, which waits on round trips
    (docs/benchmarks/remote_storage.md); local input is read by one thread."""
    max_pixels: int = setting(schema.DEFAULT_MAX_PIXELS, gt=0)
    """Images with more pixels than this are skipped as decompression bombs (Pillow's default)."""
    max_skip_frac: float = setting(0.5, ge=0.0, lt=1.0)
    """Fail (exit 2) when more than this fraction of candidate images cannot be decoded."""
    overwrite: bool = False
    """Replace an existing output folder (it is swapped in only once the new one is complete)."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings, key=value (config file or repeated --spark-conf)."""
    exclude: str | None = setting(None, path=LOCAL)
    """File of input paths to leave out: one path per line, or a CSV with a ``path`` column such as
    ``catsdogs audit``'s issues.csv (paths relative to --input). Recorded in the manifest's
    ``excluded`` list, apart from the skipped files."""

    def check(self) -> None:
        """The splits must leave images for training."""
        if self.val_frac + self.test_frac >= 1.0:
            raise ConfigError(f"--val-frac + --test-frac must leave room for training, got "
                              f"{self.val_frac} + {self.test_frac}")


@dataclass
class TrainConfig(EngineConfig, ComputeConfig, TrackingConfig):
    """Settings of ``catsdogs train``."""

    data: str | None = setting(None, required="the shards folder written by catsdogs preprocess", path=REMOTE)
    """Shards folder written by ``catsdogs preprocess``: a path, or an s3a:// / hdfs:// URI."""
    cache_dir: str | None = setting(None, path=LOCAL)
    """Local copy of remote --data, checked against the manifest's sha256 (default:
    $CATSDOGS_CACHE, else ~/.cache/catsdogs). Training streams from local disk, not the network."""
    output: str | None = setting(None, required="the run folder for checkpoints and metrics", path=LOCAL)
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
    """Out-of-distribution detector fitted on train features: auto is concepts (what the photo shows,
    whether it is another of its classes' kind, how it looks) for the ImageNet models, knn for those
    trained from scratch (docs/models.md)."""
    accept_rate: float = setting(0.995, gt=0.0, le=1.0)
    """Share of validation images the detector's threshold accepts (the rest would be "unknown"): real
    pets refused against other things let through (docs/models.md)."""
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
    """Continue the run in --output from its last.pt (optimizer, schedule, RNG and data order restored);
    settings not given are the run's, a given one that would change the trained model is refused."""
    overwrite: bool = False
    """Replace the run in --output (checkpoints, metrics, engine graphs, evaluation) rather than refuse it."""
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
    head_memory_mb: int = setting(2048, ge=0)
    """With --freeze backbone on Spark: most MB of training features (float32) the driver holds to fit the
    head; above it the executors' float16 feature shards stay on disk and the head and detector are
    fitted by passes over them, one shard in memory (0: always stream). 2,048 MB is ~200,000 photos of
    the default preset."""
    max_steps: int = setting(0, ge=0)
    """Stop after this many optimiser steps in total (0 = no limit); for smoke tests."""
    register: str | None = None
    """With tracking on: register the trained model in the MLflow model registry under this name (a new
    version each run); load it back with --run models:/NAME/VERSION."""

    def check(self) -> None:
        """The concepts detector needs ImageNet heads: refused before any work for a scratch model."""
        if self.ood_method == "concepts" and self.model not in pretrained_names():
            raise ConfigError(f"--ood-method concepts needs a model with ImageNet weights "
                              f"({', '.join(pretrained_names())}); --model {self.model} has none "
                              f"(use --ood-method knn, or auto)")


@dataclass
class EvaluateConfig(InferenceConfig, SparkConfig, TrackingConfig):
    """Settings of ``catsdogs evaluate``."""

    run: str | None = setting(None, required="the run folder written by 'catsdogs train'", path=LOCAL)
    """Run folder written by ``catsdogs train``."""
    data: str | None = setting(None, path=REMOTE)
    """Shards folder to evaluate on (default: the run's own --data); a path or s3a:// / hdfs:// URI."""
    cache_dir: str | None = setting(None, path=LOCAL)
    """Local copy of remote --data (default: $CATSDOGS_CACHE, else ~/.cache/catsdogs)."""
    split: str = setting("test", choices=schema.SPLITS)
    """Split to evaluate."""
    output: str | None = setting(None, path=LOCAL)
    """Folder for the report (default: RUN/eval)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass; memory grows with it (docs/models.md)."""
    checkpoint: str = rundir.BEST_CKPT
    """Checkpoint file name inside the run folder."""
    grid: int = setting(16, gt=0)
    """Number of most confidently wrong images shown in the grid."""


@dataclass
class PredictConfig(InferenceConfig, SparkConfig, TrackingConfig):
    """Settings of ``catsdogs predict``."""

    paths: list[str] = field(default_factory=list)
    """Image files, folders (searched recursively) or glob patterns."""
    run: str | None = setting(None, required="the run folder (or .pt checkpoint) with the trained model",
                       path=MODEL)
    """Run folder (or a .pt checkpoint) with the trained model, or an MLflow model: models:/NAME/VERSION,
    models:/NAME@ALIAS or runs:/RUN_ID/model (downloaded once into the cache folder)."""
    output: str | None = setting(None, path=REMOTE)
    """Write results here: .csv, .json or .parquet, a path or (with --master) an s3a:// / hdfs:// URI;
    written whole or not at all (default: print CSV to stdout)."""
    parts: bool = False
    """With --master: --output names a folder, and each Spark task writes its rows there as one part file
    (part-00000.csv, ...; name order is input order), with _SUCCESS last; no row passes through the
    driver. Without it the driver appends the parts into the one file --output names."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass."""
    max_pixels: int = setting(schema.DEFAULT_MAX_PIXELS, gt=0)
    """Images with more pixels than this are rejected as decompression bombs."""
    explain: str | None = setting(None, path=FILE)
    """Folder to write, per image, a Grad-CAM heatmap of what drove the answer: <stem>.png (the photo with
    the heatmap overlaid) and <stem>.npy (float32, the photo's height x width, values 0..1); files
    sharing a stem get -1, -2, ... (see explanations.csv there). Not set: no explanations."""


@dataclass
class ServeConfig(InferenceConfig, TrackingConfig):
    """Settings of ``catsdogs serve``."""

    run: str | None = setting(None, required="the run folder (or .pt checkpoint) with the trained model",
                       path=MODEL)
    """Run folder (or a .pt checkpoint) with the trained model, or an MLflow model: models:/NAME/VERSION,
    models:/NAME@ALIAS or runs:/RUN_ID/model (downloaded once into the cache folder)."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default so nothing is exposed by accident."""
    port: int = setting(8000, ge=1, le=65535)
    """TCP port."""
    max_bytes: int = setting(10 * 1024 * 1024, gt=0)
    """Largest accepted upload in bytes (larger gets 413)."""
    drain_bytes: int = setting(100 * 1024 * 1024, ge=0)
    """Largest upload over --max-bytes still read to its end (and thrown away) before the 413, so clients
    that send the whole body first get the JSON refusal, not a reset (0: none is; docs/security.md)."""
    max_pixels: int = setting(40_000_000, gt=0)
    """Images with more pixels are rejected (400): 40 MP admits usual camera and phone photos while
    capping a hostile PNG's decode memory per request (~0.5 GB; Pillow's 89 MP default allows ~1 GB)."""
    max_batch: int = setting(32, gt=0)
    """Largest micro-batch of concurrent requests run as one forward pass."""
    batch_wait_ms: float = setting(2.0, ge=0.0)
    """How long the batcher waits for more requests once one is queued, in milliseconds."""
    max_files: int = setting(64, gt=0)
    """Most files accepted by one /predict/batch request (more gets 413)."""
    workers: int | None = setting(None, ge=0)
    """Forward passes run in parallel (not set: torch on CPU: one per core, since its batch-1 forward barely
    uses a second core; onnx or CUDA: 1, since they parallelise one image well)."""
    api_key_file: str | None = setting(None, path=FILE)
    """File holding the API key (one line, e.g. from `python -c "import secrets;
    print(secrets.token_urlsafe(32))"`); else $CATSDOGS_API_KEY. With a key, every endpoint but /healthz,
    the page and the API docs needs `Authorization: Bearer KEY`. No --api-key flag: it would show in ps."""
    insecure: bool = False
    """Allow a non-loopback --host without an API key: anyone who reaches the port can use the API."""
    rate_limit: int = setting(100, ge=0)
    """Requests per second per client (more get 429; /healthz is exempt; 0 = no limit), so one client
    cannot take all the cores (docs/benchmarks/serve.md)."""
    max_uploads: int = setting(32, ge=0)
    """Concurrent uploads (POST requests in progress) per client; more get 429 (0 = no limit). 32 lets
    one client fill one default --max-batch micro-batch and caps its buffered uploads at 32 x --max-bytes."""
    cors_origin: str | None = None
    """Comma-separated origins (https://app.example.com) whose pages may call the API from a browser;
    not set: no CORS headers, so only this server's own page can."""
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
        for origin in filter(None, (o.strip() for o in (self.cors_origin or "").split(","))):
            parsed = urlparse(origin)
            if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
                raise ConfigError(f"--cors-origin {origin!r} is not an origin; name each one as "
                                  f"https://host[:port], separated by commas")


@dataclass
class ExportConfig(Config):
    """Settings of ``catsdogs export``."""

    run: str | None = setting(None, required="the run folder (or .pt checkpoint) to export", path=LOCAL)
    """Run folder (or a .pt checkpoint) to export."""
    format: str = setting("onnx", choices=tuple(rundir.EXPORT_NAMES))
    """Export format."""
    output: str | None = setting(None, path=LOCAL)
    """Output file; not set: the format's file in the run folder (model.onnx, model.ts)."""


@dataclass
class RunConfig(TrackingConfig):
    """Settings of ``catsdogs run`` (preprocess, train, evaluate in one go)."""

    data: str | None = setting(None, path=LOCAL)
    """Image folder with one subfolder per class (e.g. PetImages), or a flat folder of <class>.<n>.jpg
    files; without it, what to download."""
    output: str | None = setting(None, required="the run folder to create (e.g. runs/latest)", path=LOCAL)
    """Run folder; shards go to OUT/shards unless --shards is given."""
    shards: str | None = setting(None, path=LOCAL)
    """Shards folder (default OUT/shards); reused when made from the same input and settings."""
    model: str | None = setting(None, like=TrainConfig)
    """Model to train (``catsdogs train --help`` describes them)."""
    size: int | None = setting(None, like=PreprocessConfig)
    """Image side in pixels for preprocessing."""
    epochs: int | None = setting(None, like=TrainConfig)
    """Training epochs."""
    train_config: str | None = setting(None, path=LOCAL)
    """Optional TOML/JSON file of train settings (e.g. written by ``catsdogs tune``), or a preset's
    name; the run's own --model, --epochs and --seed, when given, win over it."""
    master: str | None = setting(None, like=PreprocessConfig)
    """Spark master URL for preprocessing; a cluster master (spark://, yarn, k8s://) also runs the frozen
    feature pass and evaluate on its executors."""
    seed: int | None = setting(None, like=TrainConfig)
    """Training seed."""
    register: str | None = None
    """With tracking on: register the trained model in the MLflow model registry under this name."""


@dataclass
class TuneConfig(TrackingConfig):
    """Settings of ``catsdogs tune``."""

    data: str | None = setting(None, required="the shards folder written by catsdogs preprocess", path=LOCAL)
    """Shards folder written by ``catsdogs preprocess``."""
    output: str | None = setting(None, required="the folder for best_config.json, study.csv and plots",
                                 path=LOCAL)
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
    threads: int | None = setting(None, ge=0)
    """Torch intra-op threads (not set: all cores)."""


@dataclass
class AuditConfig(SparkConfig):
    """Settings of ``catsdogs audit``."""

    data: str | None = setting(None, required="the shards folder written by catsdogs preprocess", path=LOCAL)
    """Shards folder written by ``catsdogs preprocess`` (every split is audited together)."""
    output: str | None = setting(None, required="the folder for issues.csv and audit.html", path=LOCAL)
    """Folder for issues.csv, audit.html and config.json (each file replaced atomically; issues.csv
    is written last)."""
    run: str | None = setting(None, path=LOCAL)
    """Run folder (or .pt checkpoint) of a trained EfficientNet-Lite model whose backbone gives the
    features and, when it has one, the out-of-distribution detector for outliers (default:
    EfficientNet-Lite0 ImageNet weights and a detector fitted here)."""
    size: int | None = setting(None, ge=0)
    """Side the backbone sees, resized in torch from the shards (not set: 180 px for the ImageNet backbone,
    the run's size with --run; docs/audit.md)."""
    batch_size: int = setting(64, gt=0)
    """Images per forward pass of the feature extractor."""
    threads: int | None = setting(None, ge=0)
    """Torch intra-op threads (not set: all cores)."""
    folds: int = setting(5, ge=2)
    """K of the K-fold logistic heads that give every image an out-of-sample predicted probability."""
    head_c: float = setting(0.1, gt=0.0)
    """Inverse L2 strength of the K-fold logistic heads on standardised features."""
    dup_threshold: float = setting(0.94, gt=0.0, le=1.0)
    """Cosine similarity of two images' tiny descriptors (8 x 8 RGB, mean-centred) at or above which they
    are near duplicates (docs/audit.md)."""
    dup_neighbours: int = setting(5, gt=0)
    """Most near duplicates reported per image (the nearest ones), so a cluster of k copies costs
    O(k) pairs per member, not O(k^2) output."""
    chunk_rows: int = setting(1024, gt=0)
    """Rows per block of the chunked similarity product: memory is chunk_rows x images x 4 bytes
    (75 MB for 18,000 images)."""
    accept_rate: float = setting(0.99, gt=0.0, le=1.0)
    """Outliers: share of validation images the audit's kNN detector (fitted on train) accepts; those
    scoring above it are reported. A --run detector uses its own threshold."""
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




COMMAND_CONFIGS: tuple[type[Config], ...] = (DownloadConfig, PreprocessConfig, TrainConfig, EvaluateConfig,
                                            PredictConfig, ServeConfig, ExportConfig, RunConfig, TuneConfig,
                                            AuditConfig)
"""Every command's settings class (the CLI maps command names to them)."""
