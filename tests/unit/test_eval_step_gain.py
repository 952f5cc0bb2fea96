"""Tests for rlp.eval.step_gain: exact telescoping, teacher-forced L_k on a tiny model (megatron
scoring vs a direct transformers forward), summaries by correctness."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from rlp.eval.benchmarks import BenchmarkItem
from rlp.eval.chains import Completion, forced_prompt
from rlp.eval.prompts import build_prompt
from rlp.eval.step_gain import (
    LOGP_GRID,
    StepGainSettings,
    chain_steps,
    on_grid,
    step_gain_completions,
    step_gains,
    summarize_step_gain,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ITEM = BenchmarkItem("g0", "Sam has 3 apples and buys 4 more. How many?", None, "7", "gsm8k")


def _completion(text: str, correct: bool, sample: int = 0, gold: str = "7") -> Completion:
    return Completion(
        run="gsm8k:sampled",
        benchmark="gsm8k",
        kind="math",
        index=0,
        item_id=ITEM.id,
        sample=sample,
        prompt=build_prompt(ITEM),
        text=text,
        gold=gold,
        correct=correct,
        extracted=None,
    )


# ------------------------------------------------------------------------------ telescoping


def test_step_gains_sum_to_the_total_exactly() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        k = rng.randrange(1, 40)
        scale = rng.choice([1.0, 1e-3, 1e-7, 300.0])
        ls = [on_grid(-rng.random() * scale) for _ in range(k + 1)]
        gains = step_gains(ls)
        total = ls[-1] - ls[0]
        assert len(gains) == k
        assert sum(gains) == total  # left to right
        assert sum(reversed(gains)) == total  # any order
        assert math.fsum(gains) == total
    # Off the grid, float rounding breaks the identity for some chains: the grid is needed.
    broken = 0
    for _ in range(2000):
        ls = [-rng.random() * rng.choice([1.0, 1e-7, 300.0]) for _ in range(12)]
        broken += sum(step_gains(ls)) != ls[-1] - ls[0]
    assert broken > 0


def test_on_grid() -> None:
    assert on_grid(-1.5) == -1.5
    assert on_grid(LOGP_GRID * 0.4) == 0.0
    assert on_grid(-12.3456789) / LOGP_GRID == round(-12.3456789 / LOGP_GRID)
    with pytest.raises(ValueError, match="exact range"):
        on_grid(-3e6)
    with pytest.raises(ValueError):
        on_grid(float("-inf"))


# ------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="module")
def model_dir(peaked_llama_dir: Path) -> Path:
    return peaked_llama_dir


def _direct_logp(hf, context: str, target: str) -> float:
    """log p(target | context) by one plain transformers forward."""
    import torch

    ctx = hf.tokenizer(context)["input_ids"]
    tgt = hf.tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + tgt])
    with torch.no_grad():
        logp = torch.log_softmax(hf.model(ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(tgt))


def test_step_gain_on_a_tiny_model(meg, hf) -> None:
    right = _completion(
        " Sam has 3 apples.\nHe buys 4 more, so 3 + 4 = 7.\nThe final answer is $\\boxed{7}$.",
        correct=True,
    )
    wrong = _completion(" He has three. Then five more. So eight", correct=False, sample=1)
    empty = _completion("\\boxed{7}", correct=True, sample=2)
    assert chain_steps(right, 16) == [" Sam has 3 apples.\n", "He buys 4 more, so 3 + 4 = 7.\n"]
    # No answer found: the whole completion is the chain.
    assert chain_steps(wrong, 16) == [" He has three. ", "Then five more. ", "So eight"]
    records = step_gain_completions(meg, [right, wrong, empty], StepGainSettings())
    assert [r.get("eligible") for r in records] == [True, True, False]
    assert records[2]["skip"] == "no_steps"
    for rec, comp in zip(records[:2], (right, wrong)):
        steps = chain_steps(comp, 16)
        assert rec["steps"] == len(steps) and len(rec["logp"]) == len(steps) + 1
        for k, value in enumerate(rec["logp"]):
            context = forced_prompt(comp.prompt, "".join(steps[:k]), "math")
            assert abs(value - _direct_logp(hf, context, "7}")) < 1e-4
        assert rec["step_gain"] == [b - a for a, b in zip(rec["logp"], rec["logp"][1:])]
        assert sum(rec["step_gain"]) == rec["total_gain"] == rec["logp"][-1] - rec["logp"][0]
    # The transformers backend gives the same numbers.
    hf_records = step_gain_completions(hf, [right, wrong, empty], StepGainSettings())
    for a, b in zip(records[:2], hf_records[:2]):
        assert max(abs(x - y) for x, y in zip(a["logp"], b["logp"])) < 1e-4
    # Merged steps: at most max_steps, same end points.
    merged = step_gain_completions(meg, [wrong], StepGainSettings(max_steps=2))[0]
    assert merged["steps"] == 2
    assert abs(merged["logp"][0] - records[1]["logp"][0]) < 1e-5
    assert abs(merged["logp"][-1] - records[1]["logp"][-1]) < 1e-5


def test_step_gain_needs_math(meg) -> None:
    mc = Completion("mmlu:greedy", "mmlu", "mc", 0, "m0", 0, "Q", "The answer is (A).", "A", True)
    with pytest.raises(ValueError, match="math"):
        step_gain_completions(meg, [mc], StepGainSettings())


def test_summary_by_correctness() -> None:
    def rec(correct: bool, logp: list[float]) -> dict:
        return {
            "eligible": True,
            "correct": correct,
            "logp": logp,
            "step_gain": step_gains(logp),
            "total_gain": logp[-1] - logp[0],
        }

    records = [
        rec(True, [-4.0, -2.0, -1.0]),  # gains +2, +1
        rec(True, [-3.0, -3.5]),  # gain -0.5
        rec(False, [-6.0, -6.0, -5.0, -7.0]),  # 0, +1, -2
        {"eligible": False, "skip": "no_steps", "correct": False},
    ]
    s = summarize_step_gain(records)
    assert s["completions"] == 4 and s["skipped"] == 1
    c, i, a = s["correct"], s["incorrect"], s["all"]
    assert (c["chains"], c["steps"], i["chains"], i["steps"], a["steps"]) == (2, 3, 1, 3, 6)
    assert c["mean_total_gain"] == (3.0 - 0.5) / 2
    assert c["mean_step_gain"] == (2 + 1 - 0.5) / 3
    assert c["positive_steps_pct"] == pytest.approx(200 / 3)
    assert i["mean_total_gain"] == -1.0 and i["positive_steps_pct"] == pytest.approx(100 / 3)
    assert a["mean_logp_start"] == pytest.approx((-4 - 3 - 6) / 3)
    assert summarize_step_gain([])["all"]["mean_step_gain"] is None
