"""Tests for rlp.eval.chains: reasoning/answer split, steps, truncation points, forced-answer
prompts per benchmark format, filler length."""

from __future__ import annotations

import random

import pytest

from rlp.eval.benchmarks import BenchmarkItem
from rlp.eval.chains import (
    ANSWER_CUES,
    FILLER_UNITS,
    filler_text,
    filler_unit,
    forced_prompt,
    group_steps,
    parse_forced_answer,
    split_reasoning,
    split_steps,
    statement_start,
    truncation_points,
)
from rlp.eval.prompts import build_prompt

MATH_ITEM = BenchmarkItem("g0", "What is 3 + 4?", None, "7", "gsm8k")
MC_ITEM = BenchmarkItem(
    "astronomy/0", "Which planet is largest?", ("Mars", "Jupiter", "Venus", "Earth"), "B", "mmlu",
    "astronomy",
)  # fmt: skip


# ------------------------------------------------------------------------------ truncation


@pytest.mark.parametrize(
    ("n", "points"),
    [
        (0, [0, 0, 0, 0]),
        (1, [0, 0, 0, 0]),
        (4, [0, 1, 2, 3]),
        (7, [0, 1, 3, 5]),
        (100, [0, 25, 50, 75]),
    ],
)
def test_truncation_points_are_floor_of_fraction(n: int, points: list[int]) -> None:
    assert truncation_points(n, (0.0, 0.25, 0.5, 0.75)) == points


def test_truncation_points_exact_for_decimal_fractions() -> None:
    # 0.7 * 10 is 7.000000000000001 in floats, 0.3 * 10 = 3.0000000000000004: floor must be 7, 3
    # and 0.1 * 30 = 3.0000000000000004 -> 3; never one token too few or too many.
    assert truncation_points(10, (0.7, 0.3)) == [7, 3]
    assert truncation_points(30, (0.1,)) == [3]
    assert truncation_points(3, (1.0,)) == [3]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        truncation_points(3, (1.5,))


# ------------------------------------------------------------------------------ forced answers


def test_forced_prompt_per_benchmark_format() -> None:
    math_prompt = build_prompt(MATH_ITEM)
    assert math_prompt.endswith("Solution:")
    forced = forced_prompt(math_prompt, " 3 + 4 = 7.\n", "math")
    assert forced == math_prompt + " 3 + 4 = 7.\nThe final answer is $\\boxed{"
    # Fraction 0: the answer cue right after the prompt.
    assert forced_prompt(math_prompt, "", "math") == math_prompt + ANSWER_CUES["math"]
    mc_prompt = build_prompt(MC_ITEM)
    assert mc_prompt.endswith("Answer: Let's think step by step.")
    assert forced_prompt(mc_prompt, " Jupiter is big. ", "mc") == (
        mc_prompt + " Jupiter is big.\nThe answer is ("
    )
    # The cues are the closings the prompts ask for.
    assert "\\boxed{}" in math_prompt and '"The answer is (X)"' in mc_prompt


@pytest.mark.parametrize(
    ("continuation", "kind", "answer"),
    [
        ("7}$.", "math", "7"),
        ("\\frac{1}{2}}$", "math", "\\frac{1}{2}"),
        (" 12 }\nProblem", "math", "12"),
        ("\\frac{1}{2", "math", None),  # never closed
        ("}$", "math", None),  # empty box
        ("B) Jupiter", "mc", "B"),
        (" **C**", "mc", "C"),
        ("E)", "mc", None),  # not a choice of this item
        ("maybe", "mc", None),
    ],
)
def test_parse_forced_answer(continuation: str, kind: str, answer: str | None) -> None:
    assert parse_forced_answer(continuation, kind, "ABCD") == answer  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ reasoning split


