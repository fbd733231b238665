"""QLoRA benchmark: LoRA on a 4-bit base against LoRA in full precision and against PEFT's QLoRA.

    python bench/qlora.py            # writes the `qlora` section of BENCHMARKS.md (about 15 minutes)
    python bench/qlora.py --quick    # smaller batches, 2 repetitions, no CLI runs; prints only

Per model (a random Llama of 277M parameters built from its config, and the bundled MiniLM):
the bytes of the 4-bit weights against the same weights in bf16; the peak memory of a QLoRA
training step against a bf16 LoRA step, each in a fresh process (memory below); the QLoRA step
time against a float32 LoRA step and against PEFT's QLoRA step on the same 4-bit base, their
repetitions interleaved in one process (run.time_cases). Then the default `lorakit train` run
without and with `--quantize nf4` (and `--loftq`), through the real command line, for held-out
accuracy: seed 0 (the default run itself) for the target, seeds 1 and 2 to show the noise.

Memory: each case runs in a new process with MALLOC_MMAP_THRESHOLD_=65536 (every freed tensor
leaves the resident set), which notes its resident size before building the model, builds it,
resets the high-water mark, runs three steps and reads the mark: the figure is the model plus
everything a step adds, without what building it left behind (the float32 weights a 4-bit
model was quantized from).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qlora_cases as Q  # noqa: E402
import report  # noqa: E402
from memory import _status_kb  # noqa: E402
from report import med, paired, spread  # noqa: E402
from run import time_cases  # noqa: E402
from sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMED = ["lora fp32", "qlora nf4 lorakit", "qlora nf4 peft", "qlora nf4 bf16 lorakit", "qlora nf4 bf16 peft"]
CKPT = Q.CHECKPOINTED
MEMORY = [
    "lora bf16",
    "qlora nf4 bf16 lorakit",
    "lora bf16" + CKPT,
    "qlora nf4 bf16 lorakit" + CKPT,
    "qlora nf4 bf16 peft" + CKPT,
]
STEPS = 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batches, 2 repetitions, no CLI runs, no file written")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 5, quick 2)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: on a shared machine far less noisy than all cores)",
    )
    ap.add_argument("--models", default=",".join(Q.MODELS), help="comma-separated subset of " + ",".join(Q.MODELS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the `lorakit train` runs")
    ap.add_argument(
        "--train-threads",
        type=int,
        default=None,
        help="--threads of the `lorakit train` runs (default: theirs, all cores)",
    )
    ap.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 1, 2],
        help="--seed of the `lorakit train` runs (default 0,1,2; 0 is the default run)",
    )
    ap.add_argument("--out", default=None, help="markdown file (default BENCHMARKS.md; --quick: none)")
    ap.add_argument("--memory-case", nargs=3, metavar=("MODEL", "CASE", "QUICK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = args.threads
    torch.set_num_threads(threads)
    if args.memory_case:
        print(json.dumps(measure_memory(*args.memory_case)))
        return 0

    reps = args.reps or (2 if args.quick else 5)
    shapes = Q.QUICK if args.quick else Q.MODELS
    out = None if (args.quick and args.out is None) else Path(args.out or ROOT / "BENCHMARKS.md")
    machine = report.machine(threads, "cpu", "float32")
    print(report.machine_line(machine), flush=True)
    started, load_before = time.time(), os.getloadavg()
    results = {}
    for name in args.models.split(","):
        shape = shapes[name]
        print(f"\n== {name}: batch {shape.batch} x length {shape.seq}", flush=True)
        res = {"shape": shape, "bytes": weight_bytes(name)}
        print("  4-bit weight bytes / bf16:", {k: round(q / b, 4) for k, (q, b) in res["bytes"].items()}, flush=True)
        res["times"] = time_cases(Q.training_cases(name, shape, TIMED), reps, "cpu", warmup=1)
        gc.collect()
        for case in TIMED:
            print(
                f"  {case:26s} {med(res['times'][case]) * 1e3:9.1f} ms ({spread(res['times'][case]):.0f}%)", flush=True
            )
        res["memory"] = {} if args.no_memory else memory_cases(name, threads, args.quick)
        results[name] = res
    accuracy = {} if (args.quick or args.no_accuracy) else cli_accuracy(args.train_threads, args.seeds)
    machine["load"] = f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
    machine["minutes"] = f"{(time.time() - started) / 60:.1f}"
    text = markdown(results, accuracy, machine, reps, sys.argv[1:])
    print("\n" + text)
    if out is not None:
        write_section("qlora", text, out)
        print(f"\nwrote the qlora section of {out}")
    return 0


def weight_bytes(name: str) -> dict[str, tuple[int, int]]:
    import lorakit

    base = Q.base_model(name)
    found = {}
    for kind in ("nf4", "fp4", "int8"):
        found[kind] = Q.quantized_bytes(lorakit.quantize(Q.copy.deepcopy(base), kind))
    return found


# ---- memory --------------------------------------------------------------------------------


def measure_memory(name: str, case: str, quick: str) -> dict[str, float]:
    """In this fresh process: the resident set a training step of `case` reaches, less the
    process before the model was built (see the module docstring)."""
    import bitsandbytes  # noqa: F401  everything a case imports, imported before the baseline
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lorakit  # noqa: F401

    if name.startswith("llama"):
        from transformers import LlamaForCausalLM  # noqa: F401
    else:
        from transformers import BertModel  # noqa: F401
    gc.collect()
    before = _status_kb("VmRSS")
    shape = (Q.QUICK if quick == "1" else Q.MODELS)[name]
    step = Q.training_cases(name, shape, [case])[case]
    gc.collect()
    built = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(STEPS):
        step()
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024, "model_mb": (built - before) / 1024}


def memory_cases(name: str, threads: int, quick: bool) -> dict[str, dict[str, float]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    found = {}
    for case in MEMORY:
        cmd = [sys.executable, __file__, "--threads", str(threads), "--memory-case", name, case, "1" if quick else "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"memory measurement of {name} / {case} failed")
        found[case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  memory {case:26s} peak {found[case]['peak_mb']:8.1f} MB (model {found[case]['model_mb']:.1f} MB)",
            flush=True,
        )
    return found


# ---- held-out accuracy through the command line --------------------------------------------


def cli_accuracy(threads: int | None, seeds: list[int]) -> dict[tuple[str, int], dict]:
    """The default run (`lorakit train`), and the same with --quantize nf4 (and --loftq): same data
    and steps, for each seed (seed 0 is the default run itself)."""
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for label in ACCURACY_RUNS:
                command = label + (f" --seed {seed}" if seed else "") + (f" --threads {threads}" if threads else "")
                out = Path(tmp) / f"{label.replace(' ', '_')}_{seed}"
                cmd = [sys.executable, "-m", *command.split(), "--out", str(out)]
                start = time.time()
                done = subprocess.run(
                    cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1")
                )
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{command} failed")
                after = re.search(r"after training: held-out accuracy ([\d.]+)%", done.stdout)
                found[label, seed] = {
                    "accuracy": float(after.group(1)) / 100,
                    "seconds": time.time() - start,
                    "command": command,
                }
                print(
                    f"  {command}: held-out accuracy {found[label, seed]['accuracy']:.2%} in "
                    f"{found[label, seed]['seconds']:.0f} s",
                    flush=True,
                )
    return found


ACCURACY_RUNS = ["lorakit train", "lorakit train --quantize nf4", "lorakit train --quantize nf4 --loftq"]


# ---- the section ---------------------------------------------------------------------------


def markdown(results: dict, accuracy: dict, m: dict[str, str], reps: int, argv: list[str]) -> str:
    cmd = "python bench/qlora.py" + ("" if not argv else " " + " ".join(argv))
    lines = [
        "## QLoRA: LoRA on a 4-bit base",
        "",
        f"Written by `{cmd}`, {m['date']}.",
        "",
        f"- Machine: {m['machine']}",
        f"- Software: {m['software']}, bitsandbytes {_bnb_version()}",
        f"- Run: {m['run']}; {reps} timed repetitions per case, interleaved, after 1 warm-up step each; "
        f"machine load {m['load']}; the run took {m['minutes']} minutes.",
        f"- Adapters: rank {Q.RANK}, alpha {2 * Q.RANK}, on every linear layer but the head (`{Q.TARGETS}`), "
        "float32 on a 4-bit base (as PEFT and QLoRA keep them), the same initial values for lorakit and PEFT. "
        "4-bit: NF4, blocks of 64, double quantization (`lorakit.quantize`, bit for bit what Transformers "
        "loads with `BitsAndBytesConfig`); the head and embeddings stay in the model's dtype.",
        "- A step: forward, loss, backward, AdamW, zero_grad. Time ratios are medians over rounds of the two "
        "cases' ratio within a round. *fp32 compute*: model and 4-bit layers compute in float32; *bf16*: the model "
        "in bf16 and the 4-bit layers computing in bf16 (Transformers' `dtype=torch.bfloat16` with "
        "`bnb_4bit_compute_dtype=torch.bfloat16`).",
        "- Peak memory: resident set of a fresh process over three steps, less the process before it built the "
        "model (model, activations, gradients, optimizer state), with `MALLOC_MMAP_THRESHOLD_=65536` so freed "
        "tensors leave the resident set; see bench/qlora.py.",
        "",
        "| model | measure | target | figure |",
        "| --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        lines += _target_rows(name, res)
    if accuracy:
        lines += _accuracy_rows(accuracy)
    lines.append("")
    for name, res in results.items():
        lines += _case_table(name, res)
    if accuracy:
        lines += [
            "Held-out accuracy (the real command line, 300 steps, 400 held-out sentences; one sentence is 0.25%):",
            "",
        ]
        lines += [f"- `{a['command']}`: {a['accuracy']:.2%} ({a['seconds']:.0f} s)" for a in accuracy.values()]
        lines.append("")
    return "\n".join(lines)


def _accuracy_rows(accuracy: dict[tuple[str, int], dict]) -> list[str]:
    """The default run (seed 0) with --quantize nf4 (and --loftq) against without, then the mean over seeds."""
    seeds = sorted({seed for _, seed in accuracy})
    rows = []
    for label, what, target in (
        ("lorakit train --quantize nf4", "`--quantize nf4`", ">= 0.99"),
        ("lorakit train --quantize nf4 --loftq", "`--quantize nf4 --loftq`", "(>= 0.99)"),
    ):
        if 0 in seeds:
            plain, quant = accuracy["lorakit train", 0]["accuracy"], accuracy[label, 0]["accuracy"]
            rows.append(
                f"| MiniLM, default run | held-out accuracy with {what} / without | {target} | "
                f"{quant / plain:.4f} ({quant:.2%} / {plain:.2%}) |"
            )
        if len(seeds) > 1:
            plain = sum(accuracy["lorakit train", s]["accuracy"] for s in seeds) / len(seeds)
            quant = sum(accuracy[label, s]["accuracy"] for s in seeds) / len(seeds)
            rows.append(
                f"| MiniLM, default run, mean over seeds {','.join(map(str, seeds))} | held-out accuracy "
                f"with {what} / without | {target} | {quant / plain:.4f} ({quant:.2%} / {plain:.2%}) |"
            )
    return rows


def _target_rows(name: str, res: dict) -> list[str]:
    t, mem = res["times"], res["memory"]
    q, b = res["bytes"]["nf4"]
    rows = [f"| {name} | quantized base weight bytes / the same weights in bf16 (NF4) | <= 0.27 | {q / b:.3f} |"]
    if mem:
        for suffix, how in (("", ""), (CKPT, ", both with gradient checkpointing")):
            peak = mem["qlora nf4 bf16 lorakit" + suffix]["peak_mb"] / mem["lora bf16" + suffix]["peak_mb"]
            rows.append(
                f"| {name} | peak memory of a QLoRA training step / a bf16 LoRA step{how} | <= 0.45 | {peak:.3f} |"
            )
    rows.append(
        f"| {name} | QLoRA step / fp32 LoRA step (fp32 compute) | report; aim <= 1.3 | "
        f"{paired(t['qlora nf4 lorakit'], t['lora fp32']):.3f} |"
    )
    rows.append(
        f"| {name} | QLoRA step / fp32 LoRA step (bf16 compute) | report | "
        f"{paired(t['qlora nf4 bf16 lorakit'], t['lora fp32']):.3f} |"
    )
    rows.append(
        f"| {name} | lorakit QLoRA step / PEFT QLoRA step, same 4-bit base (fp32 compute) | <= 0.85 | "
        f"{paired(t['qlora nf4 lorakit'], t['qlora nf4 peft']):.3f} |"
    )
    rows.append(
        f"| {name} | lorakit QLoRA step / PEFT QLoRA step, same 4-bit base (bf16 compute) | <= 0.85 | "
        f"{paired(t['qlora nf4 bf16 lorakit'], t['qlora nf4 bf16 peft']):.3f} |"
    )
    return rows


def _case_table(name: str, res: dict) -> list[str]:
    s = res["shape"]
    lines = [
        f"### {name}: batch {s.batch} x length {s.seq}",
        "",
        "| case | step ms (+-%) | peak MB (model MB) |",
        "| --- | --- | --- |",
    ]
    for case in dict.fromkeys(TIMED + MEMORY):
        tm = f"{med(res['times'][case]) * 1e3:.1f} ({spread(res['times'][case]):.0f}%)" if case in res["times"] else ""
        mm = res["memory"].get(case)
        mm = f"{mm['peak_mb']:.0f} ({mm['model_mb']:.0f})" if mm else ""
        lines.append(f"| {case} | {tm} | {mm} |")
    bytes_ = "; ".join(
        f"{k} {q / 2**20:.1f} MiB ({q / b:.3f} of bf16's {b / 2**20:.1f} MiB)" for k, (q, b) in res["bytes"].items()
    )
    return lines + ["", f"Quantized weights: {bytes_}.", ""]


def _bnb_version() -> str:
    from lorakit.quant.bnb import bitsandbytes

    return bitsandbytes().__version__


if __name__ == "__main__":
    raise SystemExit(main())
