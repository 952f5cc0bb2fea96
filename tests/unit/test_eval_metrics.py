"""Tests for rlp.eval.aggregates: pass@k, Wilson CI, paper aggregates (Table 1 / Table 2 rows)."""

from __future__ import annotations

import itertools
import math

import pytest

from rlp.eval.aggregates import (
    MATH_AVG_LABELS,
    accuracy_with_ci,
    compute_aggregates,
    default_ks,
    math_avg,
    mean_pass_at_k,
    overall,
    paired_bootstrap_ci,
    pass_at_k,
    science_avg,
    wilson_interval,
)


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 3, 1), (16, 5, 4), (100, 7, 10), (50, 0, 5), (20, 20, 3), (9, 4, 5)]
)
def test_pass_at_k_matches_binomial_formula(n: int, c: int, k: int) -> None:
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_1_is_fraction_correct() -> None:
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert mean_pass_at_k([(8, 3), (8, 8), (8, 0)], 1) == pytest.approx(100 * (3 / 8 + 1) / 3)


def test_pass_at_k_large_n_is_stable() -> None:
    value = pass_at_k(2000, 1, 1000)
    assert value == pytest.approx(0.5)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_default_ks() -> None:
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(0.5, 100)
    assert lo == pytest.approx(0.40383, abs=1e-4)
    assert hi == pytest.approx(0.59617, abs=1e-4)
    lo, hi = wilson_interval(0.0, 30)
    assert lo == 0.0
    assert hi == pytest.approx(0.11351, abs=1e-4)  # not degenerate at 0%
    lo, hi = wilson_interval(1.0, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.72246, abs=1e-4)


@pytest.mark.parametrize("p_hat", [0.0, 1.0, 0.3])
def test_wilson_interval_contains_estimate(p_hat: float) -> None:
    # Rounding must never put the estimate outside its interval (negative plot error bars).
    for n in range(1, 200):
        lo, hi = wilson_interval(p_hat, n)
        assert 0.0 <= lo <= p_hat <= hi <= 1.0


def test_accuracy_with_ci_uses_items_as_trials() -> None:
    acc = accuracy_with_ci([1, 0, 1, 1])
    assert acc.value == pytest.approx(75.0)
    lo, hi = wilson_interval(0.75, 4)
    assert (acc.ci_low, acc.ci_high) == pytest.approx((100 * lo, 100 * hi))
    frac = accuracy_with_ci([0.5, 0.25, 1.0, 0.0])
    assert frac.value == pytest.approx(43.75)
    assert frac.ci_low < frac.value < frac.ci_high
    assert frac.num_items == 4
    with pytest.raises(ValueError):
        accuracy_with_ci([])
    with pytest.raises(ValueError):
        accuracy_with_ci([1.5])


# Table 1 of the paper (Qwen3-1.7B-Base): per-benchmark scores and printed aggregates.
TABLE1 = {
    "base": {
        "math": (2.25, 48.45, 54.16, 25.94, 15.30),
        "greedy": (50.08, 28.17, 25.25),
        "sampled": (44.85, 23.95, 27.52),
        "math_avg6": 24.35,
        "sci": 34.50,
        "sci4": 32.11,
        "overall": 30.32,
        "overall5": 31.94,
    },
    "CPT": {
        "math": (3.96, 57.52, 72.85, 31.25, 19.03),
        "greedy": (41.95, 27.81, 26.26),
        "sampled": (40.00, 24.61, 24.75),
        "math_avg6": 30.77,
        "sci": 32.01,
        "sci4": 29.79,
        "overall": 30.85,
        "overall5": 32.91,
    },
    "RLP": {
        "math": (5.02, 58.48, 74.48, 31.25, 21.19),
        "greedy": (56.14, 34.62, 28.28),
        "sampled": (52.18, 30.80, 27.02),
        "math_avg6": 31.74,
        "sci": 39.68,
        "sci4": 36.67,
        "overall": 36.03,
        "overall5": 38.14,
    },
    "RLP+Post": {
        "math": (7.05, 64.30, 80.50, 36.50, 27.80),
        "greedy": (61.50, 42.40, 33.33),
        "sampled": (61.00, 41.30, 34.97),
        "math_avg6": 36.03,
        "sci": 45.74,
        "sci4": 45.76,
        "overall": 42.51,
        "overall5": 44.91,
    },
}
MATH_NAMES = ("aime25", "math500", "gsm8k", "amc23", "minerva_math")
SCI_NAMES = ("mmlu", "mmlu_pro", "gpqa_diamond")


