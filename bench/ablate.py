"""Where lorakit's training step spends its time above the floor: one piece of the fast path at a time.

    python bench/ablate.py                       # MiniLM, batch 32 x 64, all-linear r8; writes ABLATION.md
    python bench/ablate.py --reps 20 --out -     # more rounds, print only

A diagnostic, not a target. Each ablated case runs lorakit's training step with one piece of
`lorakit.layers.fused` replaced by a zero tensor of the same shape (or, for the fold, by the plain
weight), so its gradients are WRONG: the case is timed, never trained or checked. The saving
of a piece is what the step costs with it minus without it. Also timed: the plain reference
composition (`LoraLinear.reference_forward`, what the fast path replaces).

All cases share one process, one model and one batch; each round runs every case once, in an
order that rotates, and a case's figure is the median over rounds of its time divided by the
floor's time in the same round, which cancels slow drifts in machine speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cases as C  # noqa: E402
import report  # noqa: E402
from run import time_cases  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _zeros_project(x2, a):
    return x2.new_zeros(x2.shape[0], a.shape[0])


def _zeros_project_grad(g, b, s):
    return g.new_zeros(g.shape[0], b.shape[1])


def _zeros_grad_b(xa, g, s):
    return g.new_zeros(g.shape[1], xa.shape[1])


def _zeros_grad_a(gb, xd):
    return gb.new_zeros(gb.shape[1], xd.shape[1])


def _plain_weight(weight, *rest):
    return weight


def _no_recipe(x):
    return None


# piece -> {(module of lorakit, attribute): stand-in}
PIECES = {
    "x A^T (forward)": {("fused", "project"): _zeros_project},
    "s g B (backward)": {("fused", "project_grad"): _zeros_project_grad},
    "B's gradient xa^T g": {("fused", "grad_b"): _zeros_grad_b},
    "A's gradient gb^T x": {("fused", "grad_a"): _zeros_grad_a},
    "forming W + sBA (forward and backward)": {("fused", "folded_weight"): _plain_weight},
    "recomputing x from GELU's input": {("torch_internals", "recompute_recipe"): _no_recipe},
}
PIECES["all of the above"] = {k: v for d in PIECES.values() for k, v in d.items()}


@contextmanager
def patched(stand_ins: dict):
    import importlib

    modules = {name: importlib.import_module(f"lorakit.{name}") for name, _ in stand_ins}
    saved = {key: getattr(modules[key[0]], key[1]) for key in stand_ins}
    for (module, name), fn in stand_ins.items():
        setattr(modules[module], name, fn)
    try:
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(modules[module], name, fn)


@contextmanager
def reference_path():
    """Every LoraLinear on its plain reference_forward: no kernel for dispatch.py to choose."""
    import lorakit

    original = lorakit.LoraLinear.kernels
    lorakit.LoraLinear.kernels = ()
    try:
        yield
    finally:
        lorakit.LoraLinear.kernels = original


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="minilm-64")
    ap.add_argument("--variant", default="all-linear r8", help="one of the setting's variants, e.g. 'attention r8'")
    ap.add_argument("--reps", type=int, default=24, help="rounds (default 24)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=None, help="markdown file (default ABLATION.md; '-' prints only)")
    args = ap.parse_args(argv)

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    setting = C.find_setting(args.setting)
    lora = f"lorakit {args.variant}"
    built = {}
    for name in ("floor", lora):
        built.update(C.build_training(setting, "cpu", torch.float32, only=name))
    if lora not in built:
        raise SystemExit(f"no variant {args.variant!r} in {setting.name}")
    floor, step = built["floor"], built[lora]

    def with_patch(stand_ins):
        def run():
            with patched(stand_ins):
                step()

        return run

    def on_reference():
        with reference_path():
            step()

    cases = {"floor": floor, "lorakit as is": step, "lorakit, reference path": on_reference}
    cases.update({f"without {piece}": with_patch(stand_ins) for piece, stand_ins in PIECES.items()})

    names = list(cases)
    started = time.time()
    times = time_cases(cases, args.reps, "cpu")  # warm-up, then rounds with a rotating order
    per_round = {n: [a / b for a, b in zip(times[n], times["floor"], strict=True)] for n in names}

    ratio = {n: report.med(v) for n, v in per_round.items()}
    lines = [
        "| case | step / floor (+- half IQR, %) | saving against as is |",
        "| --- | --- | --- |",
    ]
    for name in names[1:]:
        saving = ratio["lorakit as is"] - ratio[name]
        lines.append(
            f"| {name} | {ratio[name]:.3f} (+-{report.spread(per_round[name]):.1f}%) | "
            f"{'' if name == 'lorakit as is' else f'{saving:+.3f}'} |"
        )
    table = "\n".join(lines)
    machine = report.machine(threads, "cpu", "float32")
    shown = sys.argv[1:] if argv is None else argv
    command = " ".join(["python bench/ablate.py", *shown])
    text = f"""# Ablation: lorakit's training step above the floor

Written by `{command}`, {machine["date"]}; {setting.name}
(batch {setting.batch} x length {setting.seq}), {args.variant}, {args.reps} rounds, {threads} threads,
{(time.time() - started) / 60:.1f} minutes. Machine: {machine["machine"]}; {machine["software"]}.

A diagnostic (see bench/ablate.py): each "without" case replaces one piece of the fast path by
a zero tensor of the same shape (the fold by the plain weight), so its gradients are wrong and
only its time means anything. A figure is the median over rounds of the case's time divided by
the floor's time in the same round; "saving" is how much of the floor's time the piece costs.

{table}
"""
    print()
    print(table)
    if args.out != "-":
        out = Path(args.out or ROOT / "ABLATION.md")
        out.write_text(text)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
