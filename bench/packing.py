"""Packing (`--packing`): one epoch of causal-LM training on data of skewed lengths, packed and not.

    python bench/packing.py            # writes the `packing` section of BENCHMARKS.md (~2 minutes on 2 cores)
    python bench/packing.py --rounds 1 --out /tmp/x.md

The data: 480 prompt/completion examples of random words, five in six 10 to 30 tokens long and
one in six about 250; --max-length 256, one epoch, rank 8 on the attention projections. The
model: bench/run.py's tiny Llama (4 layers, hidden 256, GQA) with a word-level tokenizer, saved
in a temporary folder. Each round runs `train()` unpacked (batch 16 examples), packed (batch 16
rows) and packed at a batch of rows giving about as many steps as unpacked, in this process, in
alternating order. The time compared is that of the epoch's steps (the loop less its held-out
evaluation); the ratio is the median over rounds of packed / unpacked within a round. The
padding share is that of the tokens the epoch's forward passes take (`packing.efficiency`, the
loop's own batches). Run it under the CPU lock (`flock /work/cpu.lock ...`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from cases import llama_folder  # noqa: E402
from sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"w{i}" for i in range(4000)]
EXAMPLES, MAX_LENGTH, BATCH = 480, 256, 16
TARGET = 0.6  # packed / unpacked wall time, issue 19
UNPACKED, PACKED, SAME_STEPS = "unpacked", "--packing", "--packing, as many steps"


def make_model(folder: Path) -> Path:
    """bench/run.py's tiny Llama, with a word-level tokenizer over WORDS."""
    return llama_folder(folder, WORDS, max_positions=512)


