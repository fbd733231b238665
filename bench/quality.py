"""The variants side by side on the bundled task: held-out accuracy and wall time, same budget,
at the default learning rate and at one chosen for each variant by a small sweep.

    python bench/quality.py --threads 1 --jobs 2   # the `quality` section of BENCHMARKS.md (8 min on 2 cores)

Each row is real `lorakit train` runs (subprocesses, the command shown in the table): the
default run (bundled MiniLM, bundled sentiment set, 3 epochs, rank 8, alpha 16, attention
targets, seed 0, lr 1e-3) with one variant option added. The sweep picks each variant's
learning rate without looking at the held-out 400 sentences: it trains on the default run's
training split only (1,600 sentences, of which it holds out a fixed 20% to choose by), one
epoch per learning rate of GRID; the best validation accuracy (then loss) wins, and the
variant is trained again as the default run with that rate. Run it under the CPU lock
(`flock /work/cpu.lock ...`) so the wall times compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from lorakit.training.data import examples as data_mod  # noqa: E402
from lorakit.training.prepare import SPLIT_SEED  # noqa: E402
from sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# name -> options added to the default run
VARIANTS = {
    "LoRA": [],
    "rsLoRA": ["--rslora"],
    "DoRA": ["--dora"],
    "LoRA+ (ratio 16)": ["--loraplus-ratio", "16"],
    "LoRA+ (ratio 4)": ["--loraplus-ratio", "4"],
    "PiSSA": ["--init", "pissa"],
    "OLoRA": ["--init", "olora"],
}
DEFAULT_LR = "1e-3"  # `lorakit train`'s default --lr
GRID = ("1e-4", "3e-4", "1e-3")  # the sweep's learning rates, as they go on the command line
SWEEP_EPOCHS = 1  # per sweep run: three runs per variant cost about one full run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated subset of the variants (prints only)")
    ap.add_argument("--out", default=None, help="markdown file (default BENCHMARKS.md)")
    ap.add_argument("--threads", type=int, default=None, help="--threads of every run (default: lorakit's)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (default 1; on a loaded machine two one-thread runs waste less than one two-thread run)",
    )
    args = ap.parse_args(argv)
    chosen = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only.split(",")}
    threads = args.threads or os.cpu_count() or 1
    machine = report.machine(threads, "cpu", "float32")
    print(report.machine_line(machine), flush=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(chosen, Path(tmp), args.jobs, args.threads)
    machine["load"] = f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
    how = f"--threads {args.threads}" if args.threads else "the default thread count"
    machine["runs"] = f"each run with {how}, {args.jobs} at a time"
    text = markdown(rows, machine)
    print(text)
    if not args.only:
        out = Path(args.out or ROOT / "BENCHMARKS.md")
        write_section("quality", text, out)
        print(f"wrote the quality section of {out}")
    return 0


def write_training_split(path: Path) -> str:
    """The default run's training split (the 1,600 sentences outside its held-out 400), as JSONL."""
    train, _ = data_mod.split(data_mod.bundled_sentiment(), 0.2, SPLIT_SEED)
    path.write_text("".join(json.dumps(r) + "\n" for r in train.records), encoding="utf-8")
    return str(path)


def measure(chosen: dict[str, list[str]], tmp: Path, jobs: int, threads: int | None) -> list[dict]:
    """Per variant: the default-lr run, the sweep on the training split, and the run at the rate
    it chose (the default-lr run itself when that rate is the default)."""
    sweep_data = write_training_split(tmp / "training-split.jsonl")
    folder = {name: tmp / re.sub(r"[^A-Za-z0-9]+", "-", name) for name in chosen}
    with ThreadPoolExecutor(jobs) as pool:

        def run(name: str, options: list[str], out: str) -> Future:
            return pool.submit(run_one, name, options, folder[name] / out, threads)

        sweep = ["--data", sweep_data, "--epochs", str(SWEEP_EPOCHS)]
        sweeps = {
            (name, lr): run(name, [*options, *sweep, "--lr", lr], f"sweep-{lr}")
            for name, options in chosen.items()
            for lr in GRID
        }
        default = {name: run(name, options, "default") for name, options in chosen.items()}
        best = {
            name: max(
                GRID, key=lambda lr, n=name: (sweeps[n, lr].result()["accuracy"], -sweeps[n, lr].result()["loss"])
            )
            for name in chosen
        }
        swept = {
            name: default[name] if best[name] == DEFAULT_LR else run(name, [*options, "--lr", best[name]], "swept")
            for name, options in chosen.items()
        }
        return [
            dict(
                default[n].result(),
                sweep={lr: sweeps[n, lr].result()["accuracy"] for lr in GRID},
                best_lr=best[n],
                swept=swept[n].result(),
            )
            for n in chosen
        ]


