r"""Prompt templates for the bundled evaluation, and the stop strings that go with them.

This module owns the exact text a model sees. The paper (docs/method.md §13) evaluates with
NeMo-Skills and reports neither the template nor few-shot settings, so these are our choices;
each is documented here and in ``docs/evaluation.md``.

Choices and reasons
-------------------
* **Plain completion prompts, no chat template.** RLP models are *base* models (Qwen3-1.7B-Base,
  Nemotron-Nano base checkpoints); a chat template would test instruction following rather than
  pretraining. A "Problem: ... Solution:" / "Question: ... Answer:" layout is what base models
  see in web and textbook text.
* **Math: zero-shot chain of thought ending in** ``\boxed{}``. The instruction "Solve the
  following math problem step by step. Put your final answer within \boxed{}." is the
  Qwen2.5-Math / NeMo-Skills convention; ``\boxed{}`` gives an unambiguous extraction target, and
  the extractor has fallbacks for models that ignore it.
* **Multiple choice: lettered options ("A. ...") and "Answer with the letter"**, with a short
  chain of thought closed by "The answer is (X)". Letters (up to J for MMLU-Pro's ten options)
  keep the answer space explicit; the "The answer is (X)" closing is MMLU-Pro's own CoT format
  and is what the letter extractor looks for first. The prompt ends with "Answer: Let's think
  step by step." so base models start reasoning instead of emitting a bare, often random, letter.
* **Few-shot (``--few-shot K``, default 0 = the zero-shot setting above)**: MMLU uses the
  official ``dev`` split (5 per subject, same subject first); MMLU-Pro uses its ``validation``
  split with the authors' chain-of-thought rationales (5 per category; needs pyarrow); math
  benchmarks use :data:`MATH_EXEMPLARS`, eight problems with worked solutions written for this
  project (GSM8K- and MATH-style; none is taken from a test set). GPQA has no dev split, so it
  stays zero-shot whatever ``K`` is. Exemplars come after the instruction and before the test
  question, in the same "Problem/Solution" or "Question/Answer" layout.
* **Stop strings**: a base model that has finished answering tends to start the next
  "Problem:"/"Question:" block. :data:`STOP_STRINGS` cut generation there (passed to the
  generator, and applied again by :func:`truncate_at_stop` so every backend is treated alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rlp.eval.benchmarks import LETTERS, BenchmarkItem, FewShotExample, FewShotPool

MATH_INSTRUCTION = (
    "Solve the following math problem step by step. Put your final answer within \\boxed{}."
)
MC_INSTRUCTION = (
    "The following is a multiple choice question{about}. Think step by step, then answer with "
    'the letter of the correct choice, finishing with "The answer is (X)" where X is that '
    "letter."
)
MC_ANSWER_PREFIX = "Answer: Let's think step by step."

STOP_STRINGS: tuple[str, ...] = ("\n\nProblem:", "\n\nQuestion:", "\n\n\n\n")
"""Where a completion ends besides EOS (the start of a new problem block)."""


@dataclass(frozen=True)
class MathExemplar:
    """A worked math exemplar for few-shot prompts."""

    problem: str
    solution: str
    answer: str


MATH_EXEMPLARS: tuple[MathExemplar, ...] = (
    MathExemplar(
        "A baker makes 12 trays of rolls with 18 rolls on each tray. She sells 150 rolls in the "
        "morning and 47 in the afternoon. How many rolls are left at the end of the day?",
        "She makes 12 * 18 = 216 rolls. She sells 150 + 47 = 197 rolls. "
        "So 216 - 197 = 19 rolls are left.",
        "19",
    ),
    MathExemplar(
        "Tom reads 25 pages on Monday and twice as many pages on Tuesday. On Wednesday he reads "
        "10 pages fewer than on Tuesday. How many pages does he read over the three days?",
        "On Tuesday he reads 2 * 25 = 50 pages. On Wednesday he reads 50 - 10 = 40 pages. "
        "In total he reads 25 + 50 + 40 = 115 pages.",
        "115",
    ),
    MathExemplar(
        "What is the value of $x$ if $3x - 7 = 2x + 5$?",
        "Subtract $2x$ from both sides to get $x - 7 = 5$, then add 7: $x = 12$.",
        "12",
    ),
    MathExemplar(
        "Simplify $\\frac{6}{8} + \\frac{1}{3}$.",
        "$\\frac{6}{8} = \\frac{3}{4}$. With denominator 12: "
        "$\\frac{9}{12} + \\frac{4}{12} = \\frac{13}{12}$.",
        "\\frac{13}{12}",
    ),
    MathExemplar(
        "A jacket costs $\\$80$. It is discounted by 25%, and then a 10% sales tax is added to "
        "the discounted price. What is the final price in dollars?",
        "The discount is 0.25 * 80 = 20, so the price is 80 - 20 = 60. The tax is 0.10 * 60 = 6, "
        "so the final price is 60 + 6 = 66 dollars.",
        "66",
    ),
    MathExemplar(
        "Find all real solutions of $x^2 - 5x + 6 = 0$.",
        "Factor: $x^2 - 5x + 6 = (x - 2)(x - 3)$, which is zero when $x = 2$ or $x = 3$.",
        "2, 3",
    ),
    MathExemplar(
        "How many positive divisors does $36$ have?",
        "$36 = 2^2 \\cdot 3^2$, so it has $(2 + 1)(2 + 1) = 9$ positive divisors.",
        "9",
    ),
    MathExemplar(
        "A rectangle has perimeter 30 cm and its length is twice its width. What is its area in "
        "square centimeters?",
        "Let the width be $w$; then the length is $2w$ and the perimeter is $2(w + 2w) = 6w = 30$, "
        "so $w = 5$ and the length is 10. The area is $5 \\cdot 10 = 50$.",
        "50",
    ),
)
"""Few-shot math exemplars written for this project (not taken from any benchmark)."""


def format_choices(choices: Sequence[str]) -> str:
    """``A. first\\nB. second ...`` (one line per choice)."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices; at most {len(LETTERS)} are supported")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _subject_phrase(subject: str | None) -> str:
    return f" about {subject.replace('_', ' ')}" if subject else ""


