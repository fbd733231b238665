"""training/trainer_callback.py: lorakit adapters trained by Transformers' Trainer, saved in
PEFT's layout at each checkpoint and at the end, and loaded back by PEFT and by lorakit."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_MODEL_N, assert_rounding_close, logits, tiny_bert

import lorakit
from lorakit.training.trainer_callback import SaveAdapterCallback

pytest.importorskip("accelerate")  # Trainer needs it; PEFT (the test extra) brings it


class _Sentences(torch.utils.data.Dataset):
    """16 random token sequences with a label that depends on the first token."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, 120, (16, 8), generator=gen)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_writes_peft_adapters_that_reload(tmp_path, ids):
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=["query", "value"], modules_to_save=["classifier"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=100,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=_Sentences(), callbacks=[SaveAdapterCallback()]).train()
    model.eval()
    trained = logits(model, ids)

    for folder in (tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-4", tmp_path / "out"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["r"] == 4
    # The final adapter, loaded by PEFT onto a fresh base, is the trained model.
    peft_model = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "out")).eval()
    assert_rounding_close(logits(peft_model, ids), trained, n=TINY_MODEL_N)
    # The last checkpoint holds the same adapter (step 4 is the end); lorakit loads it bitwise.
    fresh = tiny_bert()
    lorakit.load_adapter(fresh, tmp_path / "out" / "checkpoint-4")
    assert torch.equal(logits(fresh.eval(), ids), trained)
    # The first checkpoint is an earlier state, not the final one.
    early = tiny_bert()
    lorakit.load_adapter(early, tmp_path / "out" / "checkpoint-2")
    assert not torch.allclose(logits(early.eval(), ids), trained)


def test_a_missing_adapter_name_fails_at_the_start(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_bert()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=["query"]), name="mine")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Sentences(), callbacks=[SaveAdapterCallback("other")])
    with pytest.raises(ValueError, match="no lorakit adapter named 'other'"):
        trainer.train()
    assert not (tmp_path / "out" / "adapter_config.json").exists()
