"""The ``catsdogs`` command line: parses flags into a config dataclass and dispatches.

It holds no pipeline logic. Flags are generated from the config dataclasses in :mod:`catsdogs.config`
(field docstrings become help text), so every setting is a flag and a config-file key at once.
User errors (:class:`catsdogs.errors.CatsdogsError`) print one line and exit 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import catsdogs
from catsdogs import __version__
from catsdogs import config as cfgmod
from catsdogs.errors import CatsdogsError
from catsdogs.extras import install_hint


@dataclass(frozen=True)
class Command:
    """One sub-command: its config class, the function that runs it, and its one-line help."""

    config: type
    """Dataclass in :mod:`catsdogs.config`; its fields are the flags."""
    target: str
    """``module:function`` taking the resolved config; imported only when the command runs."""
    help: str
    spark_target: str = ""
    """``module:function`` run instead when the config names a Spark ``master`` (predict on a cluster):
    the in-process command module then never reaches Spark."""


COMMANDS: dict[str, Command] = {
    "download": Command(cfgmod.DownloadConfig, "catsdogs.download.command:main",
                        "Fetch, verify and unpack the Cats and Dogs archive into OUTPUT/PetImages."),
    "preprocess": Command(cfgmod.PreprocessConfig, "catsdogs.preprocess.command:main",
                          "Decode, verify, resize and split an image folder into shards with Spark."),
    "train": Command(cfgmod.TrainConfig, "catsdogs.train.launch:main", "Train a model on the shards."),
    "evaluate": Command(cfgmod.EvaluateConfig, "catsdogs.evaluate.command:main",
                        "Metrics, plots and an HTML report for a trained run."),
    "predict": Command(cfgmod.PredictConfig, "catsdogs.infer.predict:main",
                       "Classify image files or folders (with --master, as Spark tasks).",
                       spark_target="catsdogs.cluster.predict:main"),
    "serve": Command(cfgmod.ServeConfig, "catsdogs.serve.app:main",
                     "Serve the model over HTTP (FastAPI) with a web page."),
    "export": Command(cfgmod.ExportConfig, "catsdogs.infer.export:main",
                      "Export a trained model to ONNX or TorchScript."),
    "run": Command(cfgmod.RunConfig, "catsdogs.pipeline:main", "preprocess -> train -> evaluate in one go."),
    "tune": Command(cfgmod.TuneConfig, "catsdogs.train.tune:main",
                    "Optuna hyperparameter search on train/val."),
    "audit": Command(cfgmod.AuditConfig, "catsdogs.audit.command:main",
                     "Find label errors, duplicates, train/test leakage and non-pets in the shards."),
}
"""Every sub-command by name; the section of a config file with the same name configures it."""


EPILOG = """\
Start with 'make run' (downloads the photos and runs the default preset), or step by step:
  catsdogs download --output data
  catsdogs run --data data/PetImages --output runs/first
  catsdogs predict photos/ --run runs/first
  catsdogs serve --run runs/first
'catsdogs COMMAND --help' lists every flag with its default; README.md has the rest."""


def _parse_kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, value


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per setting; defaults are suppressed so that only what was typed reaches the config."""
    docs = cfgmod.field_docs(cls)
    # The command's own flags first, shared ones (TrackingConfig's) after them in --help.
    own = set(cls.__dict__.get("__annotations__", {}))
    for f in sorted(cfgmod.settings_of(cls), key=lambda f: f.name not in own):
        typ, _optional = cfgmod.type_of(f)
        # argparse %-formats help strings: a literal "%" (as in "99 %") must be doubled.
        helptext = cfgmod.help_text(f, docs.get(f.name, "")).replace("%", "%%")
        name = cfgmod.flag(f.name)
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helptext}
        if typ.startswith("list"):
            parser.add_argument(f.name, nargs="*", metavar=f.name.upper(), default=argparse.SUPPRESS,
                                help=helptext)
        elif typ.startswith("dict"):
            parser.add_argument(name, action="append", type=_parse_kv, metavar="KEY=VALUE", **kw)
        elif typ == "bool":  # --tta / --no-tta; an inference one left out is the run's recorded setting
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        else:
            conv = {"int": int, "float": float}.get(typ, str)
            parser.add_argument(name, type=conv, metavar=f.name.upper(), **kw)
            for old in (old for old, new in cfgmod.ALIASES.items() if new == f.name):
                parser.add_argument(cfgmod.flag(old), type=conv, **{**kw, "help": argparse.SUPPRESS})


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="catsdogs", description=catsdogs.__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        cls, helptext = command.config, command.help
        # allow_abbrev=False: a misspelt flag (--epoch) must be an error, not silently --epochs.
        p = sub.add_parser(name, help=helptext, description=helptext, allow_abbrev=False)
        p.add_argument("--config", default=None, metavar="FILE",
                       help="TOML/JSON file of settings; explicit flags override it")
        p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
        _add_fields(p, cls)
    return parser


def _version() -> str:
    return f"catsdogs {__version__}"


def resolve(command: str, args: argparse.Namespace) -> Any:
    """Merge defaults, the config file and explicit flags into the command's config object."""
    cls = COMMANDS[command].config
    given = {k: v for k, v in vars(args).items() if k not in {"command", "config", "debug"}}
    if "spark_conf" in given:
        given["spark_conf"] = dict(given["spark_conf"])
    layers = [cfgmod.read_config_file(args.config, command)] if args.config else []
    return cfgmod.build_config(cls, *layers, typed=given)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``catsdogs`` console script."""
    # Before torch loads: idle OpenMP threads sleep instead of spinning. On 2 shared cores (Spark
    # workers, DataLoader workers, a server) spinning threads starved each other: Lite0 inference
    # measured 17-20 images/s with spinning vs 126 with PASSIVE under load (docs/models.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    debug = bool(args.debug)
    try:
        cfg = resolve(args.command, args)
        command = COMMANDS[args.command]
        spark = bool(command.spark_target and getattr(cfg, "master", ""))
        target = command.spark_target if spark else command.target
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(cfg)
        return int(result or 0)
    except CatsdogsError as exc:
        if debug:
            raise
        print(f"catsdogs {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # an optional extra is not installed: say which one
        hint = install_hint(exc, args.command)
        if debug or hint is None:
            raise
        print(f"catsdogs {args.command}: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"catsdogs {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
