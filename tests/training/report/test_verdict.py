"""training/report/verdict.py: the rule for a run that did not learn, its smoothing, and the advice."""

from __future__ import annotations

import math

import pytest

from lorakit.training import RunConfig
from lorakit.training.report.verdict import advice, fmt_lr, judge, smoothed_ends

FALLING = [1.0 - 0.008 * i for i in range(100)]  # a training loss that falls steadily, 1.0 -> 0.21
FLAT = [0.69 + 0.01 * (i % 3 - 1) for i in range(100)]  # one that stays at chance (ln 2) on two classes


def classify(before: float, after: float, loss_before: float = 0.69, loss_after: float = 0.4) -> tuple:
    return {"accuracy": before, "loss": loss_before}, {"accuracy": after, "loss": loss_after}


def test_a_run_that_learns_gets_no_warning():
    verdict = judge("classify", *classify(0.55, 0.9), FALLING, RunConfig())
    assert verdict.learned and verdict.warning is None and verdict.lines() == []
    assert verdict.record() == {"learned": True, "warning": None}
    assert judge(
        "causal-lm", {"loss": 3.0, "perplexity": 20.1}, {"loss": 2.5, "perplexity": 12.2}, FALLING, RunConfig()
    ).learned


@pytest.mark.parametrize("after", [0.455, 0.5425])
def test_held_out_accuracy_no_better_than_before_did_not_learn(after):
    verdict = judge("classify", *classify(0.5425, after, loss_after=0.696), FLAT, RunConfig())
    assert not verdict.learned
    assert f"held-out accuracy {100 * after:.2f}% after training, 54.25% before" in verdict.warning
    assert verdict.record() == {"learned": False, "warning": verdict.warning}
    assert verdict.lines()[0].startswith("warning: this run did not learn (")
    assert verdict.lines()[1].strip() == verdict.advice and "Next: try --lr" in verdict.advice


def test_perfect_accuracy_before_and_after_is_judged_by_the_loss():
    assert judge("classify", *classify(1.0, 1.0, 0.3, 0.1), FALLING, RunConfig()).learned
    assert not judge("classify", *classify(1.0, 1.0, 0.3, 0.3), FALLING, RunConfig()).learned


def test_causal_lm_is_judged_by_the_held_out_loss():
    before, after = {"loss": 3.0, "perplexity": 20.1}, {"loss": 3.2, "perplexity": 24.5}
    verdict = judge("causal-lm", before, after, FALLING, RunConfig())
    assert not verdict.learned and "held-out loss 3.2 after training, 3 before" in verdict.warning


def test_a_non_finite_held_out_result_did_not_learn():
    assert not judge("causal-lm", {"loss": 3.0}, {"loss": math.nan}, FALLING, RunConfig()).learned
    assert not judge("classify", *classify(0.5, 0.6, loss_after=math.inf), FALLING, RunConfig()).learned


def test_training_loss_that_ends_above_its_start_did_not_learn_even_if_held_out_improved():
    rising = [0.5 + 0.01 * i for i in range(100)]
    verdict = judge("classify", *classify(0.5, 0.6), rising, RunConfig())
    assert not verdict.learned
    assert "training loss 0.545 over the first steps, 1.445 over the last" in verdict.warning
    assert "the step is too large. Next: try --lr 3.3e-4." in verdict.warning


def test_one_noisy_last_step_does_not_make_the_loss_rise():
    spiky = [*FALLING[:-1], 5.0]  # the last step alone is far above the first
    assert judge("classify", *classify(0.5, 0.6), spiky, RunConfig()).learned


def test_noise_alone_is_not_a_rise():
    # The same batches' losses, unchanged weights: the last window is higher only by chance.
    noisy = [0.6, 0.4, 0.8, 0.5, 0.7] * 3 + [0.9, 0.5, 0.8, 0.6, 0.7]
    start, end, noise = smoothed_ends(noisy)
    assert end > start * 1.01 and end - start <= noise
    assert judge("classify", *classify(0.5, 0.6), noisy, RunConfig()).learned


def test_smoothing_windows():
    assert smoothed_ends([]) is None and smoothed_ends([1.0]) is None
    assert smoothed_ends([2.0, 1.0]) == (2.0, 1.0, 0.0)
    start, end, _ = smoothed_ends(FALLING)  # 100 steps: windows of 10
    assert start == pytest.approx(sum(FALLING[:10]) / 10) and end == pytest.approx(sum(FALLING[-10:]) / 10)
    start, end, _ = smoothed_ends(FALLING[:16])  # a short run: a quarter of it, 4 steps
    assert start == pytest.approx(sum(FALLING[:4]) / 4) and end == pytest.approx(sum(FALLING[12:16]) / 4)
    start, _, _ = smoothed_ends([1.0] * 50 + [0.0] * 950)  # a long run: at most 50 steps
    assert start == 1.0


def test_rslora_and_loraplus_advice_lowers_the_lr_by_their_larger_step():
    text = advice(RunConfig(rslora=True, rank=8, lr=1e-3), "flat")
    assert "--rslora" in text and "2.83x larger steps" in text and text.endswith("Next: try --lr 3.5e-4.")
    text = advice(RunConfig(loraplus_ratio=16, lr=1e-3), "rose")
    assert "--loraplus-ratio 16 steps B at 0.016" in text and text.endswith("Next: try --lr 2.5e-4.")
    both = RunConfig(rslora=True, rank=4, loraplus_ratio=4, lr=1e-3)  # 2 x 2
    assert advice(both, "rose").endswith("try --lr 2.5e-4.")


def test_advice_follows_what_the_losses_did():
    config = RunConfig(lr=2e-3)
    assert advice(config, "still").endswith("Next: try --lr 0.02 or more --epochs.")
    assert "fits the training data but not the held-out set" in advice(config, "fell")
    assert advice(config, "rose").endswith("Next: try --lr 6.7e-4.")
    # A held-out loss that did not move says the weights did not: lowering the lr would not help.
    held = ({"accuracy": 0.5, "loss": 0.7}, {"accuracy": 0.5, "loss": 0.7000001})
    assert "weights barely moved" in judge("classify", *held, FALLING, RunConfig(rslora=True)).warning


def test_fmt_lr():
    assert [fmt_lr(x) for x in (1e-3, 3.5355e-4, 2.5e-4, 0.5, 0.02, 1e-10)] == [
        "1e-3",
        "3.5e-4",
        "2.5e-4",
        "0.5",
        "0.02",
        "1e-10",
    ]
