r"""Metrics and aggregates for the bundled evaluation.

This module owns the numbers: unbiased pass@k, per-benchmark accuracy with a confidence interval,
and the paper's aggregates (docs/method.md §13). Pure Python; scores are in **percent** (0-100)
like the paper's tables, per-item scores are fractions in [0, 1].

* **pass@k** (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for ``n`` samples of which ``c``
  are correct, computed as a stable product; averaged over items. pass@1 equals the mean
  fraction correct, i.e. the paper's "pass@1 averaged over n samples" / "@1[n]".
* **Accuracy CI**: the 95% **Wilson score interval** with ``N`` = number of *items*. For greedy
  (one 0/1 outcome per item) this is the usual binomial Wilson interval. For scores averaged over
  ``n`` samples it is conservative: a per-item score ``s_i`` in [0, 1] with mean ``mu`` has
  variance at most ``mu (1 - mu)``, so treating items as Bernoulli trials over-states the
  variance (sampling noise is included, question-sampling noise dominates). Wilson stays
  sensible at 0% and 100%, where a bootstrap or normal interval collapses to a point, which
  matters for AIME-sized sets (30 items) with small models. :func:`paired_bootstrap_ci` gives a
  CI for the difference of two result files on the same items.
* **Aggregates**: Math Avg over the five math sets with an explicit convention:
  ``"/5"`` (the mean; Table S.5), ``"/6"`` (sum / 6, the quirk of the paper's Table 1: base
  146.10 / 6 = 24.35), ``"4sets"`` (mean without AIME25; Table 2, ablations). Science Avg =
  mean of greedy MMLU, MMLU-Pro, GPQA; Science Avg@1[4] = mean of their sampled scores;
  **Overall = mean(Math Avg, Science Avg, Science Avg@1[4])**. Every aggregate carries the
  convention it used in its label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

MathAvgConvention = Literal["/5", "/6", "4sets"]
MATH_AVG_CONVENTIONS: tuple[MathAvgConvention, ...] = ("/5", "/6", "4sets")
MATH_AVG_LABELS: dict[str, str] = {
    "/5": "Math Avg (/5, mean of 5 sets)",
    "/6": "Math Avg (/6, paper Table 1 convention)",
    "4sets": "Math Avg (4 sets, no AIME25; paper Table 2 / ablations)",
}

MATH_SETS: tuple[str, ...] = ("aime25", "math500", "gsm8k", "amc23", "minerva_math")
SCIENCE_SETS: tuple[str, ...] = ("mmlu", "mmlu_pro", "gpqa_diamond")
Z_95 = 1.959963984540054


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate for one item: ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples, ``c`` correct, ``1 <= k <= n``. Uses the product form
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` to avoid huge binomials.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k in percent over items given ``(n, c)`` per item."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one item")
    return 100.0 * sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def default_ks(n: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``n`` plus ``n`` itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def wilson_interval(p_hat: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p_hat`` (fraction) from ``n`` trials."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got {n}")
    if not (0.0 <= p_hat <= 1.0):
        raise ValueError(f"wilson_interval needs 0 <= p_hat <= 1, got {p_hat}")
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p_hat + z2 / (2 * n)) / denom
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z2 / (4 * n * n)) / denom
    # Clamp to [0, 1] and make sure rounding never leaves p_hat outside its own interval.
    return max(0.0, min(p_hat, centre - half)), min(1.0, max(p_hat, centre + half))


@dataclass(frozen=True)
class Accuracy:
    """Accuracy in percent with its 95% interval and the method used."""

    value: float
    ci_low: float
    ci_high: float
    num_items: int
    method: str = "wilson(items)"


def accuracy_with_ci(item_scores: Sequence[float], z: float = Z_95) -> Accuracy:
    """Mean of per-item scores (fractions) in percent with a Wilson interval over items."""
    if not item_scores:
        raise ValueError("accuracy_with_ci needs at least one item score")
    for s in item_scores:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"per-item scores must be fractions in [0, 1], got {s}")
    mean = sum(item_scores) / len(item_scores)
    lo, hi = wilson_interval(mean, len(item_scores), z)
    return Accuracy(100.0 * mean, 100.0 * lo, 100.0 * hi, len(item_scores))


def paired_bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean difference ``b - a`` (percent) over paired items and its percentile bootstrap CI.

    Items are resampled with replacement (numpy ``default_rng(seed)``, in chunks so MMLU-sized
    sets stay small in memory); deterministic for a given seed.
    """
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap_ci needs equal, non-empty lists ({len(a)}/{len(b)})")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = diffs.size
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 4_000_000 // n))
    means: list[np.ndarray] = []
    done = 0
    while done < resamples:
        m = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(m, n))
        means.append(diffs[idx].mean(axis=1))
        done += m
    all_means = np.concatenate(means)
    lo, hi = np.quantile(all_means, [(1 - level) / 2, (1 + level) / 2])
    return 100.0 * float(diffs.mean()), 100.0 * float(lo), 100.0 * float(hi)


