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


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_presets_are_valid_configs(preset: Path) -> None:
    run = build_config(RunConfig, read_config_file(preset, "run"))
    train = build_config(TrainConfig, read_config_file(ROOT / run.train_config, "train"))
    assert run.model == train.model
    assert (ROOT / run.train_config).resolve() == preset.resolve()
