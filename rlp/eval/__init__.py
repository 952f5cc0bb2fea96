"""Bundled benchmark evaluation (paper §13 protocol) for RLP checkpoints.

Modules and what they own:

* :mod:`rlp.eval.benchmarks`: registry (name -> kind, group, protocols), item schema, loaders
  (local normalised files, GPQA from its password zip, optional HF hub), few-shot pools.
* :mod:`rlp.eval.prompts`: prompt templates and stop strings (choices documented there and in
  ``docs/evaluation.md``).
* :mod:`rlp.eval.grading`: answer extraction and checking (math-verify in worker processes with
  our own timeout; multiple-choice letters).
* :mod:`rlp.eval.aggregates`: pass@k, accuracy with Wilson CI, Math Avg (/5, /6, 4 sets), Science
  Avg, Overall.
* :mod:`rlp.eval.runner`: the resumable evaluation loop around a ``generate_fn``.
* :mod:`rlp.eval.journal`: the append-only JSON-lines journals it resumes from.
* :mod:`rlp.eval.generation`: ``load_generate_fn`` (backend dispatch; the transformers path) and
  the ``ChainModel`` interface (tokens, teacher-forced log-probs) of both backends.
* :mod:`rlp.eval.megatron_generation`: generation and teacher forcing through our Megatron model
  and KV-cache sampler, from an HF directory or an rlp checkpoint, with TP under torchrun.
* :mod:`rlp.eval.chains`: reasoning / final-answer split, steps, truncation, filler, forced
  answers in each benchmark's format.
* :mod:`rlp.eval.probes`: faithfulness probes (truncate, filler, paraphrase; Lanham et al. 2023).
* :mod:`rlp.eval.step_gain`: per-step information gain of the gold answer.
* :mod:`rlp.eval.reasoning`: runs the probes and the step gain after generation (journals,
  results sections).
* :mod:`rlp.eval.report`: results JSON, Markdown summary, plots, A/B comparison.
* :mod:`rlp.eval.lm_harness`: the lm-evaluation-harness model ``rlp`` (optional extra
  ``lmeval``; imported only by ``rlp eval lm-eval``).

Nothing here imports megatron directly (``megatron_generation`` goes through :mod:`rlp.model`);
torch and transformers are imported lazily by the two generation modules only, matplotlib by
:mod:`rlp.eval.report` when it plots. The command-line
entry point is ``rlp eval`` (:mod:`rlp.eval.command`), also ``python benchmarks/evaluate.py``.
"""

from rlp.eval.aggregates import compute_aggregates, math_avg, overall, pass_at_k, science_avg
from rlp.eval.benchmarks import (
    PAPER_BENCHMARKS,
    REGISTRY,
    BenchmarkItem,
    get_spec,
    load_benchmark,
    parse_benchmark_list,
)
from rlp.eval.grading import MathVerifier, extract_choice_letter, extract_math_answer
from rlp.eval.runner import EvalSettings, evaluate, load_generate_fn, plan_runs

__all__ = [
    "PAPER_BENCHMARKS",
    "REGISTRY",
    "BenchmarkItem",
    "EvalSettings",
    "MathVerifier",
    "compute_aggregates",
    "evaluate",
    "extract_choice_letter",
    "extract_math_answer",
    "get_spec",
    "load_benchmark",
    "load_generate_fn",
    "math_avg",
    "overall",
    "parse_benchmark_list",
    "pass_at_k",
    "plan_runs",
    "science_avg",
]
