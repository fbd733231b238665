"""`lorakit generate`: a prompt through base + adapter (a label for a classifier, a greedy
continuation for a causal LM)."""

from __future__ import annotations

import argparse

import torch

from .trained import load_trained


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="run a prompt through base + adapter")
    gen.add_argument("adapter", help="adapter folder")
    gen.add_argument("--prompt", required=True, help="text (classify: the sentence to label)")
    gen.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--no-adapter", action="store_true", help="run the base model alone, to compare")


def run(args: argparse.Namespace) -> int:
    model, tokenizer, facts = load_trained(args.adapter, args.model, adapter=not args.no_adapter)
    if facts["task"] == "classify":
        enc = tokenizer(args.prompt, return_tensors="pt", truncation=True)
        with torch.no_grad():
            probs = model(**enc).logits.float().softmax(-1)[0]
        best = int(probs.argmax())
        shown = ", ".join(f"{n} {p:.3f}" for n, p in zip(facts["labels"], probs.tolist()))
        print(f"{facts['labels'][best]}  ({shown})")
        return 0
    enc = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id)
    text = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(text if text.strip() else "(no text: the model produced only special tokens, e.g. end-of-text)")
    return 0
