"""POST /classify and /v1/classify: sequence classifiers."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from .. import protocol as P
from ..engine import Row
from ..guard import Problem
from .common import BatcherDep, EngineDep, SettingsDep, cancel, check_lengths, enqueue, problem, resolve, token_ids

router = APIRouter()


@router.post("/classify")
@router.post("/v1/classify")
async def classify(body: P.ClassifyRequest, engine: EngineDep, batcher: BatcherDep, settings: SettingsDep) -> dict:
    if engine.task != "classify":
        raise Problem(404, "this server runs a causal language model: use /v1/completions or /v1/chat/completions")
    route, names, shown = resolve(engine, body.model, body.adapters)
    rows = [Row(token_ids(engine, text), route, names) for text in P.as_list(body.input)]
    check_lengths(engine, rows, 0)
    futures = enqueue(batcher, settings, rows, with_results=True)
    try:
        results = await asyncio.gather(*futures)
    except Exception as err:
        raise problem(err) from None
    finally:
        cancel(rows)  # nothing left to do for them; a dropped client's rows are skipped
    return P.classify_answer(shown, results, sum(len(r.ids) for r in rows))
