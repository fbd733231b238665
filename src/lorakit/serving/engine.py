"""The model side of `lorakit serve`: rows of many requests through one base model and its adapters.

Everything here runs on the server's single model thread (batcher.py); nothing knows HTTP. A
*row* is one input (a sentence to classify, a prompt to continue) with its route: an adapter
name, None (the base model) or {name: weight}. A batch of rows runs as one `mixed_batch`:

- classify: one forward; each row gets its class probabilities and label;
- generate: a prefill, then one decoding step at a time for the whole batch, each row's next
  token picked with its own sampling fields (sampling.py); a row that finishes (end of text, a
  stop token or string, its max_tokens) leaves the batch at once (its rows of the KV cache are
  dropped) and the others go on.

A row whose adapter fails to load gets the error (the file and the reason); the other rows of
the batch run as if it had never been there. The same holds for any other failure: when a
batch's forward or sampling step raises, each row that has not ended runs again alone, from
where it stood (its prompt and the tokens it has so far, its random stream as it was before
the failed step), so only a row that fails by itself gets the error.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapting.mixed import Route, mixed_batch
from ..errors import LorakitError
from ..files.adapter_file import AdapterFileError
from .events import Done, Event, Failed, Text
from .kv_rows import pad, position_ids, select_rows
from .sampling import Sampling, TokenLogprob, pick
from .store import AdapterStore


class RowError(LorakitError):
    """A row that cannot run: an HTTP status and the message for the client."""

    user_fixable = False  # becomes a Problem (an HTTP answer); one reaching the command line is a bug

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Row:
    """One input row and what to do with it."""

    ids: list[int]
    route: Route
    names: tuple[str, ...]  # the adapters the route needs
    # Generation only:
    max_tokens: int = 16
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    emit: Callable[[Event], None] | None = None  # events to the request (the batcher posts them to the event loop)
    cancelled: bool = False  # the client went away: drop the row at the next chance
    out: list[int] = field(default_factory=list)  # generated token ids (a stop token or end of text too)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of `out`, if asked for
    sent: str = ""  # text already emitted
    ended: bool = False  # finished or failed: no more events
    sent_logprobs: int = 0  # entries of `logprobs` already emitted
    stops_from: int = 0  # where in the text a stop string may start (vLLM: not within min_tokens)
    arrived: float = field(default_factory=time.perf_counter)  # for the time-to-first-token metric
    first_token_at: float | None = None


class Engine:
    """A base model, its tokenizer and its adapter store; runs batches of rows."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        store: AdapterStore,
        task: str,
        base_id: str,
        base_labels: list[str] | None = None,
        render_chat: Callable[[list[dict[str, str]]], str] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.store, self.task = model.eval(), tokenizer, store, task
        self.base_id, self.base_labels, self.render_chat = base_id, base_labels, render_chat
        config = getattr(model, "config", None)
        self.max_length = _max_positions(config, tokenizer)
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        # The width of the logits: the token ids that logit_bias and stop_token_ids may name.
        self.vocab_size = int(weight.shape[0]) if weight is not None else getattr(config, "vocab_size", len(tokenizer))

    def check_sampling(self, sampling: Sampling) -> tuple[str, str] | None:
        """(field, message) when a request's sampling fields name a token the model does not have."""
        named = {"logit_bias": [t for t, _ in sampling.logit_bias], "stop_token_ids": sampling.stop_token_ids}
        for name, ids in named.items():
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                return name, f"{name}: token id {bad[0]} is outside this model's vocabulary [0, {self.vocab_size})"
        return None

    # -- text in -----------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A chat's prompt: the tokenizer's chat template, else the plain rendering lorakit trains with."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.encode(text, special=False)
        if self.render_chat is None:
            raise RowError(400, "this model has no chat template; use /v1/completions")
        return self.encode(self.render_chat(messages))

    def labels_for(self, route: Route) -> list[str] | None:
        """Label names for a classify row: its adapter's, else the base model's."""
        if isinstance(route, str):
            return self.store.entries[route].facts.get("labels") or self.base_labels
        return self.base_labels

    # -- batches -----------------------------------------------------------------------------
    def classify(self, rows: list[Row]) -> list[Any]:
        """Per row: (probabilities, label), a RowError, or the exception its forward alone raised."""
        results: list[Any] = [None] * len(rows)
        live = self.acquire(rows, results)
        if not live:
            return results
        try:
            answers = self._classify([rows[i] for i in live])
        except Exception as err:  # which row broke it? each alone: only that one gets the error
            if len(live) == 1:
                answers = [err]
            else:
                answers = [self._classify_alone(rows[i]) for i in live]
        for i, answer in zip(live, answers):
            results[i] = answer
        return results

    def _classify_alone(self, row: Row) -> Any:
        try:
            return self._classify([row])[0]
        except Exception as err:
            return err

    def _classify(self, rows: list[Row]) -> list[tuple[list[float], str | None]]:
        ids, mask = pad([r.ids for r in rows], self.pad_id, left=False)
        with torch.inference_mode(), mixed_batch(self.model, [r.route for r in rows]):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        probs = logits.softmax(-1) if logits.shape[-1] > 1 else logits.sigmoid()
        answers = []
        for j, row in enumerate(rows):
            p = probs[j].tolist()
            labels = self.labels_for(row.route)
            best = max(range(len(p)), key=p.__getitem__)
            answers.append((p, labels[best] if labels and best < len(labels) else None))
        return answers

    def generate(self, rows: list[Row]) -> None:
        """Run the rows to their ends, one decoding step at a time; events go through row.emit:
        Text, Done or Failed (events.py)."""
        errors: list[Any] = [None] * len(rows)
        live = [rows[i] for i in self.acquire(rows, errors)]
        for row, err in zip(rows, errors):
            if err is not None:
                row.emit(Failed(err))
        live = [r for r in live if not r.cancelled]
        streams = {id(r): row_stream(r.seed) for r in live}
        self.decode_isolated(live, streams)

    def decode_isolated(self, rows: list[Row], streams: dict[int, torch.Generator]) -> None:
        """Decode `rows` as one batch; if that raises, each row that has not ended goes on alone
        from where it stood, so a failure is only the failing row's."""
        before: dict[int, tuple[int, Any]] = {}  # per row: (tokens so far, random state) at the step's start
        try:
            self._decode(rows, streams, before)
        except Exception as err:
            self.recover(rows, streams, before, err)

    def recover(
        self,
        rows: list[Row],
        streams: dict[int, torch.Generator],
        before: dict[int, tuple[int, Any]],
        err: Exception | None,
    ) -> None:
        """After a step over `rows` failed with `err` (None: the rows cannot run together): each
        row goes on alone from where it stood, to its end, so a failure is only the failing row's;
        a row that failed alone gets the error. `before`: per row, (tokens so far, random state)
        at the step's start; a stream the failed step drew from is rewound, so seeds still repeat."""
        for row in rows:
            if id(row) in before and before[id(row)][0] == len(row.out):
                streams[id(row)].set_state(before[id(row)][1])
        if err is not None and len(rows) == 1:
            rows[0].ended = True
            rows[0].emit(Failed(err))
            return
        for row in rows:
            if not row.ended and not row.cancelled:
                self.decode_isolated([row], streams)

    def _decode(self, live: list[Row], streams: dict[int, torch.Generator], before: dict[int, tuple[int, Any]]) -> None:
        live = [r for r in live if not r.ended and not r.cancelled]
        if not live:
            return
        ids, mask = pad([r.ids + r.out for r in live], self.pad_id, left=True)  # goes on from its tokens
        positions = position_ids(mask)
        generators = [streams[id(r)] for r in live]
        past = None
        with torch.inference_mode(), mixed_batch(self.model, [r.route for r in live]) as batch:
            while True:
                before.update((id(r), (len(r.out), g.get_state())) for r, g in zip(live, generators))
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                tokens, entries = pick(
                    logits,
                    [r.sampling for r in live],
                    [r.ids for r in live],
                    [r.out for r in live],
                    self.eos_ids,
                    generators,
                )
                keep = [j for j, row in enumerate(live) if not self.take_token(row, tokens[j], entries[j])]
                if not keep:
                    return
                if len(keep) < len(live):  # finished rows leave: drop their cache rows
                    index = torch.tensor(keep)
                    select_rows(past, index)
                    mask, positions = mask[index], positions[index]
                    live = [live[j] for j in keep]
                    generators = [generators[j] for j in keep]
                    tokens = [tokens[j] for j in keep]
                    batch.reroute([r.route for r in live])
                ids = torch.tensor(tokens).view(-1, 1)
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                positions = positions[:, -1:] + 1

    def take_token(self, row: Row, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Take the row's next token; emit its new text; True when the row is finished.

        The checks are vLLM's (end of text unless ignore_eos, then stop_token_ids, which stay in
        the text unless special, then stop strings once past min_tokens), written out rather than
        as Transformers' StoppingCriteria: those hold one setting for the whole batch and say only
        "stop", not where a stop string cuts the text."""
        if row.cancelled:
            return True
        row.out.append(token)
        if logprob is not None:
            row.logprobs.append(logprob)
        text = self.tokenizer.decode(row.out, skip_special_tokens=True)
        if token in self.eos_ids and not row.sampling.ignore_eos:
            self._emit_text(row, text, hold=0)
            return self._finish(row, "stop", None)
        if token in row.sampling.stop_token_ids:
            self._emit_text(row, text, hold=0)
            return self._finish(row, "stop", token)
        if len(row.out) <= row.sampling.min_tokens:
            row.stops_from = len(text)
        else:
            for stop in row.stop:
                at = text.find(stop, max(0, row.stops_from - len(stop) + 1))
                if at >= 0:
                    self._emit_text(row, text[:at], hold=0)
                    return self._finish(row, "stop", stop)
        if len(row.out) >= row.max_tokens or len(row.ids) + len(row.out) >= self.max_length:
            self._emit_text(row, text, hold=0)
            return self._finish(row, "length", None)
        # Hold back what could be the start of a stop string, and a half-decoded character.
        self._emit_text(row, text, hold=max((len(s) - 1 for s in row.stop), default=0))
        return False

    def _emit_text(self, row: Row, text: str, hold: int) -> None:
        ready = text[: len(text) - hold] if hold else text
        if ready.endswith("\ufffd"):
            ready = ready.rstrip("\ufffd")
        if len(ready) > len(row.sent) and ready.startswith(row.sent):
            row.emit(Text(ready[len(row.sent) :], self._unsent_logprobs(row)))
            row.sent = ready

    def _finish(self, row: Row, reason: str, stop: str | int | None) -> bool:
        row.ended = True
        row.emit(Done(reason, stop, self._unsent_logprobs(row)))
        return True

    def _unsent_logprobs(self, row: Row) -> list[TokenLogprob]:
        entries = row.logprobs[row.sent_logprobs :]
        row.sent_logprobs = len(row.logprobs)
        return entries

    def acquire(self, rows: list[Row], results: list[Any], keep: tuple[str, ...] = ()) -> list[int]:
        """Load the adapters the rows need; rows whose adapter failed get the error. The indices
        of the rows that can run. `keep`: adapters of rows already running, kept from eviction."""
        names = {n for r in rows if not r.cancelled for n in r.names}
        missing = {n for n in names if n not in self.store.entries}
        failed: dict[str, Exception] = self.store.acquire([*keep, *sorted(names - missing)])
        live = []
        for i, row in enumerate(rows):
            gone = [n for n in row.names if n in missing]
            bad = [n for n in row.names if n in failed]
            if gone:
                results[i] = RowError(404, f"the adapter {gone[0]!r} was unloaded before this request ran")
            elif bad and isinstance(failed[bad[0]], AdapterFileError):
                results[i] = RowError(422, f"adapter {bad[0]!r} failed to load: {failed[bad[0]]}")
            elif bad:  # not the folder's fault: the server's (a 500 with an id)
                results[i] = failed[bad[0]]
            elif not row.cancelled:
                live.append(i)
        return live


def _max_positions(config: Any, tokenizer: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else 2048


def row_stream(seed: int | None) -> torch.Generator:
    """A row's own random stream: the same seed gives the same text whatever else is in the batch."""
    return torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
