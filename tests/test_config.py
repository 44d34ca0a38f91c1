"""Config resolution: defaults < config file < flags; validation names the flag; presets are valid."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from catsdogs import cli
from catsdogs.config import (
    EvaluateConfig,
    InferenceConfig,
    PredictConfig,
    PreprocessConfig,
    RunConfig,
    ServeConfig,
    TrainConfig,
    build_config,
    choices_of,
    default_of,
    field_docs,
    given_names,
    help_text,
    read_config_file,
    rules_of,
    save_config,
    settings_of,
    to_dict,
    typed_names,
)
from catsdogs.errors import ConfigError
from catsdogs.pipeline import train_config
from catsdogs.presets import PRESETS_DIR, preset_names, preset_path
from catsdogs.train.contract import check_applicable

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_docstring() -> None:
    for cls in (command.config for command in cli.COMMANDS.values()):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_flags_override_file_which_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text('[train]\nepochs = 7\nlr = 0.01\n')
    args = cli.build_parser().parse_args(["train", "--config", str(f), "--lr", "0.5"])
    cfg = cli.resolve("train", args)
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (7, 0.5, TrainConfig().batch_size)


@pytest.mark.parametrize(("layer", "needle"), [
    ({"size": 0}, "--size"),
    ({"val_frac": 0.6, "test_frac": 0.5}, "--val-frac"),
    ({"resize": "squash"}, "--resize"),
    ({"sizee": 3}, "sizee"),
    ({"size": "big"}, "--size"),
])
def test_bad_values_name_the_flag(layer: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_config(PreprocessConfig, layer)


def test_json_config_and_saved_config_round_trip(tmp_path: Path) -> None:
    cfg = build_config(TrainConfig, {"model": "cnn", "epochs": 3})
    save_config(cfg, tmp_path / "config.json")
    again = build_config(TrainConfig, json.loads((tmp_path / "config.json").read_text()))
    assert again == cfg
    assert read_config_file(tmp_path / "config.json")["model"] == "cnn"


def test_misspelt_flag_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--epoch", "3"])
    assert exc.value.code == 2
    assert "--epoch" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_help_prints(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Help texts hold "%" (e.g. "99 % of validation"); argparse must not read it as a format."""
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("name", preset_names())
def test_presets_are_valid_configs_given_by_name(name: str) -> None:
    run = build_config(RunConfig, read_config_file(name, "run"))
    assert run.train_config == name  # each preset's train section is its own file, by name
    train = build_config(TrainConfig, read_config_file(run.train_config, "train"))
    assert run.model == train.model
    assert preset_path(name) == PRESETS_DIR / f"{name}.toml"


def test_presets_are_the_makefiles_and_a_file_wins_over_a_preset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert {"effnet_lite12_frozen", "effnet_lite0_frozen", "seed"} <= set(preset_names())
    makefile = (ROOT / "Makefile").read_text()
    assert "PRESETS := src/catsdogs/presets" in makefile and PRESETS_DIR == ROOT / "src/catsdogs/presets"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seed").write_text('{"epochs": 99}')  # a JSON file in the working folder, named like a preset
    assert read_config_file("seed") == {"epochs": 99}
    for bad in ("no_such_preset", "seed.toml", "presets/seed"):
        with pytest.raises(ConfigError, match="is no preset .*effnet_lite12_frozen.*fix --config"):
            read_config_file(bad)
    assert cli.main(["train", "--config", "no_such_preset"]) == 2
    err = capsys.readouterr().err
    assert "no_such_preset" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------- what was typed is what runs


def resolve(*argv: str) -> object:
    return cli.resolve(argv[0], cli.build_parser().parse_args(list(argv)))


