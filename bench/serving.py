"""Serving benchmark: many adapters on one base model (writes the `serving` section of BENCHMARKS.md).

    python bench/serving.py            # the full run (about 8 minutes on 2 CPU cores)
    python bench/serving.py --quick    # fewer repetitions and loads, no HTTP run, prints only

all-MiniLM-L6-v2 (the encoder, no pooler), rank-8 adapters on every linear layer, inference in
float32. Cases of one setting are built from the same weights and inputs, and their timed
repetitions interleaved (run.time_cases), PEFT in the same process with the same adapter values:

- mixed batches: every row through its own adapter. lorakit `mixed_batch` / the base model's
  forward, and PEFT's `adapter_names` / the base, over 64 and 16 adapters (64 rows x 64 tokens),
  8 adapters (8 x 16), and one request (1 x 16) through the serving path;
- load time: the 1st, 100th and 1,000th adapter loaded onto one model (lorakit), the 1st and
  100th (PEFT's `load_adapter`);
- the per-row matmul lorakit uses against two others on one linear layer (why it is that one);
- HTTP: `bench/serving_load.py` (a real server process and async clients; its own docstring).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases as C  # noqa: E402
import report  # noqa: E402
from run import _timed, time_cases  # noqa: E402
from sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RANK = 8

# (label, rows, tokens per row, distinct adapters, target on lorakit / base)
SETTINGS = [
    ("64 x 64 over 64 adapters", 64, 64, 64, 1.15),
    ("64 x 64 over 16 adapters", 64, 64, 16, 1.10),
    ("8 x 16 over 8 adapters", 8, 16, 8, 1.25),
    ("1 x 16, one adapter (serving path)", 1, 16, 1, 1.20),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and loads, no HTTP run, no file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per setting (default 12, quick 3)")
    ap.add_argument("--loads", type=int, default=None, help="adapters loaded in the load-time run (default 1000)")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP load test")
    ap.add_argument("--out", default=None, help="markdown file (default BENCHMARKS.md; quick: none)")
    args = ap.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    reps = args.reps or (3 if args.quick else 12)
    loads = args.loads or (120 if args.quick else 1000)
    out = None if (args.quick and args.out is None) else Path(args.out or ROOT / "BENCHMARKS.md")

    machine = report.machine(threads, "cpu", "float32")
    print(report.machine_line(machine), flush=True)
    started, load_before = time.time(), os.getloadavg()[0]
    base = C.load_model("minilm", "cpu", torch.float32).eval()
    ours, theirs = twin_models(base, 64)
    mixed = {}
    for label, rows, tokens, distinct, _ in SETTINGS:
        mixed[label] = time_setting(base, ours, theirs, rows, tokens, distinct, reps)
        print(f"{label}: {summary(mixed[label])}", flush=True)
    del ours, theirs
    layer = layer_strategies(max(3, reps // 2))
    print("per-row matmul strategies (one linear layer):", json.dumps(layer), flush=True)
    load = load_times(base, loads, peft_loads=min(100, loads))
    print("load times:", json.dumps({k: v for k, v in load.items() if not isinstance(v, list)}), flush=True)
    http = None if (args.quick or args.no_http) else http_run(threads)
    if http:
        print("http:", json.dumps(http), flush=True)
    machine["load"] = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
    machine["minutes"] = f"{(time.time() - started) / 60:.1f}"
    text = markdown(mixed, layer, load, http, machine, reps, sys.argv[1:])
    print(text)
    if out is not None:
        write_section("serving", text, out)
        print(f"wrote the serving section of {out}")
    return 0


# ---- models ---------------------------------------------------------------------------------


def twin_models(base, count: int):
    """lorakit and PEFT models with the same `count` adapters a0..: rank 8 on every linear layer,
    A as initialised, B random (so that every adapter changes the output)."""
    from peft import LoraConfig, get_peft_model

    import lorakit

    ours = copy.deepcopy(base)
    for i in range(count):
        lorakit.add_adapter(ours, f"a{i}", lorakit.LoraConfig(rank=RANK, alpha=2 * RANK, targets="all-linear"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in C.lora_layers(ours):
            for name in layer.adapter_names:
                b = layer.pair(name)[1]
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    paths = [n for n, m in ours.named_modules() if isinstance(m, lorakit.LoraLayer)]
    config = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=paths)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(**config), adapter_name="a0")
    for i in range(1, count):
        theirs.add_adapter(f"a{i}", LoraConfig(**config))
    with torch.no_grad():
        for path in paths:
            mine, other = ours.get_submodule(path), theirs.base_model.model.get_submodule(path)
            for name in mine.adapter_names:
                other.lora_A[name].weight.copy_(mine.pair(name)[0])
                other.lora_B[name].weight.copy_(mine.pair(name)[1])
    return ours.eval(), theirs.eval()


def time_setting(base, ours, theirs, rows: int, tokens: int, distinct: int, reps: int) -> dict:
    import lorakit

    ids = torch.randint(10, base.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(1))
    names = [f"a{i % distinct}" for i in range(rows)]
    random.Random(0).shuffle(names)

    def base_case():
        with torch.inference_mode():
            return base(input_ids=ids).last_hidden_state

    def lorakit_case():
        with torch.inference_mode(), lorakit.mixed_batch(ours, names):
            return ours(input_ids=ids).last_hidden_state

    def peft_case():
        with torch.inference_mode():
            if distinct == 1:  # one request: PEFT's own serving path is the active adapter
                theirs.set_adapter(names[0])
                return theirs(input_ids=ids).last_hidden_state
            return theirs(input_ids=ids, adapter_names=names).last_hidden_state

    cases = {"base": base_case, "lorakit": lorakit_case, "peft": peft_case}
    y_ours, y_theirs, y_base = lorakit_case(), peft_case(), base_case()
    scale = y_theirs.abs().max().item()
    times = time_cases(cases, reps, "cpu")
    return {
        "times": times,
        "check": (y_ours - y_theirs).abs().max().item() / scale,
        "changed": (y_ours - y_base).abs().max().item() / scale,  # the adapters do change the output
    }


def summary(res: dict) -> str:
    t = res["times"]
    return (
        f"base {report.med(t['base']) * 1e3:.1f} ms, lorakit / base {report.paired(t['lorakit'], t['base']):.3f}, "
        f"PEFT / base {report.paired(t['peft'], t['base']):.3f}, lorakit / PEFT "
        f"{report.paired(t['lorakit'], t['peft']):.3f}; max |lorakit - PEFT| / max |y| {res['check']:.1e}"
    )


# ---- one linear layer: which batched matmul --------------------------------------------------


def layer_strategies(reps: int) -> dict[str, dict[str, float]]:
    """Time / the base linear's, 64 rows x 64 tokens over 64 adapters of rank 8, for lorakit's
    per-row batched matmul (gathered weights, bmm + baddbmm_), rows sorted by adapter into
    segments through torch._grouped_mm, and a Python loop over the adapters (PEFT's way)."""
    import torch.nn.functional as F

    rows, tokens, count = 64, 64, 64
    found = {}
    for d_in, d_out in ((384, 384), (384, 1536), (1536, 384)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, tokens, d_in, generator=g)
        w, bias = torch.randn(d_out, d_in, generator=g) * 0.05, torch.randn(d_out, generator=g)
        a = torch.randn(count, RANK, d_in, generator=g)
        b = torch.randn(count, d_out, RANK, generator=g)
        route = torch.randperm(rows, generator=g) % count
        a_rows, b_rows = a[route], b[route]
        order = torch.argsort(route, stable=True)
        ends = torch.bincount(route, minlength=count).cumsum(0).mul(tokens).to(torch.int32)

        def base_case():
            return F.linear(x, w, bias)

        def per_row():
            y = F.linear(x, w, bias)
            return y.baddbmm_(torch.bmm(x, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))

        def segments():
            y = F.linear(x, w, bias)
            xs = x.index_select(0, order).reshape(-1, d_in)
            xa = torch._grouped_mm(xs, a.transpose(1, 2), offs=ends)
            delta = torch._grouped_mm(xa, b.transpose(1, 2), offs=ends)
            return y.view(rows, -1).index_add_(0, order, delta.view(rows, -1)).view_as(y)

        def loop():
            y = F.linear(x, w, bias)
            for k in range(count):
                picked = (route == k).nonzero().flatten()
                if len(picked):
                    y[picked] += (x[picked] @ a[k].t()) @ b[k].t()
            return y

        cases = {"base": base_case, "per-row bmm (lorakit)": per_row, "loop per adapter (PEFT's way)": loop}
        if hasattr(torch, "_grouped_mm"):
            cases["sorted segments, torch._grouped_mm"] = segments
            torch.testing.assert_close(segments(), per_row(), rtol=1e-4, atol=1e-3)
        times = time_cases(cases, reps, "cpu")
        found[f"{d_in} -> {d_out}"] = {k: report.paired(v, times["base"]) for k, v in times.items() if k != "base"}
    return found


# ---- load time -----------------------------------------------------------------------------


def load_times(base, count: int, peft_loads: int) -> dict:
    """Seconds for each of `count` loads of an adapter folder onto one model (lorakit), and of
    `peft_loads` loads with PEFT's load_adapter; every adapter stays loaded."""
    from peft import PeftModel

    import lorakit

    folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    ours_src, _ = twin_models(base, 1)
    lorakit.save_adapter(ours_src, folder / "lorakit", "a0")
    theirs = C.peft_model_like(
        base, C.lorakit_model(base, C.Variant("all-linear", RANK)), C.Variant("all-linear", RANK)
    )
    theirs.save_pretrained(folder / "peft")
    del ours_src, theirs
    model = copy.deepcopy(base).eval()
    ours = [_timed(partial(lorakit.load_adapter, model, folder / "lorakit", f"n{i}")) for i in range(count)]
    del model
    host = PeftModel.from_pretrained(copy.deepcopy(base), folder / "peft", adapter_name="p0").eval()
    peft = [_timed(partial(host.load_adapter, folder / "peft", adapter_name=f"p{i}")) for i in range(1, peft_loads + 1)]
    return {"lorakit": ours, "peft": peft, **window_ratios(ours, "lorakit"), **window_ratios(peft, "peft")}


def window_ratios(times: list[float], lib: str) -> dict[str, float]:
    """Median of 10 loads around the 1st, 100th and 1,000th (a single load is too noisy), in ms."""
    found = {f"{lib} 1st": report.med(times[:10]) * 1e3}
    for n in (100, 1000):
        if len(times) >= n:
            found[f"{lib} {n}th"] = report.med(times[n - 10 : n]) * 1e3
    return found


# ---- HTTP ----------------------------------------------------------------------------------


def http_run(threads: int) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).with_name("serving_load.py")), "--json", "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        raise SystemExit("the HTTP load test failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the section ---------------------------------------------------------------------------


