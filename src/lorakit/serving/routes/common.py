"""What the endpoints share: the dependencies (the app's engine, batcher, metrics and settings),
which model a request means, its token ids, and putting its rows in the queue."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from ..batcher import Batcher
from ..engine import Engine, Row, RowError
from ..guard import Problem, internal_error
from ..metrics import Metrics
from ..settings import Settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(get_engine)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def resolve(engine: Engine, model: str | None, mix: dict[str, float] | None) -> tuple[Any, tuple[str, ...], str]:
    """(route, adapter names, the model name to echo) of a request's `model` and `adapters`."""
    store = engine.store
    if mix is not None:
        if model not in (None, engine.base_id):
            raise Problem(
                422,
                f"`adapters` mixes adapters over the base model; give model "
                f"{engine.base_id!r} (or none) with it, not {model!r}",
                "model",
            )
        unknown = [n for n in mix if n not in store.entries]
        if unknown:
            raise Problem(404, _unknown(engine, unknown[0]), "adapters")
        weighted = {n: w for n, w in mix.items() if w}  # a zero weight adds nothing: nothing to load
        return (weighted or None), tuple(weighted), engine.base_id
    if model is None or model == engine.base_id:
        return None, (), engine.base_id
    if model in store.entries:
        return model, (model,), model
    raise Problem(404, _unknown(engine, model), "model")


def _unknown(engine: Engine, name: str) -> str:
    names = [engine.base_id, *engine.store.entries]
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"The model `{name}` does not exist. Valid models: {shown}."


def token_ids(engine: Engine, value: str | list[int], special: bool = True) -> list[int]:
    if isinstance(value, str):
        return engine.encode(value, special)
    vocab = len(engine.tokenizer)
    if any(not 0 <= t < vocab for t in value):
        raise Problem(422, f"token ids must lie in [0, {vocab})", "prompt")
    return list(value)


def enqueue(batcher: Batcher, settings: Settings, rows: list[Row], with_results: bool):
    if not batcher.alive:  # queued rows would wait for ever
        raise Problem(503, "the server's batch loop has stopped; see the server's log")
    if len(rows) > settings.max_queue:  # it would never fit: retrying (as clients do on 429) cannot help
        raise Problem(
            413,
            f"this request has {len(rows)} rows (inputs x n), more than the "
            f"{settings.max_queue} the server queues (--max-queue); send it in parts",
        )
    if batcher.room() < len(rows):
        raise Problem(
            429, f"the queue is full ({settings.max_queue} rows waiting); retry shortly", headers={"Retry-After": "1"}
        )
    return batcher.submit(rows, with_results)


def check_lengths(engine: Engine, rows: list[Row], new_tokens: int) -> None:
    for row in rows:
        if not row.ids:
            raise Problem(422, "an input is empty after tokenizing")
        if len(row.ids) + new_tokens > engine.max_length:
            raise Problem(
                413,
                f"the input is {len(row.ids)} tokens"
                + (f" + {new_tokens} to generate" if new_tokens else "")
                + f", more than this model's maximum context of {engine.max_length} tokens",
            )


def cancel(rows: list[Row]) -> None:
    for row in rows:
        row.cancelled = True


def problem(err: Exception) -> Problem:
    if isinstance(err, RowError):
        return Problem(err.status, err.message)
    return internal_error(err, "a row failed")
