"""Groups of settings that several commands share, each declared once (as litgpt's ``args.py``).

A command's config (:mod:`catsdogs.config.commands`) inherits the groups it uses, so a flag shared by
five commands has one declaration, one default and one help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from catsdogs.config._fields import Config, setting
from catsdogs.devices import AUTO, DEVICES
from catsdogs.engines.names import DEFAULT_ENGINE, ENGINES, MAX_DROP_PT


@dataclass
class TrackingConfig(Config):
    """MLflow settings shared by the commands that log to or load from a tracking server."""

    tracking_uri: str | None = None
    """MLflow tracking server (http://HOST:PORT) or store URI to log runs to and load models:/ from;
    default: $MLFLOW_TRACKING_URI; neither set = tracking off (nothing imported, nothing sent)."""
    experiment: str | None = None
    """MLflow experiment the runs go into (default: $MLFLOW_EXPERIMENT_NAME, else catsdogs)."""


RUN_SETTING = "the run's recorded setting"
"""What an inference setting left unset means (evaluate, predict, serve and ``catsdogs.load`` alike)."""


@dataclass
class ComputeConfig(Config):
    """Where torch computes: shared by train, evaluate, predict and serve."""

    device: str = setting(AUTO, choices=DEVICES)
    """Device of the torch computations (auto takes a CUDA GPU when there is one; the onnx and openvino
    engines run on the CPU)."""
    threads: int | None = setting(None, ge=0)
    """Intra-op threads (not set: all cores; serve: the cores divided among its forward workers)."""


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
class SparkConfig(Config):
    """Where the forward passes of evaluate, predict and audit run (``catsdogs.cluster``)."""

    master: str | None = None
    """Spark master to run the forward passes on, as one task per shard (evaluate, audit) or per batch
    of files (predict): local[N], spark://host:7077, yarn or k8s://...; not set: in this process, no JVM."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings with --master, key=value (config file or repeated --spark-conf)."""


