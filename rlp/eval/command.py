"""Evaluate a checkpoint on the paper's benchmarks (docs/method.md §13), or compare two results.

Examples::

    # all eight paper benchmarks, paper protocol (math pass@1 over 8, science greedy + @1[4])
    python benchmarks/evaluate.py --checkpoint /path/to/hf_model --out runs/eval/base

    # quick smoke: 20 items per set, greedy only
    python benchmarks/evaluate.py --checkpoint M --benchmarks gsm8k,mmlu --limit 20 \\
        --temperature 0 --out runs/eval/smoke

    # tensor parallelism (megatron backend): one process per TP rank; rank 0 writes the outputs
    torchrun --nproc-per-node 2 benchmarks/evaluate.py --checkpoint M --tp 2 --out runs/eval/tp2

    # reasoning quality: faithfulness probes and step information gain after generation
    python benchmarks/evaluate.py --checkpoint M --benchmarks gsm8k,math500 --limit 20 \
        --num-samples 4 --probes truncate,filler --step-info-gain --out runs/eval/reasoning

    # side-by-side comparison of two finished evaluations (+ comparison.png with --out)
    python benchmarks/evaluate.py --compare runs/eval/base runs/eval/rlp --out runs/eval/ab

    # lm-evaluation-harness with our model (needs the lmeval extra)
    rlp eval lm-eval --model rlp --model_args checkpoint=M --tasks TASK

An interrupted run resumes from ``<out>/items.jsonl`` (and the probe journals) when re-run with
the same ``--out`` and settings. See docs/evaluation.md for prompts, scoring, the probes and
aggregate conventions.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rlp.eval.benchmarks import (
    REGISTRY,
    BenchmarkDataError,
    load_benchmark,
    parse_benchmark_list,
    resolve_data_dir,
)
from rlp.eval.generation import BACKENDS, resolve_backend
from rlp.eval.probes import PROBES, ProbeSettings
from rlp.eval.reasoning import ReasoningSettings
from rlp.eval.report import compare_results, load_results, plot_comparison, render_markdown
from rlp.eval.runner import (
    EvalSettings,
    ResumeMismatchError,
    check_resumable,
    evaluate,
    load_generate_fn,
)
from rlp.eval.step_gain import StepGainSettings
from rlp.options import add_fields, build, parse


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
    # Generation and scoring settings: flags (and key=value words) from EvalSettings' fields.
    add_fields(
        p,
        EvalSettings,
        names={"use_hf": ["--hf-datasets"], "verify_timeout_s": ["--verify-timeout"]},
        skip=("stop_strings",),
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
        "--out",
        default=None,
        help="output directory (default runs/eval/<checkpoint name>); re-running "
        "with the same directory resumes",
    )
    p.add_argument("--label", default=None, help="name shown in reports (default: checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.add_argument(
        "--probes",
        default="",
        help=f"faithfulness probes after generation, comma-separated from {','.join(PROBES)} "
        "(paraphrase needs --paraphraser)",
    )
    p.add_argument(
        "--paraphraser",
        default=None,
        help="Hugging Face model directory that paraphrases chains for the paraphrase probe "
        "(transformers backend, on rank 0)",
    )
    p.add_argument(
        "--step-info-gain",
        action="store_true",
        help="per-step information gain of the chains (math benchmarks)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=StepGainSettings.max_steps,
        help="steps per chain for --step-info-gain (more are merged into this many)",
    )
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


def _reasoning_settings(args: argparse.Namespace, benchmarks: list[str]) -> ReasoningSettings:
    """--probes / --paraphraser / --step-info-gain / --max-steps, checked."""
    probes = tuple(p.strip() for p in args.probes.split(",") if p.strip())
    if "paraphrase" in probes and not args.paraphraser:
        raise ValueError("--probes paraphrase needs --paraphraser DIR (a Hugging Face model)")
    if args.paraphraser and "paraphrase" not in probes:
        raise ValueError("--paraphraser is used only by the paraphrase probe; add it to --probes")
    if args.step_info_gain and not any(REGISTRY[b].kind == "math" for b in benchmarks):
        raise ValueError("--step-info-gain needs a math benchmark (it scores the gold answer)")
    return ReasoningSettings(
        probes=ProbeSettings(probes=probes),
        step_info_gain=args.step_info_gain,
        step_gain=StepGainSettings(max_steps=args.max_steps),
        paraphraser=args.paraphraser,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":
        from rlp.eval.lm_harness import main as lm_eval_main

        return lm_eval_main(argv[1:])
    args = parse(build_parser(), argv)  # flags or key=value (rlp.options)
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
                plot_comparison(a, b, out / "comparison.png")
                print(f"comparison written to {out}/ (comparison.md, comparison.png)")
            return 0
        if not args.checkpoint:
            raise ValueError("--checkpoint is required (or use --compare A.json B.json)")
        _check_parallel_args(args)
        _check_positions(args.checkpoint, args.max_new_tokens)  # before any data or model loads
        benchmarks = parse_benchmark_list(args.benchmarks)
        reasoning = _reasoning_settings(args, benchmarks)
        settings = build(EvalSettings, args)
        if not settings.use_hf:
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
        paraphraser = None
        if reasoning.paraphraser:
            # One process, on the leader's device: the followers never see it.
            try:
                paraphraser = load_generate_fn(
                    reasoning.paraphraser, 1, args.batch_size, args.seed, backend="hf"
                )
            except (FileNotFoundError, ValueError) as exc:
                code = _user_error(f"--paraphraser: {exc}")
                return code
        results = evaluate(
            generate_fn,
            benchmarks,
            settings,
            out,
            label=args.label or Path(args.checkpoint).name,
            checkpoint=str(args.checkpoint),
            progress=not args.no_progress,
            reasoning=reasoning,
            paraphraser=paraphraser,
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
    print(f"results written to {out}/ (results.json, summary.md, *.png, *.jsonl)")
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


def _model_positions(checkpoint: str) -> int | None:
    """``max_position_embeddings`` from the checkpoint's own config file (HF ``config.json``, or
    an rlp checkpoint's ``config.yaml``; a checkpoints root means its newest step), read without
    loading anything; None when it cannot be read here (the model's own check still applies)."""
    import json

    import yaml

    path = Path(checkpoint)
    if (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
        return raw if isinstance(raw, int) else None
    steps = sorted(path.glob("step_*/config.yaml")) if not (path / "config.yaml").is_file() else []
    cfg_file = path / "config.yaml" if not steps else steps[-1]
    if not cfg_file.is_file():
        return None
    raw = ((yaml.safe_load(cfg_file.read_text()) or {}).get("model") or {}).get(
        "max_position_embeddings"
    )
    return raw if isinstance(raw, int) else None


def _check_positions(checkpoint: str, max_new_tokens: int) -> None:
    positions = _model_positions(checkpoint)
    if positions is not None and max_new_tokens >= positions:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} does not fit the model's {positions} positions "
            f"(max_position_embeddings of {checkpoint}) with room for a prompt; lower it"
        )


def _user_error(exc: BaseException | str) -> int:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"error: {msg}", file=sys.stderr)
    return 2
