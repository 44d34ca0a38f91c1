"""The machinery of catsdogs' settings: fields with their rules, what was given, help text, validation.

A setting is a dataclass field declared with :func:`setting` (choices, bounds, what a required one is
for, the kind of path it holds); the string literal under it is its documentation, which the CLI turns
into ``--help``. Nothing here knows a command: the groups are in :mod:`catsdogs.config.groups`, the
commands in :mod:`catsdogs.config.commands`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from catsdogs.errors import ConfigError
from catsdogs.io.atomic import atomic_write_text

C = TypeVar("C")

Choices = tuple[Any, ...] | Callable[[], tuple[Any, ...]]
"""A choice list, or a function returning one (e.g. the model registry's names), from a light module."""


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            choices: Choices | None = None, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None, required: str = "",
            like: type | None = None, unset: str = "", path: str = "") -> Any:
    """Declare a config field with its rules: allowed values, bounds, and (if required) what it is for.

    ``required`` is the rest of the error sentence "--FLAG is required: ...", checked by
    :func:`check_required` where the command needs the value (not at parse time: ``--resume`` takes
    ``--data`` from the checkpoint, for example). ``like`` names the config class whose field of the
    same name this one forwards (``catsdogs run --epochs`` is ``train --epochs``): it takes that field's
    rules, and its own default is None (not given: the other command's default applies), so the
    default is said once. ``unset`` says what a None default stands for, for the help text (e.g. the
    run's recorded setting). ``path`` is the kind of path the field holds (:data:`PATH_KINDS`): it decides
    which URIs it takes and that a config file's relative value is relative to the file.
    """
    meta = {k: v for k, v in (("choices", choices), ("gt", gt), ("ge", ge), ("lt", lt), ("le", le),
                              ("required", required), ("like", like), ("unset", unset), ("path", path))
            if v not in (None, "")}
    return field(default=default, default_factory=default_factory, metadata=meta)


FILE = "file"
"""Path kind: a local file or folder (a config file's relative value is relative to the file)."""
LOCAL = "local"
"""Path kind: a local folder or file; also a ``file://`` URI."""
REMOTE = "remote"
"""Path kind: like :data:`LOCAL`, or an s3a://, s3:// or hdfs:// URI (the data that outgrows a machine)."""
MODEL = "model"
"""Path kind: like :data:`LOCAL`, or an MLflow model URI (models:/NAME/VERSION, runs:/ID/model)."""
PATH_KINDS: tuple[str, ...] = (FILE, LOCAL, REMOTE, MODEL)
"""Values of ``setting(path=...)``; :data:`FILE` paths are resolved against a config file only."""

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


ALIASES: Mapping[str, str] = {"out": "output"}
"""Former setting names still read, as a flag or a config-file key, but hidden from ``--help``: every
command's output folder or file is ``--output``, and runs, tune studies and config files written with
``--out`` keep working."""

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
    if default_of(f) is None:
        return str(f.metadata.get("unset") or "not set")
    return repr(default_of(f))


def flag(name: str) -> str:
    """Return the CLI flag spelling of a config field name."""
    return "--" + name.replace("_", "-")


def type_of(f: dataclasses.Field) -> tuple[str, bool]:  # type: ignore[type-arg]
    """A field's type name without ``| None``, and whether None ("not given") is allowed."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = typ.removesuffix(" | None")
    return base, base != typ


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:  # type: ignore[type-arg]
    """Coerce a config-file value to the field's type, with an error naming the flag."""
    typ, optional = type_of(f)
    try:
        if optional and (value is None or (typ == "str" and value == "")):
            return None  # "" in a config file or on the command line is "not given", as None is
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


def setting_name(key: str) -> str:
    """The field a flag-style or config-file key names: dashes as underscores, a former name as today's."""
    name = key.replace("-", "_")
    return ALIASES.get(name, name)


def need(cfg: Any, name: str) -> str:
    """The value of a required string setting; :class:`ConfigError` "--FLAG is required" when not given.

    The typed form of :func:`require`, for the places that use the value.
    """
    require(cfg, name)
    return str(getattr(cfg, name))


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