def math_avg(scores: Mapping[str, float], convention: MathAvgConvention = "/5") -> float:
    """Math Avg of the per-benchmark math scores (percent) under ``convention``.

    ``"/5"``: mean of the five; ``"/6"``: their sum divided by six (paper Table 1);
    ``"4sets"``: mean of MATH500, GSM8K, AMC23, Minerva (no AIME25).
    """
    if convention not in MATH_AVG_CONVENTIONS:
        raise ValueError(
            f"unknown Math Avg convention {convention!r}; use one of {MATH_AVG_CONVENTIONS}"
        )
    names = MATH_SETS[1:] if convention == "4sets" else MATH_SETS
    missing = [n for n in names if n not in scores]
    if missing:
        raise KeyError(f"Math Avg ({convention}) needs scores for {missing}")
    total = sum(scores[n] for n in names)
    return total / 6.0 if convention == "/6" else total / len(names)


def science_avg(scores: Mapping[str, float]) -> float:
    """Mean of MMLU, MMLU-Pro and GPQA scores (percent), greedy or sampled alike."""
    missing = [n for n in SCIENCE_SETS if n not in scores]
    if missing:
        raise KeyError(f"Science Avg needs scores for {missing}")
    return sum(scores[n] for n in SCIENCE_SETS) / len(SCIENCE_SETS)


def overall(math_average: float, science_greedy_avg: float, science_sampled_avg: float) -> float:
    """Overall = mean(Math Avg, Science Avg, Science Avg@1[4]) (docs/method.md §13)."""
    return (math_average + science_greedy_avg + science_sampled_avg) / 3.0


@dataclass
class Aggregates:
    """All aggregates that the available scores allow; ``missing`` says what blocked the rest."""

    math_avg: dict[str, float] = field(default_factory=dict)
    """By convention (``"/5"``, ``"/6"``, ``"4sets"``)."""
    science_avg: float | None = None
    science_avg_sampled: float | None = None
    science_sampled_label: str = "Science Avg@1[4]"
    overall: dict[str, float] = field(default_factory=dict)
    """Overall by Math Avg convention."""
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "math_avg": dict(self.math_avg),
            "math_avg_labels": {k: MATH_AVG_LABELS[k] for k in self.math_avg},
            "science_avg": self.science_avg,
            "science_avg_sampled": self.science_avg_sampled,
            "science_sampled_label": self.science_sampled_label,
            "overall": dict(self.overall),
            "overall_labels": {k: f"Overall (with {MATH_AVG_LABELS[k]})" for k in self.overall},
            "missing": list(self.missing),
        }


def compute_aggregates(
    math_scores: Mapping[str, float],
    science_greedy: Mapping[str, float],
    science_sampled: Mapping[str, float],
    sampled_label: str = "Science Avg@1[4]",
) -> Aggregates:
    """Every aggregate computable from the given per-benchmark scores (percent)."""
    agg = Aggregates(science_sampled_label=sampled_label)
    for conv in MATH_AVG_CONVENTIONS:
        try:
            agg.math_avg[conv] = math_avg(math_scores, conv)
        except KeyError as exc:
            agg.missing.append(str(exc.args[0]))
    try:
        agg.science_avg = science_avg(science_greedy)
    except KeyError as exc:
        agg.missing.append(f"greedy: {exc.args[0]}")
    try:
        agg.science_avg_sampled = science_avg(science_sampled)
    except KeyError as exc:
        agg.missing.append(f"sampled: {exc.args[0]}")
    if agg.science_avg is not None and agg.science_avg_sampled is not None:
        for conv, value in agg.math_avg.items():
            agg.overall[conv] = overall(value, agg.science_avg, agg.science_avg_sampled)
    return agg
