"""Tests for rlp.eval.report (and runner.build_results): JSON, Markdown, PNG, comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlp.eval.benchmarks import PAPER_BENCHMARKS, BenchmarkItem, get_spec
from rlp.eval.report import (
    _draw_early_answering,
    _draw_pass_at_k,
    _new_figure,
    aggregate_rows,
    compare_results,
    load_results,
    plot_accuracy,
    plot_comparison,
    render_markdown,
    write_reports,
)
from rlp.eval.runner import EvalSettings, build_results, plan_runs


def _make_results(correct_per_item: dict[str, list[int]], label: str) -> dict[str, Any]:
    """Results for all paper benchmarks; ``correct_per_item[run_key]`` lists num_correct."""
    settings = EvalSettings(num_samples=4)
    runs = plan_runs(PAPER_BENCHMARKS, settings)
    items: dict[str, list[BenchmarkItem]] = {}
    records = []
    for run in runs:
        spec = get_spec(run.benchmark)
        counts = correct_per_item[run.key]
        items[run.benchmark] = [
            BenchmarkItem(
                f"{run.benchmark}-{i}",
                "q",
                ("a", "b", "c", "d") if spec.kind == "mc" else None,
                "A" if spec.kind == "mc" else "1",
                run.benchmark,
            )
            for i in range(len(counts))
        ]
        for i, c in enumerate(counts):
            statuses = ["correct"] * c + ["incorrect"] * (run.num_samples - c)
            records.append(
                {
                    "type": "item",
                    "run": run.key,
                    "index": i,
                    "id": f"{run.benchmark}-{i}",
                    "gold": "1",
                    "num_samples": run.num_samples,
                    "num_correct": c,
                    "samples": [
                        {"text": "", "extracted": "1", "method": "boxed", "status": s, "detail": ""}
                        for s in statuses
                    ],
                }
            )
    return build_results(runs, items, records, settings, label=label)


def _counts(shift: int) -> dict[str, list[int]]:
    runs = plan_runs(PAPER_BENCHMARKS, EvalSettings(num_samples=4))
    out = {}
    for r in runs:
        n = r.num_samples
        out[r.key] = [min(n, (i + shift) % (n + 1)) for i in range(10)]
    return out


@pytest.fixture
def results_a() -> dict[str, Any]:
    return _make_results(_counts(0), "base")


@pytest.fixture
def results_b() -> dict[str, Any]:
    return _make_results(_counts(1), "rlp")


def test_build_results_structure(results_a: dict[str, Any]) -> None:
    assert results_a["format"] == "rlp-eval/v1"
    assert len(results_a["runs"]) == 5 + 2 * 3
    gsm = results_a["runs"]["gsm8k:sampled"]
    # counts 0,1,2,3,4,0,1,2,3,4 of 4 -> mean 0.5
    assert gsm["accuracy"] == pytest.approx(50.0)
    assert gsm["pass_at_k"]["4"] == pytest.approx(80.0)
    assert gsm["status_counts"]["correct"] == 20
    agg = results_a["aggregates"]
    assert agg["math_avg"]["/6"] == pytest.approx(5 * 50.0 / 6)
    assert agg["overall"]["/5"] == pytest.approx(50.0)
    assert agg["science_sampled_label"] == "Science Avg@1[4]"
    assert len(results_a["items"]) == 10 * 11


def test_markdown_labels_conventions(results_a: dict[str, Any]) -> None:
    md = render_markdown(results_a)
    assert md.startswith("# Evaluation: base")
    for text in (
        "MMLU@1[4]",
        "GPQA",
        "Math Avg (/5",
        "Math Avg (/6, paper Table 1",
        "Overall (Math Avg /5)",
        "Overall (Math Avg /6)",
        "Science Avg@1[4]",
        "Wilson",
    ):
        assert text in md
    labels = [label for label, _ in aggregate_rows(results_a["aggregates"])]
    assert len(labels) == len(set(labels)) == 6


def test_markdown_reports_missing_aggregates(results_a: dict[str, Any]) -> None:
    partial = dict(results_a)
    partial["aggregates"] = {"math_avg": {}, "overall": {}, "missing": ["needs aime25"]}
    md = render_markdown(partial)
    assert "n/a" in md and "needs aime25" in md


def test_write_reports_files(results_a: dict[str, Any], tmp_path: Path) -> None:
    paths = write_reports(results_a, tmp_path / "r")
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == results_a
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MATH500" in paths["markdown"].read_text(encoding="utf-8")
    assert load_results(tmp_path / "r") == results_a  # directory or file both accepted


def test_plot_accuracy_png(results_b: dict[str, Any], tmp_path: Path) -> None:
    out = plot_accuracy(results_b, tmp_path / "a.png")
    assert out.stat().st_size > 1000


def test_compare_results(results_a: dict[str, Any], results_b: dict[str, Any]) -> None:
    text = compare_results(results_a, results_b)
    assert text.startswith("# Comparison: base (A) vs rlp (B)")
    line = next(ln for ln in text.splitlines() if ln.startswith("| GSM8K |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    a, b = (
        results_a["runs"]["gsm8k:sampled"]["accuracy"],
        results_b["runs"]["gsm8k:sampled"]["accuracy"],
    )
    assert cells[1] == f"{a:.2f}" and cells[2] == f"{b:.2f}"
    assert cells[3] == f"{b - a:.2f}"
    assert "(n=10)" in cells[4]
    assert "**Overall (Math Avg /6)**" in text


def test_compare_flags_setting_differences(
    results_a: dict[str, Any], results_b: dict[str, Any]
) -> None:
    results_b = dict(results_b)
    results_b["settings"] = dict(results_b["settings"], seed=5)
    assert "Settings differ: seed (0 vs 5)" in compare_results(results_a, results_b)


def test_load_results_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.json"):
        load_results(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="not an rlp evaluation"):
        load_results(bad)


# ------------------------------------------------------------------------------ pass@k curves


def _brute_force(n: int, c: int, k: int) -> float:
    import itertools

    hits = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(hits[i] for i in sub) for sub in subsets) / len(subsets)


def test_pass_at_k_curve_is_the_unbiased_estimator() -> None:
    settings = EvalSettings(num_samples=8)
    runs = plan_runs(["gsm8k"], settings)
    counts = [0, 1, 2, 3, 5, 8, 8, 4, 0, 7]
    items = {"gsm8k": [BenchmarkItem(f"g{i}", "q", None, "1", "gsm8k") for i in range(10)]}
    records = [
        {
            "type": "item", "run": "gsm8k:sampled", "index": i, "id": f"g{i}", "gold": "1",
            "num_samples": 8, "num_correct": c,
            "samples": [
                {"text": "", "extracted": "1", "method": "boxed", "status": st, "detail": ""}
                for st in ["correct"] * c + ["incorrect"] * (8 - c)
            ],
        }
        for i, c in enumerate(counts)
    ]  # fmt: skip
    curve = build_results(runs, items, records, settings)["runs"]["gsm8k:sampled"]["pass_at_k"]
    assert list(curve) == ["1", "2", "4", "8"]  # k = 1, 2, 4, ... n
    for k, value in curve.items():
        expected = 100 * sum(_brute_force(8, c, int(k)) for c in counts) / len(counts)
        assert value == pytest.approx(expected, abs=1e-9)
    assert curve["8"] == pytest.approx(80.0)  # items with any correct sample


# ------------------------------------------------------------------------------ reasoning + A/B


def _with_reasoning(results: dict[str, Any], change: list[float], gain: float) -> dict[str, Any]:
    out = dict(results)
    out["probes"] = {
        "gsm8k": {
            "run": "gsm8k:sampled", "completions": 40, "probed": 30, "with_reference": 28,
            "reference_accuracy": 50.0, "reference_agrees_with_completion": 90.0,
            "truncate": {
                "fractions": [0.0, 0.25, 0.5, 0.75, 1.0], "change_rate": [*change, 0.0],
                "accuracy": [10.0, 20.0, 30.0, 40.0, 50.0], "aoc": 30.0,
            },
            "filler": {"change_rate": 60.0, "accuracy": 5.0},
            "items": [],
        }
    }  # fmt: skip
    group = {
        "chains": 10, "steps": 40, "mean_steps": 4.0, "mean_total_gain": 4 * gain,
        "mean_step_gain": gain, "positive_steps_pct": 55.0, "mean_logp_start": -9.0,
        "mean_logp_end": -5.0,
    }  # fmt: skip
    out["step_info_gain"] = {
        "gsm8k": {"run": "gsm8k:sampled", "correct": group, "incorrect": group, "all": group}
    }
    return out


def test_markdown_has_pass_at_k_probes_and_gain(results_a: dict[str, Any]) -> None:
    md = render_markdown(_with_reasoning(results_a, [80.0, 60.0, 40.0, 20.0], 0.25))
    assert "| GSM8K | 50.00 | 66.67 | 80.00 |" in md  # pass@1, @2, @4 of counts 0..4 of 4
    assert "Faithfulness probes" in md and "| gsm8k | 30 / 40 | 50.00 | 90.00 | 80.00 |" in md
    assert "Step information gain" in md and "| gsm8k | correct | 10 | 4.0 | 1.000 | 0.250 |" in md


def test_comparison_plot_draws_both_results(
    results_a: dict[str, Any], results_b: dict[str, Any], tmp_path: Path
) -> None:
    import sys

    import matplotlib

    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    a = _with_reasoning(results_a, [80.0, 60.0, 40.0, 20.0], 0.25)
    b = _with_reasoning(results_b, [20.0, 10.0, 5.0, 0.0], -0.1)
    out = plot_comparison(a, b, tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    sampled = [k for k, r in a["runs"].items() if r["num_samples"] > 1]
    fig, (ax,) = _new_figure(4, 3)
    assert _draw_pass_at_k(ax, [("base", a), ("rlp", b)])
    lines = ax.get_lines()
    assert len(lines) == 2 * len(sampled)  # both curves of every sampled run on one axis
    gsm = [ln for ln in lines if "GSM8K" in ln.get_label()]
    assert [list(ln.get_ydata()) for ln in gsm] == [
        [r["runs"]["gsm8k:sampled"]["pass_at_k"][k] for k in ("1", "2", "4")] for r in (a, b)
    ]
    assert {ln.get_linestyle() for ln in gsm} == {"-", "--"}
    fig, (ax,) = _new_figure(4, 3)
    assert _draw_early_answering(ax, [("base", a), ("rlp", b)])
    assert [list(ln.get_ydata()) for ln in ax.get_lines()] == [
        [80.0, 60.0, 40.0, 20.0, 0.0],
        [20.0, 10.0, 5.0, 0.0, 0.0],
    ]
    # The library never switches the caller's backend or pulls in pyplot.
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    text = compare_results(a, b)
    assert "## pass@k" in text and "| base: GSM8K |" in text and "| rlp: GSM8K |" in text
    assert "| base: gsm8k | 30 / 40 |" in text and "| rlp: gsm8k | correct |" in text
