"""Reports for the bundled evaluation: JSON, Markdown, a bar plot, and A/B comparison.

This module owns presentation only; numbers come from :mod:`rlp.eval.runner` /
:mod:`rlp.eval.aggregates`.

* ``results.json``: the full results dict (settings, per-run metrics with CI, pass@k and status
  counts, the paper's score columns, aggregates with their Math Avg convention labels, per-item
  records with extracted answers and statuses; sample texts stay in ``items.jsonl``).
* ``summary.md``: one row per run plus the aggregates. Both Math Avg conventions are printed
  and labelled: ``/5`` (mean) and ``/6`` (paper Table 1); Overall is given for each.
* ``accuracy.png``: one bar per run with its 95% interval (matplotlib, Agg backend, lazy).
* :func:`compare_results`: Markdown table of two result files side by side, with the
  difference and, for runs evaluated on the same items, a paired bootstrap 95% CI of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlp.eval.aggregates import MATH_AVG_LABELS, paired_bootstrap_ci

SUMMARY_CONVENTIONS: tuple[str, ...] = ("/5", "/6")
"""Math Avg conventions shown in summaries (``4sets`` stays in the JSON)."""


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``results.json`` (or the ``results.json`` inside a directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"no results file at {p}; pass a results.json written by "
            "benchmarks/evaluate.py or its output directory"
        )
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "runs" not in data or "aggregates" not in data:
        raise ValueError(f"{p} is not an rlp evaluation results file (no 'runs'/'aggregates')")
    return data


def aggregate_rows(aggregates: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """``(label, value)`` rows for the aggregates, with their conventions in the labels."""
    rows: list[tuple[str, float | None]] = []
    math_avg = aggregates.get("math_avg", {})
    for conv in SUMMARY_CONVENTIONS:
        rows.append((MATH_AVG_LABELS[conv], math_avg.get(conv)))
    rows.append(("Science Avg (greedy)", aggregates.get("science_avg")))
    rows.append(
        (
            aggregates.get("science_sampled_label", "Science Avg@1[4]"),
            aggregates.get("science_avg_sampled"),
        )
    )
    overall = aggregates.get("overall", {})
    for conv in SUMMARY_CONVENTIONS:
        rows.append((f"Overall (Math Avg {conv})", overall.get(conv)))
    return rows


def render_markdown(results: Mapping[str, Any]) -> str:
    """Markdown summary: per-run table, then aggregates."""
    title = results.get("label") or results.get("checkpoint") or "evaluation"
    s = results.get("settings", {})
    lines = [f"# Evaluation: {title}", ""]
    lines.append(
        f"Settings: max_new_tokens={s.get('max_new_tokens')}, few_shot={s.get('few_shot')}, "
        f"limit={s.get('limit')}, seed={s.get('seed')}, batch_size={s.get('batch_size')}."
    )
    lines += [
        "",
        "| Benchmark | Metric | Items | Accuracy (%) | 95% CI | pass@k | "
        "no answer | timeout | error |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in results["runs"].values():
        sc = r["status_counts"]
        total = sum(sc.values()) or 1
        pk = ", ".join(f"@{k}: {v:.1f}" for k, v in r["pass_at_k"].items() if k != "1")
        lines.append(
            f"| {r['score_label']} | {r['metric']} | {r['num_items']} | {r['accuracy']:.2f} | "
            f"[{r['ci'][0]:.1f}, {r['ci'][1]:.1f}] | {pk or '-'} | "
            f"{100 * sc.get('no_answer', 0) / total:.1f}% | {sc.get('timeout', 0)} | "
            f"{sc.get('error', 0)} |"
        )
    agg = results["aggregates"]
    lines += ["", "| Aggregate | Value |", "|---|---:|"]
    for label, value in aggregate_rows(agg):
        lines.append(f"| {label} | {_fmt(value)} |")
    if agg.get("missing"):
        lines += ["", "Aggregates not computed (missing scores): " + "; ".join(agg["missing"])]
    lines += [
        "",
        "CI: Wilson score interval over items (conservative for sample-averaged "
        "scores). Overall = mean(Math Avg, Science Avg, Science Avg@1[n]).",
        "",
    ]
    return "\n".join(lines)


def plot_accuracy(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Bar plot of per-run accuracy with 95% interval error bars, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["runs"].values())
    labels = [r["score_label"] for r in runs]
    values = [r["accuracy"] for r in runs]
    err = [
        [max(0.0, v - r["ci"][0]) for v, r in zip(values, runs)],
        [max(0.0, r["ci"][1] - v) for v, r in zip(values, runs)],
    ]
    colors = [
        "tab:blue"
        if r["group"] == "math"
        else "tab:green"
        if r["group"] == "science"
        else "tab:gray"
        for r in runs
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(runs) + 2), 4.0))
    try:
        bars = ax.bar(range(len(runs)), values, yerr=err, capsize=3, color=colors)
        for bar, v in zip(bars, values):
            # Value at the foot of the bar, clear of the error bar.
            ax.annotate(
                f"{v:.1f}",
                (bar.get_x() + bar.get_width() / 2, 0),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
                color="white" if v > 8 else "black",
            )
        ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(str(results.get("label") or results.get("checkpoint") or "evaluation"))
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


def write_reports(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``summary.md`` and ``accuracy.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "markdown": out / "summary.md",
        "plot": out / "accuracy.png",
    }
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(paths["json"])
    paths["markdown"].write_text(render_markdown(results), encoding="utf-8")
    plot_accuracy(results, paths["plot"])
    return paths


def _item_scores(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for row in results.get("items", []):
        out.setdefault(row["run"], {})[row["id"]] = float(row["score"])
    return out


def compare_results(
    a: Mapping[str, Any], b: Mapping[str, Any], *, names: Sequence[str] | None = None
) -> str:
    """Markdown comparison of two results dicts: per run and aggregates, B - A.

    For a run present in both with per-item records, the difference is computed on the items
    both evaluated, with a paired bootstrap 95% CI.
    """
    name_a, name_b = names or (
        str(a.get("label") or a.get("checkpoint") or "A"),
        str(b.get("label") or b.get("checkpoint") or "B"),
    )
    items_a, items_b = _item_scores(a), _item_scores(b)
    lines = [
        f"# Comparison: {name_a} (A) vs {name_b} (B)",
        "",
        "| Metric | A | B | B - A | paired 95% CI of B - A (common items) |",
        "|---|---:|---:|---:|---|",
    ]
    keys = list(a["runs"]) + [k for k in b["runs"] if k not in a["runs"]]
    for key in keys:
        ra, rb = a["runs"].get(key), b["runs"].get(key)
        label = (ra or rb)["score_label"]
        va = ra["accuracy"] if ra else None
        vb = rb["accuracy"] if rb else None
        delta = _fmt(vb - va) if va is not None and vb is not None else "n/a"
        ci = "-"
        common = sorted(set(items_a.get(key, {})) & set(items_b.get(key, {})))
        if common:
            d, lo, hi = paired_bootstrap_ci(
                [items_a[key][i] for i in common], [items_b[key][i] for i in common]
            )
            ci = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={len(common)})"
        lines.append(f"| {label} | {_fmt(va)} | {_fmt(vb)} | {delta} | {ci} |")
    rows_a = dict(aggregate_rows(a["aggregates"]))
    rows_b = dict(aggregate_rows(b["aggregates"]))
    for label in rows_a:
        va, vb = rows_a[label], rows_b.get(label)
        delta = _fmt(vb - va) if va is not None and vb is not None else "n/a"
        lines.append(f"| **{label}** | {_fmt(va)} | {_fmt(vb)} | {delta} | |")
    sa, sb = a.get("settings", {}), b.get("settings", {})
    diffs = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    if diffs:
        lines += [
            "",
            "Settings differ: " + ", ".join(f"{k} ({sa.get(k)!r} vs {sb.get(k)!r})" for k in diffs),
        ]
    return "\n".join(lines) + "\n"
