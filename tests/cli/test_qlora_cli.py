"""The command line on a quantized (QLoRA) run: eval on the run's own 4-bit base, merge into the
dequantized base (the trained model, in full precision) with its report, --requantize, and the
error without bitsandbytes."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from helpers import TINY_MODEL_N, assert_rounding_close, bert_train_args, cli_here

import lorakit
from lorakit.cli import main
from lorakit.cli.trained import load_trained
from lorakit.quant.bnb import quantized_kind

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_run(tiny, tmp_path_factory):
    """A tiny Llama causal-LM adapter trained on an NF4 base through the CLI."""
    out = tmp_path_factory.mktemp("qlora") / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny["llama"]),
                "--data",
                str(tiny["completion"]),
                "--out",
                str(out),
                "--quantize",
                "nf4",
                "--targets",
                "all-linear",
                "--batch-size",
                "8",
                "--epochs",
                "2",
                "--lr",
                "2e-2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return out


def test_eval_reproduces_the_quantized_runs_result(qlora_run, capsys):
    code, out, _ = cli_here(capsys, "eval", str(qlora_run), "--json")
    metrics = [json.loads(line) for line in (qlora_run / "metrics.jsonl").read_text().splitlines()]
    final = [m["eval"] for m in metrics if "eval" in m][-1]
    assert code == 0
    # a mean over the vocabulary's logsumexp (120) and the held-out tokens (under 1,000)
    loss = torch.tensor(json.loads(out)["loss"])
    assert_rounding_close(loss, torch.tensor(final["loss"]), n=TINY_MODEL_N + 120 + 1000)


def test_merge_writes_the_trained_model_in_full_precision(qlora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    code, out, _ = cli_here(capsys, "merge", str(qlora_run), "--out", str(merged))
    assert code == 0, out
    written, naive = (
        float(x)
        for x in re.search(
            r"from the trained model \(nf4 base \+ adapter\) is (\S+) "
            r".*original unquantized weights instead would give (\S+)$",
            out.strip(),
        ).groups()
    )
    assert written < 1e-4 < naive  # the dequantized merge is the trained model; the naive one is not
    plain = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    assert not any(quantized_kind(m) for m in plain.modules()) and plain.dtype == torch.float32
    trained, tokenizer, _ = load_trained(str(qlora_run), None)
    ids = tokenizer(["count from 3 : 4 5"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert_rounding_close(plain(ids).logits, trained(ids).logits, n=TINY_MODEL_N)

    code, out, _ = cli_here(capsys, "merge", str(qlora_run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert code == 0 and "bf16" in out
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16


def test_merge_requantize_writes_a_quantized_folder_and_reports_its_error(qlora_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "requantized"
    code, out, _ = cli_here(capsys, "merge", str(qlora_run), "--out", str(merged), "--requantize")
    assert code == 0, out
    weight_error, output_error = (
        float(x) for x in re.search(r"largest weight error (\S+); .* is (\S+) \(outputs", out).groups()
    )
    assert weight_error > 0 and output_error > 0
    loaded = AutoModelForCausalLM.from_pretrained(str(merged), device_map="cpu")
    assert quantized_kind(loaded.model.layers[0].self_attn.q_proj) == "linear4bit"
    # What Transformers reads back is the re-quantized merge made in memory.
    model, tokenizer, _ = load_trained(str(qlora_run), None)
    with pytest.warns(UserWarning):
        lorakit.merge(model, requantize=True)
    lorakit.quant.bnb.keep_layouts(loaded)
    ids = tokenizer(["count from 3 : 4 5"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_requantize_needs_a_quantized_run(tiny, tmp_path, capsys):
    out = tmp_path / "plain"
    assert (
        main(
            [
                *bert_train_args(tiny, out),
                "--max-steps",
                "1",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code, _, err = cli_here(capsys, "merge", str(out), "--out", str(tmp_path / "m"), "--requantize")
    assert code == 2 and "was not trained on a quantized base" in err


def test_quantize_without_bitsandbytes_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    code, _, err = cli_here(
        capsys,
        *bert_train_args(tiny, tmp_path / "run"),
        "--quantize",
        "nf4",
    )
    assert code == 2 and err.count("\n") == 1 and "pip install 'lorakit[quant]'" in err