def test_typed_settings_are_recorded_as_given_even_at_their_default(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text("[train]\nepochs = 7\n")
    cfg = resolve("train", "--config", str(f), "--lr", str(TrainConfig().lr))
    assert given_names(cfg) == {"epochs", "lr"}  # --lr equals the default, and still was typed
    assert typed_names(cfg) == {"lr"}  # the file's epochs was set, not typed
    assert given_names(resolve("train")) == frozenset()
    assert "given" not in to_dict(cfg) and "--given" not in cli.build_parser().format_help()


@pytest.mark.parametrize("epochs", [3, TrainConfig().epochs])  # the second equals train's default
def test_run_epochs_win_over_the_train_config_file_for_any_value(tmp_path: Path, epochs: int) -> None:
    tuned = tmp_path / "tuned.toml"
    tuned.write_text("[train]\nmodel = \"cnn\"\nepochs = 7\n")
    run = resolve("run", "--train-config", str(tuned), "--epochs", str(epochs))
    assert train_config(run, tmp_path / "s", tmp_path / "o").epochs == epochs
    untyped = resolve("run", "--train-config", str(tuned))
    assert (train_config(untyped, tmp_path / "s", tmp_path / "o").epochs, untyped.epochs) == (7, None)


@pytest.mark.parametrize("preset", sorted(PRESETS_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_a_preset_given_by_absolute_path_works_from_another_folder(preset: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = resolve("run", "--config", str(preset), "--data", "pets", "--output", "out")
    train = train_config(run, tmp_path / "shards", tmp_path / "out")  # main: 'configs/...' does not exist
    assert train.model == read_config_file(preset, "train")["model"]
    check_applicable(train)  # e.g. no --epochs forwarded to a frozen-backbone preset


def test_paths_in_a_config_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    f = tmp_path / "conf" / "p.json"
    f.write_text(json.dumps({"data": "shards", "out": "/abs/run", "cache_dir": "s3a://b/c", "model": "cnn"}))
    layer = read_config_file(f)
    assert layer == {"data": str(tmp_path / "conf" / "shards"), "out": "/abs/run", "cache_dir": "s3a://b/c",
                     "model": "cnn"}


def test_catsdogs_help_opens_with_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    opening = out.split("positional arguments")[0]
    assert "cats from dogs" in opening and "unknown" in opening and "catsdogs.load" in opening
    assert "dispatch" not in out and "dataclass" not in out


def subparsers() -> dict[str, object]:
    action = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return dict(action.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_flag_help_says_the_default_once_and_the_choices_from_their_list(command: str) -> None:
    parser = subparsers()[command]
    fields = {f.name: f for f in settings_of(cli.COMMANDS[command].config)}
    for action in parser._actions:  # type: ignore[attr-defined]
        if action.dest not in fields or action.help == argparse.SUPPRESS:  # a hidden alias (ALIASES)
            continue
        text = action.help % {}  # argparse's own formatting ("%%" -> "%")
        assert text.count("default:") + text.count("(default ") == 1, (action.dest, text)
        choices = choices_of(fields[action.dest])
        if choices:
            assert "one of: " + ", ".join(map(str, choices)) in text, action.dest


MEASURED_CHOICES = {"ood_method"}
"""Fields whose docstring compares every choice by measurement (the figures are the point)."""


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_choice_lists_are_objects_from_light_modules_never_retyped(command: str) -> None:
    cls = cli.COMMANDS[command].config
    docs = field_docs(cls)
    for f in settings_of(cls):
        spec = rules_of(f).get("choices")
        if spec is None:
            continue
        assert not isinstance(spec, str), f"{f.name}: a choice list is an object, not a 'module:NAME' string"
        names = [str(c) for c in choices_of(f)]
        spelled = [c for c in names if re.search(rf"(?<![\w-]){re.escape(c)}(?![\w-])", docs[f.name])]
        assert f.name in MEASURED_CHOICES or spelled != names, f"{cls.__name__}.{f.name} re-types its choices"


def test_the_inference_group_is_declared_once_and_run_forwards_without_respelling() -> None:
    group = {f.name for f in settings_of(InferenceConfig)}
    assert {"tta", "reject", "calibrate", "device", "threads", "backend", "int8_max_drop"} <= group
    for cls in (EvaluateConfig, PredictConfig, ServeConfig):
        assert issubclass(cls, InferenceConfig)
        assert not group & set(cls.__dict__.get("__annotations__", {})), cls.__name__
    for f in settings_of(RunConfig):
        if f.name in ("model", "size", "epochs", "master", "seed"):
            assert default_of(f) is None and f.metadata["like"] in (TrainConfig, PreprocessConfig), f.name
    assert "default: 'seed', as catsdogs train --model" in help_text(
        {f.name: f for f in settings_of(RunConfig)}["model"], "Model.")


def test_a_config_file_holding_every_setting_is_not_held_against_the_trainer(tmp_path: Path) -> None:
    """A run's own config.json lists --lr and --epochs; fed to a frozen-backbone run they are not typed."""
    f = tmp_path / "config.json"
    save_config(TrainConfig(model="effnet_lite0", freeze="backbone"), f)
    check_applicable(resolve("train", "--config", str(f)))
    with pytest.raises(ConfigError, match="--epochs does not apply with --freeze backbone"):
        check_applicable(resolve("train", "--config", str(f), "--epochs", "3"))
    tuned = tmp_path / "best.json"  # tune's best_config.json names the int8 settings too
    save_config(TrainConfig(model="cnn"), tuned)
    check_applicable(resolve("train", "--config", str(tuned)))
    run = resolve("run", "--train-config", str(tuned), "--epochs", "2")
    check_applicable(train_config(run, tmp_path / "s", tmp_path / "o"))


@pytest.mark.parametrize("command", ["train", "run", "evaluate", "tune", "predict", "audit"])
def test_out_is_a_hidden_alias_of_output(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args([command, "--out", "somewhere"])
    assert args.output == "somewhere"
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    shown = capsys.readouterr().out
    assert "--output" in shown and not re.search(r"--out\b(?!put)", shown)


def test_a_config_file_written_with_out_still_reads(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    f = tmp_path / "conf" / "old.json"
    f.write_text(json.dumps({"data": "shards", "out": "run"}))
    cfg = build_config(TrainConfig, read_config_file(f))
    assert cfg.output == str(tmp_path / "conf" / "run")
    assert "output" in given_names(cfg)
