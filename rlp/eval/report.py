"""Reports for the bundled evaluation: JSON, Markdown, plots, and A/B comparison.

This module owns presentation only; numbers come from :mod:`rlp.eval.runner`,
:mod:`rlp.eval.aggregates`, :mod:`rlp.eval.probes` and :mod:`rlp.eval.step_gain`.

* ``results.json``: the full results dict (settings, per-run metrics with CI, pass@k and status
  counts, the paper's score columns, aggregates with their Math Avg convention labels, per-item
  records with extracted answers and statuses, and when measured the ``probes`` and
  ``step_info_gain`` sections; sample texts stay in ``items.jsonl``).
* ``summary.md``: one row per run plus the aggregates (both Math Avg conventions, ``/5`` and
  ``/6``, each with its Overall), the pass@k curve of every sampled run, and the probe and step
  gain tables when measured.
* ``accuracy.png`` (one bar per run with its 95% interval), ``pass_at_k.png`` (pass@k against
  k = 1, 2, 4, ... n per run) and, when measured, ``reasoning.png`` (early-answering curves,
  filler/paraphrase change rates, step gain by correctness).
* :func:`compare_results` / :func:`plot_comparison`: two result files side by side (Markdown
  with the difference and, on common items, a paired bootstrap 95% CI; one figure with both
  pass@k curves, both early-answering curves and both step gain summaries).

Plots use matplotlib's object-oriented :class:`~matplotlib.figure.Figure` (no ``pyplot``, no
backend switch), so a caller's backend (a notebook's) is left alone; matplotlib is imported
lazily.
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
    ]
    lines += _pass_at_k_lines({"": results})
    lines += _probe_lines({"": results})
    lines += _step_gain_lines({"": results})
    lines.append("")
    return "\n".join(lines)


def _pass_at_k_lines(named: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """pass@k curves of the sampled runs (n > 1), one row per (result, run)."""
    rows = [
        (name, r)
        for name, res in named.items()
        for r in res["runs"].values()
        if r["num_samples"] > 1
    ]
    if not rows:
        return []
    ks = sorted({int(k) for _, r in rows for k in r["pass_at_k"]})
    head = "| Run | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    lines = ["", "## pass@k (unbiased estimator, %)", "", head, "|---|" + "---:|" * len(ks)]
    for name, r in rows:
        cells = [_fmt(r["pass_at_k"].get(str(k))) for k in ks]
        label = f"{name}: {r['score_label']}" if name else r["score_label"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _probe_lines(named: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = [(n, b, p) for n, res in named.items() for b, p in res.get("probes", {}).items()]
    if not rows:
        return []
    fracs = next((p["truncate"]["fractions"][:-1] for _, _, p in rows if "truncate" in p), [])
    others = [x for x in ("filler", "paraphrase") if any(x in p for _, _, p in rows)]
    head = ["Benchmark", "probed / completions", "reference acc", "reference = own answer"]
    head += [f"change @{f:g}" for f in fracs] + (["AOC"] if fracs else [])
    head += [f"{x} {m}" for x in others for m in ("change", "acc")]
    lines = [
        "",
        "## Faithfulness probes (%, Lanham et al. 2023)",
        "",
        "Change = answer differs from the answer forced after the whole chain; accuracy of the "
        "forced answers; AOC = area over the early-answering (change-rate) curve.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for name, bench, p in rows:
        trunc = p.get("truncate", {})
        cells = [
            f"{name}: {bench}" if name else bench,
            f"{p['probed']} / {p['completions']}",
            _fmt(p.get("reference_accuracy")),
            _fmt(p.get("reference_agrees_with_completion")),
        ]
        if fracs:
            rates = trunc.get("change_rate", [None] * len(fracs))[: len(fracs)]
            cells += [_fmt(c) for c in rates] + [_fmt(trunc.get("aoc"))]
        for x in others:
            cells += [_fmt(p.get(x, {}).get("change_rate")), _fmt(p.get(x, {}).get("accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _step_gain_lines(named: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = [(n, b, g) for n, res in named.items() for b, g in res.get("step_info_gain", {}).items()]
    if not rows:
        return []
    lines = [
        "",
        "## Step information gain (nats; log p(gold | question, steps))",
        "",
        "| Benchmark | completions (own answer) | chains | steps / chain | mean total IG | "
        "mean IG / step | positive steps (%) | mean log p start -> end |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, bench, g in rows:
        for group in ("correct", "incorrect", "all"):
            s = g[group]
            label = f"{name}: {bench}" if name else bench
            lines.append(
                f"| {label} | {group} | {s['chains']} | {_fmt(s['mean_steps'], 1)} | "
                f"{_fmt(s['mean_total_gain'], 3)} | {_fmt(s['mean_step_gain'], 3)} | "
                f"{_fmt(s['positive_steps_pct'], 1)} | "
                f"{_fmt(s['mean_logp_start'])} -> {_fmt(s['mean_logp_end'])} |"
            )
    return lines


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    """A detached matplotlib ``Figure`` and its axes (no pyplot, no backend switch)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_accuracy(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Bar plot of per-run accuracy with 95% interval error bars, saved as PNG."""
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
    fig, (ax,) = _new_figure(max(6.0, 0.8 * len(runs) + 2), 4.0)
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
    return _save(fig, path)


_STYLES = ("-", "--", ":", "-.")


def _draw_pass_at_k(ax: Any, named: Sequence[tuple[str, Mapping[str, Any]]]) -> bool:
    """pass@k against k (log2 axis) for every run with n > 1; line style per result."""
    colors: dict[str, str] = {}
    drawn = False
    all_ks: set[int] = set()
    for style, (name, res) in zip(_STYLES * 4, named):
        for key, r in res["runs"].items():
            if r["num_samples"] < 2:
                continue
            color = colors.setdefault(key, f"C{len(colors) % 10}")
            ks = sorted(int(k) for k in r["pass_at_k"])
            all_ks.update(ks)
            label = f"{name}: {r['score_label']}" if name else r["score_label"]
            ax.plot(
                ks,
                [r["pass_at_k"][str(k)] for k in ks],
                style,
                marker="o",
                color=color,
                label=label,
            )
            drawn = True
    ax.set_xscale("log", base=2)
    if all_ks:
        ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, 105)
    ax.set_title("pass@k")
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _draw_early_answering(ax: Any, named: Sequence[tuple[str, Mapping[str, Any]]]) -> bool:
    """Change rate against the kept fraction of the reasoning, per benchmark and result."""
    drawn = False
    colors: dict[str, str] = {}
    for style, (name, res) in zip(_STYLES * 4, named):
        for bench, p in res.get("probes", {}).items():
            t = p.get("truncate")
            if not t or t.get("aoc") is None:
                continue
            color = colors.setdefault(bench, f"C{len(colors) % 10}")
            label = f"{name}: {bench}" if name else bench
            ax.plot(
                t["fractions"],
                t["change_rate"],
                style,
                marker="o",
                color=color,
                label=f"{label} (AOC {t['aoc']:.1f})",
            )
            drawn = True
    ax.set_xlabel("fraction of the reasoning kept")
    ax.set_ylabel("answer changed (%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 105)
    ax.set_title("early answering (truncate probe)")
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _draw_bars(
    ax: Any, labels: Sequence[str], series: Mapping[str, Sequence[float | None]]
) -> None:
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.5)
    if series:
        ax.legend(fontsize=7)


def _draw_probe_bars(ax: Any, named: Sequence[tuple[str, Mapping[str, Any]]]) -> bool:
    labels: list[str] = []
    series: dict[str, list[float | None]] = {}
    for _, res in named:
        for bench, p in res.get("probes", {}).items():
            for probe in ("filler", "paraphrase"):
                if probe in p:
                    label = f"{bench} {probe}"
                    if label not in labels:
                        labels.append(label)
    if not labels:
        return False
    for name, res in named:
        vals = []
        for label in labels:
            bench, probe = label.rsplit(" ", 1)
            vals.append(res.get("probes", {}).get(bench, {}).get(probe, {}).get("change_rate"))
        series[name or "change rate"] = vals
    _draw_bars(ax, labels, series)
    ax.set_ylabel("answer changed (%)")
    ax.set_title("filler / paraphrase probes")
    return True


def _draw_step_gain(ax: Any, named: Sequence[tuple[str, Mapping[str, Any]]]) -> bool:
    labels: list[str] = []
    for _, res in named:
        for bench in res.get("step_info_gain", {}):
            for group in ("correct", "incorrect"):
                if f"{bench} {group}" not in labels:
                    labels.append(f"{bench} {group}")
    if not labels:
        return False
    series: dict[str, list[float | None]] = {}
    for name, res in named:
        gains = res.get("step_info_gain", {})
        series[name or "mean IG / step"] = [
            gains.get(lab.rsplit(" ", 1)[0], {})
            .get(lab.rsplit(" ", 1)[1], {})
            .get("mean_step_gain")
            for lab in labels
        ]
    _draw_bars(ax, labels, series)
    ax.set_ylabel("mean IG per step (nats)")
    ax.set_title("step information gain")
    return True


def plot_pass_at_k(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """pass@k curves of the sampled runs (``None`` and no file when no run has n > 1)."""
    fig, (ax,) = _new_figure(6.0, 4.0)
    if not _draw_pass_at_k(ax, [("", results)]):
        return None
    return _save(fig, path)


def plot_reasoning(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Early-answering curves, filler/paraphrase change rates and step gain by correctness
    (``None`` and no file when neither probes nor step gain were measured)."""
    if not results.get("probes") and not results.get("step_info_gain"):
        return None
    fig, axes = _new_figure(15.0, 4.2, ncols=3)
    named = [("", results)]
    _draw_early_answering(axes[0], named)
    _draw_probe_bars(axes[1], named)
    _draw_step_gain(axes[2], named)
    return _save(fig, path)


def plot_comparison(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
) -> Path:
    """One figure for two results: both pass@k curves on one axis, both early-answering curves,
    the filler/paraphrase change rates and the step gain of both side by side."""
    name_a, name_b = names or _names(a, b)
    named = [(name_a, a), (name_b, b)]
    fig, axes = _new_figure(20.0, 4.5, ncols=4)
    _draw_pass_at_k(axes[0], named)
    _draw_early_answering(axes[1], named)
    _draw_probe_bars(axes[2], named)
    _draw_step_gain(axes[3], named)
    return _save(fig, path)


def write_reports(results: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``summary.md`` and the plots into ``out_dir``."""
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
    for key, plot in (("pass_at_k", plot_pass_at_k), ("reasoning", plot_reasoning)):
        written = plot(results, out / f"{key}.png")
        if written is not None:
            paths[key] = written
    return paths


def _names(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, str]:
    return (
        str(a.get("label") or a.get("checkpoint") or "A"),
        str(b.get("label") or b.get("checkpoint") or "B"),
    )


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
    name_a, name_b = names or _names(a, b)
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
    both = {name_a: a, name_b: b} if name_a != name_b else {"A": a, "B": b}
    lines += _pass_at_k_lines(both)
    lines += _probe_lines(both)
    lines += _step_gain_lines(both)
    sa, sb = a.get("settings", {}), b.get("settings", {})
    diffs = [k for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    if diffs:
        lines += [
            "",
            "Settings differ: " + ", ".join(f"{k} ({sa.get(k)!r} vs {sb.get(k)!r})" for k in diffs),
        ]
    return "\n".join(lines) + "\n"
