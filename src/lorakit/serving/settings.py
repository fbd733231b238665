"""The server's limits and options (from `lorakit serve`'s command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Settings:
    api_key: str | None = None  # then every request but /health needs "Authorization: Bearer <key>"
    max_batch: int = 32  # rows per batch (generation: rows decoding together)
    max_batch_tokens: int = 2048  # generation: tokens through the model per step (decoding rows + prefill chunk)
    max_wait_ms: float = 5.0  # how long an idle server waits for more rows before it starts a batch
    max_queue: int = 256  # rows waiting; beyond, 429 (413 for a request of more rows than that)
    adapter_root: Path | None = None  # where /v1/load_lora_adapter may read folders; None: no run-time loading
    max_body_bytes: int = 1 << 20
    continuous: bool = True  # generation scheduled per step; False: static batches (to measure against)
