#!/usr/bin/env python
"""Does RLP teach a model useful thoughts? RLP vs continued pretraining vs no training.

    python benchmarks/rlp_vs_cpt.py                       # the experiment (SmolLM2-135M, CPU)
    python benchmarks/rlp_vs_cpt.py --quick --out DIR     # a tiny random model, minutes (CI)
    python benchmarks/rlp_vs_cpt.py --steps 4 --eval-every 2 --seeds 1 --out DIR   # a pilot

All arms start from the same weights (SmolLM2-135M-Instruct, ``rlp convert smollm2``; ``--quick``:
a tiny random-init model, the same init per seed) and read the same data stream (same shards,
seed and order):

* ``rlp``  - the paper objective: clipped policy gradient on the thought tokens, NTP weight 0;
* ``cpt``  - continued pretraining: next-token loss only, on packed sequences of the same stream,
  ``data.ntp_seq_len`` set so that it reads as many document tokens per step as the RLP arm's
  contexts hold (prefix + target); its training FLOPs are reported next to RLP's;
* ``none`` - no training: the start weights. Their evaluation is the step-0 evaluation of the
  training runs of the same seed (same weights, same held-out contexts, same sampling seed:
  deterministic on CPU), so it is not recomputed.

Each run is ``rlp train`` (a subprocess) with held-out evaluation before the first step, every
``--eval-every`` steps and at the end (``RUN/heldout.jsonl``): thought benefit, filler benefit,
benefit over filler and NTP loss without thoughts (``docs/method.md``, "Thought benefit"), with
the policy weights only. A seed sets the run seed (data order, rollouts) and the held-out
thought-sampling seed. Writes ``OUT/rlp_vs_cpt.json``, ``OUT/rlp_vs_cpt.md`` (table) and
``OUT/<metric>.png`` (mean over seeds, band = min..max), plus ``OUT/rlp_vs_cpt.png`` (all four).

Data (``docs/results.md``): reasoning-gym (Apache-2.0, PyPI) procedural exercises, question +
``Answer:`` line, from 16 arithmetic/logic tasks; held-out documents come from another generator
seed, minus any text equal to a training document. No benchmark test set is used (GSM-Symbolic,
a rewrite of GSM8K test, is excluded). Work files (shards, run directories) go to ``--work-dir``;
finished runs with the same settings are reused, so an interrupted experiment continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

TASKS = (
    "basic_arithmetic",
    "chain_sum",
    "decimal_arithmetic",
    "fraction_simplification",
    "gcd",
    "lcm",
    "prime_factorization",
    "products",
    "simple_equations",
    "leg_counting",
    "time_intervals",
    "family_relationships",
    "calendar_arithmetic",
    "base_conversion",
    "count_bits",
    "syllogism",
)
"""reasoning-gym generators: short problems whose next tokens a little computation can predict."""

METRICS = {
    "eval/thought/benefit": "thought benefit (nats)",
    "eval/thought/filler_benefit": "filler benefit (nats)",
    "eval/thought/benefit_over_filler": "thought benefit over filler (nats)",
    "eval/nll": "held-out NTP loss without thoughts (nats/token)",
}
"""Plotted and tabulated metrics (keys of heldout.jsonl)."""
EXTRA = (
    "eval/thought/benefit_best",
    "eval/thought/frac_some_helps",
    "eval/thought/prompt_effect",
    "eval/thought/benefit_over_filler_se",
    "eval/info_gain",
)
OVER = "eval/thought/benefit_over_filler"
ARMS = ("rlp", "cpt", "none")
TRAIN_SEED, HELDOUT_SEED = 1, 2


# ---------------------------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every knob of the experiment (full or quick), after command-line overrides."""
    full = {
        "base_config": "1gpu_smollm2_135m",
        "model_dir": str(Path(args.model_dir).expanduser()),
        "docs_per_task": 150,
        "heldout_per_task": 16,
        "seeds": [1, 2],
        "steps": 48,
        "eval_every": 16,
        "contexts_per_step": 2,
        "num_thoughts": 4,
        "max_thought_tokens": 32,
        "min_prefix_tokens": 8,
        "max_prefix_tokens": 96,
        "eval_documents": 32,
        "eval_ntp_seq_len": 128,
        "lr": 1e-5,
        "ema_decay": 0.999,
        "threads": 2,
        "max_tokens_per_micro_batch": 2048,
    }
    quick = dict(
        full,
        base_config="tiny_cpu",
        model_dir=None,
        docs_per_task=25,
        heldout_per_task=4,
        seeds=[1],
        steps=4,
        eval_every=2,
        max_thought_tokens=12,
        max_prefix_tokens=48,
        eval_documents=8,
        eval_ntp_seq_len=64,
        lr=1e-3,
        ema_decay=0.99,
        threads=1,
        max_tokens_per_micro_batch=4096,
    )
    out = quick if args.quick else full
    for key in out:
        value = getattr(args, key, None)
        if value is not None and key != "model_dir":
            out[key] = value
    out["quick"] = bool(args.quick)
    return out


