"""`lorakit serve`: a base model and its adapters over HTTP, with vLLM's endpoints.

lorakit serve runs/sentiment                      the adapter of a default `lorakit train`
lorakit serve runs/a runs/b --adapter-root runs/  several, plus every adapter folder under runs/
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..files.peft_format import CONFIG_FILE
from ..serving.extra_check import ServeError, require_web
from ..training.options import add_options, check_options, option, options_from_args

API_KEY_ENV = "LORAKIT_API_KEY"
_WHAT, _SERVER, _BATCHES = "what to serve", "server", "batching"


@dataclass
class ServeOptions:
    """The options of `lorakit serve` (besides the adapter folders), checked from these definitions."""

    model: str | None = option(None, _WHAT, "base model (default: the one named in the adapters' adapter_config.json)")
    adapter_root: str | None = option(
        None,
        _WHAT,
        "register every adapter folder under DIR (loaded on "
        "first use); /v1/load_lora_adapter may load folders from DIR only",
        metavar="DIR",
    )
    max_loaded_mb: float = option(
        1024.0,
        _WHAT,
        "loaded adapters' size limit in MB; least recently used ones are unloaded (default 1024)",
        metavar="MB",
        valid=">= 0",
    )
    host: str = option("127.0.0.1", _SERVER, "address to listen on (default 127.0.0.1)")
    port: int = option(8000, _SERVER, "port (default 8000; 0: any free port)", valid="[0, 65535]")
    api_key: str | None = option(
        None, _SERVER, f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)", metavar="KEY"
    )
    max_batch: int = option(32, _BATCHES, "rows per batch (default 32)", metavar="ROWS", valid=">= 1")
    # A batch that waits longer than a minute for company leaves a lone request hanging.
    max_wait_ms: float = option(
        5.0,
        _BATCHES,
        "how long a batch waits for more rows, at most a minute (default 5)",
        metavar="MS",
        valid="[0, 60000]",
    )
    max_queue: int = option(
        256,
        _BATCHES,
        "rows waiting before requests get 429; a request of more rows gets 413 (default 256)",
        metavar="ROWS",
        valid=">= 1",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a base model and many adapters over HTTP (vLLM-compatible endpoints)")
    s.add_argument(
        "adapters",
        nargs="*",
        metavar="RUN_OR_ADAPTER_FOLDER",
        help="adapter folders, served under their folder names and kept loaded",
    )
    add_options(s, ServeOptions)


def run(args: argparse.Namespace) -> int:
    require_web()
    check_options(options_from_args(ServeOptions, args), ServeError)
    api_key = _api_key(args.api_key)
    _check_folders(args)
    from ..serving.app import Settings, build_app
    from ..serving.server import run as run_server
    from .serve_setup import build_engine, root_folders

    root = Path(args.adapter_root) if args.adapter_root else None
    if root is not None and not root.is_dir():
        raise ServeError(f"--adapter-root {root}: no such folder")
    pinned = [Path(a) for a in args.adapters]
    found = root_folders(root) if root is not None else []
    engine, skipped = build_engine(pinned, found, args.model, int(args.max_loaded_mb * 2**20))
    for folder, err in skipped:
        print(f"lorakit serve: skipping {folder}: {err}", file=sys.stderr)
    settings = Settings(
        api_key=api_key,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        adapter_root=root,
    )
    app = build_app(engine, settings)
    names = list(engine.store.entries)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    def announce(url: str) -> None:
        print(f"lorakit serve: {engine.base_id} ({engine.task}) with adapters: {shown or 'none'}", flush=True)
        print(
            f"lorakit serve: listening on {url}"
            + (" (API key required)" if settings.api_key else "")
            + "; Ctrl-C to stop",
            flush=True,
        )

    interrupted = False
    try:
        run_server(app, args.host, args.port, announce)
    except KeyboardInterrupt:
        interrupted = True  # uvicorn has drained and stopped; the signal comes back to us afterwards
    print(f"lorakit serve: stopped after {sum(app.state.metrics.requests.values())} requests", flush=True)
    return 130 if interrupted else 0  # Ctrl-C ends every command with 130, after the drain here


def _api_key(given: str | None) -> str | None:
    """The key from --api-key, else from $LORAKIT_API_KEY; an empty one is what `--api-key "$KEY"`
    gives when KEY is unset, and serving open then would be a surprise: refused."""
    key, source = given, "--api-key"
    if given is None:
        key, source = os.environ.get(API_KEY_ENV), f"${API_KEY_ENV}"
    if key is not None and not key.strip():
        raise ServeError(
            f"{source} is empty: give a key, or leave it out (and unset ${API_KEY_ENV}) to serve without one"
        )
    return key


def _check_folders(args: argparse.Namespace) -> None:
    for folder in args.adapters:
        if not (Path(folder) / CONFIG_FILE).is_file():
            raise ServeError(f"{folder}: not an adapter folder (no {CONFIG_FILE}); give a `lorakit train` output")
    if not args.adapters and not args.adapter_root and not args.model:
        raise ServeError("give adapter folders, --adapter-root DIR, or --model for a causal LM without adapters")
