r"""Text surgery on chains of thought for the reasoning-quality measurements.

This module owns the pure string/token rules that :mod:`rlp.eval.probes` and
:mod:`rlp.eval.step_gain` apply to a graded completion; it knows nothing about models or files.

Reasoning and final answer
    A completion's *reasoning* is the text before the statement of its final answer: the answer
    is located by the grader (:func:`rlp.eval.grading.extract_math_answer` /
    :func:`~rlp.eval.grading.extract_choice_letter`, which record where the matched statement
    starts) and the reasoning ends at the start of the line holding that statement, or, when an
    earlier sentence on the same line ended (". ", "! ", "? "), at the start of the answer's own
    sentence. ``"3 + 4 = 7. The final answer is $\boxed{7}$."`` has the reasoning
    ``"3 + 4 = 7. "``. A completion without an extracted answer has no reasoning in this sense
    (:func:`split_reasoning` returns ``None``).

Forced answers (the benchmark's own answer format)
    ``forced_prompt(prompt, partial, kind)`` is ``prompt + partial.rstrip() + cue``, where the
    cue opens the format the prompt asks for: math ``"\nThe final answer is $\boxed{"`` (the
    few-shot exemplars' closing line), multiple choice ``"\nThe answer is ("`` (MMLU-Pro's
    closing). The model continues greedily for a few tokens and :func:`parse_forced_answer` reads
    the answer: the text up to the brace that closes the box, or the first letter that names a
    choice.

Steps (:func:`split_steps`)
    The reasoning is cut after every run of newlines and, inside a line, after a sentence end (a
    ``.``, ``!`` or ``?`` followed by spaces or tabs and more text; a decimal point is never
    followed by a space, so ``3.5`` stays whole). A piece without any letter or digit (a lone
    ``$$``, a blank line) is merged into the step before it (the first such piece into the step
    after it). The steps concatenate back to the reasoning exactly. :func:`group_steps` merges
    consecutive steps into at most ``max_steps`` groups of near-equal step counts.

Truncation and filler
    :func:`truncation_points` gives ``floor(f * n)`` kept tokens for each fraction ``f`` of a
    reasoning of ``n`` tokens (exact for decimal fractions). :func:`filler_unit` picks a filler
    string that the tokenizer maps to exactly one token, repeated or not, so ``unit * n`` is
    ``n`` tokens: the filler probe keeps the reasoning's token count and drops its content.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from rlp.eval.grading import extract_choice_letter, extract_math_answer, match_brace

ChainKind = Literal["math", "mc"]

ANSWER_CUES: dict[str, str] = {
    "math": "\nThe final answer is $\\boxed{",
    "mc": "\nThe answer is (",
}
"""The forced-answer continuation per benchmark kind (the format the prompts ask for)."""

ANSWER_CLOSERS: dict[str, str] = {"math": "}", "mc": ")"}
"""What closes a forced answer; part of the teacher-forced target of the step gain."""

TRUNCATION_FRACTIONS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
"""Fractions of the reasoning's tokens kept by the truncation probe (Lanham et al. 2023)."""

FILLER_UNITS: tuple[str, ...] = (" ...", "...", " .", ".", " _", "_")
"""Filler candidates, most natural first (Lanham et al. use "...")."""


@dataclass(frozen=True)
class Completion:
    """One graded completion, as the probes and the step gain see it."""

    run: str
    benchmark: str
    kind: ChainKind
    index: int
    item_id: str
    sample: int
    prompt: str
    text: str
    gold: str
    correct: bool
    extracted: str | None = None
    valid_letters: str = ""
    choices: tuple[str, ...] | None = None

    @property
    def key(self) -> tuple[str, int, int]:
        """(run, item index, sample index): the journal key."""
        return (self.run, self.index, self.sample)

    def reasoning(self) -> str | None:
        """:func:`split_reasoning` of this completion."""
        return split_reasoning(self.text, self.kind, self.valid_letters, self.choices)


_SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+(?=\S)")
_STEP_CUT = re.compile(r"\n+|(?<=[.!?])[ \t]+(?=\S)")
_CONTENT = re.compile(r"[A-Za-z0-9]")
_LETTER = re.compile(r"\s*\**\s*([A-Z])(?![A-Za-z])")


def statement_start(text: str, pos: int) -> int:
    """Start of the statement holding ``pos``: its line, or its sentence on that line."""
    line_start = text.rfind("\n", 0, pos) + 1
    ends = [m.end() for m in _SENTENCE_END.finditer(text, line_start, pos + 1) if m.end() <= pos]
    return ends[-1] if ends else line_start


def split_reasoning(
    text: str,
    kind: ChainKind,
    valid_letters: str = "",
    choices: Sequence[str] | None = None,
) -> str | None:
    """The reasoning before the final-answer statement (``None`` if no answer is found)."""
    if kind == "math":
        ext = extract_math_answer(text)
    else:
        ext = extract_choice_letter(text, valid_letters, choices)
    if ext.answer is None or ext.start is None:
        return None
    return text[: statement_start(text, ext.start)]


def split_steps(reasoning: str) -> list[str]:
    """Steps of a reasoning (lines, then sentences; see the module docstring).

    ``"".join(split_steps(r)) == r`` for every ``r``; a reasoning without any letter or digit
    has no steps.
    """
    cuts = [0, *(m.end() for m in _STEP_CUT.finditer(reasoning)), len(reasoning)]
    pieces = [reasoning[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    steps: list[str] = []
    pending = ""  # content-free text before the first real step
    for piece in pieces:
        if _CONTENT.search(piece):
            steps.append(pending + piece)
            pending = ""
        elif steps:
            steps[-1] += piece
        else:
            pending += piece
    if pending and steps:
        steps[-1] += pending
    return steps


def group_steps(steps: Sequence[str], max_steps: int) -> list[str]:
    """Merge consecutive steps into at most ``max_steps`` groups of near-equal step counts."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    n = len(steps)
    if n <= max_steps:
        return list(steps)
    bounds = [(i * n) // max_steps for i in range(max_steps + 1)]
    return ["".join(steps[a:b]) for a, b in zip(bounds, bounds[1:])]


def truncation_points(n_tokens: int, fractions: Sequence[float]) -> list[int]:
    """Tokens kept for each fraction: ``floor(f * n_tokens)`` (``f`` read as a decimal)."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    out = []
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"truncation fractions must lie in [0, 1], got {f}")
        out.append(math.floor(Fraction(str(f)) * n_tokens))
    return out


def forced_prompt(prompt: str, partial_reasoning: str, kind: ChainKind) -> str:
    """``prompt + partial_reasoning.rstrip() + cue``: ask for the answer after this reasoning."""
    return prompt + partial_reasoning.rstrip() + ANSWER_CUES[kind]


def parse_forced_answer(continuation: str, kind: ChainKind, valid_letters: str = "") -> str | None:
    """The answer in a forced continuation (text after the cue); ``None`` if unreadable.

    Math: the box content up to the brace that closes the cue's ``{`` (stripped; empty or
    unclosed -> ``None``). Multiple choice: the first capital letter, if it names a choice.
    """
    if kind == "math":
        text = "{" + continuation
        close = match_brace(text, 0)
        if close is None:
            return None
        return text[1:close].strip() or None
    m = _LETTER.match(continuation)
    if m and m.group(1) in valid_letters:
        return m.group(1)
    return None


def filler_unit(encode: Callable[[str], list[int]], units: Sequence[str] = FILLER_UNITS) -> str:
    """The first unit that is one token and stays one token per copy when repeated."""
    for unit in units:
        one = encode(unit)
        if len(one) != 1:
            continue
        if all(encode(unit * m) == one * m for m in (2, 3, 5, 8, 17)):
            return unit
    raise ValueError(
        f"no filler unit among {list(units)} tokenizes to one token per copy with this tokenizer"
    )


def filler_text(unit: str, n_tokens: int) -> str:
    """``n_tokens`` copies of the filler unit."""
    return unit * n_tokens
