"""The endpoints of `lorakit serve`, one `APIRouter` per kind; each reads the engine, the batcher,
the metrics and the settings through the dependencies of `common.py`, so a test can mount one
router on a bare app and override them."""

from . import admin, classify, generate

ROUTERS = (admin.router, classify.router, generate.router)

__all__ = ["ROUTERS", "admin", "classify", "generate"]