def math_prompt(question: str, num_shots: int = 0) -> str:
    """Zero- or few-shot chain-of-thought math prompt (see the module docstring)."""
    if num_shots < 0:
        raise ValueError(f"--few-shot must be >= 0, got {num_shots}")
    parts = [MATH_INSTRUCTION, ""]
    for ex in MATH_EXEMPLARS[:num_shots]:
        parts += [
            f"Problem: {ex.problem}",
            "",
            f"Solution: {ex.solution} The final answer is $\\boxed{{{ex.answer}}}$.",
            "",
        ]
    parts += [f"Problem: {question.strip()}", "", "Solution:"]
    return "\n".join(parts)


def _mc_block(question: str, choices: Sequence[str]) -> str:
    return f"Question: {question.strip()}\n{format_choices(choices)}"


def mc_prompt(
    question: str,
    choices: Sequence[str],
    subject: str | None = None,
    exemplars: Sequence[FewShotExample] = (),
) -> str:
    """Multiple-choice prompt with lettered choices and optional solved exemplars."""
    parts = [MC_INSTRUCTION.format(about=_subject_phrase(subject)), ""]
    for ex in exemplars:
        if ex.choices is None:
            raise ValueError("multiple-choice exemplars need choices")
        reasoning = f" {ex.rationale.strip()}" if ex.rationale.strip() else ""
        parts += [
            _mc_block(ex.question, ex.choices),
            f"{MC_ANSWER_PREFIX}{reasoning} The answer is ({ex.answer}).",
            "",
        ]
    parts += [_mc_block(question, choices), MC_ANSWER_PREFIX]
    return "\n".join(parts)


def build_prompt(item: BenchmarkItem, num_shots: int = 0, pool: FewShotPool | None = None) -> str:
    """Prompt for one item: math or multiple choice, zero- or ``num_shots``-shot.

    For multiple choice ``pool`` supplies the exemplars (``None`` -> zero-shot; the runner passes
    none for GPQA, which has no dev split).
    """
    if item.choices is None:
        return math_prompt(item.question, num_shots)
    exemplars = pool.select(item.subject, num_shots) if pool is not None else []
    return mc_prompt(item.question, item.choices, item.subject, exemplars)


def truncate_at_stop(text: str, stop_strings: Sequence[str] = STOP_STRINGS) -> str:
    """Cut ``text`` at the earliest stop string (the stop string itself is removed)."""
    cut = len(text)
    for stop in stop_strings:
        idx = text.find(stop)
        if 0 <= idx < cut:
            cut = idx
    return text[:cut]