@pytest.mark.parametrize(
    ("text", "reasoning"),
    [
        (" 3 + 4 = 7. The final answer is $\\boxed{7}$.", " 3 + 4 = 7. "),
        (" First 3.\nThen 3 + 4 = 7.\nSo it is $\\boxed{7}$.", " First 3.\nThen 3 + 4 = 7.\n"),
        (" 3 + 4 = 7.\n#### 7", " 3 + 4 = 7.\n"),
        (" Adding, the answer is 7", ""),  # one sentence: no reasoning before it
        ("\\boxed{7}", ""),
        (" no number here", None),
    ],
)  # fmt: skip
def test_split_reasoning_math(text: str, reasoning: str | None) -> None:
    assert split_reasoning(text, "math") == reasoning


def test_split_reasoning_mc_and_statement_start() -> None:
    text = " Jupiter is the largest planet. The answer is (B)."
    assert (
        split_reasoning(text, "mc", "ABCD", MC_ITEM.choices) == " Jupiter is the largest planet. "
    )
    assert split_reasoning(" I am unsure.", "mc", "ABCD", MC_ITEM.choices) is None
    # A decimal point is no sentence end; a sentence end right before the answer is.
    s = "It is 3.5 km. \\boxed{3.5}"
    assert statement_start(s, s.index("\\boxed")) == s.index("\\boxed")
    s = "It is 3.5\\boxed{3.5}"
    assert statement_start(s, s.index("\\boxed")) == 0


# ------------------------------------------------------------------------------ steps


def test_split_steps_rule() -> None:
    r = "First, 2 apples. Then 3.5 more!\n\nSo we get 5.5.\n$$\nx=1\n$$\n"
    assert split_steps(r) == [
        "First, 2 apples. ",
        "Then 3.5 more!\n\n",
        "So we get 5.5.\n$$\n",
        "x=1\n$$\n",
    ]
    assert split_steps("\n\n  Step one\nStep two") == ["\n\n  Step one\n", "Step two"]
    assert split_steps("$$ \n ...") == []
    assert split_steps("") == []


def test_split_steps_concatenate_back_exactly() -> None:
    rng = random.Random(0)
    alphabet = ["a", "7", ".", " ", "\n", "!", "?", "$", "\t", "3.5", "Step", ". ", "\n\n"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        steps = split_steps(text)
        if any(ch.isalnum() for ch in text):
            assert "".join(steps) == text
        else:
            assert steps == []
        assert all(any(ch.isalnum() for ch in s) for s in steps)
        for k in (1, 2, 3, 8):
            grouped = group_steps(steps, k)
            assert "".join(grouped) == "".join(steps) and len(grouped) == min(k, len(steps))


def test_group_steps() -> None:
    assert group_steps(list("abcdefg"), 3) == ["ab", "cd", "efg"]
    assert group_steps(list("ab"), 5) == ["a", "b"]
    with pytest.raises(ValueError):
        group_steps(["a"], 0)


# ------------------------------------------------------------------------------ filler


@pytest.fixture(scope="module")
def tiny_tokenizer():
    pytest.importorskip("transformers")
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from tests.unit.test_eval_generation import _build_tiny_model

    with tempfile.TemporaryDirectory() as d:
        _build_tiny_model(Path(d))
        yield AutoTokenizer.from_pretrained(d)


def test_filler_has_the_chain_length(tiny_tokenizer) -> None:
    def encode(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    unit = filler_unit(encode)
    assert unit in FILLER_UNITS
    for reasoning in (
        " 3 + 4 = 7.",
        " Sam has 3 apples and buys 4 more, so he has 7 apples.\n",
        "x",
    ):
        n = len(encode(reasoning))
        assert len(encode(filler_text(unit, n))) == n


def test_filler_unit_needs_a_stable_single_token() -> None:
    # Characters are tokens, but runs of "." merge pairwise: "..." -> ["..", "."] is not stable.
    def encode(text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith("..", i):
                out.append(1000)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    assert filler_unit(encode, ("...", ".", "_")) == "_"
    with pytest.raises(ValueError, match="no filler unit"):
        filler_unit(encode, ("...", "."))
