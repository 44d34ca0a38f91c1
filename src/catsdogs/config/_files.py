"""Where settings come from: config files and presets, path settings, and the merge into a config.

Resolution order: dataclass default < config file (``--config``, TOML or JSON; relative paths in it are
relative to the file's own folder) < explicit flag. :func:`build_config` records which settings were
given at all, so a later stage can tell "typed 0.001" from "left at the default 0.001".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from catsdogs.config._fields import (
    LOCAL,
    MODEL,
    REMOTE,
    SET,
    TYPED,
    _coerce,
    flag,
    setting_name,
    settings_of,
    validate,
)
from catsdogs.config.commands import COMMAND_CONFIGS
from catsdogs.errors import ConfigError
from catsdogs.io.storage import SCHEMES, scheme_of
from catsdogs.presets import find_config, preset_names, preset_path
from catsdogs.track.registry import mlflow_scheme

C = TypeVar("C")


@functools.cache
def path_settings() -> frozenset[str]:
    """Names of the settings, in any command, that hold a path (``setting(path=...)``)."""
    return frozenset(f.name for klass in COMMAND_CONFIGS for f in dataclasses.fields(klass)
                     if f.metadata.get("path"))


def read_config_file(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a TOML or JSON config file, or a preset by name; take ``[section]`` when present, else the top.

    Relative paths in a file (settings declared with a ``path`` kind) are relative to the file's own
    folder, so a config names the files next to it from whatever folder the command runs in; a bare
    preset name (``train_config = "seed"``) stays a name.
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
    paths = path_settings()
    return {k: relative_to(p.parent, v) if setting_name(k) in paths else v for k, v in data.items()}


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
            key = setting_name(key)
            if key not in names:
                raise ConfigError(
                    f"unknown setting {key!r} for {cls.__name__}; known: {', '.join(sorted(names))}"
                )
            merged[key] = _coerce(key, value, names[key])
            given[key] = how
    cfg = cls(**merged, given=given)
    for f in settings_of(cls):
        kind, value = f.metadata.get("path"), getattr(cfg, f.name)
        if kind in (LOCAL, REMOTE, MODEL) and isinstance(value, str) and value:
            setattr(cfg, f.name, local_path(value, flag(f.name), kind == REMOTE, kind == MODEL))
    validate(cfg)
    return cfg


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


