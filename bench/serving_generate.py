"""Generation in `lorakit serve`: continuous batching against static batching, and against offline.

    python bench/serving_generate.py            # writes the `serving-generate` section of BENCHMARKS.md
    python bench/serving_generate.py --quick    # smaller, prints only

A random Llama (4 layers, hidden 256, 2048 positions, a word-level vocabulary of 512) with 8
random rank-8 adapters on every linear layer, saved as `lorakit train` writes them and loaded
the way `lorakit serve` loads them (cli/serve_setup.build_engine). The server side runs in this
process: the engine and its Batcher (the same object the HTTP app drives), rows submitted with
the request's settings and their events timed as they arrive, so the figures are the scheduling's
and the model's, not HTTP's. Every case runs twice, static batching (`Settings.continuous`
False: a batch runs until its last row ends, today's main before continuous batching) and
continuous batching, side by side in one run.

1. A short request (4 new tokens) sent 50 ms after a request for 825 tokens, against the same
   request alone: its latency ratio.
2. 32 concurrent requests over the 8 adapters, 32 new tokens each (ignore_eos): output tokens per
   second served, against offline: the same 32 rows in one `mixed_batch` through Transformers'
   `generate` (greedy, left padding).
3. A load generator in the style of vLLM's serving benchmark: requests arriving as a Poisson
   process, prompt lengths uniform in [8, 96], output lengths uniform in [8, 160], adapters drawn
   from the 8: throughput, time to first token and time per output token at p50 / p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
WORDS = [f"w{i}" for i in range(508)]
ADAPTERS = [f"a{i}" for i in range(8)]


def make_base(folder: Path) -> None:
    from cases import llama_folder

    llama_folder(folder, WORDS, max_positions=2048)


def make_adapters(base: Path, root: Path) -> list[Path]:
    import lorakit
    from lorakit.training.base_model import load_model

    model = load_model(str(base), "causal-lm", None)
    g = torch.Generator().manual_seed(1)
    folders = []
    for name in ADAPTERS:
        lorakit.add_adapter(model, name, lorakit.LoraConfig(rank=8, alpha=16, targets="all-linear"))
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, lorakit.LoraLayer) and name in module.adapter_names:
                    b = module.pair(name)[1]
                    b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        lorakit.save_adapter(model, root / name, name, base_model_name_or_path=str(base), task_type="CAUSAL_LM")
        folders.append(root / name)
    return folders


def prompt(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Server:
    """The engine's Batcher in this process; rows timed from submission to each event."""

    def __init__(self, engine, continuous: bool, max_batch: int = 32) -> None:
        from lorakit.serving.app import Settings
        from lorakit.serving.batcher import Batcher
        from lorakit.serving.metrics import Metrics

        settings = Settings(max_batch=max_batch, max_queue=4096, continuous=continuous, max_wait_ms=5.0)
        self.engine, self.batcher = engine, Batcher(engine, settings, Metrics(engine.store))

    async def ask(self, text: str, adapter: str | None, max_tokens: int) -> dict:
        """One greedy request; {ttft, total, tokens, text}."""
        from lorakit.serving.engine import Row
        from lorakit.serving.events import Done, Failed, Text
        from lorakit.serving.sampling import Sampling

        loop = asyncio.get_running_loop()
        done, times, pieces = loop.create_future(), [], []

        def emit(ev) -> None:  # on the event loop (the batcher posts the model thread's events)
            if isinstance(ev, Text):
                times.append(time.perf_counter())
                pieces.append(ev.delta)
            elif isinstance(ev, (Done, Failed)) and not done.done():
                times.append(time.perf_counter())
                done.set_result(ev)

        ids = self.engine.encode(text)
        row = Row(
            ids,
            adapter,
            (adapter,) if adapter else (),
            max_tokens=max_tokens,
            sampling=Sampling(temperature=0.0, ignore_eos=True),
            emit=emit,
        )
        started = time.perf_counter()
        self.batcher.submit([row], with_results=False)
        end = await done
        assert not isinstance(end, Failed), end
        return {
            "ttft": times[0] - started,
            "total": times[-1] - started,
            "tokens": len(row.out),
            "text": "".join(pieces),
        }


