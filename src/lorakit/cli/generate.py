"""`lorakit generate`: a prompt through base + adapter (a label for a classifier, a greedy
continuation for a causal LM).

The model gets what training gave it (`tasks.model_inputs`: token ids and attention mask), not
every key the tokenizer returns: a tokenizer may add `token_type_ids`, which a causal LM's
`generate` refuses.
"""

from __future__ import annotations

import argparse

import torch

from ..training import TrainingError
from ..training.base_model import position_limit
from ..training.tasks import model_inputs
from .trained import load_trained


def add_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="run a prompt through base + adapter")
    gen.add_argument("adapter", help="adapter folder")
    gen.add_argument("--prompt", required=True, help="text (classify: the sentence to label)")
    gen.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--no-adapter", action="store_true", help="run the base model alone, to compare")


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise TrainingError(f"--max-new-tokens must be an integer >= 1, got {args.max_new_tokens}")
    model, tokenizer, facts = load_trained(args.adapter, args.model, adapter=not args.no_adapter)
    limit = position_limit(model)
    if facts["task"] == "classify":
        cut = {"max_length": limit[0]} if limit else {}  # a long sentence is cut as training cuts it
        enc = model_inputs(tokenizer(args.prompt, return_tensors="pt", truncation=True, **cut))
        with torch.no_grad():
            probs = model(**enc).logits.float().softmax(-1)[0]
        best = int(probs.argmax())
        shown = ", ".join(f"{n} {p:.3f}" for n, p in zip(facts["labels"], probs.tolist()))
        print(f"{facts['labels'][best]}  ({shown})")
        return 0
    enc = model_inputs(tokenizer(args.prompt, return_tensors="pt"))
    length = enc["input_ids"].shape[1]
    if limit and length + args.max_new_tokens > limit[0]:
        raise TrainingError(
            f"--prompt is {length} tokens; with --max-new-tokens {args.max_new_tokens} that is more than the "
            f"model's position limit, {limit[0]} ({limit[1]} in its config)"
        )
    with torch.no_grad():
        ids = model.generate(
            **enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id
        )
    text = tokenizer.decode(ids[0, length:], skip_special_tokens=True)
    print(text if text.strip() else "(no text: the model produced only special tokens, e.g. end-of-text)")
    return 0
