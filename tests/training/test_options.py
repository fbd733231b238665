"""training/options.py and option_check.py: the run's options, defined once, give the parser, its
defaults and run_config.json; every option is checked against its definition before anything is
written, from the command line and from a hand-edited run_config.json."""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, fields

import pytest

from lorakit.cli import main
from lorakit.training import RunConfig, TrainingError
from lorakit.training.option_check import number_problem, parse_bounds
from lorakit.training.options import RUN_FILE, add_run_options, read_run, run_option_fields


def numeric_options() -> list[tuple[str, type, str]]:
    """(name, int or float, range) of every numeric option, read from the definitions."""
    found = []
    for f in run_option_fields():
        kind = f.metadata.get("type") or type(f.default)
        if kind in (int, float):
            found.append((f.name, kind, f.metadata.get("valid")))
    return found


def outside(kind: type, rule: str) -> list[str]:
    """Command-line values just outside `rule`, and the non-finite ones a float option parses."""
    bounds = parse_bounds(rule)
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - 1)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + 1)
    texts = [str(int(v)) if kind is int else repr(float(v)) for v in values]
    return texts + (["nan", "inf", "-inf"] if kind is float else [])


BAD = [(name, text) for name, kind, rule in numeric_options() for text in outside(kind, rule)]


def test_every_numeric_option_states_its_range():
    names = {name for name, _, rule in numeric_options() if rule}
    assert names == {name for name, _, _ in numeric_options()}
    assert {"weight_decay", "lr", "warmup", "dropout", "alpha", "max_length", "eval_split"} <= names
    RunConfig().check()  # the defaults lie inside


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_numeric_option_exits_2_and_writes_nothing(name, value, tmp_path, capsys):
    out = tmp_path / "run"
    flag = "--" + name.replace("_", "-")
    code = main(["train", "--data", str(tmp_path / "never-read.csv"), "--out", str(out), f"{flag}={value}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"{flag} must be" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 2.5}, "--rank must be an integer >= 1, got 2.5"),
        ({"rank": True}, "--rank must be an integer >= 1, got True"),
        ({"weight_decay": "0.1"}, "--weight-decay must be a number >= 0, got '0.1'"),
        ({"max_steps": 0}, "--max-steps must be an integer >= 1, got 0"),
        ({"seed": 10**13}, "--seed must be an integer in [-1e12, 1e12]"),
        ({"device": "gpu"}, "--device must be one of auto, cpu, cuda, got 'gpu'"),
        ({"task": "translate"}, "--task must be one of classify, causal-lm"),
        ({"bf16": "yes"}, "--bf16 must be true or false, got 'yes'"),
        ({"model": 3}, "--model must be a string, got 3"),
        ({"labels": "neg,pos"}, "--labels must be a list of names"),
    ],
)
def test_check_covers_types_and_choices(changes, message):
    with pytest.raises(TrainingError) as caught:
        RunConfig(**changes).check()
    assert message in str(caught.value)


def test_optional_options_may_be_none_and_ints_are_numbers():
    RunConfig(max_steps=None, threads=None, save_every=None, alpha=16, lr=1, seed=-3).check()


def test_number_problem_and_bounds():
    assert 0 in parse_bounds("[0, 1)") and 1 not in parse_bounds("[0, 1)")
    assert 0 not in parse_bounds("> 0") and 1e-9 in parse_bounds("> 0")
    assert number_problem(math.nan, float, ">= 0", False) == "a number >= 0"
    assert number_problem(None, int, ">= 1", True) is None
    assert number_problem(None, int, ">= 1", False) == "an integer >= 1"
    with pytest.raises(ValueError, match="not a range"):
        parse_bounds("positive")


def test_a_bad_value_in_run_config_json_names_the_file(tmp_path, capsys):
    run = tmp_path / "edited"
    run.mkdir()
    config = RunConfig(weight_decay=-1.0)
    (run / "run_config.json").write_text(json.dumps(config.to_json()))
    code = main(["train", "--repeat", str(run), "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert code == 2 and "run_config.json: --weight-decay must be a number >= 0, got -1.0" in err
    assert not (tmp_path / "again").exists()


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
    args = _parser().parse_args(
        [
            "--rank",
            "4",
            "--alpha",
            "8",
            "--targets",
            "q_proj,v_proj",
            "--labels",
            "a, b",
            "--max-steps",
            "7",
            "--bf16",
            "--lr",
            "3e-4",
        ]
    )
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


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"targets": 5}, "--targets must be a preset, a regex or a list of module names, got 5"),
        ({"targets": ["query", 5]}, "--targets must be a preset, a regex or a list of module names"),
        ({"labels": []}, "--labels must be a list of names, got []"),
    ],
)
def test_check_covers_the_list_options(changes, message, tmp_path, capsys):
    with pytest.raises(TrainingError, match=re.escape(message)):
        RunConfig(**changes).check()
    run = tmp_path / "edited"  # the same in a hand-edited run_config.json, which is named
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(RunConfig(**changes).to_json()))
    code = main(["train", "--repeat", str(run), "--out", str(tmp_path / "again")])
    assert code == 2 and f"run_config.json: {message}" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("mode", ["--resume", "--repeat"])
@pytest.mark.parametrize("options", [["--epochs", "5"], ["--rank", "2", "--lr", "0.1"]])
def test_resume_and_repeat_refuse_options_they_would_ignore(mode, options, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(RunConfig().to_json()))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    out = ["--out", str(tmp_path / "again")] if mode == "--repeat" else []
    code = main(["train", mode, str(run), *out, *options])
    err = capsys.readouterr().err
    flags = ", ".join(o for o in options if o.startswith("--"))
    assert code == 2 and f"{mode} uses every option saved in its run_config.json, so {flags} would be ignored" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and not (tmp_path / "again").exists()
