"""Tests for rlp.eval.prompts: templates, few-shot exemplars, stop strings."""

from __future__ import annotations

import re

import pytest

from rlp.eval.benchmarks import BenchmarkItem, FewShotExample, FewShotPool
from rlp.eval.grading import extract_choice_letter, extract_math_answer
from rlp.eval.prompts import (
    MATH_EXEMPLARS,
    STOP_STRINGS,
    build_prompt,
    format_choices,
    math_prompt,
    mc_prompt,
    truncate_at_stop,
)


def test_zero_shot_math_prompt() -> None:
    p = math_prompt("  What is 2 + 2?  ")
    assert "step by step" in p and "\\boxed{}" in p
    assert p.endswith("Problem: What is 2 + 2?\n\nSolution:")
    assert p.count("Problem:") == 1


def test_few_shot_math_prompt_uses_exemplars_in_order() -> None:
    p = math_prompt("Q?", num_shots=3)
    assert p.count("Problem:") == 4
    for ex in MATH_EXEMPLARS[:3]:
        assert ex.problem in p and f"\\boxed{{{ex.answer}}}" in p
    assert MATH_EXEMPLARS[3].problem not in p
    assert p.index(MATH_EXEMPLARS[0].problem) < p.index(MATH_EXEMPLARS[1].problem)
    with pytest.raises(ValueError):
        math_prompt("Q?", num_shots=-1)


def test_math_exemplars_answers_extractable() -> None:
    # Each exemplar's rendered solution must grade as its own answer.
    for ex in MATH_EXEMPLARS:
        rendered = f"{ex.solution} The final answer is $\\boxed{{{ex.answer}}}$."
        assert extract_math_answer(rendered).answer == ex.answer


def test_math_exemplar_arithmetic() -> None:
    # The word-problem exemplars state their arithmetic; check every "a op b [op c] = d".
    pattern = re.compile(r"((?:\d+(?:\.\d+)?\s*[-+*]\s*)+\d+(?:\.\d+)?) = (\d+(?:\.\d+)?)")
    checked = 0
    for ex in MATH_EXEMPLARS:
        for lhs, rhs in pattern.findall(ex.solution):
            assert eval(lhs) == pytest.approx(float(rhs)), (ex.problem, lhs, rhs)
            checked += 1
    assert checked >= 8


def test_format_choices_letters() -> None:
    assert format_choices(["x", "y", "z"]) == "A. x\nB. y\nC. z"
    ten = format_choices([str(i) for i in range(10)])
    assert ten.splitlines()[-1] == "J. 9"
    with pytest.raises(ValueError):
        format_choices(["c"] * 27)


def test_mc_prompt_zero_shot() -> None:
    p = mc_prompt("Which planet?", ["Mars", "Venus"], subject="college_physics")
    assert "about college physics" in p
    assert "letter" in p and "The answer is (X)" in p
    assert "Question: Which planet?\nA. Mars\nB. Venus\nAnswer: Let's think step by step." in p
    assert p.endswith("Answer: Let's think step by step.")
    assert "about" not in mc_prompt("Q", ["a", "b"]).split("\n")[0]


def test_mc_prompt_few_shot_exemplars_answered_in_extractable_form() -> None:
    ex = [
        FewShotExample("Dev q", ("p", "q", "r", "s"), "C", rationale="Because r."),
        FewShotExample("Dev q2", ("p", "q", "r", "s"), "A"),
    ]
    p = mc_prompt("Test q", ["1", "2", "3", "4"], exemplars=ex)
    assert p.count("Question:") == 3
    assert "Because r. The answer is (C)." in p and "step. The answer is (A)." in p
    assert p.index("Dev q") < p.index("Test q")
    block = p.split("\n\n")[1]
    assert extract_choice_letter(block, "ABCD").answer == "C"


def test_build_prompt_dispatch() -> None:
    math_item = BenchmarkItem("1", "What is 1+1?", None, "2", "gsm8k")
    assert build_prompt(math_item, 2).count("Problem:") == 3
    mc_item = BenchmarkItem("astro/1", "Q", ("a", "b", "c", "d"), "B", "mmlu", "astronomy")
    pool = FewShotPool({"astronomy": [FewShotExample("d", ("a", "b"), "B")]})
    assert build_prompt(mc_item, 1, pool).count("Question:") == 2
    assert build_prompt(mc_item, 1, None).count("Question:") == 1  # e.g. GPQA: no dev split


def test_truncate_at_stop() -> None:
    text = "step 1\nso \\boxed{3}\n\nProblem: next one \\boxed{9}"
    assert truncate_at_stop(text) == "step 1\nso \\boxed{3}"
    assert truncate_at_stop("A\n\nQuestion: more\n\nProblem: x") == "A"
    assert truncate_at_stop("no stop here") == "no stop here"
    assert truncate_at_stop("x STOP y", ["STOP"]) == "x "
    assert "\n\nProblem:" in STOP_STRINGS and "\n\nQuestion:" in STOP_STRINGS
