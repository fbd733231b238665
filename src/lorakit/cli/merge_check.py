"""What `lorakit merge` measures a merged model on: a fixed batch of inputs, and the largest
difference of a model's outputs from the trained model's there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..training.base_model import fit_max_length
from ..training.data import examples as data_mod
from ..training.options import RUN_FILE, read_run
from ..training.prepare import held_out_set

EXAMPLES = 16


class Probe:
    """A batch of inputs; `worst` compares a model's outputs with reference outputs on it."""

    def __init__(self, batch: dict[str, torch.Tensor], what: str) -> None:
        self.batch, self.what = batch, what
        mask = batch.get("attention_mask")
        self.mask = mask.bool() if mask is not None else None

    @torch.no_grad()
    def outputs(self, model: torch.nn.Module) -> torch.Tensor:
        model.eval()
        return model(**self.batch).logits.float()

    def worst(self, model: torch.nn.Module, reference: torch.Tensor) -> float:
        """max |model's outputs - reference| over the real (unpadded) positions."""
        diff = (self.outputs(model) - reference).abs()
        if diff.dim() == 3 and self.mask is not None:  # (batch, seq, vocab): skip padding
            diff = diff[self.mask]
        return float(diff.max())

    def scale(self, reference: torch.Tensor) -> float:
        values = reference[self.mask] if reference.dim() == 3 and self.mask is not None else reference
        return float(values.abs().max())


def probe_for(folder: str, model: torch.nn.Module, tokenizer: Any, facts: dict[str, Any]) -> Probe:
    """The first held-out examples of the run in `folder`; random token ids for other folders."""
    if (Path(folder) / RUN_FILE).is_file():
        config = read_run(folder)
        dataset = held_out_set(config)
        max_length, _ = fit_max_length(config.max_length, model, "--max-length")  # as training lowered it
        encoded = data_mod.encode(dataset, facts["task"], tokenizer, max_length, facts["labels"])
        count = min(EXAMPLES, len(encoded))
        batch = encoded.batch(list(range(count)))
        batch.pop("labels", None)
        return Probe(batch, f"{count} held-out examples of the run")
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    return Probe({"input_ids": ids}, "4 x 32 random token ids")
