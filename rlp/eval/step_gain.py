r"""Step information gain: how much each reasoning step raises the belief in the gold answer.

This module owns the per-step information gain of a chain and its summary. For a math completion
with gold answer ``y``, question prompt ``q`` and reasoning steps ``s_1 .. s_K``
(:func:`rlp.eval.chains.split_steps`, grouped to at most ``max_steps`` by
:func:`rlp.eval.chains.group_steps`; the reasoning is the text before the final-answer statement,
or the whole completion when no answer was extracted):

    L_k  = log p(y + "}" | forced_prompt(q, s_1 .. s_k))          k = 0 .. K
    IG_k = L_k - L_{k-1}                                            k = 1 .. K

where ``forced_prompt`` appends the benchmark's answer cue ``\nThe final answer is $\boxed{`` and
the target ``y + "}"`` (the gold answer and the brace that closes the box, so that a prefix of a
longer number does not count as the answer) is tokenized on its own, so every ``L_k`` scores the
same target tokens. ``L_k`` is the teacher-forced sum of the target's token log-probs
(:meth:`rlp.eval.generation.ChainModel.score`: :func:`rlp.model.logprobs.score_sequences` on the
megatron backend, the logits' ``log_softmax`` on the transformers backend). Sequences longer than
the model's positions (plus the last, predicted token) are cut from the left.

**Exact telescoping.** Each ``L_k`` is rounded to the grid of multiples of ``2**-30`` nats
(:data:`LOGP_GRID`; far below fp32 resolution). Grid values of magnitude below ``2**21`` make
every difference and every partial sum exact in float64, so ``sum(IG_1..IG_K) == L_K - L_0``
holds with ``==``, in any summation order.

Summary, separately for correct and incorrect completions (by the completion's own graded
answer; no answer counts as incorrect) and for all: chains, mean steps per chain, **mean total
IG per chain** (``L_K - L_0``), **mean IG per step** (pooled over all steps), the **percentage of
steps with positive IG**, and the mean ``L_0`` / ``L_K``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlp.eval.chains import ANSWER_CLOSERS, Completion, forced_prompt, group_steps, split_steps
from rlp.eval.generation import ChainModel

LOGP_GRID = 2.0**-30
"""Resolution (nats) of the per-prefix log-likelihoods; makes the step gains telescope exactly."""
_MAX_ABS_LOGP = 2.0**21


@dataclass(frozen=True)
class StepGainSettings:
    """How chains are cut into steps and scored."""

    max_steps: int = 16
    """Steps beyond this are merged into this many groups of consecutive steps."""
    sequences_per_call: int = 64
    """Teacher-forced sequences per ``score`` call."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.sequences_per_call < 1:
            raise ValueError("sequences_per_call must be >= 1")

    def fingerprint(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps}


def on_grid(logp: float) -> float:
    """``logp`` rounded to the nearest multiple of :data:`LOGP_GRID` (exact float64)."""
    if not abs(logp) < _MAX_ABS_LOGP:
        raise ValueError(f"log-likelihood {logp} is outside the exact range (|x| < 2**21)")
    return round(logp / LOGP_GRID) * LOGP_GRID


def step_gains(logps: Sequence[float]) -> list[float]:
    """``IG_k = L_k - L_{k-1}`` for grid values ``L_0 .. L_K`` (exact; see the module doc)."""
    return [b - a for a, b in zip(logps, logps[1:])]


def chain_steps(c: Completion, max_steps: int) -> list[str]:
    """The (grouped) steps of a completion's reasoning (the whole text if it has no answer)."""
    reasoning = c.reasoning()
    return group_steps(split_steps(c.text if reasoning is None else reasoning), max_steps)


def step_gain_completions(
    model: ChainModel, completions: Sequence[Completion], settings: StepGainSettings
) -> list[dict[str, Any]]:
    """One record per completion (same order): steps, ``L_0..L_K``, step gains, total gain."""
    records: list[dict[str, Any]] = []
    sequences: list[list[int]] = []
    spans: list[tuple[int, int, int]] = []  # (record, first sequence, target length)
    for c in completions:
        rec: dict[str, Any] = {
            "run": c.run,
            "index": c.index,
            "id": c.item_id,
            "sample": c.sample,
            "correct": c.correct,
        }
        records.append(rec)
        if c.kind != "math":
            raise ValueError(f"step information gain needs math completions, got {c.benchmark}")
        steps = chain_steps(c, settings.max_steps)
        if not steps:
            rec.update(eligible=False, skip="no_steps")
            continue
        target = model.encode(c.gold.strip() + ANSWER_CLOSERS["math"])
        rec.update(eligible=True, steps=len(steps), step_chars=[len(s) for s in steps])
        spans.append((len(records) - 1, len(sequences), len(target)))
        for k in range(len(steps) + 1):
            context = model.encode(
                forced_prompt(c.prompt, "".join(steps[:k]), "math"), special=True
            )
            seq = context + target
            if model.max_positions is not None and len(seq) > model.max_positions + 1:
                seq = seq[-(model.max_positions + 1) :]
            sequences.append(seq)
    logps: list[list[float]] = []
    for start in range(0, len(sequences), settings.sequences_per_call):
        logps.extend(model.score(sequences[start : start + settings.sequences_per_call]))
    for owner, first, n_target in spans:
        rec = records[owner]
        k_count = rec["steps"] + 1
        ls = [on_grid(sum(lp[-n_target:])) for lp in logps[first : first + k_count]]
        gains = step_gains(ls)
        rec.update(logp=ls, step_gain=gains, total_gain=ls[-1] - ls[0])
    return records


def _group_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    gains = [g for r in records for g in r["step_gain"]]
    n = len(records)
    return {
        "chains": n,
        "steps": len(gains),
        "mean_steps": len(gains) / n if n else None,
        "mean_total_gain": sum(r["total_gain"] for r in records) / n if n else None,
        "mean_step_gain": sum(gains) / len(gains) if gains else None,
        "positive_steps_pct": 100.0 * sum(g > 0 for g in gains) / len(gains) if gains else None,
        "mean_logp_start": sum(r["logp"][0] for r in records) / n if n else None,
        "mean_logp_end": sum(r["logp"][-1] for r in records) / n if n else None,
    }


def summarize_step_gain(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Summary for correct, incorrect and all scored completions (nats; see the module doc)."""
    scored = [r for r in records if r.get("eligible")]
    return {
        "completions": len(records),
        "skipped": len(records) - len(scored),
        "correct": _group_summary([r for r in scored if r["correct"]]),
        "incorrect": _group_summary([r for r in scored if not r["correct"]]),
        "all": _group_summary(scored),
    }
