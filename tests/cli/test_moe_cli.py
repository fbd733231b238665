"""`lorakit train` on a Mixture-of-Experts model folder, end to end: the experts trained as PEFT's
target_parameters (or written per expert for vLLM), then inspect, eval, merge and PEFT on them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_MODEL_N, assert_rounding_close, files_of, make_model, tensors
from helpers import cli_here as lorakit

from lorakit.cli.trained import load_trained

TRAIN = ("--targets", "attention+mlp", "--batch-size", "8", "--max-steps", "4", "--lr", "1e-2", "--threads", "1")


@pytest.fixture(scope="module")
def moe_run(moe, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_run") / "run"
    code = lorakit_main(
        "train", "--model", str(moe["base"]), "--data", str(tiny["completion"]), "--out", str(out), *TRAIN
    )
    assert code == 0
    return out


def lorakit_main(*args: str) -> int:
    from lorakit.cli import main

    return main(list(args))


def test_train_adapts_the_experts_and_peft_reads_the_run(moe, moe_run, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((moe_run / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    )
    code, out, _ = lorakit(capsys, "inspect", str(moe_run))
    assert code == 0 and "4 fused expert parameters: down_proj, gate_up_proj" in out
    ours, tokenizer, _ = load_trained(str(moe_run), None)
    ids = tokenizer(["count from 3 : 4 5"], return_tensors="pt")["input_ids"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(moe["base"])), str(moe_run)).eval()
    with torch.no_grad():
        expected = ours(ids).logits
        assert_rounding_close(reference(ids).logits, expected, n=TINY_MODEL_N)
        base = AutoModelForCausalLM.from_pretrained(str(moe["base"]))(ids).logits
    assert not torch.allclose(base, expected)  # training changed the experts (and attention)
    code, out, _ = lorakit(capsys, "eval", str(moe_run))
    assert code == 0 and "perplexity" in out


def test_merge_an_moe_run_into_a_model_folder(moe_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    assert lorakit(capsys, "merge", str(moe_run), "--out", str(merged))[0] == 0
    ours, tokenizer, _ = load_trained(str(moe_run), None)
    ids = tokenizer(["count from 3 : 4 5"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert_rounding_close(
            AutoModelForCausalLM.from_pretrained(str(merged))(ids).logits, ours(ids).logits, n=TINY_MODEL_N
        )


def test_train_writes_the_per_expert_layout_on_request(moe, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    code = lorakit_main(
        "train",
        "--model",
        str(moe["base"]),
        "--data",
        str(tiny["completion"]),
        "--out",
        str(out),
        "--expert-layout",
        "per-expert",
        *TRAIN,
    )
    assert code == 0
    keys = tensors(out)
    assert "base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight" in keys
    assert not any(k.endswith("experts.lora_A.weight") for k in keys)
    code, text, _ = lorakit(capsys, "inspect", str(out))
    assert code == 0 and "24 per-expert modules of 4 experts: down_proj, gate_proj, up_proj" in text
    assert lorakit(capsys, "eval", str(out))[0] == 0  # lorakit reads it back


def test_a_model_without_a_per_expert_layout_is_refused_before_training(tiny, tmp_path, capsys):
    folder = make_model(tmp_path / "gpt_oss", "gpt_oss")
    out = tmp_path / "run"
    code, _, err = lorakit(
        capsys,
        "train",
        "--model",
        str(folder),
        "--data",
        str(tiny["completion"]),
        "--out",
        str(out),
        "--expert-layout",
        "per-expert",
        *TRAIN,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--expert-layout per-expert" in err and "gpt_oss" in err
    assert not out.exists() or files_of(out) == {}


def test_combine_moe_runs_and_write_them_per_expert(moe, moe_run, tmp_path, capsys):
    from lorakit import load_adapter, mixed_batch

    out = tmp_path / "combined"
    code, _, err = lorakit(
        capsys,
        "combine",
        str(moe_run),
        str(moe["m1"]),
        "--method",
        "cat",
        "--out",
        str(out),
        "--expert-layout",
        "per-expert",
    )
    assert code == 0, err
    assert "base_model.model.model.layers.0.mlp.experts.2.gate_proj.lora_A.weight" in tensors(out)
    combined, tokenizer, _ = load_trained(str(out), None)
    both, _, _ = load_trained(str(moe_run), None)
    load_adapter(both, moe["m1"], "second")
    ids = tokenizer(["count from 3 : 4 5"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), mixed_batch(both, [{"default": 0.5, "second": 0.5}]):
        want = both(ids).logits  # cat is exact: the combined delta is the weighted sum of the two
    with torch.no_grad():
        assert_rounding_close(combined(ids).logits, want, n=TINY_MODEL_N)


def test_an_moe_run_resumed_from_a_checkpoint_ends_bit_for_bit_the_same(moe, tiny, tmp_path, monkeypatch):
    from helpers import whole_and_resumed

    whole, cut = whole_and_resumed(
        tiny,
        tmp_path,
        monkeypatch,
        model=str(moe["base"]),
        data=str(tiny["completion"]),
        targets="attention+mlp",
        max_steps=4,
        save_every=2,
        batch_size=8,
    )
    assert tensors(whole).keys() == tensors(cut).keys()
    diffs = {k: (tensors(whole)[k] - tensors(cut)[k]).abs().max().item() for k in tensors(whole)}
    assert all(v == 0 for v in diffs.values()), {k: v for k, v in diffs.items() if v}
