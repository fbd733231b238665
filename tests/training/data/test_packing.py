"""training/data/packing.py: best-fit-decreasing rows, packed batches, the mask Transformers builds
from restarting positions, the refusal of models that leak across examples, and packed runs
whose held-out loss, first-step loss and resumed weights match the unpacked ones."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import bert_train_args, tensors, tiny_model, whole_and_resumed, write_jsonl
from helpers import train_tiny as run

from lorakit.training import TrainingError
from lorakit.training.base_model import load_tokenizer
from lorakit.training.data import examples as D
from lorakit.training.data.packing import Packed, check_model, efficiency, pack, pack_lengths
from lorakit.training.prepare import SPLIT_SEED
from lorakit.training.report.metrics_log import fmt_result
from lorakit.training.tasks import forward, label_count, loss_sum


def varied_rows(n: int, seed: int = 0) -> list[dict]:
    """Counting examples of 1 to 12 numbers: lengths differ, so packing has work to do."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, count = rng.randint(0, 19), rng.randint(1, 12)
        rows.append(
            {
                "prompt": f"count from {start} :",
                "completion": " ".join(str((start + k) % 20) for k in range(1, count + 1)),
            }
        )
    return rows


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("packing") / "varied.jsonl", varied_rows(120))


# ---- rows ----------------------------------------------------------------------------------


