"""Evaluate a checkpoint on the paper's benchmarks (docs/method.md §13), or compare two results.

Examples::

    # all eight paper benchmarks, paper protocol (math pass@1 over 8, science greedy + @1[4])
    python benchmarks/evaluate.py --checkpoint /path/to/hf_model --out runs/eval/base

    # quick smoke: 20 items per set, greedy only
    python benchmarks/evaluate.py --checkpoint M --benchmarks gsm8k,mmlu --limit 20 \\
        --temperature 0 --out runs/eval/smoke

    # tensor parallelism (megatron backend): one process per TP rank; rank 0 writes the outputs
    torchrun --nproc-per-node 2 benchmarks/evaluate.py --checkpoint M --tp 2 --out runs/eval/tp2

    # side-by-side comparison of two finished evaluations
    python benchmarks/evaluate.py --compare runs/eval/base/results.json runs/eval/rlp/results.json

An interrupted run resumes from ``<out>/items.jsonl`` when re-run with the same ``--out`` and
settings. See docs/evaluation.md for prompts, scoring and aggregate conventions.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rlp.eval.benchmarks import (
    DATA_DIR_ENV,
    REGISTRY,
    BenchmarkDataError,
    load_benchmark,
    parse_benchmark_list,
    resolve_data_dir,
)
from rlp.eval.generation import BACKENDS, resolve_backend
from rlp.eval.report import compare_results, load_results, render_markdown
from rlp.eval.runner import (
    EvalSettings,
    ResumeMismatchError,
    check_resumable,
    evaluate,
    load_generate_fn,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/evaluate.py",
        description="Bundled RLP benchmark evaluation (math pass@1[n], science greedy + @1[n]).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        help="Hugging Face model directory, or an rlp checkpoint (step dir or checkpoints root; "
        "megatron backend only)",
    )
    p.add_argument(
        "--benchmarks",
        default="all",
        help=f"comma-separated names or 'all' (the 8 paper sets) or 'all+extra'; "
        f"valid: {', '.join(REGISTRY)}",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"benchmark data root (default: ${DATA_DIR_ENV} or ../shared/benchmarks "
        "next to the repository)",
    )
    p.add_argument(
        "--hf-datasets",
        action="store_true",
        help="load test sets from the Hugging Face hub instead (needs internet and "
        "the 'datasets' package)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="samples per item for sampled runs (default: 8 math, 4 science)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="temperature of sampled runs (default 0.6); 0 = greedy everywhere",
    )
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate a fixed random subset of this many items per benchmark",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="generation backend: megatron (rlp's model and KV-cache sampler; HF dirs and rlp "
        "checkpoints; --tp) or hf (transformers; HF dirs, one device); auto = megatron when "
        "megatron-core imports, else hf",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size (megatron backend); N > 1 needs N processes: "
        "torchrun --nproc-per-node N benchmarks/evaluate.py ...",
    )
    p.add_argument(
        "--few-shot",
        type=int,
        default=0,
        help="exemplars per prompt (0 = zero-shot chain of thought)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default runs/eval/<checkpoint name>); re-running "
        "with the same directory resumes",
    )
    p.add_argument("--label", default=None, help="name shown in reports (default: checkpoint)")
    p.add_argument(
        "--verify-timeout",
        type=float,
        default=10.0,
        help="seconds per math-verify check; a timeout counts as incorrect",
    )
    p.add_argument("--verify-workers", type=int, default=2, help="math-verify worker processes")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="compare two results files (or their directories) and exit",
    )
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    return p


def _list_benchmarks() -> str:
    rows = []
    for spec in REGISTRY.values():
        protos = ", ".join(
            f"{pr.mode}(n={pr.num_samples}, T={pr.temperature:g})" for pr in spec.protocols
        )
        rows.append(
            f"{spec.name:14s} {spec.kind:4s} {spec.group:8s} {protos:40s} {spec.description}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = _launch_rank()
    # Under torchrun only rank 0 talks; the other ranks just generate.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Input problems (bad names, missing data, wrong checkpoint, changed settings on resume)
    # are reported as one "error:" line and exit code 2; anything else is a bug and raises.
    # Every rank runs the same checks, so all ranks of a launch stop together.
    user_errors = (KeyError, ValueError, FileNotFoundError, BenchmarkDataError, ResumeMismatchError)
    try:
        if args.list:
            print(_list_benchmarks())
            return 0
        if args.compare:
            a, b = (load_results(x) for x in args.compare)
            text = compare_results(a, b)
            print(text)
            if args.out:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "comparison.md").write_text(text, encoding="utf-8")
            return 0
        if not args.checkpoint:
            raise ValueError("--checkpoint is required (or use --compare A.json B.json)")
        _check_parallel_args(args)
        benchmarks = parse_benchmark_list(args.benchmarks)
        settings = EvalSettings(
            num_samples=args.num_samples,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
            few_shot=args.few_shot,
            batch_size=args.batch_size,
            seed=args.seed,
            data_dir=args.data_dir,
            use_hf=args.hf_datasets,
            verify_timeout_s=args.verify_timeout,
            verify_workers=args.verify_workers,
        )
        if not args.hf_datasets:
            settings.data_dir = str(resolve_data_dir(args.data_dir))
            for name in benchmarks:  # fail on missing/malformed data before loading a model
                load_benchmark(name, settings.data_dir, limit=args.limit)
        out = Path(args.out) if args.out else Path("runs/eval") / Path(args.checkpoint).name
        check_resumable(out, settings)
        backend = resolve_backend(args.backend)
        if backend == "hf" and args.tp > 1:
            raise ValueError(
                f"--tp {args.tp} needs the megatron backend"
                + (", but megatron-core does not import here" if args.backend == "auto" else "")
                + "; pass --backend megatron (or --tp 1)"
            )
        generate_fn = load_generate_fn(
            args.checkpoint, args.tp, args.batch_size, args.seed, backend=backend
        )
    except user_errors as exc:
        return _user_error(exc)
    if not getattr(generate_fn, "is_leader", True):
        # A follower TP rank: generate what rank 0 asks for until it is done.
        code = generate_fn.serve()
        generate_fn.teardown()
        return code
    code = 1  # what the followers are told if evaluate() raises
    try:
        results = evaluate(
            generate_fn,
            benchmarks,
            settings,
            out,
            label=args.label or Path(args.checkpoint).name,
            checkpoint=str(args.checkpoint),
            progress=not args.no_progress,
        )
        code = 0
    except (BenchmarkDataError, ResumeMismatchError) as exc:
        code = _user_error(exc)
        return code
    finally:
        if hasattr(generate_fn, "close"):
            generate_fn.close(code)
            generate_fn.teardown()
    print(render_markdown(results))
    print(f"results written to {out}/ (results.json, summary.md, accuracy.png, items.jsonl)")
    return 0


def _launch_rank() -> int:
    """Global rank from the launcher's environment (torchrun / srun); 0 for a plain process."""
    import os

    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _check_parallel_args(args: argparse.Namespace) -> None:
    """--tp / --backend / launch consistency, before any data or model is read."""
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if args.backend == "hf":
        from rlp.dist import detect_launch

        if args.tp > 1:
            raise ValueError(
                f"--tp {args.tp} needs --backend megatron (the hf backend runs one process on "
                "one device)"
            )
        if detect_launch().world_size > 1:
            raise ValueError(
                "--backend hf runs in one process: launch it with python, not torchrun/srun, or "
                "use --backend megatron --tp N with N processes"
            )
        return
    from rlp.eval.megatron_generation import check_launch

    check_launch(args.tp)  # the launch must have exactly --tp processes


def _user_error(exc: BaseException) -> int:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"error: {msg}", file=sys.stderr)
    return 2
