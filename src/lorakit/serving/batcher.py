"""Batching for `lorakit serve`: rows from many requests, whatever their adapters, run as mixed
batches on the single model thread.

Generation is scheduled per decoding step (scheduler.py): rows join the running batch between
two steps and leave as soon as they finish, so a short request does not wait for a long one.
Classification (and generation with `Settings.continuous` off, kept to measure against) is
batched statically: the first row that arrives opens a batch, rows arriving within `max_wait`
join it, up to `max_batch`; then the batch runs (engine.py) while the next one gathers.

An idle server waits `max_wait` after the first row for company in either mode. Rows wait in a
queue of at most `max_queue` rows: a request whose rows do not all fit is turned away whole
(429), never half queued. All model work, including loading and unloading adapters, goes
through one thread, so nothing else touches the model during a step or a batch (a load or an
unload runs between two steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .engine import Engine, Row
from .events import Event, Failed
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import Settings

# How long the model thread steps before it hands the thread back between steps (for loads and
# unloads): each hand-back costs a trip through the event loop, about as long as a small step.
STEPS_SECONDS = 0.02


class Batcher:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.max_queue = settings.max_batch, settings.max_queue
        self.max_wait_s = settings.max_wait_ms / 1000
        continuous = engine.task == "causal-lm" and settings.continuous
        self.scheduler = (
            Scheduler(engine, settings.max_batch, settings.max_batch_tokens, metrics) if continuous else None
        )
        # Made by start(), on the running event loop (a stopped app starts again with new ones).
        self._queue: asyncio.Queue[tuple[Row, asyncio.Future | None]] | None = None
        self._arrived: asyncio.Event | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._outbox: deque[tuple[Callable[[Event], None], Event]] = deque()  # events posted from the model thread
        self._flush_pending = False
        self._pool: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._running = 0  # rows in the batch on the model thread

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._queue, self._arrived = asyncio.Queue(), asyncio.Event()
        self._event_loop, self._outbox, self._flush_pending = asyncio.get_running_loop(), deque(), False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-model")
        work = self._steps() if self.scheduler is not None else self._loop()
        self._task = self._event_loop.create_task(work)

    async def stop(self) -> None:
        """Run what is queued, then stop (Ctrl-C drains the queue)."""
        while self._queue is not None and self.alive and (self.depth or self._running or self._scheduler_busy):
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        """Whether batches still run (the loop has not stopped on an error)."""
        return self._task is not None and not self._task.done()

    # -- submitting --------------------------------------------------------------------------
    def room(self) -> int:
        return self.max_queue - self.depth

    @property
    def depth(self) -> int:
        """Rows waiting (not yet running)."""
        waiting = len(self.scheduler.waiting) if self.scheduler is not None else 0
        return waiting + (self._queue.qsize() if self._queue is not None else 0)

    @property
    def _scheduler_busy(self) -> bool:
        return self.scheduler is not None and self.scheduler.busy

    def submit(self, rows: list[Row], with_results: bool) -> list[asyncio.Future] | None:
        """Queue `rows` (the caller checked `room()` first, with no await in between, so the
        check and the puts are one step of the event loop). Classify rows get a future each."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows] if with_results else [None] * len(rows)
        for row in rows:
            if row.emit is not None:  # the request's callback runs on the loop; the model thread posts to it
                row.emit = functools.partial(self._post, row.emit)
        if self.scheduler is not None:
            self.scheduler.waiting.extend(rows)
            self._arrived.set()
            return None
        for row, future in zip(rows, futures):
            self._queue.put_nowait((row, future))
        return futures if with_results else None

    def _post(self, emit: Callable[[Event], None], event: Event) -> None:
        """From the model thread: queue `emit(event)` for the event loop. One wake-up of the loop
        delivers every event posted until then (one per token would cost the model thread the
        interpreter lock at each token)."""
        self._outbox.append((emit, event))
        if not self._flush_pending:
            self._flush_pending = True
            self._event_loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False  # before draining: an event posted from now on schedules another flush
        while self._outbox:
            emit, event = self._outbox.popleft()
            emit(event)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the model thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- the loops ---------------------------------------------------------------------------
    async def _steps(self) -> None:
        """Continuous batching: one scheduler step at a time on the model thread; rows that
        arrive meanwhile join at the next step."""
        loop, scheduler = asyncio.get_running_loop(), self.scheduler
        while True:
            if not scheduler.busy:
                self._arrived.clear()
                if not scheduler.waiting:
                    await self._arrived.wait()
                    continue
                deadline = loop.time() + self.max_wait_s  # idle: the first row waits a moment for company
                while len(scheduler.waiting) < self.max_batch and (left := deadline - loop.time()) > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
            try:
                await loop.run_in_executor(self._pool, scheduler.run, STEPS_SECONDS)
            except Exception as err:  # outside any row's forward (the scheduler isolates those): every row says why
                for row in scheduler.drop_all():
                    if not row.ended:
                        row.ended = True
                        row.emit(Failed(err))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(row, fut) for row, fut in batch if not row.cancelled and not (fut is not None and fut.done())]
            if not batch:
                continue
            self._running = len(batch)
            self.metrics.batch_rows.observe(len(batch))
            try:
                await self._run(batch)
            finally:
                self._running = 0

    async def _run(self, batch: list[tuple[Row, asyncio.Future | None]]) -> None:
        rows = [row for row, _ in batch]
        loop = asyncio.get_running_loop()
        if self.engine.task == "classify":
            try:
                results = await loop.run_in_executor(self._pool, self.engine.classify, rows)
            except Exception as err:  # outside the rows' forward (the engine isolates that): every row has it
                results = [err] * len(rows)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    (future.set_exception if isinstance(result, Exception) else future.set_result)(result)
            return
        try:
            await loop.run_in_executor(self._pool, self.engine.generate, rows)
        except Exception as err:  # outside any row's decoding (the engine isolates those): every row says why
            for row in rows:
                if not row.ended:
                    row.ended = True
                    row.emit(Failed(err))
