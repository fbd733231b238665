"""The `lorakit` command on a user's mistakes: exit status 2 and one line naming the file,
option or module, nothing written; and the limits the commands hold to (the model's position
limit, what generate passes the model, merge's output folder, damaged files for inspect)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import bert_train_args, files_of, make_model, randomize_adapter
from helpers import cli_here as lorakit_cli
from helpers import train_tiny as run

import lorakit
from lorakit.cli.trained import load_trained


def one_line_error(code: int, err: str) -> bool:
    return code == 2 and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A tiny classifier run (adapter folder with labels.json and metrics.jsonl)."""
    out = tmp_path_factory.mktemp("errors") / "run"
    run(tiny, out, max_steps=2)
    return out


# ---- train: the model's position limit, devices ----------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_max_length_above_the_models_limit_is_lowered_with_a_notice(kind, tiny, tmp_path, capsys):
    data = tiny["classify"] if kind == "bert" else tiny["completion"]
    key = "max_position_embeddings" if kind == "bert" else "n_positions"
    out = tmp_path / "run"
    code, text, err = lorakit_cli(
        capsys,
        "train",
        "--model",
        str(tiny[kind]),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-length",
        "1000",
        "--max-steps",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "1",
    )
    assert code == 0, err
    assert f"notice: --max-length 1000 is above the model's position limit, 64 (from {key} in its config)" in text
    saved = json.loads((out / "run_config.json").read_text())["config"]
    assert saved["max_length"] == 1000 and saved["extra"]["max_length"] == 64  # asked for, and used
    code, _, err = lorakit_cli(capsys, "eval", str(out), "--max-length", "1000")
    assert code == 0 and "position limit, 64" in err


def test_device_cuda_without_cuda_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    code, _, err = lorakit_cli(
        capsys,
        *bert_train_args(tiny, out),
        "--device",
        "cuda",
    )
    assert one_line_error(code, err) and "--device cuda: no CUDA device is available" in err
    assert not out.exists()


# ---- merge: never into its own input ---------------------------------------------------------


@pytest.fixture
def merge_case(tiny, adapter, tmp_path):
    """A copy of the adapter folder beside a copy of its base model, the adapter pointing at it."""
    base = shutil.copytree(tiny["bert"], tmp_path / "base")
    folder = shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder, base


@pytest.mark.parametrize(
    ("where", "says"),
    [
        (lambda a, b: a, "is the adapter folder"),
        (lambda a, b: a.parent, "holds the adapter folder"),
        (lambda a, b: a / "merged", "is inside the adapter folder"),
        (lambda a, b: b, "is the base model folder"),
        (lambda a, b: b / "merged", "is inside the base model folder"),
        (lambda a, b: b.parent / ".", "holds the adapter folder"),
    ],
)
def test_merge_refuses_an_out_that_is_or_holds_its_input(where, says, merge_case, capsys):
    folder, base = merge_case
    root = folder.parent
    before = files_of(root)
    code, _, err = lorakit_cli(capsys, "merge", str(folder), "--out", str(where(folder, base)), "--overwrite")
    assert one_line_error(code, err) and says in err
    assert files_of(root) == before


@pytest.mark.parametrize("folder", ["documents", "model folder"])
def test_merge_refuses_a_folder_it_did_not_write_even_with_overwrite(folder, merge_case, tiny, tmp_path, capsys):
    adapter, _ = merge_case
    mine = tmp_path / "mine"
    if folder == "documents":
        mine.mkdir()
        (mine / "thesis.tex").write_text("years of work")
    else:  # a model folder of the user's (config.json and weights), not one merge wrote
        shutil.copytree(tiny["bert"], mine)
    before = files_of(mine)
    code, _, err = lorakit_cli(capsys, "merge", str(adapter), "--out", str(mine), "--overwrite")
    assert one_line_error(code, err)
    assert f"--out {mine} holds files that are not a merged model folder (no merge.json)" in err
    assert files_of(mine) == before
    (tmp_path / "file").write_text("x")
    code, _, err = lorakit_cli(capsys, "merge", str(adapter), "--out", str(tmp_path / "file" / "merged"))
    assert one_line_error(code, err) and "is a file, not a folder" in err


