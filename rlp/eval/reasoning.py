"""The reasoning-quality phase of an evaluation: faithfulness probes and step information gain.

This module owns running :mod:`rlp.eval.probes` and :mod:`rlp.eval.step_gain` over the graded
completions in ``items.jsonl`` after generation, journalling their records and turning them into
the ``probes`` and ``step_info_gain`` sections of ``results.json``.

* **Which completions.** Per benchmark, the completions of one run: the ``sampled`` run when
  there is one (math; multiple choice ``@1[n]``), else the ``greedy`` run. Every sample of every
  evaluated item is used. The step gain runs on math benchmarks only (it needs a gold answer in
  the ``\\boxed{}`` format).
* **Journals.** ``probes.jsonl`` and ``step_gain.jsonl`` in the output directory (format of
  :mod:`rlp.eval.journal`), one record per completion, appended every ``completions_per_batch``
  completions. A re-run with the same settings skips what is there; a re-run with different
  probe settings (or generations) is refused, as for ``items.jsonl``.
* **Results** are rebuilt from the journals in canonical order (item, then sample), so an
  interrupted and resumed phase gives the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlp.eval.benchmarks import BenchmarkItem, get_spec
from rlp.eval.chains import Completion
from rlp.eval.generation import ChainModel
from rlp.eval.grading import MathVerifier
from rlp.eval.journal import append_lines, open_journal, read_journal
from rlp.eval.probes import ProbeSettings, probe_completions, summarize_probes
from rlp.eval.step_gain import StepGainSettings, step_gain_completions, summarize_step_gain

logger = logging.getLogger(__name__)

PROBES_FILE = "probes.jsonl"
STEP_GAIN_FILE = "step_gain.jsonl"


@dataclass(frozen=True)
class ReasoningSettings:
    """What the reasoning-quality phase measures (nothing by default)."""

    probes: ProbeSettings = field(default_factory=ProbeSettings)
    step_info_gain: bool = False
    step_gain: StepGainSettings = field(default_factory=StepGainSettings)
    paraphraser: str | None = None
    """The paraphraser model's path (recorded; the model itself is passed separately)."""
    completions_per_batch: int = 16

    @property
    def enabled(self) -> bool:
        return bool(self.probes.probes) or self.step_info_gain


@dataclass(frozen=True)
class RunRef:
    """The few facts about an evaluated run that this phase needs."""

    key: str
    benchmark: str
    mode: str
    num_samples: int


def analysed_runs(runs: Sequence[RunRef]) -> dict[str, RunRef]:
    """Per benchmark, the run whose completions are analysed (sampled if present, else greedy)."""
    out: dict[str, RunRef] = {}
    for run in runs:
        if run.benchmark not in out or run.mode == "sampled":
            out[run.benchmark] = run
    return out


def completions_of(
    run: RunRef,
    items: Sequence[BenchmarkItem],
    records: Mapping[tuple[str, int], Mapping[str, Any]],
    prompt_for: Callable[[BenchmarkItem], str],
) -> list[Completion]:
    """Every sample of every item of ``run`` as a :class:`Completion`, in canonical order."""
    kind = get_spec(run.benchmark).kind
    out: list[Completion] = []
    for i, item in enumerate(items):
        rec = records[(run.key, i)]
        prompt = prompt_for(item)
        for j, sample in enumerate(rec["samples"]):
            out.append(
                Completion(
                    run=run.key,
                    benchmark=run.benchmark,
                    kind=kind,
                    index=i,
                    item_id=item.id,
                    sample=j,
                    prompt=prompt,
                    text=sample["text"],
                    gold=item.answer,
                    correct=sample["status"] == "correct",
                    extracted=sample["extracted"],
                    valid_letters=item.valid_letters,
                    choices=item.choices,
                )
            )
    return out


def _fingerprints(settings: ReasoningSettings, generation: Mapping[str, Any]) -> dict[str, dict]:
    return {
        "probe": {
            "generation": dict(generation),
            **settings.probes.fingerprint(),
            "paraphraser": settings.paraphraser,
        },
        "gain": {"generation": dict(generation), **settings.step_gain.fingerprint()},
    }


