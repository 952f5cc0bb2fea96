r"""Answer extraction and correctness checking for the bundled evaluation.

This module owns *how a generation is graded*: pulling the final answer out of a completion,
normalising it, and deciding whether it matches the gold answer. It knows nothing about models,
prompts or aggregation.

Math answers
------------
:func:`extract_math_answer` tries, in order (the first that yields something wins; the method is
recorded with every sample):

1. ``boxed``: the **last** ``\boxed{...}`` or ``\fbox{...}`` with balanced nested braces (also
   ``\boxed 5``). Unbalanced boxes (a completion cut off mid-answer) are skipped.
2. ``answer_is``: the last "the (final) answer is X" / "Answer: X", up to the end of the line or
   sentence.
3. ``hashes``: the last "#### X" line (GSM8K solution style).
4. ``last_number``: the last number in the completion (``-1,234.5``, ``3/4``).

No candidate -> status ``no_answer``. :func:`normalize_math_answer` then strips what math-verify
would otherwise trip on: surrounding ``$``/``\(...\)``, dollar signs, ``\left``/``\right``,
spacing macros, degree marks, thousands separators (``1,000`` -> ``1000`` only when the string is
a single number), a trailing unit after a number (``5.4 \text{ cents}``, ``6.5 \mathrm{~m}``,
``18 dollars``), ``\text{X}`` wrappers, scientific ``4.5e33`` -> ``4.5 \times 10^{33}``
(math-verify reads ``e`` as Euler's number) and a trailing period.

Equivalence: identical normalised strings are correct at once; otherwise math-verify 0.9.0
decides with ``verify(parse(gold), parse(pred))`` (**gold first**), both wrapped as
``$\boxed{...}$`` so its LaTeX extractor sees them. math-verify's own timeouts use
``signal.alarm``, which fails off the main thread (and a swallowed ``ValueError`` there silently
scores everything 0). So we call it with ``parsing_timeout=None`` and
``timeout_seconds=None`` and enforce our own limit in :class:`MathVerifier`: a small pool of
worker *processes*; a pair that runs past ``timeout_s`` gets its worker killed and replaced and is
recorded as ``timeout`` (counted incorrect). Exceptions inside math-verify are recorded as
``error`` (counted incorrect, reported separately), never turned into a silent 0. Each worker
checks at start-up that ``1/2 == 0.5`` and ``3 != 4`` and refuses to run otherwise.

Multiple-choice answers
-----------------------
:func:`extract_choice_letter` accepts only letters valid for the item (``A``-``D`` for four
choices, up to ``J`` for MMLU-Pro). Patterns in priority order (last match of the first pattern
that matches wins): "answer is (C)" / "Answer: C" / "correct option: **C**"; ``\boxed{C}``;
``**C**``; "(C)"; a line starting "C." / "C)" / "C:"; a trailing standalone letter; finally the
choice text itself (the answer segment or the last line equals exactly one choice's text).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import re
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["correct", "incorrect", "no_answer", "timeout", "error"]
STATUSES: tuple[str, ...] = ("correct", "incorrect", "no_answer", "timeout", "error")

# ---------------------------------------------------------------------------------------------
# Math extraction
# ---------------------------------------------------------------------------------------------

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_SPACE = re.compile(r"\\boxed +([^\s${}]+)")
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is\s*:?|:|=)\s*(.+)", re.IGNORECASE
)
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Extraction:
    """An extracted answer (``None`` when nothing was found) and the rule that found it.

    ``start`` is the index in the completion where the matched answer statement begins (the
    ``\\boxed``, "the answer is", ``####``, the number or the letter pattern); ``None`` when
    nothing was found. :mod:`rlp.eval.chains` cuts the reasoning before it. It takes no part
    in equality.
    """

    answer: str | None
    method: str
    start: int | None = field(default=None, compare=False)


def match_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (``None`` if unbalanced)."""
    depth = 0
    i = open_idx
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2  # escaped brace \{ or \} is literal text, not grouping
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_last_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` / ``\fbox{...}`` (or ``\boxed x``)."""
    found = _last_boxed(text)
    return None if found is None else found[1]


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start index, content) of the last complete box, nested ``\\boxed{\\boxed{x}}`` unwrapped."""
    best: tuple[int, str] | None = None
    for m in _BOX_START.finditer(text):
        close = match_brace(text, m.end() - 1)
        if close is None:
            continue
        content = text[m.end() : close]
        if best is None or m.start() > best[0]:
            best = (m.start(), content)
    for m in _BOX_SPACE.finditer(text):
        if best is None or m.start() > best[0]:
            best = (m.start(), m.group(1))
    if best is None:
        return None
    content = best[1].strip()
    # \boxed{\boxed{5}} -> 5
    inner = _BOX_START.match(content)
    if inner and match_brace(content, inner.end() - 1) == len(content) - 1:
        nested = find_last_boxed(content)
        return None if nested is None else (best[0], nested)
    return best[0], content


def _clean_answer_segment(segment: str) -> str:
    segment = segment.split("\n", 1)[0]
    # End of sentence: a period followed by whitespace/end that is not a decimal point.
    m = re.search(r"(?<!\d)\.(?:\s|$)|(?<=\d)\.(?:\s|$)", segment)
    if m:
        segment = segment[: m.start()]
    segment = segment.strip().strip("*").strip()
    return segment


def extract_math_answer(text: str, *, allow_last_number: bool = True) -> Extraction:
    """Extract the final answer of a math completion (see the module docstring for the order)."""
    boxed = _last_boxed(text)
    if boxed and boxed[1]:
        return Extraction(boxed[1], "boxed", boxed[0])
    matches = list(_ANSWER_IS.finditer(text))
    for m in reversed(matches):
        seg = _clean_answer_segment(m.group(1))
        if seg:
            return Extraction(seg, "answer_is", m.start())
    hashes = list(_HASHES.finditer(text))
    if hashes:
        seg = hashes[-1].group(1).strip()
        if seg:
            return Extraction(seg, "hashes", hashes[-1].start())
    if allow_last_number:
        numbers = list(_NUMBER.finditer(text))
        if numbers:
            return Extraction(numbers[-1].group(0), "last_number", numbers[-1].start())
    return Extraction(None, "none")


_SIMPLE_NUMBER = r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)"
_NUMERIC_HEAD = re.compile(
    rf"^(?:{_SIMPLE_NUMBER}|[-+]?\\frac\{{?\d+\}}?\{{?\d+\}}?|{_SIMPLE_NUMBER}/\d+)"
    rf"(?:\s*\\times\s*10\^\{{?[-+]?\d+\}}?)?$"
)
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SCIENTIFIC = re.compile(r"^([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)$")
_TRAILING_WORDS = re.compile(rf"^({_SIMPLE_NUMBER}(?:/\d+)?)\s*[A-Za-z][A-Za-z .]*$")
_FUNCS = re.compile(r"(?<![\\A-Za-z])(arcsin|arccos|arctan|sin|cos|tan|log|ln|exp)\s*\(")


def _strip_trailing_macro(s: str) -> str:
    """Drop a trailing ``\\text{unit}`` (or ``\\mathrm{...}``) when what precedes is a number."""
    for m in reversed(list(_TEXT_MACRO.finditer(s))):
        close = match_brace(s, m.end() - 1)
        if close is None or close != len(s) - 1:
            continue
        head = s[: m.start()].strip()
        if head and _NUMERIC_HEAD.match(head.replace(" ", "")):
            return head
        break
    return s


def _unwrap_text_macros(s: str) -> str:
    out = s
    while True:
        m = _TEXT_MACRO.search(out)
        if not m:
            return out
        close = match_brace(out, m.end() - 1)
        if close is None:
            return out
        out = out[: m.start()] + out[m.end() : close] + out[close + 1 :]


def normalize_math_answer(answer: str) -> str:
    """Normalise an extracted (or gold) math answer before comparison; see the module doc."""
    s = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[!,;:](?![A-Za-z])|\\displaystyle|\\quad|\\qquad", " ", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "%")
    # Degrees: 30^\circ, 30^{\circ}, 30°, 30 degrees.
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree", "", s)
    s = re.sub(r"\s*\b(?:degrees?|deg)\.?$", "", s)
    s = s.replace("{,}", "")
    s = s.strip()
    s = _strip_trailing_macro(s)
    s = s.rstrip(".").strip()
    s = re.sub(r"\s+", " ", s)
    m = _TRAILING_WORDS.match(s)
    if m:
        s = m.group(1)
    s = _unwrap_text_macros(s).strip()
    s = re.sub(r"\s+", " ", s)
    # Minerva-style Python spellings: np.arcsin(...), -1./3.
    s = re.sub(r"\b(?:np|math)\.", "", s)
    s = _FUNCS.sub(lambda mm: "\\" + mm.group(1) + "(", s)
    s = re.sub(r"(\d)\.(?=[^\d]|$)", r"\1", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    sci = _SCIENTIFIC.match(s)
    if sci:
        s = f"{sci.group(1)} \\times 10^{{{int(sci.group(2))}}}"
    return s.strip().rstrip(".").strip()


def _compact(s: str) -> str:
    return re.sub(r"\s+", "", s)


# ---------------------------------------------------------------------------------------------
# math-verify in worker processes, with our own timeout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyOutcome:
    """Result of comparing one (gold, prediction) pair."""

    status: Status
    detail: str = ""


class VerifierError(RuntimeError):
    """The verifier workers could not start or their self-check failed."""


def _wrap_for_math_verify(answer: str) -> str:
    return "$\\boxed{" + answer + "}$"


def _verify_pair(parse: Any, verify: Any, gold: str, pred: str) -> tuple[bool, str]:
    gold_parsed = parse(_wrap_for_math_verify(gold), parsing_timeout=None, raise_on_error=True)
    pred_parsed = parse(_wrap_for_math_verify(pred), parsing_timeout=None, raise_on_error=True)
    if not gold_parsed:
        # Gold that math-verify cannot read: fall back to exact (whitespace-free) comparison.
        return _compact(gold) == _compact(pred), "gold_unparsed"
    if not pred_parsed:
        return False, "pred_unparsed"
    ok = verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True)
    return bool(ok), ""


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Worker loop: import math-verify, self-check, then answer ``(task_id, gold, pred)``."""
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from math_verify import parse, verify

        checks = (
            _verify_pair(parse, verify, "1/2", "0.5")[0],
            not _verify_pair(parse, verify, "3", "4")[0],
        )
        if not all(checks):
            conn.send(("fatal", f"math-verify self-check failed: {checks}"))
            return
    except Exception as exc:  # report start-up failures to the parent, which raises
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, gold, pred = msg
        try:
            ok, detail = _verify_pair(parse, verify, gold, pred)
            conn.send((task_id, "correct" if ok else "incorrect", detail))
        except Exception as exc:  # recorded as status "error", never as a silent 0
            conn.send((task_id, "error", f"{type(exc).__name__}: {str(exc)[:200]}"))


@dataclass
class _Worker:
    proc: Any
    conn: multiprocessing.connection.Connection
    state: Literal["starting", "idle", "busy"] = "starting"
    task: int | None = None
    deadline: float = 0.0


@dataclass
class MathVerifier:
    """A pool of math-verify worker processes with a per-pair wall-clock timeout.

    Use as a context manager (or call :meth:`close`). Results are cached by normalised pair.
    ``num_workers`` processes are started lazily on first use with the ``spawn`` start method
    (safe when the parent holds threads, e.g. torch); a worker whose pair exceeds ``timeout_s``
    is killed and replaced, and the pair is reported as ``timeout``.
    """

    num_workers: int = 2
    timeout_s: float = 10.0
    start_timeout_s: float = 180.0
    context: str = "spawn"
    stats: Counter[str] = field(default_factory=Counter)
    _workers: list[_Worker] = field(default_factory=list, repr=False)
    _cache: dict[tuple[str, str], VerifyOutcome] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"MathVerifier needs num_workers >= 1, got {self.num_workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"MathVerifier timeout_s must be > 0, got {self.timeout_s}")

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        ctx = multiprocessing.get_context(self.context)
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="rlp-math-verify")
        proc.start()
        child.close()
        return _Worker(proc, parent, deadline=time.monotonic() + self.start_timeout_s)

    def _kill(self, worker: _Worker) -> None:
        try:
            worker.proc.kill()
            worker.proc.join(timeout=5)
        finally:
            worker.conn.close()

    def close(self) -> None:
        """Stop all workers (they hold no state, so they are simply killed)."""
        for w in self._workers:
            if w.proc.is_alive():
                w.proc.kill()
        for w in self._workers:
            w.proc.join(timeout=5)
            w.conn.close()
        self._workers.clear()

    def check(self, gold: str, pred: str) -> VerifyOutcome:
        """Compare one pair (see :meth:`check_many`)."""
        return self.check_many([(gold, pred)])[0]

    def check_many(self, pairs: Sequence[tuple[str, str]]) -> list[VerifyOutcome]:
        """Compare ``(gold, prediction)`` pairs of *extracted* answers, in parallel.

        Normalises both sides, short-cuts identical strings, then asks math-verify.
        """
        results: list[VerifyOutcome | None] = [None] * len(pairs)
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (gold, pred) in enumerate(pairs):
            key = (normalize_math_answer(gold), normalize_math_answer(pred))
            if not key[1]:
                results[i] = VerifyOutcome("incorrect", "empty_after_normalisation")
            elif _compact(key[0]) == _compact(key[1]):
                results[i] = VerifyOutcome("correct", "exact")
            elif key in self._cache:
                results[i] = self._cache[key]
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            keys = list(todo)
            for key, outcome in zip(keys, self._run(keys)):
                self._cache[key] = outcome
                for i in todo[key]:
                    results[i] = outcome
        out = [r for r in results if r is not None]
        assert len(out) == len(pairs)
        self.stats.update(r.status for r in out)
        return out

    def _run(self, keys: Sequence[tuple[str, str]]) -> list[VerifyOutcome]:
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        outcomes: list[VerifyOutcome | None] = [None] * len(keys)
        pending = deque(range(len(keys)))
        while pending or any(w.state == "busy" for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                if w.state == "idle" and pending:
                    task = pending.popleft()
                    w.conn.send((task, *keys[task]))
                    w.state, w.task, w.deadline = "busy", task, now + self.timeout_s
            waiting = [w for w in self._workers if w.state in ("busy", "starting")]
            if not waiting:
                continue
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = multiprocessing.connection.wait([w.conn for w in waiting], timeout=wait_s)
            for w in waiting:
                if w.conn in ready:
                    self._receive(w, outcomes)
            now = time.monotonic()
            for idx, w in enumerate(self._workers):
                if w.state in ("busy", "starting") and now >= w.deadline and w.conn not in ready:
                    if w.state == "starting":
                        self._kill(w)
                        raise VerifierError(
                            f"math-verify worker did not start within {self.start_timeout_s:.0f}s"
                        )
                    assert w.task is not None
                    outcomes[w.task] = VerifyOutcome("timeout", f"> {self.timeout_s:g}s")
                    self._kill(w)
                    self._workers[idx] = self._spawn()
        return [o if o is not None else VerifyOutcome("error", "lost") for o in outcomes]

    def _receive(self, w: _Worker, outcomes: list[VerifyOutcome | None]) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError) as exc:
            w.proc.join(timeout=5)
            code = w.proc.exitcode
            if w.state == "starting":
                raise VerifierError(
                    f"math-verify worker exited during start-up (exit code {code}). Workers use "
                    "the 'spawn' start method, which re-imports the main script: guard the "
                    'script\'s top-level code with `if __name__ == "__main__":`.'
                ) from exc
            assert w.task is not None
            outcomes[w.task] = VerifyOutcome("error", f"worker died (exit code {code})")
            self._kill(w)
            self._workers[self._workers.index(w)] = self._spawn()
            return
        if w.state == "starting":
            if msg[0] != "ready":
                self._kill(w)
                raise VerifierError(f"math-verify worker failed to start: {msg[1]}")
            w.state = "idle"
            return
        task, status, detail = msg
        outcomes[task] = VerifyOutcome(status, detail)
        w.state, w.task = "idle", None


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

_MC_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Keyword case-insensitive, letter case-sensitive ("the answer is a prime" is no answer).
    (
        "answer_is",
        re.compile(
            r"(?i:answer|choice|option)\s*(?i:is|:|=)\s*:?\s*(?:\*\*|\\boxed\{|\\text\{)?"
            r"\s*\(?([A-Z])\)?(?![A-Za-z0-9])"
        ),
    ),
    ("boxed", re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-Z])\)?\s*\}?\s*\}")),
    ("bold", re.compile(r"\*\*\s*\(?([A-Z])\)?[.:)]?\s*\*\*")),
    ("paren", re.compile(r"\(([A-Z])\)")),
    ("line_start", re.compile(r"(?m)^\s*([A-Z])\s*[.):](?:\s|$)")),
    ("trailing", re.compile(r"(?:^|[\s:])\(?([A-Z])\)?[\s.!*]*$")),
)


def _norm_choice_text(s: str) -> str:
    s = s.strip().strip("$*").strip()
    s = re.sub(r"\s+", " ", s).rstrip(".").strip().lower()
    return s


def extract_choice_letter(
    text: str, valid_letters: str, choices: Sequence[str] | None = None
) -> Extraction:
    """Extract the chosen letter (restricted to ``valid_letters``) from an MC completion."""
    if not valid_letters:
        raise ValueError("extract_choice_letter needs the item's valid letters (e.g. 'ABCD')")
    valid = set(valid_letters.upper())
    for method, pattern in _MC_PATTERNS:
        found = [m for m in pattern.finditer(text) if m.group(1) in valid]
        if found:
            return Extraction(found[-1].group(1), method, found[-1].start())
    if choices:
        return _match_choice_text(text, choices, valid_letters)
    return Extraction(None, "none")


def _match_choice_text(text: str, choices: Sequence[str], valid_letters: str) -> Extraction:
    candidates: list[tuple[str, int]] = []
    m = list(re.finditer(r"answer\s*(?:is|:)\s*(.+)", text, re.IGNORECASE))
    if m:
        candidates.append((_clean_answer_segment(m[-1].group(1)), m[-1].start()))
    stripped = text.rstrip()
    lines = [ln for ln in stripped.splitlines() if ln.strip()]
    if lines:
        candidates.append((lines[-1], stripped.rfind(lines[-1])))
    normed = [_norm_choice_text(c) for c in choices]
    for cand, start in candidates:
        c = _norm_choice_text(cand)
        hits = [i for i, n in enumerate(normed) if n and n == c]
        if len(hits) == 1 and valid_letters[hits[0]]:
            return Extraction(valid_letters[hits[0]], "choice_text", start)
    return Extraction(None, "none")


# ---------------------------------------------------------------------------------------------
# Per-sample records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleScore:
    """Grading of one generated sample."""

    extracted: str | None
    method: str
    status: Status
    detail: str = ""

    @property
    def correct(self) -> bool:
        return self.status == "correct"

    def to_dict(self) -> dict[str, Any]:
        return {
            "extracted": self.extracted,
            "method": self.method,
            "status": self.status,
            "detail": self.detail,
        }


def score_mc(
    text: str, gold_letter: str, valid_letters: str, choices: Sequence[str] | None = None
) -> SampleScore:
    """Grade one multiple-choice completion."""
    ext = extract_choice_letter(text, valid_letters, choices)
    if ext.answer is None:
        return SampleScore(None, ext.method, "no_answer")
    status: Status = "correct" if ext.answer == gold_letter.upper() else "incorrect"
    return SampleScore(ext.answer, ext.method, status)


def score_math_batch(
    verifier: MathVerifier, golds: Sequence[str], texts: Sequence[str]
) -> list[SampleScore]:
    """Grade math completions ``texts[i]`` against ``golds[i]`` (extraction + verification)."""
    if len(golds) != len(texts):
        raise ValueError(f"score_math_batch: {len(golds)} golds but {len(texts)} texts")
    extractions = [extract_math_answer(t) for t in texts]
    pairs = [(g, e.answer) for g, e in zip(golds, extractions) if e.answer is not None]
    outcomes = iter(verifier.check_many(pairs))
    scores: list[SampleScore] = []
    for e in extractions:
        if e.answer is None:
            scores.append(SampleScore(None, e.method, "no_answer"))
        else:
            o = next(outcomes)
            scores.append(SampleScore(e.answer, e.method, o.status, o.detail))
    return scores