def test_merge_overwrite_replaces_only_what_merge_wrote(merge_case, tmp_path, capsys):
    adapter, _ = merge_case
    merged = tmp_path / "merged"
    assert lorakit_cli(capsys, "merge", str(adapter), "--out", str(merged))[0] == 0
    record = json.loads((merged / "merge.json").read_text())
    assert record["files"] == sorted(p.name for p in merged.iterdir()) and "config.json" in record["files"]
    (merged / "README.md").write_text("my notes on this model")
    (merged / "model.safetensors").write_bytes(b"stale")  # replaced: a file merge wrote
    assert lorakit_cli(capsys, "merge", str(adapter), "--out", str(merged), "--overwrite")[0] == 0
    assert (merged / "README.md").read_text() == "my notes on this model"
    assert sorted(p.name for p in merged.iterdir()) == sorted([*record["files"], "README.md"])
    assert (merged / "model.safetensors").stat().st_size > 1000
    # A file of the user's with the name of one merge writes (not listed in merge.json) is refused.
    listed = [f for f in record["files"] if f != "tokenizer.json"]
    (merged / "merge.json").write_text(json.dumps({**record, "files": listed}))
    before = files_of(merged)
    code, _, err = lorakit_cli(capsys, "merge", str(adapter), "--out", str(merged), "--overwrite")
    assert one_line_error(code, err) and f"--out {merged} holds tokenizer.json, which lorakit merge writes" in err
    assert files_of(merged) == before


# ---- generate: what training passes ----------------------------------------------------------


def test_generate_with_a_tokenizer_that_returns_token_type_ids(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_model(tmp_path / "llama", "llama")
    config_file = base / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    config_file.write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    assert "token_type_ids" in tokenizer("count from 3 :")  # what broke generate

    model = AutoModelForCausalLM.from_pretrained(str(base))
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets="all-linear"))
    randomize_adapter(model)
    lorakit.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), task_type="CAUSAL_LM")
    code, out, err = lorakit_cli(
        capsys, "generate", str(tmp_path / "adapter"), "--prompt", "count from 3 :", "--max-new-tokens", "5"
    )
    assert code == 0, err
    ours, _, _ = load_trained(str(tmp_path / "adapter"), None)
    enc = tokenizer("count from 3 :", return_tensors="pt")
    ids = ours.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )[0, enc["input_ids"].shape[1] :]
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert out.strip() == (expected or "(no text: the model produced only special tokens, e.g. end-of-text)")

    code, _, err = lorakit_cli(capsys, "generate", str(tmp_path / "adapter"), "--prompt", "count " * 70)
    assert one_line_error(code, err) and "model's position limit, 64" in err


# ---- inspect and eval: damaged or unreadable files name the file -----------------------------


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: (f / "labels.json").write_text("{"), "labels.json: invalid JSON at line 1"),
        (lambda f: (f / "labels.json").write_text('{"id2label": {"1": "a"}}'), "labels.json: expected"),
        (lambda f: ((f / "labels.json").unlink(), (f / "labels.json").mkdir()), "labels.json: cannot be read"),
        (lambda f: (f / "metrics.jsonl").write_text('{"step": 0}\nnot json\n'), "metrics.jsonl:2: not valid JSON"),
        (lambda f: (f / "metrics.jsonl").write_text('{"step": "0"}\n'), "metrics.jsonl:1: expected an object"),
        (
            lambda f: (f / "metrics.jsonl").write_text('{"step": 2, "eval": {"accuracy": null}}\n'),
            "metrics.jsonl:1: 'eval' must be an object of numbers",
        ),
        (lambda f: ((f / "metrics.jsonl").unlink(), (f / "metrics.jsonl").mkdir()), "metrics.jsonl: cannot be read"),
    ],
)
def test_inspect_names_a_damaged_file(damage, says, adapter, tmp_path, capsys):
    folder = shutil.copytree(adapter, tmp_path / "adapter")
    damage(folder)
    code, _, err = lorakit_cli(capsys, "inspect", str(folder))
    assert one_line_error(code, err) and f"{folder}/{says}" in err