# ---------------------------------------------------------------------------------- data


def documents(tasks: tuple[str, ...], per_task: int, seed: int) -> list[dict[str, str]]:
    """``per_task`` reasoning-gym exercises per task: ``question\\nAnswer: answer``."""
    import reasoning_gym

    docs = []
    for k, task in enumerate(tasks):
        for entry in reasoning_gym.create_dataset(task, size=per_task, seed=seed * 1000 + k):
            text = f"{entry['question'].strip()}\nAnswer: {entry['answer']}"
            docs.append({"text": text, "source": f"reasoning_gym/{task}"})
    return docs


def build_data(work: Path, st: dict[str, Any]) -> dict[str, Any]:
    """Train and held-out shards (and, for ``--quick``, a BPE tokenizer trained on train only)."""
    import random

    from rlp.data.builder import BuildOptions, build_shards

    train = documents(TASKS, st["docs_per_task"], TRAIN_SEED)
    seen = {d["text"] for d in train}
    held = [
        d for d in documents(TASKS, st["heldout_per_task"], HELDOUT_SEED) if d["text"] not in seen
    ]
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(held)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("heldout", held)):
        data = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
        path = raw / f"{name}.jsonl"
        if not path.is_file() or path.read_text() != data:
            path.write_text(data)
    if st["model_dir"]:
        tokenizer = st["model_dir"]
    else:
        from rlp.tokenizer import train_bpe_tokenizer

        tokenizer = str(work / "tokenizer")
        if not (work / "tokenizer" / "tokenizer.json").is_file():
            train_bpe_tokenizer((d["text"] for d in train), 1024, tokenizer)
    for name, docs in (("train", train), ("heldout", held)):
        build_shards(
            [raw / f"{name}.jsonl"],
            BuildOptions(
                tokenizer=tokenizer,
                out=work / name,
                prefix=name,
                docs_per_shard=len(docs),
                workers=1,
                progress=False,
            ),
        )
    return {
        "tokenizer": tokenizer,
        "train_shards": str(work / "train" / "train-000000.tar"),
        "heldout_shards": str(work / "heldout" / "heldout-000000.tar"),
        "train_documents": len(train),
        "heldout_documents": len(held),
        "source": "reasoning-gym " + _version("reasoning-gym"),
        "tasks": list(TASKS),
    }


