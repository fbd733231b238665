"""Continuous batching (Orca's iteration-level scheduling) for generation in `lorakit serve`.

The running batch decodes one token per row per step. Between two steps, rows that finished or
whose client went away leave at once (their KV-cache rows are dropped), and waiting rows join:
their prompts run as a prefill of their own (chunked when the step's token budget is smaller
than the prompts), then their KV cache is joined to the running batch's (kv_rows.py). A step
runs at most `max_batch_tokens` tokens through the model: one per running row, the rest for the
prefill, so a long prompt delays the running rows by at most one budget per step.

Each row keeps its adapter route, sampling fields, random stream and stop conditions: the
decoding and prefill forwards each run as a `mixed_batch` over their own rows' routes, and
sampling (sampling.py) reads each row's settings. Position ids count each row's own tokens and
the attention mask hides padding, so a row's tokens are those it would get alone.

When a forward or a sampling step fails, the rows it involved go on one by one from where they
stood (Engine.recover), so only a row that fails by itself gets the error.

Everything here runs on the model thread (batcher.py calls `step`); `waiting` is appended from
the event loop and popped here (a deque: both ends are thread-safe).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..adapting.mixed import mixed_batch
from . import kv_rows
from .engine import Engine, Row, RowError, row_stream
from .events import Failed
from .metrics import Metrics
from .sampling import pick


class _Prefill:
    """A group of admitted rows whose prompts are being run, `done` columns so far."""

    def __init__(self, rows: list[Row], pad_id: int) -> None:
        self.rows = rows
        self.ids, self.mask = kv_rows.pad([r.ids for r in rows], pad_id, left=True)
        self.positions = kv_rows.position_ids(self.mask)
        self.done = 0
        self.past: Any = None

    @property
    def width(self) -> int:
        return self.ids.shape[1]


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int, max_batch_tokens: int, metrics: Metrics | None = None) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []  # the running batch, in the order of its cache rows
        self.past: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # (rows, cached columns)
        self.pending = torch.zeros(0, dtype=torch.long)  # each row's last token, not yet through the model
        self.positions = torch.zeros(0, dtype=torch.long)  # the position of that token
        self.prefill: _Prefill | None = None
        self.streams: dict[int, torch.Generator] = {}
        # One mixed_batch block stays open across steps while the routes stay the same: its plans
        # (which rows go through which adapter) are then made once, not at every step.
        self._block: contextlib.ExitStack | None = None
        self._batch: Any = None
        self._routes: list[Any] | None = None
        self._admitting: list[Row] = []  # taken from `waiting`, not yet in a prefill (for drop_all)

    @property
    def busy(self) -> bool:
        """Whether rows are running or being admitted (another step has work)."""
        return bool(self.rows) or self.prefill is not None

    @property
    def occupied(self) -> int:
        return len(self.rows) + (len(self.prefill.rows) if self.prefill else 0)

    def drop_all(self) -> list[Row]:
        """Forget the running and admitted rows (after a failure outside any row); those rows."""
        rows = self.rows + (self.prefill.rows if self.prefill else []) + self._admitting
        self._admitting = []
        self.rows, self.past, self.prefill = [], None, None
        self.mask, self.pending, self.positions = self.mask[:0, :0], self.pending[:0], self.positions[:0]
        self.streams.clear()
        return rows

    def run(self, seconds: float) -> None:
        """Steps while there is work, for about `seconds` (then the batcher gets the thread back
        for a load or an unload); rows that arrive meanwhile join at the next step."""
        deadline = time.perf_counter() + seconds
        try:
            self.step()
            while (self.busy or self.waiting) and time.perf_counter() < deadline:
                self.step()
        finally:
            self.release()  # a load or an unload may run next: the model leaves the block

    def release(self) -> None:
        """Leave the open mixed_batch block (before adapters load, or the engine runs rows alone)."""
        if self._block is not None:
            self._block.close()
        self._block = self._batch = self._routes = None

    def _route(self, routes: list[Any]) -> None:
        """The next forward's rows go through `routes`."""
        if self._batch is None:
            self._block = contextlib.ExitStack()
            self._batch = self._block.enter_context(mixed_batch(self.engine.model, routes))
        elif routes != self._routes:
            self._batch.reroute(routes)
        self._routes = routes

    def step(self) -> None:
        """One decoding step of the running batch, then one prefill chunk of waiting rows."""
        self._leave(lambda r: r.ended or r.cancelled or self._unloaded(r))
        tokens = 0
        if self.rows:
            tokens += len(self.rows)
            self._decode()
        if self.prefill is None:
            self.prefill = self._admit(self.max_batch_tokens - tokens)
        if self.prefill is not None:
            tokens += self._prefill_chunk(max(self.max_batch_tokens - tokens, 1))
        if self.metrics is not None:
            self.metrics.running.set(len(self.rows))
            if tokens:
                self.metrics.step_tokens.observe(tokens)

    # -- the running batch -------------------------------------------------------------------
    def _decode(self) -> None:
        rows = self.rows
        mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        before = self._states(rows)
        try:
            self._route([r.route for r in rows])
            with torch.inference_mode():
                out = self.engine.model(
                    input_ids=self.pending.view(-1, 1),
                    attention_mask=mask,
                    position_ids=self.positions.view(-1, 1),
                    past_key_values=self.past,
                    use_cache=True,
                )
            self.past, self.mask = out.past_key_values, mask
            self.pending = self._take(rows, out.logits[:, -1, :].float())
        except Exception as err:
            self._isolate(rows, before, err)
            self._leave(lambda r: True)
            return
        self.positions = self.positions + 1

    def _take(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token and hand it to the row (which emits its text); the tokens."""
        tokens, entries = pick(
            logits,
            [r.sampling for r in rows],
            [r.ids for r in rows],
            [r.out for r in rows],
            self.engine.eos_ids,
            [self.streams[id(r)] for r in rows],
        )
        now = time.perf_counter()
        for row, token, entry in zip(rows, tokens, entries):
            self.engine.take_token(row, token, entry)
            self._timing(row, now)
        return torch.tensor(tokens, dtype=torch.long)

    def _timing(self, row: Row, now: float) -> None:
        if row.first_token_at is None:
            row.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - row.arrived)
        if row.ended and len(row.out) > 1 and self.metrics is not None:
            self.metrics.tpot.observe((now - row.first_token_at) / (len(row.out) - 1))

    def _staying(self, rows: list[Row], gone: Callable[[Row], bool]) -> list[int]:
        """The indices of `rows` that stay; the random streams of the others are forgotten."""
        keep = []
        for j, row in enumerate(rows):
            if gone(row):
                self.streams.pop(id(row), None)
            else:
                keep.append(j)
        return keep

    def _leave(self, gone: Callable[[Row], bool]) -> None:
        """Drop the rows of the running batch for which `gone` holds (their cache rows too)."""
        keep = self._staying(self.rows, gone)
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.past = [], None
            self.mask = self.mask[:0, :0]
            self.pending, self.positions = self.pending[:0], self.positions[:0]
            return
        index = torch.tensor(keep)
        kv_rows.select_rows(self.past, index)
        self.rows = [self.rows[j] for j in keep]
        self.pending, self.positions = self.pending[index], self.positions[index]
        self.mask = kv_rows.trim(self.past, self.mask[index])

    def _unloaded(self, row: Row) -> bool:
        """A running row whose adapter was unloaded (POST /v1/unload_lora_adapter) ends with a 404."""
        gone = [n for n in row.names if n not in self.engine.store.entries]
        if gone and not row.ended:
            row.ended = True
            row.emit(Failed(RowError(404, f"the adapter {gone[0]!r} was unloaded while this request ran")))
        return bool(gone)

    def _states(self, rows: list[Row]) -> dict[int, tuple[int, Any]]:
        """Per row: (tokens so far, random state), to rewind a stream that a failed step drew from."""
        return {id(r): (len(r.out), self.streams[id(r)].get_state()) for r in rows}

    def _isolate(self, rows: list[Row], before: dict[int, tuple[int, Any]] | None, err: Exception | None) -> None:
        """After a failed step: the rows go on alone on the engine's static path (Engine.recover)."""
        self.release()  # the engine's static path opens its own block
        self.engine.recover(rows, {id(r): self.streams[id(r)] for r in rows}, before or {}, err)

    # -- admitting ---------------------------------------------------------------------------
    def _admit(self, budget: int) -> _Prefill | None:
        """The next group of waiting rows, in arrival order: as many as the batch has room for
        and whose padded prompts fit `budget` tokens (at least one row: a longer prompt runs in
        chunks, one per step)."""
        group: list[Row] = []
        width = 0
        while self.waiting and len(self.rows) + len(group) < self.max_batch:
            row = self.waiting[0]
            if row.cancelled:
                self.waiting.popleft()
                continue
            wider = max(width, len(row.ids))
            if group and wider * (len(group) + 1) > budget:
                break
            group.append(self.waiting.popleft())
            width = wider
        if not group:
            return None
        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(group))
        self.release()  # acquiring may load adapters the open block does not know
        self._admitting = group
        errors: list[Any] = [None] * len(group)
        running = tuple(sorted({n for r in self.rows for n in r.names}))
        live = set(self.engine.acquire(group, errors, keep=running))
        for row, err in zip(group, errors):
            if err is not None:
                row.ended = True
                row.emit(Failed(err))
        group = [r for j, r in enumerate(group) if j in live]
        for row in group:
            self.streams[id(row)] = row_stream(row.seed)
        self._admitting = []
        return _Prefill(group, self.engine.pad_id) if group else None

    def _prefill_chunk(self, budget: int) -> int:
        """Run the next columns of the prefill (as many as `budget` tokens allow); when the
        prompts are through, pick the first tokens and join the rows to the running batch.
        Returns the tokens run."""
        p = self.prefill
        if any(r.cancelled for r in p.rows):  # clients gone mid-prefill: their rows go now
            keep = self._staying(p.rows, lambda r: r.cancelled)
            if not keep:
                self.prefill = None
                return 0
            index = torch.tensor(keep)
            p.rows = [p.rows[j] for j in keep]
            p.ids, p.mask, p.positions = p.ids[index], p.mask[index], p.positions[index]
            if p.past is not None:
                kv_rows.select_rows(p.past, index)
        rows = p.rows
        end = min(p.width, p.done + max(budget // len(rows), 1))
        before = self._states(rows)
        try:
            self._route([r.route for r in rows])
            with torch.inference_mode():
                out = self.engine.model(
                    input_ids=p.ids[:, p.done : end],
                    attention_mask=p.mask[:, :end],
                    position_ids=p.positions[:, p.done : end],
                    past_key_values=p.past,
                    use_cache=True,
                )
            ran = len(rows) * (end - p.done)
            p.past, p.done = out.past_key_values, end
            if end < p.width:
                return ran
            first = self._take(rows, out.logits[:, -1, :].float())
        except Exception as err:
            self.prefill = None
            self._isolate(rows, before, err)
            return 0
        self.prefill = None
        self._join(rows, p, first)
        return ran

    def _join(self, rows: list[Row], p: _Prefill, first: torch.Tensor) -> None:
        """The prefilled rows that did not finish with their first token join the running batch."""
        keep = self._staying(rows, lambda r: r.ended or r.cancelled)
        if not keep:
            return
        index = torch.tensor(keep)
        joining = [rows[j] for j in keep]
        positions, pending, mask = p.positions[index, -1] + 1, first[index], p.mask[index]
        if len(keep) < len(rows):
            kv_rows.select_rows(p.past, index)
        if not self.rows:
            self.past, self.mask = p.past, kv_rows.trim(p.past, mask)
            self.rows, self.pending, self.positions = joining, pending, positions
            return
        try:
            self.mask = kv_rows.join(self.past, self.mask, p.past, mask)
        except NotImplementedError:  # a cache kind that cannot be joined: these rows go on alone
            self._isolate(joining, None, None)
            return
        self.rows = self.rows + joining
        self.pending = torch.cat([self.pending, pending])
        self.positions = torch.cat([self.positions, positions])