def run_reasoning(
    model: ChainModel,
    runs: Sequence[RunRef],
    items_by_benchmark: Mapping[str, Sequence[BenchmarkItem]],
    item_records: Mapping[tuple[str, int], Mapping[str, Any]],
    prompt_for: Callable[[BenchmarkItem], str],
    settings: ReasoningSettings,
    out_dir: Path,
    *,
    generation: Mapping[str, Any],
    verifier: MathVerifier | None,
    paraphraser: Callable[..., list[list[str]]] | None = None,
    progress: bool = True,
) -> None:
    """Probe and score every analysed completion not yet journalled (see the module doc)."""
    for name in ("encode", "decode", "score"):
        if not callable(getattr(model, name, None)):
            raise TypeError(
                "the reasoning-quality measurements need a model loaded by load_generate_fn "
                f"(a generate_fn with encode/decode/score); this one has no {name}()"
            )
    prints = _fingerprints(settings, generation)
    phases: list[tuple[str, Path, str, Callable[[list[Completion]], list[dict]]]] = []
    if settings.probes.probes:
        phases.append(
            (
                "probes",
                out_dir / PROBES_FILE,
                "probe",
                lambda cs: probe_completions(
                    model, cs, settings.probes, verifier=verifier, paraphraser=paraphraser
                ),
            )
        )
    if settings.step_info_gain:
        phases.append(
            (
                "step gain",
                out_dir / STEP_GAIN_FILE,
                "gain",
                lambda cs: step_gain_completions(model, cs, settings.step_gain),
            )
        )
    chosen = analysed_runs(runs)
    for label, path, rtype, compute in phases:
        done = {
            (r["run"], r["index"], r["sample"]) for r in open_journal(path, rtype, prints[rtype])
        }
        todo: list[Completion] = []
        for bench, run in chosen.items():
            if rtype == "gain" and get_spec(bench).kind != "math":
                continue
            comps = completions_of(run, items_by_benchmark[bench], item_records, prompt_for)
            todo += [c for c in comps if c.key not in done]
        bar = tqdm(total=len(todo), desc=label, unit="chain", disable=not progress)
        try:
            step = settings.completions_per_batch
            for start in range(0, len(todo), step):
                batch = todo[start : start + step]
                recs = compute(batch)
                append_lines(path, [{"type": rtype, **r} for r in recs])
                bar.update(len(batch))
        finally:
            bar.close()


def reasoning_results(
    runs: Sequence[RunRef],
    items_by_benchmark: Mapping[str, Sequence[BenchmarkItem]],
    settings: ReasoningSettings,
    out_dir: Path,
) -> dict[str, Any]:
    """The ``probes`` / ``step_info_gain`` sections, rebuilt from the journals."""
    out: dict[str, Any] = {}
    chosen = analysed_runs(runs)
    sections = []
    if settings.probes.probes:
        sections.append(("probes", out_dir / PROBES_FILE, "probe"))
    if settings.step_info_gain:
        sections.append(("step_info_gain", out_dir / STEP_GAIN_FILE, "gain"))
    for section, path, rtype in sections:
        _, records = read_journal(path, rtype)
        by_key = {(r["run"], r["index"], r["sample"]): r for r in records}
        out[section] = {}
        for bench, run in chosen.items():
            if rtype == "gain" and get_spec(bench).kind != "math":
                continue
            n_items = len(items_by_benchmark[bench])
            keys = [(run.key, i, j) for i in range(n_items) for j in range(run.num_samples)]
            missing = [k for k in keys if k not in by_key]
            if missing:
                raise RuntimeError(
                    f"{path}: {len(missing)} completions of {run.key} have no record"
                )
            recs = [{k: v for k, v in by_key[key].items() if k != "type"} for key in keys]
            if rtype == "probe":
                summary = summarize_probes(recs, settings.probes)
                extra: dict[str, Any] = {
                    "probes": list(settings.probes.probes),
                    "paraphraser": settings.paraphraser,
                }
            else:
                summary = summarize_step_gain(recs)
                extra = {"max_steps": settings.step_gain.max_steps}
            out[section][bench] = {"run": run.key, **extra, **summary, "items": recs}
    return out