async def short_during_long(engine, continuous: bool) -> dict:
    server = Server(engine, continuous)
    server.batcher.start()
    try:
        rng = random.Random(0)
        await server.ask(prompt(rng, 8), "a1", 4)  # warm-up
        alone = statistics.median([(await server.ask(prompt(rng, 8), "a1", 4))["total"] for _ in range(3)])
        long = asyncio.ensure_future(server.ask(prompt(rng, 8), "a0", 825))
        await asyncio.sleep(0.05)
        short = await server.ask(prompt(rng, 8), "a1", 4)
        long_done = await long
    finally:
        await server.batcher.stop()
    return {"alone_s": alone, "during_s": short["total"], "ratio": short["total"] / alone, "long_s": long_done["total"]}


async def concurrent(engine, continuous: bool, rows: list[tuple[str, str]], new: int) -> dict:
    server = Server(engine, continuous)
    server.batcher.start()
    try:
        await server.ask(rows[0][0], rows[0][1], 4)
        t = time.perf_counter()
        answers = await asyncio.gather(*[server.ask(p, a, new) for p, a in rows])
        seconds = time.perf_counter() - t
    finally:
        await server.batcher.stop()
    return {
        "tok_s": sum(a["tokens"] for a in answers) / seconds,
        "seconds": seconds,
        "texts": [a["text"] for a in answers],
    }


def offline(engine, rows: list[tuple[str, str]], new: int) -> dict:
    """The same rows in one mixed batch through Transformers' generate (greedy, left padding)."""
    from lorakit import mixed_batch

    tok = engine.tokenizer
    tok.padding_side = "left"
    enc = tok([p for p, _ in rows], return_tensors="pt", padding=True)
    times, texts = [], []
    for _ in range(3):
        t = time.perf_counter()
        with torch.inference_mode(), mixed_batch(engine.model, [a for _, a in rows]):
            out = engine.model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        times.append(time.perf_counter() - t)
    texts = [tok.decode(o[enc["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]
    return {"tok_s": len(rows) * new / min(times), "seconds": min(times), "texts": texts}


async def load(engine, continuous: bool, n: int, rate: float, seed: int = 0) -> dict:
    server = Server(engine, continuous)
    server.batcher.start()
    rng = random.Random(seed)
    jobs = [
        (prompt(rng, rng.randint(8, 96)), rng.choice(ADAPTERS), rng.randint(8, 160), rng.expovariate(rate))
        for _ in range(n)
    ]
    try:
        await server.ask(jobs[0][0], jobs[0][1], 4)
        t = time.perf_counter()
        tasks = []
        for text, adapter, out, gap in jobs:
            tasks.append(asyncio.ensure_future(server.ask(text, adapter, out)))
            await asyncio.sleep(gap)
        answers = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - t
    finally:
        await server.batcher.stop()
    ttft = sorted(a["ttft"] for a in answers)
    tpot = sorted((a["total"] - a["ttft"]) / (a["tokens"] - 1) for a in answers if a["tokens"] > 1)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "tok_s": sum(a["tokens"] for a in answers) / seconds,
        "req_s": n / seconds,
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5),
        "tpot_p99": pct(tpot, 0.99),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=64, help="load generator requests")
    ap.add_argument("--rate", type=float, default=8.0, help="load generator arrivals per second")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores - 1)")
    args = ap.parse_args(argv)
    # One core left to the event loop: torch's threads and the loop's on the same cores stall each other
    # (with every core to torch, served throughput fell to 0.3-0.4 of offline on 2 cores).
    torch.set_num_threads(args.threads or max((os.cpu_count() or 2) - 1, 1))
    from lorakit.cli.serve_setup import build_engine
    from lorakit.training.base_model import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="lorakit-gen-") as tmp:
        base = Path(tmp) / "base"
        make_base(base)
        folders = make_adapters(base, Path(tmp) / "adapters")
        engine, _ = build_engine(folders, [], None, 1 << 30)
        rng = random.Random(1)
        rows = [(prompt(rng, rng.randint(8, 24)), ADAPTERS[i % 8]) for i in range(32)]
        new = 32
        res: dict = {}
        for mode, cont in (("static", False), ("continuous", True)):
            res[mode] = {
                "short": asyncio.run(short_during_long(engine, cont)),
                "concurrent": asyncio.run(concurrent(engine, cont, rows, new)),
            }
            print(mode, json.dumps({k: v for k, v in res[mode]["short"].items()}), flush=True)
        res["offline"] = offline(engine, rows, new)
        for mode in ("static", "continuous"):
            c = res[mode]["concurrent"]
            c["ratio"] = c["tok_s"] / res["offline"]["tok_s"]
            c["same_text"] = sum(a == b for a, b in zip(c.pop("texts"), res["offline"]["texts"]))
            print(mode, "concurrent", json.dumps(c), flush=True)
        res["offline"].pop("texts")
        n = 16 if args.quick else args.requests
        for mode, cont in (("static", False), ("continuous", True)):
            res[mode]["load"] = asyncio.run(load(engine, cont, n, args.rate))
            print(mode, "load", json.dumps(res[mode]["load"]), flush=True)
    res["threads"], res["requests"], res["rate"] = torch.get_num_threads(), n, args.rate
    if not args.quick:
        from sections import write_section

        write_section("serving-generate", markdown(res, argv if argv is not None else sys.argv[1:]))
        path = ROOT / "BENCHMARKS.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data["serving_generate"] = res
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    return 0


