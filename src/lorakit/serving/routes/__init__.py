"""The endpoints of `lorakit serve`, one `APIRouter` per kind; each reads the engine, the batcher,
the metrics and the settings through the dependencies of `common.py`, so a test can mount one
router on a bare app and override them."""

from .admin import router as admin
from .classify import router as classify
from .generate import router as generate

__all__ = ["admin", "classify", "generate"]