def test_unreadable_files_are_one_line(adapter, capsys, monkeypatch):
    # Tests may run as root, where chmod does not stop reads: make the reads fail instead.
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "metrics.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    code, _, err = lorakit_cli(capsys, "inspect", str(adapter))
    assert one_line_error(code, err) and f"{adapter}/metrics.jsonl: cannot be read (Permission denied)" in err
    monkeypatch.undo()

    def refuse(folder):
        raise PermissionError(13, "Permission denied", str(Path(folder) / "adapter_model.safetensors"))

    monkeypatch.setattr("lorakit.cli.inspect.read_tensor_shapes", refuse)
    code, _, err = lorakit_cli(capsys, "inspect", str(adapter))
    assert one_line_error(code, err) and f"{adapter}/adapter_model.safetensors: Permission denied" in err


@pytest.mark.parametrize(("option", "value"), [("--batch-size", "0"), ("--max-length", "1")])
def test_eval_checks_its_numbers_first(option, value, adapter, capsys):
    code, _, err = lorakit_cli(capsys, "eval", str(adapter), option, value)
    assert one_line_error(code, err) and f"{option} must be an integer" in err


def test_generate_checks_max_new_tokens(adapter, capsys):
    code, _, err = lorakit_cli(capsys, "generate", str(adapter), "--prompt", "good", "--max-new-tokens", "0")
    assert one_line_error(code, err) and "--max-new-tokens must be an integer >= 1" in err


# ---- what the user's files and options can hold: one line, nothing written -------------------


def _edit_config(folder: Path, **fields) -> None:
    file = folder / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | fields))


@pytest.mark.parametrize("command", ["eval", "generate", "merge", "inspect"])
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        (dict(task_type=["SEQ_CLS"]), "task_type=['SEQ_CLS'] must be a string"),  # was: unhashable type 'list'
        (dict(base_model_name_or_path=5), "base_model_name_or_path=5 must be a string"),
        (dict(use_rslora="false"), "use_rslora='false' must be true or false"),
        (
            dict(base_model_name_or_path="/nonexistent/base"),
            "base_model_name_or_path /nonexistent/base is not a folder",
        ),
    ],
)
def test_an_adapter_config_a_command_cannot_use_is_one_line(command, fields, says, adapter, tmp_path, capsys):
    if command == "inspect" and "nonexistent" in str(fields):
        pytest.skip("inspect loads no model")
    folder = shutil.copytree(adapter, tmp_path / "adapter")
    _edit_config(folder, **fields)
    extra = {"generate": ["--prompt", "good"], "merge": ["--out", str(tmp_path / "merged")]}.get(command, [])
    before = files_of(tmp_path)
    code, _, err = lorakit_cli(capsys, command, str(folder), *extra)
    assert one_line_error(code, err) and f"{folder}/adapter_config.json: {says}" in err
    assert files_of(tmp_path) == before


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--targets", "nope"], "targets 'nope'"),  # a message that lists the model's modules, folded to one line
        (["--rank", "5000"], "--rank 5000 is above the size of every layer it adapts (the largest is 32)"),
        (["--labels", ""], "--labels must be a list of names, got []"),
        (["--out-link"], "is a symbolic link to"),
        (["--model-damaged"], "could not load"),
    ],
)
def test_train_options_and_folders_the_run_cannot_use(options, says, tiny, tmp_path, capsys):
    out, model = tmp_path / "run", tiny["bert"]
    if options == ["--out-link"]:
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "missing")
        options = []
    if options == ["--model-damaged"]:
        model = shutil.copytree(tiny["bert"], tmp_path / "model")
        (model / "model.safetensors").write_bytes(b"not safetensors")
        options = []
    before = files_of(tmp_path)
    code, _, err = lorakit_cli(
        capsys,
        "train",
        "--model",
        str(model),
        "--data",
        str(tiny["classify"]),
        "--out",
        str(out),
        "--max-steps",
        "1",
        "--threads",
        "1",
        *options,
    )
    assert one_line_error(code, err) and says in err
    assert files_of(tmp_path) == before and not (tmp_path / "missing").exists() and not (tmp_path / "run").exists()
