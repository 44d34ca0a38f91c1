"""Typed configuration for every command (litgpt-style: field machinery, shared groups, commands).

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

from catsdogs.config._fields import (
    ALIASES,
    FILE,
    INTERNAL,
    LOCAL,
    MODEL,
    PATH_KINDS,
    REMOTE,
    SET,
    TYPED,
    Config,
    check_required,
    choices_of,
    default_of,
    default_text,
    effective_default,
    field_docs,
    flag,
    given_names,
    help_text,
    need,
    require,
    rules_of,
    save_config,
    setting,
    settings_of,
    to_dict,
    type_of,
    typed_names,
    validate,
)
from catsdogs.config._files import build_config, local_path, path_settings, read_config_file, relative_to
from catsdogs.config.commands import (
    AuditConfig,
    DownloadConfig,
    EvaluateConfig,
    ExportConfig,
    PredictConfig,
    PreprocessConfig,
    RunConfig,
    ServeConfig,
    TrainConfig,
    TuneConfig,
)
from catsdogs.config.groups import (
    RUN_SETTING,
    ComputeConfig,
    EngineConfig,
    InferenceConfig,
    SparkConfig,
    TrackingConfig,
)

__all__ = [
    "ALIASES", "FILE", "INTERNAL", "LOCAL", "MODEL", "PATH_KINDS", "REMOTE", "RUN_SETTING", "SET", "TYPED",
    "AuditConfig", "ComputeConfig", "Config", "DownloadConfig", "EngineConfig", "EvaluateConfig",
    "ExportConfig", "InferenceConfig", "PredictConfig", "PreprocessConfig", "RunConfig", "ServeConfig",
    "SparkConfig", "TrackingConfig", "TrainConfig", "TuneConfig", "build_config", "check_required",
    "choices_of", "default_of", "default_text", "effective_default", "field_docs", "flag", "given_names",
    "help_text", "local_path", "need", "path_settings", "read_config_file", "relative_to", "require",
    "rules_of", "save_config", "setting", "settings_of", "to_dict", "type_of", "typed_names", "validate",
]