def test_best_fit_decreasing_by_hand():
    # 5 opens a row (3 free), 4 another (4 free); 3 fits both, best in the first (fills it); the second 3
    # goes to the 4-free row (1 left); 2 opens a third row; 1 fits the 1-free row exactly.
    assert pack_lengths([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


def test_rows_hold_every_example_once_within_capacity():
    lengths = [random.Random(3).randint(1, 40) for _ in range(500)]
    rows = pack_lengths(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 64) + 10  # near the bound no packing can beat
    assert pack_lengths(lengths, 64) == rows  # a pure function of the lengths
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_lengths([3, 9], 8)


def test_packed_batch_restarts_positions_and_never_targets_a_first_token():
    data = D.Encoded(
        "causal-lm",
        [[5, 6, 7], [8, 9], [4, 4, 4, 4]],
        [[-100, 6, 7], [8, 9], [-100, -100, 4, 4]],
        pad_id=0,
        lines=["f:1", "f:2", "f:3"],
    )
    packed = pack(data, 6)
    assert isinstance(packed, Packed) and len(packed) == 2 and packed.examples == 3
    assert packed.members == [[2, 1], [0]] and packed.pieces == [[4, 2], [3]]
    batch = packed.batch([0, 1])
    assert batch["input_ids"].tolist() == [[4, 4, 4, 4, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # padding: a block
    assert batch["labels"].tolist() == [[-100, -100, 4, 4, -100, 9], [-100, 6, 7, -100, -100, -100]]
    assert "attention_mask" not in batch  # Transformers builds the mask from the positions


def test_pack_refuses_classification():
    with pytest.raises(TrainingError, match="causal-lm"):
        pack(D.Encoded("classify", [[1, 2]], [0]), 8)


def test_efficiency_counts_padding_of_the_batches():
    assert efficiency([4, 2, 2], 1) == 1.0
    assert efficiency([4, 2, 2], 3) == pytest.approx(8 / 12)
    assert efficiency([4, 2, 2], 3, packing_to=4) == 1.0  # rows [4] and [2, 2]
    skewed = [20] * 50 + [250] * 10
    assert efficiency(skewed, 16, packing_to=256) > efficiency(skewed, 16)


# ---- the mask Transformers builds ----------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_loss_equals_unpacked(kind, attention):
    model = tiny_model(
        kind,
        attn_implementation=attention,
        **({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if kind == "gpt2" else {}),
    )
    model.train()  # use_cache is on in training mode too: the packed forward must turn it off
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 120, (n,), generator=gen).tolist() for n in (9, 3, 14, 6, 1, 11)]
    labels = [[-100] * (len(s) // 2) + s[len(s) // 2 :] for s in seqs]
    data = D.Encoded("causal-lm", seqs, labels, pad_id=0)
    packed = pack(data, 16)
    assert len(packed) < len(data)
    plain, rows = data.batch(list(range(len(data)))), packed.batch(list(range(len(packed))))
    cpu = torch.device("cpu")
    with torch.no_grad():
        want = loss_sum("causal-lm", forward(model, plain, cpu, False), plain["labels"])
        got = loss_sum("causal-lm", forward(model, rows, cpu, False), rows["labels"])
    assert label_count("causal-lm", rows["labels"]) == label_count("causal-lm", plain["labels"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)  # without the block mask it differs by ~1e-2


class _NoPositions(torch.nn.Module):
    """A causal LM that drops the position ids it is given: packed examples would see each other."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model("llama")

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


class _NoPositionArgument(_NoPositions):
    def forward(self, input_ids, use_cache=None):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_check_model_passes_transformers_and_refuses_leaks():
    sample = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    check_model(tiny_model("llama"), sample, torch.device("cpu"))
    check_model(tiny_model("gpt2"), sample, torch.device("cpu"))
    with pytest.raises(TrainingError, match="_NoPositions does not keep packed examples apart"):
        check_model(_NoPositions(), sample, torch.device("cpu"))
    with pytest.raises(TrainingError, match="does not take packed rows"):
        check_model(_NoPositionArgument(), sample, torch.device("cpu"))


# ---- runs ----------------------------------------------------------------------------------


def _eval(out) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval" in m]


def _loss(out) -> list[float]:
    lines = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [m["loss"] for m in lines if "loss" in m]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_held_out_and_first_step_losses_do_not_change_with_packing(tiny, tmp_path, varied, kind):
    common = dict(model=str(tiny[kind]), data=str(varied), max_length=32, max_steps=1, dropout=0.0)
    plain = run(tiny, tmp_path / "plain", batch_size=96, **common)  # 96 training examples: one step takes all
    train_set = D.split(D.read_dataset(varied), 0.2, SPLIT_SEED)[0]
    encoded = D.encode(train_set, "causal-lm", load_tokenizer(str(tiny[kind])), 32)
    rows = len(pack_lengths([len(ids) for ids in encoded.input_ids], 32))
    assert rows < 96
    packed = run(tiny, tmp_path / "packed", batch_size=rows, packing=True, **common)  # one step: every row
    assert fmt_result(packed["before"]) == fmt_result(plain["before"])
    assert packed["before"]["loss"] == pytest.approx(plain["before"]["loss"], rel=1e-5)
    assert _loss(tmp_path / "packed")[0] == pytest.approx(_loss(tmp_path / "plain")[0], rel=1e-5)
    assert packed["after"]["loss"] == pytest.approx(plain["after"]["loss"], rel=1e-3)  # the same update


def test_packed_run_resumes_bitwise(tiny, tmp_path, varied, monkeypatch):
    from lorakit.training.options import read_run

    whole, cut = whole_and_resumed(
        tiny,
        tmp_path,
        monkeypatch,
        model=str(tiny["llama"]),
        data=str(varied),
        max_length=32,
        packing=True,
        batch_size=2,
        max_steps=6,
        save_every=3,
        dropout=0.1,
    )
    assert read_run(cut).packing is True
    assert tensors(whole).keys() == tensors(cut).keys()
    for key, value in tensors(whole).items():
        assert torch.equal(value, tensors(cut)[key]), key
    assert _loss(whole) == _loss(cut)


def test_packing_refuses_classification_before_writing(tiny, tmp_path):
    with pytest.raises(TrainingError, match="--packing is for causal-lm training; the task here is classify"):
        run(tiny, tmp_path / "never", packing=True)
    assert not (tmp_path / "never").exists()


def test_cli_packing_on_classification_is_one_line(tiny, tmp_path, capsys):
    from helpers import cli_here

    code, _, err = cli_here(
        capsys,
        *bert_train_args(tiny, tmp_path / "never"),
        "--packing",
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--packing" in err
