"""The serving wing: many adapters on one base model, over HTTP (`lorakit serve`).

`store.py` (torch only) keeps registered adapters loaded within a byte budget; the rest
(`engine.py`, `batcher.py`, `app.py`) needs the `serve` extra: FastAPI, uvicorn (and httpx for
the tests and the load benchmark), imported only where the server is built.
"""

from .store import AdapterStore, Entry

__all__ = ["AdapterStore", "Entry"]
