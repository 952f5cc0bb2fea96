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
* :mod:`rlp.eval.generation`: ``load_generate_fn`` (backend dispatch; the transformers path).
* :mod:`rlp.eval.megatron_generation`: generation through our Megatron model and KV-cache
  sampler, from an HF directory or an rlp checkpoint, with tensor parallelism under torchrun.
* :mod:`rlp.eval.report`: results JSON, Markdown summary, bar plot, A/B comparison.

Nothing here imports megatron directly (``megatron_generation`` goes through :mod:`rlp.model`);
torch and transformers are imported lazily by the two generation modules only. The command-line
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
