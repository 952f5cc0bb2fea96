"""Command line: ``rlp train | config | data | convert | eval | submit | status``.

    rlp train                                   # the tiny CPU run (rlp/configs/tiny_cpu.yaml)
    rlp train --config 1gpu_smollm2_135m optim.lr=3e-6
    torchrun --nproc-per-node 2 -m rlp.cli train parallel.tp_size=2
    rlp train --dry-run rollout.num_thoughts=8  # print the resolved config, run nothing
    rlp config --reference                      # every key with its default and docstring
    rlp data build --input docs/ --tokenizer TOK --out shards/
    rlp data demo --out data/demo               # bundled offline demo corpus
    rlp convert hf-to-mcore|mcore-to-hf|gguf-to-hf|smollm2 ...
    rlp eval --checkpoint DIR --benchmarks gsm8k,mmlu --limit 20
    rlp submit --config FILE --nodes 4 --gpus-per-node 8 [--dry-run] [key=value ...]
    rlp status RUN_DIR

Heavy modules (torch, megatron) are imported only by the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import sys

from rlp.config import ConfigError, load_config, reference_yaml, to_yaml

DEFAULT_CONFIG = "tiny_cpu"


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML file, or the name of a bundled config (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. rollout.num_thoughts=8"
    )
    return parser


def _load(args: argparse.Namespace):
    path = args.config if args.config is not None else DEFAULT_CONFIG
    return load_config(path, args.overrides)


def train_main(argv: list[str]) -> int:
    parser = _config_parser("rlp train", "Run RLP training (auto-resumes from checkpoint.dir).")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    cfg = _load(args)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from rlp import dist
    from rlp.checkpoint import CheckpointError
    from rlp.data.format import DataError
    from rlp.model.convert import ConversionError
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

    if dist.is_rank0():
        final = summary.get("final", {})
        print(
            f"[rlp] done: {summary['steps']} steps in {summary['seconds']:.1f} s "
            f"({summary['seconds_per_step']:.2f} s/step); "
            f"loss {final.get('loss/total', float('nan')):.4f}, "
            f"reward {final.get('reward/mean', float('nan')):+.4f}, "
            f"thought tokens {summary['thought_tokens']}; run dir {cfg.run.output_dir}"
        )
    dist.shutdown()
    return 0


def config_main(argv: list[str]) -> int:
    parser = _config_parser("rlp config", "Print a resolved config or the key reference.")
    parser.add_argument("--reference", action="store_true", help="all keys, defaults and docs")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_yaml(), end="")
        return 0
    print(to_yaml(_load(args)), end="")
    return 0


def data_main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "demo"):
        print("usage: rlp data build ARGS... | rlp data demo ARGS...", file=sys.stderr)
        return 2
    if argv[0] == "build":
        from rlp.data.builder import main as build_main

        return int(build_main(argv[1:]) or 0)
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


if __name__ == "__main__":
    sys.exit(main())
