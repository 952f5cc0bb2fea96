"""The evaluation loop: prompts -> batched generation -> extraction -> scoring -> aggregates.

This module owns running an evaluation against any ``generate_fn`` with the signature

    generate_fn(prompts: list[str], num_samples: int, temperature: float,
                max_new_tokens: int, seed: int) -> list[list[str]]

(one list of ``num_samples`` completions per prompt, completions only, without the prompt).
:func:`load_generate_fn` (defined in :mod:`rlp.eval.generation`) builds one from a checkpoint.

Runs and protocols
------------------
Each benchmark expands into one or two *runs* (``"<benchmark>:greedy"``,
``"<benchmark>:sampled"``) from its registry protocols: math = pass@1 averaged over 8 samples,
science = greedy plus avg@4. ``num_samples`` / ``temperature`` in :class:`EvalSettings` override
the sampled protocols; a sampled temperature of 0 turns math runs into one greedy sample and
drops the (identical) sampled science runs.

Determinism and resume
----------------------
Items of a run are cut into fixed batches of ``batch_size`` prompts over the (sub)sampled item
list; batch ``b`` of run ``r`` is generated with seed ``hash(seed, r, b)``. Every finished batch
is appended to ``<out>/items.jsonl`` in one write (flushed and fsynced). A re-run with the same
``--out`` and settings skips finished batches, regenerates unfinished ones with the same seed and
therefore produces the same final results as an uninterrupted run (given a deterministic
``generate_fn``). The first line of ``items.jsonl`` records the settings; resuming with different
output-affecting settings is refused with the list of differences. Final results are always
rebuilt from ``items.jsonl`` in canonical order, never from in-memory state.

Reasoning quality
-----------------
With ``reasoning=ReasoningSettings(...)`` the faithfulness probes and the step information gain
run after generation over the stored completions (:mod:`rlp.eval.reasoning`), with their own
journals in the output directory, and add the ``probes`` / ``step_info_gain`` sections.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlp.eval.aggregates import (
    accuracy_with_ci,
    compute_aggregates,
    default_ks,
    mean_pass_at_k,
)
from rlp.eval.benchmarks import (
    BenchmarkItem,
    FewShotPool,
    get_spec,
    load_benchmark,
    load_mmlu_dev,
    load_mmlu_pro_categories,
    load_mmlu_pro_validation,
    with_subjects,
)
from rlp.eval.generation import load_generate_fn
from rlp.eval.grading import STATUSES, MathVerifier, SampleScore, score_math_batch, score_mc
from rlp.eval.journal import (
    ResumeMismatchError,
    append_lines,
    check_meta,
    open_journal,
    read_journal,
)
from rlp.eval.prompts import MATH_EXEMPLARS, STOP_STRINGS, build_prompt, truncate_at_stop
from rlp.eval.reasoning import ReasoningSettings, RunRef, reasoning_results, run_reasoning

__all__ = [
    "EvalSettings",
    "GenerateFn",
    "GenerateFnError",
    "ResumeMismatchError",
    "RunSpec",
    "batch_seed",
    "build_results",
    "check_resumable",
    "evaluate",
    "load_generate_fn",
    "plan_runs",
]

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[str], int, float, int, int], list[list[str]]]
RESULTS_FORMAT = "rlp-eval/v1"
ITEMS_FILE = "items.jsonl"


class GenerateFnError(RuntimeError):
    """The generate function returned something of the wrong shape or type."""


@dataclass
class EvalSettings:
    """Everything that decides what is generated and how it is scored."""

    num_samples: int | None = None
    """Samples per item for sampled runs (``None``: the protocol's, 8 math / 4 science)."""
    temperature: float | None = None
    """Temperature of sampled runs (``None``: the protocol's, 0.6). Greedy runs always use 0."""
    max_new_tokens: int = 2048
    """Longest completion in tokens (it must leave room for a prompt in the model's positions)."""
    limit: int | None = None
    """Evaluate a fixed-seed random subset of this many items per benchmark."""
    few_shot: int = 0
    """Exemplars per prompt (0 = zero-shot chain of thought)."""
    batch_size: int = 8
    """Prompts per ``generate_fn`` call; also fixes batch composition and hence seeds."""
    seed: int = 0
    """Seed of the item subset and of sampling."""
    data_dir: str | None = None
    """Benchmark data root holding <name>/test.jsonl (``None``: $RLP_BENCHMARK_DIR, else
    ~/.cache/rlp/benchmarks; layout in docs/evaluation.md)."""
    use_hf: bool = False
    """Load the test sets from the Hugging Face hub instead (needs internet and ``datasets``)."""
    stop_strings: tuple[str, ...] = STOP_STRINGS
    """Completions end at the first of these strings."""
    verify_timeout_s: float = 10.0
    """Seconds per math-verify check; a timeout counts as incorrect."""
    verify_workers: int = 2
    """Math-verify worker processes."""

    def __post_init__(self) -> None:
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.few_shot < 0:
            raise ValueError(f"--few-shot must be >= 0, got {self.few_shot}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        self.stop_strings = tuple(self.stop_strings)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change outputs; a resume must match these exactly."""
        d = asdict(self)
        for key in ("data_dir", "verify_workers"):
            d.pop(key)
        d["stop_strings"] = list(self.stop_strings)
        return d


@dataclass(frozen=True)
class RunSpec:
    """One (benchmark, protocol) run."""

    benchmark: str
    mode: str
    num_samples: int
    temperature: float

    @property
    def key(self) -> str:
        return f"{self.benchmark}:{self.mode}"

    @property
    def score_label(self) -> str:
        """Column name as in the paper: ``MATH500``, ``MMLU``, ``MMLU@1[4]``."""
        spec = get_spec(self.benchmark)
        if spec.kind == "mc" and self.mode == "sampled":
            return f"{spec.display_name}@1[{self.num_samples}]"
        return spec.display_name

    @property
    def metric_name(self) -> str:
        if self.mode == "greedy":
            return "greedy accuracy"
        return f"pass@1 averaged over {self.num_samples} samples (T={self.temperature:g})"


def plan_runs(benchmarks: Sequence[str], settings: EvalSettings) -> list[RunSpec]:
    """Expand benchmark names into runs using registry protocols and the overrides."""
    runs: list[RunSpec] = []
    for name in benchmarks:
        spec = get_spec(name)
        for proto in spec.protocols:
            if proto.mode == "greedy":
                runs.append(RunSpec(spec.name, "greedy", 1, 0.0))
                continue
            n = settings.num_samples if settings.num_samples is not None else proto.num_samples
            t = settings.temperature if settings.temperature is not None else proto.temperature
            if t == 0.0:
                if spec.kind == "math":
                    runs.append(RunSpec(spec.name, "greedy", 1, 0.0))
                # Multiple choice already has a greedy run; a T=0 "sampled" run would repeat it.
                continue
            runs.append(RunSpec(spec.name, "sampled", n, t))
    return runs


def batch_seed(seed: int, run_key: str, batch_index: int) -> int:
    """Deterministic 31-bit seed for one batch of one run."""
    digest = hashlib.sha256(f"{seed}:{run_key}:{batch_index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# items.jsonl
# ---------------------------------------------------------------------------------------------


def _read_items_file(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    return read_journal(path, "item")


def check_resumable(out_dir: str | os.PathLike[str], settings: EvalSettings) -> int:
    """Raise :class:`ResumeMismatchError` if ``out_dir`` holds a run with other settings.

    Returns the number of item records already there (0 for a fresh directory). Cheap; the CLI
    calls it before loading a model.
    """
    path = Path(out_dir) / ITEMS_FILE
    meta, records = _read_items_file(path)
    if meta is not None and records:  # a settings line without records binds nothing
        check_meta(meta, settings.fingerprint(), path)
    elif records:
        raise ResumeMismatchError(
            f"{path} has item records but no settings line; use a new --out directory"
        )
    return len(records)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class _Timing:
    generate_s: float = 0.0
    score_s: float = 0.0
    reasoning_s: float = 0.0
    batches: int = 0
    by_run: dict[str, float] = field(default_factory=dict)


def _few_shot_pool(benchmark: str, settings: EvalSettings) -> FewShotPool | None:
    if settings.few_shot <= 0:
        return None
    if benchmark == "mmlu":
        return load_mmlu_dev(settings.data_dir)
    if benchmark == "mmlu_pro":
        return load_mmlu_pro_validation(settings.data_dir)
    if benchmark == "gpqa_diamond":
        logger.warning("GPQA-Diamond has no dev split; it is evaluated zero-shot")
    return None


def _load_items(benchmark: str, settings: EvalSettings) -> list[BenchmarkItem]:
    items = load_benchmark(
        benchmark, settings.data_dir, use_hf=settings.use_hf, limit=settings.limit
    )
    if benchmark == "mmlu_pro" and settings.few_shot > 0 and not settings.use_hf:
        items = with_subjects(items, load_mmlu_pro_categories(settings.data_dir))
    return items


def _num_shots(benchmark: str, settings: EvalSettings) -> int:
    if get_spec(benchmark).kind == "math" and settings.few_shot > len(MATH_EXEMPLARS):
        logger.warning(
            "--few-shot %d > %d math exemplars; using %d",
            settings.few_shot,
            len(MATH_EXEMPLARS),
            len(MATH_EXEMPLARS),
        )
        return len(MATH_EXEMPLARS)
    return 0 if benchmark == "gpqa_diamond" else settings.few_shot


def _check_outputs(outputs: Any, prompts: Sequence[str], n: int) -> list[list[str]]:
    if not isinstance(outputs, list) or len(outputs) != len(prompts):
        got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise GenerateFnError(
            f"generate_fn returned {got} entries for {len(prompts)} prompts; "
            "it must return one list of completions per prompt"
        )
    for i, row in enumerate(outputs):
        if not isinstance(row, list) or len(row) != n or not all(isinstance(t, str) for t in row):
            raise GenerateFnError(
                f"generate_fn output for prompt {i} must be a list of {n} strings, got {row!r:.200}"
            )
    return outputs


def _score_batch(
    run: RunSpec,
    items: Sequence[BenchmarkItem],
    texts: list[list[str]],
    verifier: MathVerifier | None,
) -> list[list[SampleScore]]:
    if get_spec(run.benchmark).kind == "mc":
        return [
            [score_mc(t, it.answer, it.valid_letters, it.choices) for t in row]
            for it, row in zip(items, texts)
        ]
    if verifier is None:
        raise RuntimeError("math scoring needs a MathVerifier")
    golds = [it.answer for it, row in zip(items, texts) for _ in row]
    flat = score_math_batch(verifier, golds, [t for row in texts for t in row])
    out, pos = [], 0
    for row in texts:
        out.append(flat[pos : pos + len(row)])
        pos += len(row)
    return out


def _batches(n: int, size: int) -> Iterator[tuple[int, int, int]]:
    for b, start in enumerate(range(0, n, size)):
        yield b, start, min(n, start + size)


def evaluate(
    generate_fn: GenerateFn,
    benchmarks: Sequence[str],
    settings: EvalSettings,
    out_dir: str | os.PathLike[str],
    *,
    label: str | None = None,
    checkpoint: str | None = None,
    progress: bool = True,
    verifier: MathVerifier | None = None,
    write_reports: bool = True,
    reasoning: ReasoningSettings | None = None,
    paraphraser: GenerateFn | None = None,
) -> dict[str, Any]:
    """Run (or resume) an evaluation and return the results dict (also written to ``out_dir``).

    Writes ``items.jsonl`` incrementally, then ``results.json``, ``summary.md`` and the plots
    (see :mod:`rlp.eval.report`). A ``verifier`` may be passed to reuse a running
    :class:`MathVerifier`; otherwise one is started and stopped here. With ``reasoning``
    (:class:`rlp.eval.reasoning.ReasoningSettings`), the faithfulness probes and the step
    information gain then run over the completions (``generate_fn`` must be a model from
    :func:`load_generate_fn`; ``paraphraser`` is the ``generate_fn`` of the paraphrase probe)
    and their sections join the results.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items_path = out / ITEMS_FILE
    existing = open_journal(
        items_path,
        "item",
        settings.fingerprint(),
        format=RESULTS_FORMAT,
        label=label,
        checkpoint=checkpoint,
    )
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in existing:
        done.setdefault((rec["run"], rec["index"]), rec)

    runs = plan_runs(benchmarks, settings)
    own_verifier = verifier is None and any(get_spec(r.benchmark).kind == "math" for r in runs)
    if own_verifier:
        verifier = MathVerifier(
            num_workers=settings.verify_workers, timeout_s=settings.verify_timeout_s
        )
    timing = _Timing()
    t_start = time.monotonic()
    item_cache: dict[str, list[BenchmarkItem]] = {}
    try:
        for run in runs:
            if run.benchmark not in item_cache:
                item_cache[run.benchmark] = _load_items(run.benchmark, settings)
            items = item_cache[run.benchmark]
            t_run = time.monotonic()
            _run_one(
                run, items, settings, generate_fn, verifier, items_path, done, timing, progress
            )
            timing.by_run[run.key] = time.monotonic() - t_run
        if reasoning is not None and reasoning.enabled:
            t_reasoning = time.monotonic()
            _run_reasoning_phase(
                generate_fn,
                runs,
                item_cache,
                settings,
                reasoning,
                out,
                verifier,
                paraphraser,
                progress,
            )
            timing.reasoning_s = time.monotonic() - t_reasoning
    finally:
        if own_verifier and verifier is not None:
            verifier.close()

    _, records = _read_items_file(items_path)
    results = build_results(runs, item_cache, records, settings, label=label, checkpoint=checkpoint)
    if reasoning is not None and reasoning.enabled:
        results.update(reasoning_results(_run_refs(runs), item_cache, reasoning, out))
    results["timing"] = {
        "wall_s": round(time.monotonic() - t_start, 3),
        "generate_s": round(timing.generate_s, 3),
        "score_s": round(timing.score_s, 3),
        "reasoning_s": round(timing.reasoning_s, 3),
        "batches_generated": timing.batches,
        "by_run_s": {k: round(v, 3) for k, v in timing.by_run.items()},
    }
    if write_reports:
        from rlp.eval.report import write_reports as _write_reports

        _write_reports(results, out)
    return results


def _run_refs(runs: Sequence[RunSpec]) -> list[RunRef]:
    return [RunRef(r.key, r.benchmark, r.mode, r.num_samples) for r in runs]


def _run_reasoning_phase(
    generate_fn: GenerateFn,
    runs: Sequence[RunSpec],
    item_cache: Mapping[str, Sequence[BenchmarkItem]],
    settings: EvalSettings,
    reasoning: ReasoningSettings,
    out: Path,
    verifier: MathVerifier | None,
    paraphraser: GenerateFn | None,
    progress: bool,
) -> None:
    """Probes and step gain over the generated completions (prompts rebuilt as generated)."""
    _, records = _read_items_file(out / ITEMS_FILE)
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        by_key.setdefault((rec["run"], rec["index"]), rec)
    pools = {b: _few_shot_pool(b, settings) for b in item_cache}

    def prompt_for(item: BenchmarkItem) -> str:
        return build_prompt(item, _num_shots(item.benchmark, settings), pools[item.benchmark])

    run_reasoning(
        generate_fn,  # type: ignore[arg-type]
        _run_refs(runs),
        item_cache,
        by_key,
        prompt_for,
        reasoning,
        out,
        generation=settings.fingerprint(),
        verifier=verifier,
        paraphraser=paraphraser,
        progress=progress,
    )


def _run_one(
    run: RunSpec,
    items: Sequence[BenchmarkItem],
    settings: EvalSettings,
    generate_fn: GenerateFn,
    verifier: MathVerifier | None,
    items_path: Path,
    done: dict[tuple[str, int], dict[str, Any]],
    timing: _Timing,
    progress: bool,
) -> None:
    pool = _few_shot_pool(run.benchmark, settings)
    shots = _num_shots(run.benchmark, settings)
    initial = sum((run.key, i) in done for i in range(len(items)))
    for i in range(len(items)):
        rec = done.get((run.key, i))
        if rec is not None and rec["id"] != items[i].id:
            raise ResumeMismatchError(
                f"{items_path}: run {run.key} item {i} is {rec['id']!r} but the data has "
                f"{items[i].id!r}; the benchmark files changed. Use a new --out directory."
            )
    bar = tqdm(
        total=len(items),
        initial=initial,
        desc=f"{run.score_label} ({run.mode})",
        unit="item",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for b, start, stop in _batches(len(items), settings.batch_size):
            missing = [i for i in range(start, stop) if (run.key, i) not in done]
            if not missing:
                continue
            batch_items = items[start:stop]
            prompts = [build_prompt(it, shots, pool) for it in batch_items]
            seed = batch_seed(settings.seed, run.key, b)
            t0 = time.monotonic()
            raw = generate_fn(
                prompts, run.num_samples, run.temperature, settings.max_new_tokens, seed
            )
            texts = [
                [truncate_at_stop(t, settings.stop_strings) for t in row]
                for row in _check_outputs(raw, prompts, run.num_samples)
            ]
            t1 = time.monotonic()
            scores = _score_batch(run, batch_items, texts, verifier)
            timing.generate_s += t1 - t0
            timing.score_s += time.monotonic() - t1
            timing.batches += 1
            new = []
            for j, i in enumerate(range(start, stop)):
                if i not in missing:
                    continue
                it = items[i]
                rec = {
                    "type": "item",
                    "run": run.key,
                    "benchmark": run.benchmark,
                    "mode": run.mode,
                    "index": i,
                    "id": it.id,
                    "gold": it.answer,
                    "batch": b,
                    "seed": seed,
                    "num_samples": run.num_samples,
                    "num_correct": sum(s.correct for s in scores[j]),
                    "samples": [{"text": t, **s.to_dict()} for t, s in zip(texts[j], scores[j])],
                }
                new.append(rec)
                done[(run.key, i)] = rec
            append_lines(items_path, new)
            bar.update(len(new))
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def build_results(
    runs: Sequence[RunSpec],
    items_by_benchmark: Mapping[str, Sequence[BenchmarkItem]],
    records: Sequence[Mapping[str, Any]],
    settings: EvalSettings,
    *,
    label: str | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Results dict from item records (canonical order; independent of how the run went)."""
    by_key: dict[tuple[str, int], Mapping[str, Any]] = {}
    for rec in records:
        by_key.setdefault((rec["run"], rec["index"]), rec)
    run_results: dict[str, dict[str, Any]] = {}
    item_rows: list[dict[str, Any]] = []
    math_scores: dict[str, float] = {}
    sci_greedy: dict[str, float] = {}
    sci_sampled: dict[str, float] = {}
    sampled_ns: set[int] = set()
    for run in runs:
        spec = get_spec(run.benchmark)
        items = items_by_benchmark[run.benchmark]
        recs = [by_key.get((run.key, i)) for i in range(len(items))]
        if any(r is None for r in recs):
            missing = sum(r is None for r in recs)
            raise RuntimeError(f"run {run.key}: {missing} items have no record in {ITEMS_FILE}")
        counts = [(int(r["num_samples"]), int(r["num_correct"])) for r in recs if r]
        acc = accuracy_with_ci([c / n for n, c in counts])
        statuses: Counter[str] = Counter()
        methods: Counter[str] = Counter()
        for r in recs:
            assert r is not None
            statuses.update(s["status"] for s in r["samples"])
            methods.update(s["method"] for s in r["samples"])
            item_rows.append(
                {
                    "run": run.key,
                    "index": r["index"],
                    "id": r["id"],
                    "gold": r["gold"],
                    "num_samples": r["num_samples"],
                    "num_correct": r["num_correct"],
                    "score": r["num_correct"] / r["num_samples"],
                    "extracted": [s["extracted"] for s in r["samples"]],
                    "statuses": [s["status"] for s in r["samples"]],
                }
            )
        ks = default_ks(run.num_samples)
        run_results[run.key] = {
            "benchmark": run.benchmark,
            "display_name": spec.display_name,
            "kind": spec.kind,
            "group": spec.group,
            "mode": run.mode,
            "num_samples": run.num_samples,
            "temperature": run.temperature,
            "metric": run.metric_name,
            "score_label": run.score_label,
            "accuracy": acc.value,
            "ci": [acc.ci_low, acc.ci_high],
            "ci_method": acc.method,
            "num_items": acc.num_items,
            "pass_at_k": {str(k): mean_pass_at_k(counts, k) for k in ks},
            "status_counts": {s: statuses.get(s, 0) for s in STATUSES},
            "extraction_methods": dict(sorted(methods.items())),
        }
        if spec.group == "math":
            math_scores[run.benchmark] = acc.value
        elif spec.group == "science":
            if run.mode == "greedy":
                sci_greedy[run.benchmark] = acc.value
            else:
                sci_sampled[run.benchmark] = acc.value
                sampled_ns.add(run.num_samples)
    n_label = "/".join(str(n) for n in sorted(sampled_ns)) or "4"
    agg = compute_aggregates(
        math_scores, sci_greedy, sci_sampled, sampled_label=f"Science Avg@1[{n_label}]"
    )
    return {
        "format": RESULTS_FORMAT,
        "label": label,
        "checkpoint": checkpoint,
        "settings": settings.fingerprint(),
        "runs": run_results,
        "scores": {r["score_label"]: r["accuracy"] for r in run_results.values()},
        "aggregates": agg.to_dict(),
        "items": item_rows,
    }
