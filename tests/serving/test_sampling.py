"""serving/sampling.py against references computed another way: each step against the Transformers
logits processor run on each row alone (one setting per call), OpenAI's penalties against their
formula in float64, and a batch of rows with different settings against each row alone."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import logits_process as T

from lorakit.serving.sampling import (
    Sampling,
    adjust,
    filtered,
    min_p_filter,
    penalize,
    pick,
    top_k_filter,
    top_p_filter,
)

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _alone(processor, row: torch.Tensor, ids: list[int] | None = None) -> torch.Tensor:
    """`processor` (one setting) on one row, with `ids` as the sequence so far."""
    input_ids = torch.tensor([ids if ids is not None else [0]], dtype=torch.long)
    return processor(input_ids, row[None].clone())[0]


def test_top_k_per_row_matches_transformers_top_k_warper():
    logits = _logits(4)
    logits[2, :5] = logits[2, 5]  # ties at the k-th value are kept, as Transformers keeps them
    ks = [1, 7, 6, 0]
    got = top_k_filter(logits, ks)
    for j, k in enumerate(ks):
        want = _alone(T.TopKLogitsWarper(k), logits[j]) if k > 0 else logits[j]
        assert torch.equal(got[j], want), k
    assert torch.equal(top_k_filter(logits, [-1] * 4), logits)  # -1: off, as in vLLM
    assert torch.equal(top_k_filter(logits, [VOCAB + 5] * 4), logits)


def test_min_p_per_row_matches_transformers_min_p_warper():
    logits = _logits(3, seed=1)
    values = [0.05, 0.5, 0.0]
    got = min_p_filter(logits, values)
    for j, p in enumerate(values):
        want = _alone(T.MinPLogitsWarper(p), logits[j]) if p else logits[j]
        assert torch.equal(got[j], want), p
    assert (got[1] == float("-inf")).sum() > (got[0] == float("-inf")).sum() > 0


def test_top_p_per_row_matches_transformers_top_p_warper():
    logits = _logits(3, seed=2)
    values = [0.3, 0.9, 1.0]
    got = top_p_filter(logits, values)
    for j, p in enumerate(values):
        want = _alone(T.TopPLogitsWarper(p), logits[j]) if p < 1 else logits[j]
        assert torch.equal(got[j], want), p


def test_repetition_penalty_matches_transformers_on_prompt_and_output():
    logits = _logits(3, seed=3)
    prompts, outputs = [[1, 2, 3], [4, 4], [5]], [[7, 3], [], [9]]
    settings = [Sampling(repetition_penalty=1.3), Sampling(repetition_penalty=0.7), Sampling()]
    got = penalize(logits.clone(), settings, prompts, outputs)
    for j, s in enumerate(settings):
        ids = prompts[j] + outputs[j]
        want = _alone(T.RepetitionPenaltyLogitsProcessor(s.repetition_penalty), logits[j], ids)
        assert torch.equal(got[j], want)
    assert not torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])


def test_presence_and_frequency_penalties_follow_openai_formula_in_float64():
    logits = _logits(3, seed=4)
    prompts, outputs = [[1, 2], [3], [8, 8]], [[5, 5, 5, 6], [6, 2], []]
    settings = [
        Sampling(frequency_penalty=0.5, presence_penalty=1.5),
        Sampling(frequency_penalty=-1.0, presence_penalty=0.0),
        Sampling(presence_penalty=2.0),
    ]
    got = penalize(logits.clone(), settings, prompts, outputs)
    for j, s in enumerate(settings):
        want = logits[j].double().clone()
        for token in set(outputs[j]):  # OpenAI: mu - c * frequency - (c > 0) * presence, output tokens only
            count = outputs[j].count(token)
            want[token] -= count * s.frequency_penalty + (count > 0) * s.presence_penalty
        torch.testing.assert_close(got[j].double(), want, rtol=0, atol=4 * 1e-7 * want.abs().max().item())
    assert got[0][5] < logits[0][5] - 2.9 and torch.equal(got[2], logits[2])  # the prompt is not penalised


def test_min_tokens_matches_transformers_min_new_tokens_processor():
    logits = _logits(3, seed=5)
    eos, prompt = {3, 4}, [1, 2, 9]
    settings = [Sampling(min_tokens=2), Sampling(min_tokens=2, stop_token_ids=(11,)), Sampling(min_tokens=1)]
    outputs = [[7], [7], [7]]
    got = adjust(logits.clone(), settings, [prompt] * 3, outputs, eos)
    for j, s in enumerate(settings):
        banned = sorted({*eos, *s.stop_token_ids})
        processor = T.MinNewTokensLengthLogitsProcessor(len(prompt), s.min_tokens, banned)
        assert torch.equal(got[j], _alone(processor, logits[j], prompt + outputs[j]))
    assert got[1][11] == float("-inf") and got[2][3] == logits[2][3]  # row 2 has its one token already


def test_logit_bias_matches_transformers_sequence_bias():
    logits = _logits(2, seed=6)
    settings = [Sampling(logit_bias=((4, 100.0), (9, -2.5))), Sampling()]
    got = adjust(logits.clone(), settings, [[1]] * 2, [[], []], set())
    processor = T.SequenceBiasLogitsProcessor([[[4], 100.0], [[9], -2.5]])
    assert torch.equal(got[0], _alone(processor, logits[0], [1]))
    assert torch.equal(got[1], logits[1])


def test_a_batch_of_rows_with_their_own_settings_equals_each_row_alone_in_vllms_order():
    logits = _logits(4, seed=7)
    settings = [
        Sampling(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
        Sampling(temperature=1.3, top_p=0.5),
        Sampling(temperature=1.0, min_p=0.2, logit_bias=((2, 3.0),)),
        Sampling(temperature=0.5, top_k=3),
    ]
    prompts, outputs = [[1, 2], [3], [4, 5], [6]], [[2], [], [9, 9], []]
    got = filtered(adjust(logits.clone(), settings, prompts, outputs, {0}), settings)
    for j, s in enumerate(settings):
        # vLLM's order: bias and penalties, then temperature, min_p, top_k, top_p.
        chain = [T.RepetitionPenaltyLogitsProcessor(s.repetition_penalty)]
        if s.logit_bias:
            chain.insert(0, T.SequenceBiasLogitsProcessor([[[t], b] for t, b in s.logit_bias]))
        chain.append(T.TemperatureLogitsWarper(s.temperature))
        if s.min_p:
            chain.append(T.MinPLogitsWarper(s.min_p))
        if s.top_k:
            chain.append(T.TopKLogitsWarper(s.top_k))
        if s.top_p < 1:
            chain.append(T.TopPLogitsWarper(s.top_p))
        want = _alone(T.LogitsProcessorList(chain), logits[j], prompts[j] + outputs[j])
        assert torch.equal(got[j].isinf(), want.isinf()), j
        torch.testing.assert_close(got[j].softmax(-1), want.softmax(-1), rtol=1e-6, atol=1e-7)


def test_pick_greedy_rows_take_the_argmax_after_bias_and_ignore_the_filters():
    logits = _logits(2, seed=8)
    target = int(logits[0].argmin())
    settings = [
        Sampling(temperature=0, top_k=3, top_p=0.1, min_p=0.9, logit_bias=((target, 100.0),)),
        Sampling(temperature=1e-6, top_k=1),
    ]
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    for _ in range(3):  # deterministic: the generators are never drawn from
        tokens, entries = pick(logits, settings, [[1], [1]], [[], []], {0}, generators)
        assert tokens == [target, int(logits[1].argmax())] and entries == [None, None]


def test_pick_top_k_one_equals_greedy_and_seeds_repeat_whatever_the_neighbours():
    logits = _logits(3, seed=9)
    one = [Sampling(temperature=1.0, top_k=1)] * 3
    tokens, _ = pick(logits, one, [[1]] * 3, [[]] * 3, set(), [torch.Generator().manual_seed(i) for i in range(3)])
    assert tokens == logits.argmax(-1).tolist()
    free = Sampling(temperature=1.5)
    alone = [pick(logits[:1], [free], [[1]], [[]], set(), [torch.Generator().manual_seed(5)])[0][0] for _ in range(2)]
    mixed = pick(
        logits,
        [free, Sampling(temperature=0), Sampling(top_k=2)],
        [[1]] * 3,
        [[]] * 3,
        set(),
        [torch.Generator().manual_seed(s) for s in (5, 6, 7)],
    )[0][0]
    assert alone[0] == alone[1] == mixed


@pytest.mark.parametrize("n", [0, 3])
def test_logprobs_are_the_raw_log_softmax_whatever_the_filters(n):
    logits = _logits(2, seed=10)
    settings = [Sampling(temperature=0.3, top_k=2, repetition_penalty=2.0, logprobs=n), Sampling()]
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
    tokens, entries = pick(logits, settings, [[1, 2]] * 2, [[]] * 2, set(), generators)
    want = logits[0].double().log_softmax(-1)
    entry = entries[0]
    assert entries[1] is None and entry.token == tokens[0]
    assert math.isclose(entry.logprob, want[tokens[0]].item(), rel_tol=1e-6, abs_tol=1e-6)
    assert [t for t, _ in entry.top] == want.topk(n).indices.tolist() if n else entry.top == ()
    for token, value in entry.top:
        assert math.isclose(value, want[token].item(), rel_tol=1e-6, abs_tol=1e-6)