def markdown(res: dict, argv: list[str]) -> str:
    s, c = res["static"], res["continuous"]
    ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
    lines = [
        "## Serving: generation, continuous against static batching",
        "",
        f"`python bench/serving_generate.py {' '.join(argv)}`".replace(" `", "`"),
        f"(torch threads: {res['threads']}, one core left to the event loop; a random 4-layer Llama, "
        "8 rank-8 adapters; engine and batcher in one "
        "process, see the script's docstring). Static: a batch runs until its last row ends; continuous: rows join "
        "and leave between decoding steps.",
        "",
        "| case | static | continuous | target |",
        "| --- | --- | --- | --- |",
        f"| 4-token request during an 825-token generation / alone (latency) | {s['short']['ratio']:.1f}x "
        f"({ms(s['short']['during_s'])} / {ms(s['short']['alone_s'])}) | {c['short']['ratio']:.1f}x "
        f"({ms(c['short']['during_s'])} / {ms(c['short']['alone_s'])}) | <= 3x |",
        f"| 32 concurrent requests over 8 adapters, 32 tokens each: served / offline mixed-batch `generate` "
        f"(tokens/s) | {s['concurrent']['ratio']:.2f} | {c['concurrent']['ratio']:.2f} "
        f"({c['concurrent']['tok_s']:.0f} / {res['offline']['tok_s']:.0f}) | >= 0.8 |",
        f"| same greedy text as offline (of 32) | {s['concurrent']['same_text']} | {c['concurrent']['same_text']} | |",
        "",
        "Same text: offline forbids end-of-text (`min_new_tokens`) where the served rows, with `ignore_eos`, may "
        "pick it and go on, so a row can differ after such a token. Transformers' own continuous-batching "
        "`generate_batch` is not in the table: it cannot route adapters per request (docs/serving.md).",
        "",
        f"Load generator: {res['requests']} requests, Poisson arrivals at {res['rate']:g}/s, prompts 8-96 words, "
        "outputs 8-160 tokens, adapters drawn from 8:",
        "",
        "| batching | output tokens/s | requests/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("static", "continuous"):
        x = res[mode]["load"]
        lines.append(
            f"| {mode} | {x['tok_s']:.0f} | {x['req_s']:.2f} | {ms(x['ttft_p50'])} | {ms(x['ttft_p99'])} | "
            f"{ms(x['tpot_p50'])} | {ms(x['tpot_p99'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