@pytest.mark.parametrize("column", list(TABLE1))
def test_table1_row_reproduced_with_div6_convention(column: str) -> None:
    row = TABLE1[column]
    agg = compute_aggregates(
        dict(zip(MATH_NAMES, row["math"])),
        dict(zip(SCI_NAMES, row["greedy"])),
        dict(zip(SCI_NAMES, row["sampled"])),
    )
    # The paper rounds half up (216.15 / 6 = 36.025 -> 36.03): compare within half a cent.
    half = 0.005 + 1e-9
    assert agg.math_avg["/6"] == pytest.approx(row["math_avg6"], abs=half)
    assert agg.science_avg == pytest.approx(row["sci"], abs=half)
    assert agg.science_avg_sampled == pytest.approx(row["sci4"], abs=half)
    assert agg.overall["/6"] == pytest.approx(row["overall"], abs=half)
    # With the /5 convention the numbers are those listed in docs/method.md §13.
    assert agg.overall["/5"] == pytest.approx(row["overall5"], abs=half)
    assert agg.missing == []


def test_base_row_explicit_numbers() -> None:
    math_scores = dict(zip(MATH_NAMES, TABLE1["base"]["math"]))
    assert math_avg(math_scores, "/6") == pytest.approx(146.10 / 6)
    assert math_avg(math_scores, "/5") == pytest.approx(146.10 / 5)
    assert overall(24.35, 34.50, 32.11) == pytest.approx(30.32, abs=0.005)


def test_table2_four_set_math_avg_and_overall() -> None:
    # Nemotron-Nano-12B-v2 base column: Math Avg over 4 sets (no AIME25).
    math_scores = {"math500": 79.95, "gsm8k": 72.31, "amc23": 70.63, "minerva_math": 22.61}
    assert round(math_avg(math_scores, "4sets"), 2) == 61.38
    sci = science_avg({"mmlu": 54.12, "mmlu_pro": 24.16, "gpqa_diamond": 25.25})
    sci4 = science_avg({"mmlu": 48.01, "mmlu_pro": 27.13, "gpqa_diamond": 22.47})
    assert round(sci, 2) == 34.51 and round(sci4, 2) == 32.54
    assert round(overall(math_avg(math_scores, "4sets"), sci, sci4), 2) == 42.81


def test_conventions_are_labelled_and_validated() -> None:
    assert "/6" in MATH_AVG_LABELS["/6"] and "Table 1" in MATH_AVG_LABELS["/6"]
    assert "/5" in MATH_AVG_LABELS["/5"]
    with pytest.raises(ValueError, match="convention"):
        math_avg(dict.fromkeys(MATH_NAMES, 1.0), "/7")  # type: ignore[arg-type]


def test_aggregates_report_missing_benchmarks() -> None:
    agg = compute_aggregates({"gsm8k": 50.0}, {"mmlu": 40.0}, {})
    assert agg.math_avg == {}
    assert agg.science_avg is None and agg.overall == {}
    text = " ".join(agg.missing)
    assert "aime25" in text and "mmlu_pro" in text
    # AIME25 missing still allows the 4-set convention.
    agg4 = compute_aggregates({n: 10.0 for n in MATH_NAMES[1:]}, {}, {})
    assert agg4.math_avg == {"4sets": 10.0}


def test_paired_bootstrap_ci_is_deterministic_and_brackets_difference() -> None:
    a = [0.0, 1.0, 0.0, 1.0, 0.5] * 20
    b = [1.0, 1.0, 0.0, 1.0, 1.0] * 20
    d, lo, hi = paired_bootstrap_ci(a, b, resamples=500, seed=1)
    assert d == pytest.approx(30.0)
    assert lo < d < hi
    assert paired_bootstrap_ci(a, b, resamples=500, seed=1) == (d, lo, hi)
    same = paired_bootstrap_ci(a, a, resamples=100)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0], [1.0, 0.0])
