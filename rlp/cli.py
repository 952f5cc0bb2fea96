"""Command line: ``rlp train | config | data | convert | eval | submit | status``.

    rlp train                                   # the tiny CPU run (rlp/configs/tiny_cpu.yaml)
    rlp train --config 1gpu_smollm2_135m optim.lr=3e-6
    torchrun --nproc-per-node 2 -m rlp.cli train parallel.tp_size=2
    rlp train --dry-run rollout.num_thoughts=8  # print the resolved config, run nothing
    rlp config --reference                      # every key with its default and docstring
    rlp data build --input docs/ --tokenizer TOK --out shards/
    rlp data demo --out data/demo               # bundled offline demo corpus
    rlp data manifest --shards 'https://host/c/part-{0000..0099}.tar' --out c-manifest.json
    rlp convert hf-to-mcore|mcore-to-hf|gguf-to-hf|smollm2 ...
    rlp eval --checkpoint DIR --benchmarks gsm8k,mmlu --limit 20
    rlp submit --config FILE --nodes 4 --gpus-per-node 8 [--dry-run] [key=value ...]
    rlp status RUN_DIR

Heavy modules (torch, megatron) are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import sys

from rlp.config import ConfigError, load_config, reference_yaml, to_yaml
from rlp.options import config_parser, parse


def train_main(argv: list[str]) -> int:
    parser = config_parser("rlp train", "Run RLP training (auto-resumes from checkpoint.dir).")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="= run.overwrite=true: with checkpoint.resume=never, move a previous run in "
        "run.output_dir aside (replaced_<time>/) and start again",
    )
    args = parse(parser, argv, run_config=True)
    overrides = [*args.overrides, *(["run.overwrite=true"] if args.overwrite else [])]
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from rlp import dist
    from rlp.checkpoint import CheckpointError
    from rlp.data.format import DataError
    from rlp.model.hf_mapping import ConversionError
    from rlp.tokenizer import TokenizerError
    from rlp.trainer import Trainer, TrainingError

    try:
        trainer = Trainer(cfg)
        summary = trainer.train()
    except (TrainingError, DataError, CheckpointError, TokenizerError, ConversionError) as err:
        # Problems with the run's inputs or numerics: one clear line, no traceback.
        print(f"rlp train: error: {err}", file=sys.stderr)
        dist.shutdown()
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints and stops)
        print("rlp train: interrupted; resume from the newest checkpoint", file=sys.stderr)
        return 130

    if dist.is_rank0():
        print(_done_message(summary, cfg.run.output_dir))
    dist.shutdown()
    return 0


def _done_message(summary: dict, run_dir: str) -> str:
    """The end-of-run lines: totals, final loss and reward, and where every record is."""
    final = summary.get("final", {})
    lines = [
        f"[rlp] done: {summary['steps']} steps in {summary['seconds']:.1f} s "
        f"({summary['seconds_per_step']:.2f} s/step); "
        f"loss {final.get('loss/total', float('nan')):.4f}, "
        f"reward {final.get('reward/mean', float('nan')):+.4f}, "
        f"thought tokens {summary['thought_tokens']}; run dir {run_dir}"
    ]
    for name, path in (summary.get("files") or {}).items():
        if path and name != "run_dir":
            lines.append(f"  {name:<11}{path}")
    return "\n".join(lines)


def config_main(argv: list[str]) -> int:
    parser = config_parser("rlp config", "Print a resolved config or the key reference.")
    parser.add_argument("--reference", action="store_true", help="all keys, defaults and docs")
    args = parse(parser, argv, run_config=True)
    if args.reference:
        print(reference_yaml(), end="")
        return 0
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def data_main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "demo", "manifest"):
        print(
            "usage: rlp data build ARGS... | rlp data demo ARGS... | rlp data manifest ARGS...",
            file=sys.stderr,
        )
        return 2
    if argv[0] == "build":
        from rlp.data.builder import main as build_main

        return int(build_main(argv[1:]) or 0)
    if argv[0] == "manifest":
        from rlp.data.indexer import main as manifest_main

        return int(manifest_main(argv[1:]) or 0)
    from rlp.data.demo import main as demo_main

    return int(demo_main(argv[1:]) or 0)


def convert_main(argv: list[str]) -> int:
    from rlp.model.convert import convert_main as run

    return int(run(argv) or 0)


def eval_main(argv: list[str]) -> int:
    from rlp.eval.command import main as run

    return int(run(argv) or 0)


def submit_main(argv: list[str]) -> int:
    from rlp.submit import submit_main as run

    return int(run(argv) or 0)


def status_main(argv: list[str]) -> int:
    from rlp.monitor import status_main as run

    return int(run(argv) or 0)


COMMANDS = {
    "train": train_main,
    "config": config_main,
    "data": data_main,
    "convert": convert_main,
    "eval": eval_main,
    "submit": submit_main,
    "status": status_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"rlp: unknown command '{command}'; choose from {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    try:
        return COMMANDS[command](rest)
    except ConfigError as err:
        print(f"rlp {command}: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not _is_user_error(err):
            raise
        print(f"rlp {command}: error: {err}", file=sys.stderr)
        return 2


USER_ERRORS = {
    "rlp.tokenizer": "TokenizerError",
    "rlp.data.format": "DataError",
    "rlp.data.builder": "BuildError",
    "rlp.checkpoint": "CheckpointError",
    "rlp.model.hf_mapping": "ConversionError",
}
"""Errors that mean "change your input": reported in one line by every subcommand."""


def _is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of :data:`USER_ERRORS` (only modules already imported can have
    raised one, so nothing heavy is imported here)."""
    for module, name in USER_ERRORS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(err, cls):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
