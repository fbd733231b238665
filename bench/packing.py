"""Packing (`--packing`): one epoch of causal-LM training on data of skewed lengths, packed and not.

    python bench/packing.py            # writes the `packing` section of BENCHMARKS.md
    python bench/packing.py --rounds 1 --out /tmp/x.md

The data: 480 prompt/completion examples of random words, five in six 10 to 30 tokens long and
one in six about 250; --max-length 256, one epoch, batch 16 (examples unpacked, rows packed),
rank 8 on the attention projections. The model: bench/run.py's tiny Llama (4 layers, hidden
256, GQA) with a word-level tokenizer, saved in a temporary folder. Each round runs `train()`
unpacked and packed in this process, in alternating order; the ratio is the median over rounds
of packed / unpacked wall time within a round. The padding share is that of the tokens the
epoch's forward passes take (`packing.efficiency`, the loop's own batches). Run it under the
CPU lock (`flock /work/cpu.lock ...`).
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
from sections import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"w{i}" for i in range(4000)]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
EXAMPLES, MAX_LENGTH, BATCH = 480, 256, 16
TARGET = 0.6  # packed / unpacked wall time, issue 19


def make_model(folder: Path) -> Path:
    """bench/run.py's tiny Llama, with a word-level tokenizer over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = SPECIAL + WORDS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of both runs (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None, help="markdown file (default BENCHMARKS.md)")
    args = ap.parse_args(argv)
    from lorakit.training import RunConfig, train
    from lorakit.training.data import encode, read_dataset
    from lorakit.training.packing import efficiency
    from lorakit.training.tasks import load_tokenizer, quiet_transformers

    quiet_transformers()
    machine = report.machine(args.threads, "cpu", "float32")
    print(report.machine_line(machine), flush=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(root / "llama")
        data, held = make_data(root / "train.jsonl", EXAMPLES, 0), make_data(root / "held.jsonl", 48, 1)
        lengths = [len(ids) for ids in encode(read_dataset(data), "causal-lm", load_tokenizer(str(model)),
                                              MAX_LENGTH).input_ids]
        share = {"unpacked": 1 - efficiency(lengths, BATCH),
                 "packed": 1 - efficiency(lengths, BATCH, packing_to=MAX_LENGTH),
                 "unsorted": unsorted_padding(lengths, BATCH)}
        times: dict[str, list[float]] = {"unpacked": [], "packed": []}
        steps: dict[str, int] = {}
        losses: dict[str, float] = {}
        for r in range(args.rounds):
            for name in (("unpacked", "packed") if r % 2 == 0 else ("packed", "unpacked")):
                config = RunConfig(model=str(model), data=str(data), eval_data=str(held), epochs=1,
                                   batch_size=BATCH, max_length=MAX_LENGTH, packing=name == "packed",
                                   threads=args.threads, out=str(root / f"{name}-{r}"))
                started = time.monotonic()
                summary = train(config, stream=io.StringIO())
                times[name].append(time.monotonic() - started)
                steps[name], losses[name] = summary["steps"], summary["after"]["loss"]
                print(f"round {r + 1} {name:8s} {times[name][-1]:.1f} s, {steps[name]} steps, "
                      f"held-out loss {summary['before']['loss']:.4f} -> {losses[name]:.4f}", flush=True)
    ratio = statistics.median(p / u for p, u in zip(times["packed"], times["unpacked"]))
    machine["load"] = f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
    result = {"ratio": ratio, "times": times, "steps": steps, "padding": share, "losses": losses,
              "tokens": sum(lengths), "long": sum(n > 200 for n in lengths)}
    text = markdown(result, machine, args)
    print(text)
    out = Path(args.out or ROOT / "BENCHMARKS.md")
    write_section("packing", text, out)
    print(f"wrote the packing section of {out}")
    return 0


def markdown(r: dict, m: dict, args: argparse.Namespace) -> str:
    med = {k: statistics.median(v) for k, v in r["times"].items()}
    verdict = "met" if r["ratio"] <= TARGET else "missed"
    return f"""## Packing (`python bench/packing.py`)

Written {m['date']}. {m['machine']}; {m['software']}; {m['run']}; machine load {m['load']}.

{EXAMPLES} prompt/completion examples of random words ({r['tokens']:,} tokens; {r['long']} of about
250 tokens, the rest 10 to 30), 48 held out; a tiny random Llama (4 layers, hidden 256, GQA), rank 8 on the
attention projections, --max-length {MAX_LENGTH}, one epoch, --batch-size {BATCH} (examples unpacked,
rows of up to {MAX_LENGTH} tokens packed). Wall time is the whole `train()` call (held-out
evaluation before and after included), median of {args.rounds} rounds run in alternating order.
Unpacked batches are already sorted by length within pools of 50 batches (training/loop.py), so
their padding is what that sorting leaves; in a plain shuffled order, batches of {BATCH} padded to
their longest example would be {r['padding']['unsorted']:.0%} padding on this data (computed, not run).
The two runs process nearly the same tokens; packing changes the shapes (fewer, fuller rows, so
fewer optimizer steps: `--batch-size` counts rows) and adds the block-diagonal attention mask.

| | unpacked | `--packing` |
| --- | --- | --- |
| wall time (median) | {med['unpacked']:.1f} s | {med['packed']:.1f} s |
| optimizer steps | {r['steps']['unpacked']} | {r['steps']['packed']} |
| padding share of processed tokens | {r['padding']['unpacked']:.1%} | {r['padding']['packed']:.1%} |
| held-out loss after the epoch | {r['losses']['unpacked']:.4f} | {r['losses']['packed']:.4f} |

packed / unpacked wall time: **{r['ratio']:.2f}** (target <= {TARGET}: {verdict}; per round
{', '.join(f'{p / u:.2f}' for p, u in zip(r['times']['packed'], r['times']['unpacked']))}).
"""


if __name__ == "__main__":
    raise SystemExit(main())
