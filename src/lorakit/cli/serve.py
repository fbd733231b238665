"""`lorakit serve`: a base model and its adapters over HTTP, with vLLM's endpoints.

    lorakit serve runs/sentiment                      the adapter of a default `lorakit train`
    lorakit serve runs/a runs/b --adapter-root runs/  several, plus every adapter folder under runs/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..peft_format import CONFIG_FILE
from ..serving.deps import ServeError, require_web

API_KEY_ENV = "LORAKIT_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a base model and many adapters over HTTP (vLLM-compatible endpoints)")
    s.add_argument("adapters", nargs="*", metavar="RUN_OR_ADAPTER_FOLDER",
                   help="adapter folders, served under their folder names and kept loaded")
    s.add_argument("--model", help="base model (default: the one named in the adapters' adapter_config.json)")
    s.add_argument("--adapter-root", metavar="DIR",
                   help="register every adapter folder under DIR (loaded on first use); "
                        "/v1/load_lora_adapter may load folders from DIR only")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    s.add_argument("--max-batch", type=int, default=32, help="rows per batch (default 32)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more rows (default 5)")
    s.add_argument("--max-queue", type=int, default=256, help="rows waiting before requests get 429 (default 256)")
    s.add_argument("--max-loaded-mb", type=float, default=1024.0,
                   help="loaded adapters' size limit in MB; least recently used ones are unloaded (default 1024)")


def run(args: argparse.Namespace) -> int:
    require_web()
    _check_options(args)
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
    settings = Settings(api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_batch=args.max_batch,
                        max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, adapter_root=root)
    app = build_app(engine, settings)
    names = list(engine.store.entries)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    def announce(url: str) -> None:
        print(f"lorakit serve: {engine.base_id} ({engine.task}) with adapters: {shown or 'none'}", flush=True)
        print(f"lorakit serve: listening on {url}" + (" (API key required)" if settings.api_key else "")
              + "; Ctrl-C to stop", flush=True)

    try:
        run_server(app, args.host, args.port, announce)
    except KeyboardInterrupt:
        pass  # uvicorn has drained and stopped; the signal comes back to us afterwards
    print(f"lorakit serve: stopped after {sum(app.state.metrics.requests.values())} requests", flush=True)
    return 0


def _check_options(args: argparse.Namespace) -> None:
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ServeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_wait_ms < 0 or args.max_loaded_mb < 0:
        raise ServeError("--max-wait-ms and --max-loaded-mb must not be negative")
    if not 0 <= args.port < 65536:
        raise ServeError(f"--port must be in 0..65535, got {args.port}")
    for folder in args.adapters:
        if not (Path(folder) / CONFIG_FILE).is_file():
            raise ServeError(f"{folder}: not an adapter folder (no {CONFIG_FILE}); give a `lorakit train` output")
    if not args.adapters and not args.adapter_root and not args.model:
        raise ServeError("give adapter folders, --adapter-root DIR, or --model for a causal LM without adapters")