def make_data(path: Path, count: int, seed: int) -> Path:
    """Prompt/completion rows: five in six 10-30 tokens in all, one in six about 250."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            total = rng.randint(240, 255) if i % 6 == 5 else rng.randint(10, 30)
            words = [rng.choice(WORDS) for _ in range(total - 1)]  # the end-of-text token makes `total`
            cut = max(1, len(words) // 3)
            f.write(json.dumps({"prompt": " ".join(words[:cut]), "completion": " ".join(words[cut:])}) + "\n")
    return path


def unsorted_padding(lengths: list[int], batch: int) -> float:
    """The padding share of batches drawn in a plain shuffled order, without the loop's sorting by
    length (what padding to the longest example in each batch costs when nothing groups lengths)."""
    order = random.Random(0).sample(range(len(lengths)), len(lengths))
    batches = [order[k : k + batch] for k in range(0, len(order) - batch + 1, batch)]
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / processed


class _Clock:
    steps = 0.0  # seconds in the training steps of the current run


def _time_the_steps() -> _Clock:
    """Time the loop's steps alone: `_Run.loop` less the held-out evaluations it runs (each epoch's
    end). Loading, tokenizing and the evaluation before training are the same work packed or not."""
    from lorakit.training import loop

    clock, run_loop, held_out = _Clock(), loop._Run.loop, loop._Run._held_out

    def timed_loop(self) -> None:
        started = time.monotonic()
        run_loop(self)
        clock.steps += time.monotonic() - started

    def untimed_held_out(self) -> dict:
        started = time.monotonic()
        result = held_out(self)
        clock.steps -= time.monotonic() - started  # inside the loop: not a step (the first one is outside it)
        return result

    loop._Run.loop, loop._Run._held_out = timed_loop, untimed_held_out
    return clock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of the three runs (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None, help="markdown file (default BENCHMARKS.md)")
    args = ap.parse_args(argv)
    from lorakit.training import RunConfig, train
    from lorakit.training.base_model import load_tokenizer, quiet_transformers
    from lorakit.training.data.examples import encode, read_dataset
    from lorakit.training.data.packing import efficiency, pack_lengths

    quiet_transformers()
    clock = _time_the_steps()
    machine = report.machine(args.threads, "cpu", "float32")
    print(report.machine_line(machine), flush=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root / "llama")
        data, held = make_data(root / "train.jsonl", EXAMPLES, 0), make_data(root / "held.jsonl", 48, 1)
        lengths = [
            len(ids)
            for ids in encode(read_dataset(data), "causal-lm", load_tokenizer(str(model)), MAX_LENGTH).input_ids
        ]
        # Also packed rows at a batch size that gives about as many optimizer steps as unpacked:
        # what packing changes besides taking fewer steps.
        rows = len(pack_lengths(lengths, MAX_LENGTH))
        batch_of = {UNPACKED: BATCH, PACKED: BATCH, SAME_STEPS: max(1, rows // (EXAMPLES // BATCH))}
        share = {
            name: 1 - efficiency(lengths, size, packing_to=None if name == UNPACKED else MAX_LENGTH)
            for name, size in batch_of.items()
        }
        times: dict[str, list[float]] = {name: [] for name in batch_of}  # the epoch's steps
        whole: dict[str, list[float]] = {name: [] for name in batch_of}  # the train() call
        steps: dict[str, int] = {}
        losses: dict[str, float] = {}
        for r in range(args.rounds):
            for name in list(batch_of) if r % 2 == 0 else list(batch_of)[::-1]:
                config = RunConfig(
                    model=str(model),
                    data=str(data),
                    eval_data=str(held),
                    epochs=1,
                    batch_size=batch_of[name],
                    max_length=MAX_LENGTH,
                    packing=name != UNPACKED,
                    threads=args.threads,
                    out=str(root / f"run-{r}-{name[-5:]}"),
                )
                started, clock.steps = time.monotonic(), 0.0
                summary = train(config, stream=io.StringIO())
                whole[name].append(time.monotonic() - started)
                times[name].append(clock.steps)
                steps[name], losses[name] = summary["steps"], summary["after"]["loss"]
                print(
                    f"round {r + 1} {name:24s} {times[name][-1]:.1f} s in the steps, "
                    f"{whole[name][-1]:.1f} s in all, {steps[name]} steps, "
                    f"held-out loss {summary['before']['loss']:.4f} -> {losses[name]:.4f}",
                    flush=True,
                )
    ratios = {name: [t / u for t, u in zip(times[name], times[UNPACKED])] for name in (PACKED, SAME_STEPS)}
    whole_ratio = statistics.median(p / u for p, u in zip(whole[PACKED], whole[UNPACKED]))
    machine["load"] = f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
    result = {
        "ratios": ratios,
        "times": times,
        "steps": steps,
        "padding": share,
        "losses": losses,
        "batch": batch_of,
        "tokens": sum(lengths),
        "long": sum(n > 200 for n in lengths),
        "unsorted": unsorted_padding(lengths, BATCH),
        "whole": whole,
        "whole_ratio": whole_ratio,
    }
    text = markdown(result, machine, args)
    print(text)
    out = Path(args.out or ROOT / "BENCHMARKS.md")
    write_section("packing", text, out)
    print(f"wrote the packing section of {out}")
    return 0


def markdown(r: dict, m: dict, args: argparse.Namespace) -> str:
    ratio = statistics.median(r["ratios"][PACKED])
    verdict = "met" if ratio <= TARGET else "missed"
    names = list(r["batch"])
    table = [
        "| | " + " | ".join(f"`{name}`" for name in names) + " |",
        "| --- |" + " --- |" * len(names),
        "| `--batch-size` | " + " | ".join(str(r["batch"][n]) for n in names) + " |",
        "| wall time of the epoch's steps (median) | "
        + " | ".join(f"{statistics.median(r['times'][n]):.2f} s" for n in names)
        + " |",
        "| steps' time / unpacked (median of the rounds) | 1 | "
        + " | ".join(f"{statistics.median(r['ratios'][n]):.2f}" for n in names[1:])
        + " |",
        "| optimizer steps | " + " | ".join(str(r["steps"][n]) for n in names) + " |",
        "| padding share of processed tokens | " + " | ".join(f"{r['padding'][n]:.1%}" for n in names) + " |",
        "| wall time of the whole `train()` call (median) | "
        + " | ".join(f"{statistics.median(r['whole'][n]):.1f} s" for n in names)
        + " |",
        "| held-out loss after the epoch | " + " | ".join(f"{r['losses'][n]:.4f}" for n in names) + " |",
    ]
    per_round = ", ".join(f"{x:.2f}" for x in r["ratios"][PACKED])
    return f"""## Packing (`python bench/packing.py`)

Written {m["date"]}. {m["machine"]}; {m["software"]}; {m["run"]}; machine load {m["load"]}.

{EXAMPLES} prompt/completion examples of random words ({r["tokens"]:,} tokens; {r["long"]} of about
250 tokens, the rest 10 to 30), 48 held out; a tiny random Llama (4 layers, hidden 256, GQA), rank 8
on the attention projections, --max-length {MAX_LENGTH}, one epoch; `--batch-size` counts examples
unpacked and rows of up to {MAX_LENGTH} tokens packed, so the third column packs at a batch size
giving about as many optimizer steps as unpacked. The time compared is that of the epoch's steps
(`train()`'s loop less its held-out evaluation), median of {args.rounds} rounds, the runs of a round in
alternating order; the whole call (loading the model, tokenizing, checking that the model keeps
packed examples apart, evaluating before and after) is shown too. Unpacked batches are already
sorted by length within pools of 50 batches (training/loop.py), so their padding is what that
sorting leaves; in a plain shuffled order, batches of {BATCH} padded to their longest example would
be {r["unsorted"]:.0%} padding on this data (computed, not run).

{chr(10).join(table)}

`--packing` / unpacked wall time of the epoch: **{ratio:.2f}** (target <= {TARGET}: {verdict}; per round
{per_round}); of the whole `train()` call: {r["whole_ratio"]:.2f}.
"""


if __name__ == "__main__":
    raise SystemExit(main())