def _version(dist_name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------------- runs


def common_overrides(st: dict[str, Any], data: dict[str, Any], seed: int) -> list[str]:
    return [
        "run.device=cpu",
        f"run.seed={seed}",
        f"run.max_steps={st['steps']}",
        "model.params_dtype=float32",
        "model.recompute=none",  # CPU: memory is not the limit, compute is
        f"tokenizer.path={data['tokenizer']}",
        f"data.shards={data['train_shards']}",
        "data.build_demo_if_missing=false",
        "data.num_workers=0",
        f"data.min_prefix_tokens={st['min_prefix_tokens']}",
        f"data.max_prefix_tokens={st['max_prefix_tokens']}",
        f"rollout.contexts_per_step={st['contexts_per_step']}",
        f"rollout.num_thoughts={st['num_thoughts']}",
        f"rollout.max_thought_tokens={st['max_thought_tokens']}",
        f"rollout.sample_batch_size={max(16, st['num_thoughts'] * 16)}",
        "rollout.use_system_prompt=true",
        f"objective.max_tokens_per_micro_batch={st['max_tokens_per_micro_batch']}",
        f"optim.lr={st['lr']}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.weight_decay=0.0",
        "optim.clip_grad=1.0",
        f"eval.every={st['eval_every']}",
        f"eval.shards={data['heldout_shards']}",
        f"eval.num_documents={st['eval_documents']}",
        f"eval.sample_seed={1000 + seed}",
        f"eval.ntp_seq_len={st['eval_ntp_seq_len']}",
        "benefit.heldout=true",
        f"checkpoint.init_from={st['model_dir'] or 'null'}",
        "checkpoint.save_every=0",
        "checkpoint.keep_last=1",
        "log.wandb=disabled",
        f"log.samples_every={st['eval_every']}",
        f"log.every={max(1, st['steps'] // 8)}",
    ]


def arm_overrides(arm: str, st: dict[str, Any], cpt_seq_len: int) -> list[str]:
    if arm == "rlp":
        return [
            "objective.rl_weight=1.0",
            "objective.ntp_weight=0.0",
            "ema.enabled=true",
            f"ema.decay={st['ema_decay']}",
            "benefit.per_step=true",
        ]
    return [
        "objective.rl_weight=0.0",
        "objective.ntp_weight=1.0",
        "objective.ntp_every=1",
        "data.ntp_batch_size=1",
        f"data.ntp_seq_len={cpt_seq_len}",
        "ema.enabled=false",
        "benefit.per_step=false",
    ]


def matched_seq_len(st: dict[str, Any], data: dict[str, Any], seed: int) -> dict[str, float]:
    """Document tokens (prefix + target) the RLP arm reads per step, from the run's own stream:
    the CPT arm's packed sequence length (one sequence per step)."""
    from rlp.config import load_config
    from rlp.data.stream import RLPDataStream
    from rlp.tokenizer import load_tokenizer

    cfg = load_config(st["base_config"], common_overrides(st, data, seed))
    tok = load_tokenizer(data["tokenizer"])
    stream = RLPDataStream(
        cfg.data.shards,
        cfg.data,
        dp_rank=0,
        dp_size=1,
        seed=cfg.run.seed,
        target_tokens=cfg.reward.target_tokens,
        tokenizer=tok,
    )
    try:
        contexts = stream.next_contexts(st["steps"] * st["contexts_per_step"])
    finally:
        stream.close()
    per_context = statistics.fmean(len(c.prefix) + len(c.target) for c in contexts)
    return {
        "tokens_per_context": per_context,
        "ntp_seq_len": max(2, round(per_context * st["contexts_per_step"])),
    }


def run_train(run_dir: Path, st: dict[str, Any], overrides: list[str], force: bool) -> None:
    """``rlp train`` in a subprocess; a finished run with the same overrides is kept."""
    marker = run_dir / "bench_overrides.json"
    done = (run_dir / "summary.json").is_file() and marker.is_file()
    if done and not force and json.loads(marker.read_text()) == overrides:
        print(f"[rlp_vs_cpt] reuse {run_dir}", flush=True)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(st["threads"]),
        MKL_NUM_THREADS=str(st["threads"]),
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    cmd = [sys.executable, "-m", "rlp.cli", "train", "--config", st["base_config"], *overrides]
    print(f"[rlp_vs_cpt] {run_dir.name}: rlp train ... ({st['steps']} steps)", flush=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-4000:]
        raise SystemExit(f"[rlp_vs_cpt] {run_dir.name} failed ({proc.returncode}):\n{tail}")
    (run_dir / "wall_seconds.json").write_text(json.dumps({"seconds": seconds}))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # hundreds of MB per run
    marker.write_text(json.dumps(overrides))
    print(f"[rlp_vs_cpt] {run_dir.name}: {seconds:.0f} s", flush=True)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(run_dir: Path, arm: str, st: dict[str, Any], system_tokens: int) -> dict[str, Any]:
    """Held-out curve, per-step training metrics, tokens, FLOPs and times of one run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    n = float(summary["parameters"])
    held = _rows(run_dir / "heldout.jsonl")
    steps = _rows(run_dir / "metrics.jsonl")
    b, k = st["contexts_per_step"], 1
    data_tokens = flops = 0.0
    for row in steps:
        if arm == "rlp":
            prompt = row.get("rollout/prompt_tokens", 0.0)
            seq = row.get("rollout/sequence_tokens", 0.0)
            thought = row.get("thought/tokens", 0.0)
            data_tokens += prompt - b * (system_tokens + 1) + b * k
            # generation (prefill once per context + decode), scoring, EMA baseline, fwd+bwd
            flops += 2 * n * (prompt + thought) + 2 * n * seq + 2 * n * prompt + 6 * n * seq
        else:
            tokens = row.get("ntp/tokens", 0.0)
            data_tokens += tokens
            flops += 6 * n * tokens
    step_times = [r["time/step"] for r in steps if isinstance(r.get("time/step"), (int, float))]
    eval_times = [r["time/eval"] for r in steps if isinstance(r.get("time/eval"), (int, float))]
    wall = json.loads((run_dir / "wall_seconds.json").read_text())["seconds"]
    per_step_keys = [k for k in (steps[0] if steps else {}) if k.startswith("thought/")]
    return {
        "held_out": held,
        "train_curve": {
            key: [r.get(key) for r in steps]
            for key in ("reward/mean", "loss/ntp", *per_step_keys)
            if any(key in r for r in steps)
        },
        "data_tokens": data_tokens,
        "train_flops": flops,
        "parameters": n,
        "seconds": {
            "wall": wall,
            "steps_total": sum(step_times),
            "train_step_median": statistics.median(step_times) if step_times else None,
            "eval_median": statistics.median(eval_times) if eval_times else None,
        },
        "final_train_metrics": {k: v for k, v in summary.get("final", {}).items() if "/" in k},
    }


# ---------------------------------------------------------------------------------- report


def aggregate(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per arm, metric and evaluated step: mean, sd, min, max over seeds."""
    out: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        steps = sorted({row["step"] for run in by_seed.values() for row in run["held_out"]})
        out[arm] = {"steps": steps}
        for key in [*METRICS, *EXTRA]:
            series = []
            for step in steps:
                values = [
                    row[key]
                    for run in by_seed.values()
                    for row in run["held_out"]
                    if row["step"] == step and isinstance(row.get(key), (int, float))
                ]
                series.append(_stats(values))
            out[arm][key] = series
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def paired(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Paired over the same held-out contexts, per seed (mean, s.e.): each arm's last evaluation
    minus its step 0, and RLP minus CPT at the last step; for benefit and benefit over filler."""
    from rlp.heldout import paired_difference

    out: dict[str, Any] = {}
    for name in ("benefit_over_filler", "benefit", "filler_benefit"):
        cell: dict[str, Any] = {}
        for arm in ("rlp", "cpt"):
            cell[f"{arm}_last_minus_start"] = {
                str(seed): paired_difference(run["held_out"][0], run["held_out"][-1], name)
                for seed, run in runs[arm].items()
            }
        cell["rlp_minus_cpt_last"] = {
            str(seed): paired_difference(
                runs["cpt"][seed]["held_out"][-1], runs["rlp"][seed]["held_out"][-1], name
            )
            for seed in runs["rlp"]
            if seed in runs["cpt"]
        }
        out[name] = cell
    return out


def no_training_arm(runs: dict[str, dict[int, dict[str, Any]]], steps: list[int]) -> dict:
    """The start weights at every step: each seed's step-0 evaluation (see the module doc)."""
    out = {}
    for seed, run in runs["rlp"].items():
        start = next(r for r in run["held_out"] if r["step"] == 0)
        out[seed] = {
            "held_out": [dict(start, step=s) for s in steps],
            "data_tokens": 0.0,
            "train_flops": 0.0,
            "seconds": {"wall": 0.0},
            "derived_from": f"rlp seed {seed}, step 0",
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    st, agg = result["settings"], result["aggregate"]
    last = {arm: len(agg[arm]["steps"]) - 1 for arm in agg}
    lines = [
        "# RLP vs continued pretraining vs no training "
        f"({'--quick: tiny random model' if st['quick'] else 'SmolLM2-135M-Instruct'})",
        "",
        f"Command: `{result['command']}`  ",
        f"Model: {result['model']}; data: {result['data']['source']} "
        f"({result['data']['train_documents']} train / {result['data']['heldout_documents']} "
        f"held-out documents); seeds {st['seeds']}; {st['steps']} steps; "
        f"evaluated every {st['eval_every']} steps on {st['eval_documents']} held-out contexts "
        f"x {st['num_thoughts']} thoughts (cap {st['max_thought_tokens']} tokens).",
        "",
        "Mean ± sd over seeds [min, max] at the last step; Δ = last - step 0 (same seeds).",
        "",
        "| arm | " + " | ".join(METRICS.values()) + " | data tokens | train FLOPs |",
        "|---|" + "---:|" * (len(METRICS) + 2),
    ]
    for arm in ARMS:
        if arm not in agg:
            continue
        cells = []
        for key in METRICS:
            end, start = agg[arm][key][last[arm]], agg[arm][key][0]
            if end["mean"] is None:
                cells.append("n/a")
                continue
            delta = end["mean"] - start["mean"]
            cells.append(
                f"{end['mean']:+.4f} ± {end['sd']:.4f} [{end['min']:+.4f}, {end['max']:+.4f}]"
                f" (Δ {delta:+.4f})"
            )
        tok = statistics.fmean(r["data_tokens"] for r in result["runs"][arm].values())
        flops = statistics.fmean(r["train_flops"] for r in result["runs"][arm].values())
        cells += [f"{tok:,.0f}", f"{flops:.3g}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired over the same held-out contexts (per seed: mean ± s.e. of the per-context "
        "difference):",
        "",
    ]
    for name, cell in result["paired"].items():
        for what, by_seed in cell.items():
            parts = [
                f"seed {seed} {v[0]:+.4f} ± {v[1]:.4f}" if v else f"seed {seed} n/a"
                for seed, v in by_seed.items()
            ]
            lines.append(f"- {name}, {what.replace('_', ' ')}: " + "; ".join(parts))
    lines += [
        "",
        "Held-out curves (mean over seeds; for benefit over filler also ± the standard error over "
        "held-out contexts, mean over seeds):",
        "",
    ]
    for key, label in METRICS.items():
        lines.append(f"- {label}:")
        for arm in ARMS:
            if arm in agg:
                ses = agg[arm][OVER + "_se"] if key == OVER else [None] * len(agg[arm][key])
                pts = ", ".join(
                    (f"{s}: {v['mean']:+.4f}" if v["mean"] is not None else f"{s}: n/a")
                    + (f" ± {e['mean']:.4f}" if e and e["mean"] is not None else "")
                    for s, v, e in zip(agg[arm]["steps"], agg[arm][key], ses)
                )
                lines.append(f"  - {arm}: {pts}")
    timing = result["timing"]
    lines += [
        "",
        f"Wall time of the runs {timing['runs_wall_seconds']:.0f} s ({result['machine']}); "
        f"RLP step {_fmt(timing['rlp_step_seconds'])} s, CPT step "
        f"{_fmt(timing['cpt_step_seconds'])} s, "
        f"evaluation {_fmt(timing['eval_seconds'])} s (medians).",
    ]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def plot(result: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg, written = result["aggregate"], []
    colors = {"rlp": "tab:red", "cpt": "tab:blue", "none": "tab:gray"}

    def draw(ax, key: str, label: str) -> None:
        for arm in ARMS:
            if arm not in agg:
                continue
            pts = [
                (s, v) for s, v in zip(agg[arm]["steps"], agg[arm][key]) if v["mean"] is not None
            ]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ax.plot(xs, [v["mean"] for _, v in pts], marker="o", color=colors[arm], label=arm)
            if key == OVER:  # +- one standard error over the held-out contexts (seed mean)
                se = [v["mean"] or 0.0 for v in agg[arm][OVER + "_se"][: len(pts)]]
                dodge = (max(xs) or 1) * 0.012 * (ARMS.index(arm) - 1)  # bars side by side
                xs = [x + dodge for x in xs]
                ax.errorbar(
                    xs,
                    [v["mean"] for _, v in pts],
                    yerr=se,
                    fmt="none",
                    ecolor=colors[arm],
                    capsize=3,
                    alpha=0.7,
                )
            ax.fill_between(
                xs,
                [v["min"] for _, v in pts],
                [v["max"] for _, v in pts],
                color=colors[arm],
                alpha=0.15,
            )
        if key.startswith("eval/thought/"):
            ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()

    for key, label in METRICS.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        draw(ax, key, label)
        extra = "; bars: ±1 s.e. over contexts" if key == OVER else ""
        ax.set_title(f"band: min..max over seeds{extra}", fontsize=9)
        name = key.split("/")[-1] + ".png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, label) in zip(axes.flat, METRICS.items()):
        draw(ax, key, label)
    fig.suptitle("RLP vs CPT vs no training: held-out, same weights (band: min..max over seeds)")
    fig.tight_layout()
    fig.savefig(out / "rlp_vs_cpt.png", dpi=110)
    plt.close(fig)
    return [*written, "rlp_vs_cpt.png"]


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random model, 1 seed, few steps")
    p.add_argument("--out", type=Path, default=None, help="results dir")
    p.add_argument("--work-dir", type=Path, default=None, help="shards and run dirs")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument(
        "--model-dir",
        default="~/.cache/rlp/smollm2-135m-instruct",
        help="HF dir of the start model (rlp convert smollm2 writes the default)",
    )
    for name, typ in (
        ("steps", int),
        ("eval_every", int),
        ("contexts_per_step", int),
        ("num_thoughts", int),
        ("max_thought_tokens", int),
        ("max_prefix_tokens", int),
        ("eval_documents", int),
        ("docs_per_task", int),
        ("lr", float),
        ("threads", int),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=None, dest=name)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument(
        "--base-config", default=None, help="config the runs start from (default: bundled one)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    st = settings(args)
    if st["steps"] % st["eval_every"]:
        raise SystemExit("--steps must be a multiple of --eval-every (same evaluated steps)")
    out = args.out or (REPO / "benchmarks" / "results" / "rlp_vs_cpt")
    work = args.work_dir or (REPO / "runs" / ("rlp_vs_cpt_quick" if st["quick"] else "rlp_vs_cpt"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if st["model_dir"] and not (Path(st["model_dir"]) / "config.json").is_file():
        raise SystemExit(
            f"no model at {st['model_dir']}: run `rlp convert smollm2` first (or --model-dir)"
        )
    t0 = time.perf_counter()
    data = build_data(work, st)
    from rlp.config import load_config
    from rlp.rollout import system_prompt_ids
    from rlp.tokenizer import load_tokenizer

    cfg0 = load_config(st["base_config"], common_overrides(st, data, st["seeds"][0]))
    system_tokens = len(system_prompt_ids(load_tokenizer(data["tokenizer"]), cfg0.rollout))
    runs: dict[str, dict[int, dict[str, Any]]] = {"rlp": {}, "cpt": {}}
    matched = {}
    for seed in st["seeds"]:
        matched[seed] = matched_seq_len(st, data, seed)
        for arm in ("rlp", "cpt"):
            overrides = [
                *common_overrides(st, data, seed),
                *arm_overrides(arm, st, matched[seed]["ntp_seq_len"]),
            ]
            run_dir = work / f"{arm}_seed{seed}"
            run_train(run_dir, st, [*overrides, f"run.output_dir={run_dir}"], args.force)
            runs[arm][seed] = collect(run_dir, arm, st, system_tokens)
    steps = sorted({r["step"] for r in runs["rlp"][st["seeds"][0]]["held_out"]})
    runs["none"] = no_training_arm(runs, steps)
    for seed in st["seeds"]:  # all arms share the start: same weights, same evaluation seeds
        a = runs["rlp"][seed]["held_out"][0]
        b = runs["cpt"][seed]["held_out"][0]
        for key in METRICS:
            if a.get(key) is not None and b.get(key) is not None and abs(a[key] - b[key]) > 1e-4:
                print(f"[rlp_vs_cpt] warning: step 0 differs between arms ({key}, seed {seed})")

    def median(arm: str, key: str) -> float | None:
        vals = [r["seconds"][key] for r in runs[arm].values() if r["seconds"].get(key)]
        return statistics.median(vals) if vals else None

    result = {
        "command": "python benchmarks/rlp_vs_cpt.py " + " ".join(argv or sys.argv[1:]),
        "settings": st,
        "model": (
            f"SmolLM2-135M-Instruct ({st['model_dir']})"
            if st["model_dir"]
            else "tiny random-init Llama (tiny_cpu architecture)"
        ),
        "data": data,
        "cpt_matching": {str(s): m for s, m in matched.items()},
        "system_prompt_tokens": system_tokens,
        "runs": {arm: {str(s): r for s, r in by_seed.items()} for arm, by_seed in runs.items()},
        "aggregate": aggregate(runs),
        "paired": paired(runs),
        "timing": {
            "this_invocation_seconds": time.perf_counter() - t0,
            "runs_wall_seconds": sum(
                r["seconds"]["wall"] for arm in ("rlp", "cpt") for r in runs[arm].values()
            ),
            "rlp_step_seconds": median("rlp", "train_step_median"),
            "cpt_step_seconds": median("cpt", "train_step_median"),
            "eval_seconds": median("rlp", "eval_median"),
            "run_wall_seconds": {
                f"{arm}_seed{s}": r["seconds"]["wall"]
                for arm in ("rlp", "cpt")
                for s, r in runs[arm].items()
            },
        },
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {st['threads']} threads/run",
        "flops_note": (
            "train FLOPs ~ 2N per forward token and 6N per trained token (N = parameters, "
            "attention ignored); RLP = generation (prompt prefill + thoughts) + scoring + EMA "
            "baseline + loss; evaluation excluded"
        ),
    }
    (out / "rlp_vs_cpt.json").write_text(json.dumps(_finite(result), indent=1) + "\n")
    (out / "rlp_vs_cpt.md").write_text(markdown(result))
    written = plot(result, out)
    print(markdown(result))
    print(f"[rlp_vs_cpt] wrote {out}/rlp_vs_cpt.json, rlp_vs_cpt.md, {', '.join(written)}")
    return 0


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
