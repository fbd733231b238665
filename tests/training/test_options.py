"""training/options.py: the run's options, defined once, give the parser, its defaults and
run_config.json."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields

import pytest

from lorakit.training import RunConfig, TrainingError
from lorakit.training.options import RUN_FILE, add_run_options, read_run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    return parser


def test_every_option_has_a_flag_and_the_dataclass_default():
    parser = _parser()
    options = [f.name for f in fields(RunConfig) if f.name != "extra"]
    assert set(vars(parser.parse_args([]))) == set(options)
    assert RunConfig.from_args(parser.parse_args([])) == RunConfig()
    usage = parser.format_help()
    for name in options:
        assert "--" + name.replace("_", "-") in usage


def test_parsed_values_reach_the_config_typed():
    args = _parser().parse_args(["--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj", "--labels", "a, b",
                                 "--max-steps", "7", "--bf16", "--lr", "3e-4"])
    config = RunConfig.from_args(args)
    assert (config.rank, config.alpha, config.targets, config.labels) == (4, 8.0, ["q_proj", "v_proj"], ["a", "b"])
    assert (config.max_steps, config.bf16, config.lr) == (7, True, 3e-4)
    assert isinstance(config.alpha, float) and isinstance(config.rank, int)


def test_variant_options_reach_the_lora_config():
    args = _parser().parse_args(["--dora", "--init", "pissa", "--loraplus-ratio", "16"])
    config = RunConfig.from_args(args)
    assert (config.dora, config.init, config.loraplus_ratio) == (True, "pissa", 16.0)
    lora = config.lora([])
    assert (lora.use_dora, lora.init) == (True, "pissa")
    with pytest.raises(SystemExit):
        _parser().parse_args(["--init", "loftq"])
    for bad in ("0", "-1", "nan"):
        with pytest.raises(TrainingError, match="--loraplus-ratio must be a number > 0"):
            RunConfig.from_args(_parser().parse_args(["--loraplus-ratio", bad])).check()


def test_run_config_json_round_trip_and_unknown_keys(tmp_path):
    config = RunConfig(rank=4, targets=["query"], out=str(tmp_path))
    (tmp_path / RUN_FILE).write_text(json.dumps(config.to_json()))
    assert read_run(tmp_path) == config
    raw = config.to_json()
    raw["config"]["rnak"] = 4
    (tmp_path / RUN_FILE).write_text(json.dumps(raw))
    with pytest.raises(TrainingError, match=r"run_config.json: unknown run options \['rnak'\]"):
        read_run(tmp_path)
    assert set(asdict(config)) == {f.name for f in fields(RunConfig)}
