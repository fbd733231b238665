"""`lorakit train` on a Mixture-of-Experts model: the presets reach the fused experts, the run says
how many expert parameters it adapts, and the adapter learns."""

from __future__ import annotations

import io

from helpers import completion_rows, make_model, write_jsonl

from lorakit.training import RunConfig, train


def test_train_adapts_the_experts_and_says_so(tmp_path):
    model = make_model(tmp_path / "moe", "qwen3_moe")
    data = write_jsonl(tmp_path / "completion.jsonl", completion_rows(32))
    stream = io.StringIO()
    config = RunConfig(
        model=str(model),
        data=str(data),
        out=str(tmp_path / "out"),
        batch_size=8,
        epochs=2,
        lr=1e-2,
        threads=1,
        targets="attention+mlp",
    )
    summary = train(config, stream=stream)
    said = stream.getvalue()
    assert "on 8 modules (k_proj, o_proj, q_proj, v_proj) and 4 expert parameters (down_proj, gate_up_proj)" in said
    assert summary["after"]["loss"] < summary["before"]["loss"]