def run_one(name: str, options: list[str], out: Path, threads: int | None) -> dict:
    """One `lorakit train` process; its own CPU time comes from wait4, so runs side by side do not mix."""
    command = [sys.executable, "-m", "lorakit", "train", *options, "--out", str(out)]
    command += ["--threads", str(threads)] if threads else []
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    log, errors = out.with_name(out.name + ".stdout"), out.with_name(out.name + ".stderr")
    started = time.monotonic()
    with log.open("w") as stdout, errors.open("w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds, cpu = time.monotonic() - started, usage.ru_utime + usage.ru_stime
    if process.returncode != 0:
        raise SystemExit(f"{name}: lorakit train failed:\n{errors.read_text()[-2000:]}")
    evals = [m["eval"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" in m]
    trainable = next(line for line in log.read_text().splitlines() if line.startswith("trainable parameters"))
    print(
        f"{name:18s} {' '.join(options[-2:]) if '--lr' in options else 'lr ' + DEFAULT_LR:>10s} "
        f"{'sweep' if '--data' in options else 'full '}: accuracy {evals[-1]['accuracy']:.2%}  "
        f"({seconds:.0f} s wall, {cpu:.0f} s CPU)",
        flush=True,
    )
    return {
        "name": name,
        "options": " ".join(options),
        "accuracy": evals[-1]["accuracy"],
        "loss": evals[-1]["loss"],
        "before": evals[0]["accuracy"],
        "epochs": [e["accuracy"] for e in evals[1:]],
        "seconds": seconds,
        "cpu": cpu,
        "trainable": trainable.split(":", 1)[1].split(" of ")[0].strip(),
    }


def markdown(rows: list[dict], m: dict) -> str:
    grid = ", ".join(GRID)
    lines = [
        f"| variant | `lorakit train` options | held-out accuracy at lr {DEFAULT_LR} | sweep: "
        f"validation accuracy at lr {grid} | chosen lr | held-out accuracy at the chosen lr | held-out "
        "loss at the chosen lr | accuracy after epochs 1, 2, 3 at the chosen lr | trainable parameters "
        "| wall time | CPU time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        s = r["swept"]
        per_epoch = ", ".join(f"{a:.2%}" for a in s["epochs"])
        sweep = ", ".join(f"{r['sweep'][lr]:.2%}" for lr in GRID)
        lines.append(
            f"| {r['name']} | `{r['options'] or '(none)'}` | {r['accuracy']:.2%} | {sweep} | "
            f"{r['best_lr']} | {s['accuracy']:.2%} | {s['loss']:.4f} | {per_epoch} | "
            f"{r['trainable']} | {r['seconds']:.0f} s | {r['cpu']:.0f} s |"
        )
    return f"""## Variants: quality on the bundled task (`python bench/quality.py`)

Written {m["date"]}. {m["machine"]}; {m["software"]}; one `lorakit train` process per run,
{m["runs"]}; machine load {m["load"]}.

Every row is the default run, `lorakit train` (bundled all-MiniLM-L6-v2 as a two-class sentence
classifier, the bundled 2,000 review sentences with the fixed 400 held out, 3 epochs of batch 16,
peak lr 1e-3 with 10% warmup, rank 8, alpha 16 on the attention projections, the classifier head
trained in full, seed 0), plus the options shown; then the same at the learning rate its sweep chose.
The sweep never sees the 400 held-out sentences: it trains on the other 1,600 with a fixed 20% of
them (320) held out to choose by, {SWEEP_EPOCHS} epoch per learning rate of the grid {grid}; the best
validation accuracy wins (ties: the lower validation loss). Where the sweep chose {DEFAULT_LR} the two
figures are the same run. The wall and CPU times are the default-lr run's whole process (loading
the model, the evaluation before and after every epoch, writing the folder); CPU time is the
process's user + system time, which other load on the machine disturbs less than the wall time.
One seed per row: differences of a few tenths of a percent (one or two of 400 sentences) are
within what another seed would change. The thread count changes the order of float sums, and a
run at the edge of diverging can end either way: rsLoRA at 1e-3 learns with `--threads 1` and
ends at chance with `--threads 2` on the same machine (docs/cli.md, "A run that did not learn").
The sweep's one epoch is a cheap stand-in for three: where it chose another rate than 1e-3, the
full run at that rate can end below the default-lr run.

{chr(10).join(lines)}
{_notes(rows)}"""


def _notes(rows: list[dict]) -> str:
    """What a reader must know about a row that did not learn (a figure alone would mislead)."""
    notes = []
    for r in rows:
        if r["accuracy"] <= r["before"]:
            why = ""
            if "--loraplus-ratio" in r["options"]:
                why = (
                    f" Its B factors step at {r['options'].split()[-1]} x the default peak lr of 1e-3, which was "
                    "chosen for plain LoRA (LoRA+'s paper tunes the base rate and the ratio together)."
                )
            if "--rslora" in r["options"]:
                why = (
                    " rsLoRA scales the update by alpha / sqrt(rank) = 16 / sqrt(8) = 5.7 instead of alpha / rank "
                    "= 2, so at the same lr its steps are 2.8 x larger; the default lr was chosen for plain LoRA "
                    "(with rsLoRA one lowers alpha or the lr)."
                )
            s = r["swept"]
            then = (
                f" At lr {r['best_lr']}, the sweep's choice, it reaches {s['accuracy']:.2%}."
                if s["accuracy"] > s["before"]
                else " No rate of the sweep's grid made it learn."
            )
            held = f"held-out accuracy {r['accuracy']:.2%} after training, {r['before']:.2%} before"
            notes.append(
                f"\n{r['name']} did not learn at lr {DEFAULT_LR}: {held} (`lorakit train` says so "
                f"in its last lines).{why}{then}\n"
            )
    return "".join(notes)


if __name__ == "__main__":
    raise SystemExit(main())
