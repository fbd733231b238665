"""lorakit's benchmark: LoRA overhead against the physical floor, full fine-tuning and PEFT.

    python bench/run.py            # full run (about 10 minutes on 2 CPU cores), writes BENCHMARKS.md
    python bench/run.py --quick    # one MiniLM and one Llama case, fewer repetitions, prints only

Every case of a setting is built in this one process from the same weights, inputs, thread
count and seed; their timed repetitions are interleaved (case order rotates each round), so
load from other processes falls on all of them alike. Peak memory is measured per case in a
fresh subprocess (see memory.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases as C  # noqa: E402
import report  # noqa: E402
from sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OTHER_KEYS = ("experts",)  # BENCHMARKS.json keys that other scripts write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two settings, 3 repetitions, no file written")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--settings", default=None, help="comma-separated subset, e.g. minilm-64,llama-tiny")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", default=None, help="markdown file to write (default BENCHMARKS.md; quick: none)")
    ap.add_argument("--render", metavar="JSON", help="rewrite --out from a run's saved figures, running nothing")
    # Internal: one memory measurement, run in a fresh subprocess by this script.
    ap.add_argument("--memory-case", nargs=2, metavar=("SETTING", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dtype = getattr(torch, args.dtype)
    if args.memory_case:
        import memory

        print(json.dumps(memory.measure(*args.memory_case, device=args.device, dtype=dtype)))
        return 0

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        results = [
            dict(
                r,
                setting=C.Setting(
                    **{**r["setting"], "variants": tuple(C.Variant(**v) for v in r["setting"]["variants"])}
                ),
            )
            for r in saved["results"]
        ]
        out = Path(args.out or ROOT / "BENCHMARKS.md")
        write_section("core", report.markdown(results, saved["machine"], saved["reps"], saved["argv"]), out)
        print(f"wrote {out}")
        return 0

    reps = args.reps or (3 if args.quick else 7)
    chosen = C.settings(args.quick)
    if args.settings:
        wanted = args.settings.split(",")
        chosen = [C.find_setting(n) for n in wanted]
    out = None if (args.quick and args.out is None) else Path(args.out or ROOT / "BENCHMARKS.md")

    machine = report.machine(threads, args.device, args.dtype)
    print(report.machine_line(machine), flush=True)
    started = time.time()
    load_before = os.getloadavg()
    results = []
    for setting in chosen:
        print(f"\n== {setting.name}: batch {setting.batch} x length {setting.seq}", flush=True)
        res = {"setting": setting, "train": {}, "infer": {}, "memory": {}, "memory_live": {}, "checks": {}, "files": {}}
        res["train"] = time_cases(C.build_training(setting, args.device, dtype), reps, args.device)
        res["checks"].update(check_training(setting, args.device, dtype))
        res["infer"] = time_cases(C.build_inference(setting, args.device, dtype), reps * 2, args.device)
        res["checks"].update(check_inference(setting, args.device, dtype))
        res["files"] = adapter_files(setting, args.device, dtype)
        if not args.no_memory:
            res["memory"] = memory_cases(setting, args, threads, live=False)
            if setting is chosen[0] and args.device == "cpu":
                res["memory_live"] = memory_cases(setting, args, threads, live=True)
        report.print_setting(res)
        results.append(res)
    machine["load"] = f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
    machine["minutes"] = f"{(time.time() - started) / 60:.1f}"
    print()
    print(report.targets_table(results[0]))
    if out is not None:
        write_section("core", report.markdown(results, machine, reps, sys.argv[1:]), out)
        raw = out.with_suffix(".json")
        # Other scripts keep their figures under their own key (bench/experts.py: "experts"): kept.
        others = {k: v for k, v in (json.loads(raw.read_text()) if raw.exists() else {}).items() if k in OTHER_KEYS}
        raw.write_text(
            json.dumps(
                {
                    **others,
                    "machine": machine,
                    "reps": reps,
                    "argv": sys.argv[1:],
                    "results": [dict(r, setting=dataclasses.asdict(r["setting"])) for r in results],
                },
                indent=1,
            )
        )
        print(f"\nwrote {out} (figures in {raw}; re-render with --render {raw})")
    return 0


def time_cases(cases: dict, reps: int, device: str, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each case, repetitions interleaved, case order rotating each round."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            start = time.perf_counter()
            cases[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _twin_models(setting: C.Setting, device: str, dtype: torch.dtype):
    """For each variant: (variant, lorakit model, PEFT model with the same adapter values, inputs)."""
    base = C.load_model(setting.model, device, dtype)
    ids = C.make_inputs(setting, base, device)
    for v in setting.variants:
        ours = C.lorakit_model(base, v)
        yield v, ours, C.peft_model_like(base, ours, v), ids


def check_training(setting: C.Setting, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Same start, same batch: lorakit's and PEFT's loss and adapter gradients must agree."""
    import lorakit

    found = {}
    for v, ours, theirs, ids in _twin_models(setting, device, dtype):
        ours.train(), theirs.train()
        torch.manual_seed(3)
        loss_ours = C.loss_of(ours, ids)
        loss_ours.backward()
        torch.manual_seed(3)
        loss_theirs = C.loss_of(theirs, ids)
        loss_theirs.backward()
        worst = 0.0
        modules = dict(theirs.base_model.model.named_modules())
        for path, layer in ours.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                a, b = layer.pair("default")
                ta = modules[path].lora_A["default"].weight
                tb = modules[path].lora_B["default"].weight
                for mine, other in ((a, ta), (b, tb)):
                    scale = other.grad.abs().max().clamp_min(1e-12)
                    worst = max(worst, ((mine.grad - other.grad).abs().max() / scale).item())
        found[f"train {v.label}: |loss diff|"] = abs(loss_ours.item() - loss_theirs.item())
        found[f"train {v.label}: max grad diff / max grad"] = worst
    return found


