"""Config resolution: defaults < config file < flags; validation names the flag; presets are valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from catsdogs import cli
from catsdogs.config import (
    PreprocessConfig,
    RunConfig,
    TrainConfig,
    build_config,
    field_docs,
    read_config_file,
    save_config,
)
from catsdogs.errors import ConfigError
from catsdogs.presets import PRESETS_DIR, preset_names, preset_path

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
