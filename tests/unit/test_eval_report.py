"""Tests for rlp.eval.report (and runner.build_results): JSON, Markdown, PNG, comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlp.eval.benchmarks import PAPER_BENCHMARKS, BenchmarkItem, get_spec
from rlp.eval.report import (
    aggregate_rows,
    compare_results,
    load_results,
    plot_accuracy,
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
