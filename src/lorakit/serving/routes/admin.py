"""GET /health, /metrics, /v1/models; POST /v1/load_lora_adapter, /v1/unload_lora_adapter."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from ...files.adapter_file import AdapterFileError
from .. import protocol as P
from ..engine import Engine
from ..guard import Problem
from ..metrics import CONTENT_TYPE
from ..store import AdapterStore
from .common import BatcherDep, EngineDep, MetricsDep, SettingsDep

router = APIRouter()


@router.get("/health")
async def health(batcher: BatcherDep) -> Response:
    return Response(status_code=200 if batcher.alive else 503)


@router.get("/metrics")
async def metrics_text(metrics: MetricsDep, batcher: BatcherDep) -> Response:
    metrics.queue_depth.set(batcher.depth)
    return Response(metrics.text(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def models(engine: EngineDep) -> dict:
    cards = [P.model_card(engine.base_id, engine.base_id, None, engine.max_length)]
    cards += [P.model_card(e.name, str(e.folder), engine.base_id, None) for e in list(engine.store.entries.values())]
    return {"object": "list", "data": cards}


@router.post("/v1/load_lora_adapter")
async def load_lora(body: P.LoadRequest, engine: EngineDep, batcher: BatcherDep, settings: SettingsDep) -> Response:
    name, root = body.lora_name, settings.adapter_root
    if not name or not body.lora_path:
        raise Problem(400, "Both 'lora_name' and 'lora_path' must be provided.")
    if root is None:
        raise Problem(403, "loading adapters at run time is off: start lorakit serve with --adapter-root DIR")
    if name == engine.base_id:
        raise Problem(400, f"The lora adapter '{name}' conflicts with a served base model.")
    folder = confine(root, body.lora_path)
    if not folder.is_dir():
        raise Problem(404, f"Loading lora {name} failed: No adapter found for {body.lora_path}")
    try:
        added = await batcher.call(register_and_load, engine, name, folder)
    except (AdapterFileError, ValueError) as err:
        raise Problem(400, f"Loading lora {name} failed: {err}") from None
    if not added:
        raise Problem(400, f"The lora adapter '{name}' has already been loaded.")
    return Response(f"Success: LoRA adapter '{name}' added successfully.", status_code=200)


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: P.UnloadRequest, engine: EngineDep, batcher: BatcherDep) -> Response:
    if not body.lora_name:
        raise Problem(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
    if not await batcher.call(unregister, engine.store, body.lora_name):
        raise Problem(404, f"The lora adapter '{body.lora_name}' cannot be found.")
    return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", status_code=200)


def confine(root: Path, given: str) -> Path:
    """`given` (relative to `root`, or absolute) as a real path inside `root`; 403 otherwise:
    no '..' component, and no symlink that leads out."""
    path = Path(given)
    if ".." in path.parts:
        raise Problem(403, f"lora_path {given!r} may not contain '..'", "lora_path")
    real_root = root.resolve()
    real = (path if path.is_absolute() else root / path).resolve()
    if real != real_root and real_root not in real.parents:
        raise Problem(403, f"lora_path {given!r} lies outside the adapter root {str(root)!r}", "lora_path")
    return real


def register_and_load(engine: Engine, name: str, folder: Path) -> bool:
    """On the model thread: register, then load at once, so a bad folder is reported now. False
    when the name is taken (checked here, in the same step as registering: loads run concurrently)."""
    store = engine.store
    if name in store.entries:
        return False
    store.register(name, folder)
    failed = store.acquire([name])
    if failed:
        store.unregister(name)
        raise failed[name]
    return True


def unregister(store: AdapterStore, name: str) -> bool:
    """On the model thread: forget `name`; False when it is not registered (the check and the
    removal are one step, so of concurrent unloads of one name exactly one succeeds)."""
    if name not in store.entries:
        return False
    store.unregister(name)
    return True
