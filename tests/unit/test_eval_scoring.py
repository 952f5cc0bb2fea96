"""Tests for rlp.eval.grading: extraction, normalisation, math-verify workers, MC letters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rlp.eval.grading import (
    MathVerifier,
    extract_choice_letter,
    extract_math_answer,
    find_last_boxed,
    normalize_math_answer,
    score_math_batch,
    score_mc,
)

pytest.importorskip("math_verify")


@pytest.fixture(scope="module")
def verifier() -> Iterator[MathVerifier]:
    with MathVerifier(num_workers=2, timeout_s=20.0) as v:
        yield v


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("text", "answer", "method"),
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "boxed"),
        ("first \\boxed{3} then corrected: \\boxed{4}", "4", "boxed"),
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} ok", "\\frac{\\sqrt{2}}{2}", "boxed"),
        ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed"),
        ("\\fbox{42}", "42", "boxed"),
        ("\\boxed{\\boxed{7}}", "7", "boxed"),
        ("$\\boxed 9$", "9", "boxed"),
        ("The answer is 18.", "18", "answer_is"),
        ("Thus the final answer is $1.5$. Done", "$1.5$", "answer_is"),
        ("Final Answer: x^2 + 1\nmore text", "x^2 + 1", "answer_is"),
        ("She earns 9 + 9 = 18 dollars.\n#### 18", "18", "hashes"),
        ("we get 3 apples and then 4,500 pears", "4,500", "last_number"),
        ("ratio is 3/4", "3/4", "last_number"),
        ("no digits at all", None, "none"),
    ],
)
def test_extract_math_answer(text: str, answer: str | None, method: str) -> None:
    ext = extract_math_answer(text)
    assert ext.answer == answer
    assert ext.method == method


def test_unbalanced_box_is_skipped_for_earlier_complete_one() -> None:
    assert find_last_boxed("\\boxed{5} and later \\boxed{\\frac{1}{") == "5"
    # A completion cut off inside its only box falls back to other rules.
    assert extract_math_answer("so \\boxed{\\frac{3").method == "last_number"


def test_last_number_fallback_can_be_disabled() -> None:
    assert extract_math_answer("it is 12", allow_last_number=False).answer is None


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("$1,000$", "1000"),
        ("\\$1,000.", "1000"),
        ("1{,}000", "1000"),
        ("5.4 \\text{ cents}", "5.4"),
        ("6.5 \\mathrm{~m}", "6.5"),
        ("18 dollars", "18"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("45°", "45"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("4.5e33", "4.5 \\times 10^{33}"),
        ("1e-5", "1 \\times 10^{-5}"),
        ("-1./3", "-1/3"),
        ("2, 3", "2, 3"),  # a list, not a thousands separator
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "( 3, \\frac{\\pi}{2} )"),
    ],
)
def test_normalize_math_answer(raw: str, normalised: str) -> None:
    assert normalize_math_answer(raw) == normalised


# ------------------------------------------------------------------------------ math-verify

EQUIVALENT = [
    ("1/2", "0.5"),
    ("0.5", "\\frac{2}{4}"),
    ("\\frac{1}{2}", "\\frac{2}{4}"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("72", "72.0"),
    ("1000", "$1,000"),
    ("1000", "\\$1,000"),
    ("(0,1]", "(0, 1]"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)"),
    ("x^2+2x+1", "(x+1)^2"),
    ("30", "30^\\circ"),
    ("30^\\circ", "30"),
    ("5", "5\\text{ cm}"),
    ("1.6", "1.6 \\mathrm{~cm}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("4.5e33", "4.5 \\times 10^{33}"),
    ("-1./3", "-\\frac{1}{3}"),
    ("\\text{Evelyn}", "Evelyn"),
    ("2, 3", "3, 2"),
    ("10\\%", "10"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("1/2", "0.51"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("[0,1)", "(0,1]"),
    ("x^2+2x+1", "x^2+2x+2"),
    ("72", "27"),
    ("1000", "100"),
    ("\\sqrt{2}", "2"),
    ("\\text{Evelyn}", "Navin"),
]


def test_checker_accepts_equivalent_forms(verifier: MathVerifier) -> None:
    outcomes = verifier.check_many(EQUIVALENT)
    bad = [(p, o) for p, o in zip(EQUIVALENT, outcomes) if o.status != "correct"]
    assert not bad


def test_checker_rejects_wrong_answers(verifier: MathVerifier) -> None:
    outcomes = verifier.check_many(NOT_EQUIVALENT)
    bad = [(p, o) for p, o in zip(NOT_EQUIVALENT, outcomes) if o.status != "incorrect"]
    assert not bad


def test_checker_exact_shortcut_and_cache(verifier: MathVerifier) -> None:
    assert verifier.check("\\frac{1}{2}", "\\dfrac{1}{2}").detail == "exact"
    first = verifier.check("7/8", "0.875")
    again = verifier.check("7/8", "0.875")
    assert first == again and first.status == "correct"


def test_score_math_batch_statuses(verifier: MathVerifier) -> None:
    scores = score_math_batch(
        verifier,
        ["18", "18", "18", "\\frac{1}{2}"],
        ["so \\boxed{18}", "The answer is 17.", "I don't know", "#### 0.5"],
    )
    assert [s.status for s in scores] == ["correct", "incorrect", "no_answer", "correct"]
    assert [s.method for s in scores] == ["boxed", "answer_is", "none", "hashes"]
    assert scores[0].correct and not scores[2].correct
    with pytest.raises(ValueError):
        score_math_batch(verifier, ["1"], [])


def test_timeout_counts_as_incorrect_and_worker_is_replaced() -> None:
    # sympy does not finish comparing this tower of powers: the worker is killed at the limit.
    with MathVerifier(num_workers=1, timeout_s=1.0) as v:
        slow, fine = v.check_many([("2^{2^{2^{2^{2^{2}}}}}", "3"), ("1/2", "0.5")])
        assert slow.status == "timeout"
        assert fine.status == "correct"
        assert v.check("3", "4").status == "incorrect"
        assert v.stats["timeout"] == 1


def test_verifier_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        MathVerifier(num_workers=0)
    with pytest.raises(ValueError):
        MathVerifier(timeout_s=0)


# ------------------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize(
    ("text", "letter", "method"),
    [
        ("Let's think. ... The answer is (C).", "C", "answer_is"),
        ("the correct answer is: **B**", "B", "answer_is"),
        ("Answer: D", "D", "answer_is"),
        ("The answer is C because ...", "C", "answer_is"),
        ("Option A is wrong. The correct option is B.", "B", "answer_is"),
        ("so we pick \\boxed{A}", "A", "boxed"),
        ("so we pick \\boxed{\\text{D}}", "D", "boxed"),
        ("I am confident: **C**", "C", "bold"),
        ("After elimination we have (B) left", "B", "paren"),
        ("C. 42 is right", "C", "line_start"),
        ("hmm\nB) the second", "B", "line_start"),
        (" D", "D", "trailing"),
        ("reasoning ... so it must be A", "A", "trailing"),
    ],
)
def test_extract_choice_letter(text: str, letter: str, method: str) -> None:
    ext = extract_choice_letter(text, "ABCD")
    assert (ext.answer, ext.method) == (letter, method)


def test_letters_restricted_to_valid_choices() -> None:
    # "E" is not a choice of a 4-option item: ignored, the valid (B) is used.
    assert extract_choice_letter("(B) ... The answer is (E).", "ABCD").answer == "B"
    assert extract_choice_letter("The answer is (E).", "ABCD").answer is None
    # MMLU-Pro items have up to ten options.
    assert extract_choice_letter("The answer is (J).", "ABCDEFGHIJ").answer == "J"
    with pytest.raises(ValueError):
        extract_choice_letter("A", "")


def test_lowercase_article_is_not_a_letter() -> None:
    assert extract_choice_letter("the answer is a prime number", "ABCD").answer is None


def test_choice_text_fallback() -> None:
    choices = ["Paris", "London", "Rome", "Berlin"]
    assert extract_choice_letter("The answer is Rome.", "ABCD", choices).answer == "C"
    assert extract_choice_letter("thinking...\nberlin", "ABCD", choices).answer == "D"
    assert extract_choice_letter("Madrid", "ABCD", choices).answer is None


def test_score_mc() -> None:
    assert score_mc("The answer is (B).", "B", "ABCD").status == "correct"
    assert score_mc("The answer is (A).", "B", "ABCD").status == "incorrect"
    assert score_mc("no idea", "B", "ABCD").status == "no_answer"
