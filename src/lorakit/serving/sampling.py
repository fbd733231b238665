"""The next token of each generating row in `lorakit serve`: vLLM's sampling fields as tensor math
over one batch whose rows each carry their own settings.

The order is vLLM's (its v1 sampler):

1. log-probabilities for the answer, from the raw logits (before any field below);
2. the fields that may change the greedy choice: `min_tokens` (end-of-text and `stop_token_ids`
   are banned until the row has that many tokens), `logit_bias`, then the penalties:
   `repetition_penalty` (CTRL's, on every token of the prompt and the output: a positive logit is
   divided by it, a negative one multiplied) and OpenAI's `frequency_penalty` / `presence_penalty`
   (on the output only: logit - frequency * count - presence * (count > 0));
3. temperature under 1e-5: the arg-max; else divide by the temperature, keep the tokens with
   probability at least `min_p` times the largest, the `top_k` largest (0 or -1: all), the smallest
   set reaching `top_p`, and draw from what is left with the row's own generator.

Why not Transformers' logits processors (TopKLogitsWarper, MinPLogitsWarper, ...): each applies
one setting to the whole batch, while the rows of one batch here come from different requests with
different settings (one asks top_k 1, its neighbour top_p 0.9). The same math with a setting per
row is a few lines each; tests/serving/test_sampling.py pins every step to the Transformers
processor run on each row alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # vLLM: a temperature under this means the arg-max
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs: alternatives per token an answer may ask for


@dataclass(frozen=True)
class Sampling:
    """One request's sampling fields (vLLM's names and neutral values)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, bias in [-100, 100]
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # alternatives per token in the answer (0: the chosen one only); None: off

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model, and the most likely tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


def pick(
    logits: torch.Tensor,
    settings: Sequence[Sampling],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_ids: Collection[int],
    generators: Sequence[torch.Generator],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """The next token of each row (logits: (rows, vocab) float32), and its log-probability entry
    where the row asked for one."""
    raw = logits.log_softmax(-1) if any(s.logprobs is not None for s in settings) else None
    changed = any(
        len(o) < s.min_tokens or s.logit_bias or s.repetition_penalty != 1 or s.presence_penalty or s.frequency_penalty
        for s, o in zip(settings, outputs)
    )
    scores = adjust(logits.clone(), settings, prompts, outputs, eos_ids) if changed else logits
    tokens = [0] * len(settings)
    greedy = [j for j, s in enumerate(settings) if s.greedy]
    if greedy:
        for j, token in zip(greedy, scores[greedy].argmax(-1).tolist()):
            tokens[j] = token
    drawn = [j for j, s in enumerate(settings) if not s.greedy]
    if drawn:
        probs = filtered(scores[drawn], [settings[j] for j in drawn]).softmax(-1)
        for row, j in zip(probs, drawn):
            tokens[j] = int(torch.multinomial(row, 1, generator=generators[j]))
    entries: list[TokenLogprob | None] = [None] * len(settings)
    if raw is not None:
        for j, s in enumerate(settings):
            if s.logprobs is not None:
                entries[j] = token_logprob(raw[j], tokens[j], s.logprobs)
    return tokens, entries


def token_logprob(logprobs: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """`token`'s entry from one row of log-probabilities, with the `n` most likely tokens."""
    top = logprobs.topk(n) if n else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return TokenLogprob(token, float(logprobs[token]), pairs)


def adjust(
    logits: torch.Tensor,
    settings: Sequence[Sampling],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_ids: Collection[int],
) -> torch.Tensor:
    """Step 2 in place: min_tokens, logit_bias, then the penalties."""
    for j, s in enumerate(settings):
        if len(outputs[j]) < s.min_tokens:
            banned = sorted({*eos_ids, *s.stop_token_ids})
            logits[j, banned] = float("-inf")
        if s.logit_bias:
            ids, bias = zip(*s.logit_bias)
            logits[j, list(ids)] += torch.tensor(bias, dtype=logits.dtype)
    return penalize(logits, settings, prompts, outputs)


def penalize(
    logits: torch.Tensor,
    settings: Sequence[Sampling],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
) -> torch.Tensor:
    """The repetition, frequency and presence penalties, each row its own, in place."""
    vocab = logits.shape[-1]
    repetition = torch.tensor([s.repetition_penalty for s in settings], dtype=logits.dtype)
    if bool((repetition != 1).any()):
        seen = _counts([list(p) + list(o) for p, o in zip(prompts, outputs)], vocab) > 0
        factor = torch.where(seen, repetition[:, None], torch.ones((), dtype=logits.dtype))
        logits.copy_(torch.where(logits > 0, logits / factor, logits * factor))
    frequency = torch.tensor([s.frequency_penalty for s in settings], dtype=logits.dtype)
    presence = torch.tensor([s.presence_penalty for s in settings], dtype=logits.dtype)
    if bool((frequency != 0).any() or (presence != 0).any()):
        counts = _counts(outputs, vocab).to(logits.dtype)
        logits -= frequency[:, None] * counts + presence[:, None] * (counts > 0).to(logits.dtype)
    return logits


def filtered(logits: torch.Tensor, settings: Sequence[Sampling]) -> torch.Tensor:
    """Step 3 before the draw: temperature, min_p, top_k, top_p; removed tokens at -inf."""
    temperature = torch.tensor([s.temperature for s in settings], dtype=logits.dtype)
    logits = logits / temperature[:, None]
    # Each filter only where a row uses it: the sorts cost more than the rest of a step's sampling.
    if any(s.min_p > 0 for s in settings):
        logits = min_p_filter(logits, [s.min_p for s in settings])
    if any(s.top_k > 0 for s in settings):
        logits = top_k_filter(logits, [s.top_k for s in settings])
    if any(s.top_p < 1 for s in settings):
        logits = top_p_filter(logits, [s.top_p for s in settings])
    return logits


def min_p_filter(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Remove the tokens less likely than min_p times the most likely one (0: none)."""
    probs = logits.softmax(-1)
    floor = torch.tensor(min_p, dtype=logits.dtype)[:, None] * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < floor, float("-inf"))


def top_k_filter(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept); k <= 0 keeps all."""
    vocab = logits.shape[-1]
    rows = [j for j, t in enumerate(top_k) if t > 0]
    if not rows:
        return logits
    k = torch.tensor([min(top_k[j], vocab) for j in rows])
    # The k-th largest of each row that uses top_k, from one topk as wide as the largest k.
    kth = logits[rows].topk(int(k.max()), -1).values.gather(-1, (k - 1)[:, None])
    out = logits.clone()
    out[rows] = logits[rows].masked_fill(logits[rows] < kth, float("-inf"))
    return out


def top_p_filter(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    ascending, order = logits.sort(-1)
    mass = ascending.softmax(-1).cumsum(-1)
    # 1 - p in double, as a Python float would be, so the cut matches a one-setting reference.
    outside = mass <= torch.tensor([1.0 - p for p in top_p], dtype=logits.dtype)[:, None]
    outside[:, -1] = False
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def _counts(seqs: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """(rows, vocab) how often each token occurs in each row's sequence (ids outside vocab ignored)."""
    width = max((len(s) for s in seqs), default=0)
    index = torch.full((len(seqs), width + 1), vocab, dtype=torch.long)  # column `vocab` takes the padding
    for j, s in enumerate(seqs):
        if s:
            ids = torch.tensor(list(s), dtype=torch.long)
            index[j, : len(s)] = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    counts = torch.zeros((len(seqs), vocab + 1), dtype=torch.long)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, :vocab]