def check_inference(setting: C.Setting, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Same inputs: lorakit's and PEFT's outputs must agree, and merged must match unmerged."""
    import lorakit

    found = {}
    for v, ours, theirs, ids in _twin_models(setting, device, dtype):
        y_ours = C.inference_step(ours, ids)()
        y_theirs = C.inference_step(theirs, ids)()
        y_merged = C.inference_step(lorakit.merge(copy.deepcopy(ours)), ids)()
        scale = y_theirs.abs().max().item()
        found[f"infer {v.label}: max |lorakit - peft| / max |y|"] = (y_ours - y_theirs).abs().max().item() / scale
        found[f"infer {v.label}: max |merged - unmerged| / max |y|"] = (y_merged - y_ours).abs().max().item() / scale
    return found


def adapter_files(setting: C.Setting, device: str, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Save and load time (median of 5) and file size of the first variant's adapter, both libraries."""
    from peft import PeftModel

    import lorakit

    v = setting.variants[0]
    base = C.load_model(setting.model, device, dtype)
    ours = C.lorakit_model(base, v)
    theirs = C.peft_model_like(base, ours, v)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        mine, other = Path(tmp, "lorakit"), Path(tmp, "peft")

        def save_ours() -> None:
            lorakit.save_adapter(ours, mine)

        def load_ours() -> None:
            fresh = C.lorakit_model(base, v)
            lorakit.load_adapter(fresh, mine, name="loaded")

        def save_theirs() -> None:
            theirs.save_pretrained(other)

        def load_theirs() -> None:
            PeftModel.from_pretrained(copy.deepcopy(base), other)

        save_ours(), save_theirs()
        build = statistics.median(_timed(lambda: C.lorakit_model(base, v)) for _ in range(3))
        for lib, save, load, folder in (
            ("lorakit", save_ours, load_ours, mine),
            ("peft", save_theirs, load_theirs, other),
        ):
            t_save = statistics.median(_timed(save) for _ in range(5))
            t_load = statistics.median(_timed(load) for _ in range(5))
            if lib == "lorakit":
                t_load -= build  # load_ours builds a fresh injected model first
            else:
                t_load -= statistics.median(_timed(lambda: copy.deepcopy(base)) for _ in range(3))
            size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
            found[lib] = {"save_ms": t_save * 1e3, "load_ms": t_load * 1e3, "size_kb": size / 1024}
    return found


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_cases(setting: C.Setting, args, threads: int, live: bool) -> dict[str, float]:
    """Peak memory growth (MB) of each training case, each in a fresh subprocess.

    live=False: the C library's allocator as it comes (what the process really holds).
    live=True: every block of 64 KiB or more is its own mapping, returned on free, so the
    resident set follows the live tensors (see memory.py).
    """
    names = ["floor", "full"] + [f"{lib} {v.label}" for v in setting.variants for lib in ("peft", "lorakit")]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    found = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--threads",
            str(threads),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--memory-case",
            setting.name,
            name,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"memory measurement of {setting.name} / {name} failed")
        found[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
        print(f"  memory{' (live)' if live else ''} {name:28s} {found[name]:8.1f} MB", flush=True)
    return found


if __name__ == "__main__":
    raise SystemExit(main())