def markdown(mixed: dict, layer: dict, load: dict, http: dict | None, m: dict, reps: int, argv: list[str]) -> str:
    ratio = lambda res, a, b: report.paired(res["times"][a], res["times"][b])  # noqa: E731
    rows = []
    for label, _, _, _, target in SETTINGS:
        res = mixed[label]
        ours, theirs = ratio(res, "lorakit", "base"), ratio(res, "peft", "base")
        rows.append((f"{label} / base forward", f"<= {target:.2f}", f"{ours:.2f}", f"{theirs:.2f}", ours <= target))
    for label in SETTINGS[0][0], SETTINGS[1][0]:
        ours = ratio(mixed[label], "lorakit", "peft")
        rows.append((f"lorakit mixed / PEFT `adapter_names`, {label}", "<= 0.60", f"{ours:.2f}", "1", ours <= 0.60))
    last = max(n for n in (1000, 100) if f"lorakit {n}th" in load)
    grow = load[f"lorakit {last}th"] / load["lorakit 1st"]
    peft_grow = load["peft 100th"] / load["peft 1st"] if "peft 100th" in load else None
    rows.append(
        (
            f"load time of the {last:,}th adapter / the 1st",
            "<= 1.2",
            f"{grow:.2f}",
            f"{peft_grow:.2f} (100th / 1st)" if peft_grow else "-",
            grow <= 1.2,
        )
    )
    if http:
        rows.append(
            (
                "HTTP: 200 concurrent requests over 32 adapters, served / offline mixed batches (throughput)",
                ">= 0.7",
                f"{http['ratio']:.2f}",
                "-",
                http["ratio"] >= 0.7 and http["errors"] == 0,
            )
        )
    table = ["| measure | target | lorakit | PEFT | met |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} | {d} | {'yes' if ok else 'no'} |" for a, b, c, d, ok in rows]

    details = [
        "| setting | base forward (ms) | lorakit / base | PEFT / base | lorakit / PEFT "
        "| max diff lorakit vs PEFT / max |y| "
        "| max diff lorakit vs base / max |y| |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, *_ in SETTINGS:
        res = mixed[label]
        t = res["times"]
        details.append(
            f"| {label} | {report.med(t['base']) * 1e3:.1f} ({report.spread(t['base']):.0f}%) | "
            f"{ratio(res, 'lorakit', 'base'):.3f} | {ratio(res, 'peft', 'base'):.3f} | "
            f"{ratio(res, 'lorakit', 'peft'):.3f} | {res['check']:.1e} | {res['changed']:.1e} |"
        )
    strategies = list(next(iter(layer.values())))
    layer_table = ["| layer (in -> out) | " + " | ".join(strategies) + " |", "|" + " --- |" * (len(strategies) + 1)]
    layer_table += [
        f"| {shape} | " + " | ".join(f"{v[s]:.2f}" for s in strategies) + " |" for shape, v in layer.items()
    ]
    loads = ", ".join(f"{k} {v:.1f} ms" for k, v in load.items() if not isinstance(v, list))
    shown = " ".join(argv)
    http_text = ""
    if http:
        http_text = (
            f"\n**HTTP** (`python bench/serving_load.py`, run by this script): {http['requests']} concurrent "
            f"`/v1/classify` requests (one text of about {http['tokens_per_row']} tokens each) over {http['adapters']} "
            f"classifier adapters (rank 8, all linear layers, a head each), async httpx clients on loopback "
            f"(one client and connection per request) against a "
            f"`lorakit serve --adapter-root` process (--max-batch {http['max_batch']}, --max-wait-ms "
            f"{http['max_wait_ms']}), every adapter loaded by a warm-up request first; median of {http['rounds']} "
            f"rounds: {http['served_rps']:.1f} requests/s served against {http['offline_rps']:.1f} rows/s offline "
            f"(the same rows, tokenized and run as mixed batches of {http['max_batch']} in this process): "
            f"ratio {http['ratio']:.2f}; latency p50 {http['p50_ms']:.0f} ms, p99 {http['p99_ms']:.0f} ms; "
            f"mean batch the server ran {http['mean_batch']:.1f} rows (from /metrics); the clients used "
            f"{http['client_cpu_s']:.2f} s of CPU per round, on the same cores; "
            f"errors {http['errors']}; answers checked against the offline result of the row's adapter: "
            f"{http['checked']} of {http['requests']} per round, "
            f"largest probability difference {http['max_diff']:.1e}.\n"
        )
    return f"""## Serving: many adapters on one base

Written by `python bench/serving.py{" " + shown if shown else ""}`, {m["date"]}.

- Machine: {m["machine"]}
- Software: {m["software"]}
- Run: {m["run"]}; {reps} timed rounds per setting, interleaved (each round runs base, lorakit and
  PEFT once, order rotating), after 2 warm-up calls each; machine load {m["load"]}, shared with other
  work; the run took {m["minutes"]} minutes.
- Model: all-MiniLM-L6-v2 encoder, rank-8 adapters on all 36 linear layers (alpha 16), float32,
  `torch.inference_mode()`; lorakit and PEFT hold the same 64 adapters with the same values. A
  ratio is the median over rounds of the two cases' ratio in the same round.

{chr(10).join(table)}

Per setting (times are medians; in parentheses half the interquartile range; the last column
shows that the adapters do change the output, the one before that lorakit's rows equal PEFT's):

{chr(10).join(details)}

Where lorakit's mixed batch spends its time: the rank-8 products of one row are too small for the
matmul kernel to run at full speed, so the choice of the batched form matters. One linear layer, 64
rows x 64 tokens over 64 adapters, time / the base linear's:

{chr(10).join(layer_table)}

Load time (median of 10 loads around the 1st, 100th and 1,000th; every adapter stays loaded):
{loads}.
{http_text}"""


if __name__ == "__main__":
    raise SystemExit(main())
