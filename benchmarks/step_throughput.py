#!/usr/bin/env python
"""Measure RLP step time by phase, tokens/s and peak memory for a config.

    python benchmarks/step_throughput.py --config tiny_cpu --steps 10 --warmup 2
    python benchmarks/step_throughput.py --config 1gpu_smollm2_135m --steps 10 \
        checkpoint.init_from=null          # random weights of that shape
    torchrun --nproc-per-node 2 benchmarks/step_throughput.py --config ... parallel.tp_size=2
    python benchmarks/step_throughput.py --config tiny_cpu rollout.engine=reference  # old sampler

Runs ``--warmup + --steps`` training steps with checkpointing off (in a scratch run directory),
then prints a table of median seconds per phase (sample, score, loss, optim, ema), thought and
total tokens/s, and peak memory (CUDA max allocated, or process RSS on CPU). The JSON result is
written to ``--out`` (default ``benchmarks/results/<hardware>_<config>.json``). Numbers are
measurements, not assertions: compare runs on the same hardware only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

try:
    import rlp  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rlp import dist
from rlp.config import load_config
from rlp.model.build import num_parameters
from rlp.trainer import Trainer

PHASES = ("sample", "score", "loss", "optim", "ema")


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu{torch.get_num_threads()}t"


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="rlp-bench-")
    cfg = load_config(
        args.config,
        [
            *args.overrides,
            f"run.output_dir={scratch}",
            f"run.max_steps={args.warmup + args.steps}",
            "checkpoint.save_every=0",
            "checkpoint.resume=never",
            "checkpoint.save_on_signal=false",
            "log.wandb=disabled",
            "log.samples_every=0",
            f"log.every={args.warmup + args.steps}",
        ],
    )
    trainer = Trainer(cfg)
    rows = []
    for step in range(args.warmup + args.steps):
        metrics = trainer.train_step()
        if step >= args.warmup:
            rows.append(metrics)
    trainer.logger.close()
    if not dist.is_rank0():
        dist.shutdown()
        return 0

    def median(key: str) -> float:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else float("nan")

    step_time = median("time/step")
    result = {
        "config": str(args.config),
        "overrides": args.overrides,
        "hardware": _hardware(),
        "world_size": dist.get_env().world_size,
        "rollout_engine": trainer.engine.name,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "steps_measured": len(rows),
        "seconds_per_step": step_time,
        "phase_seconds": {p: median(f"time/{p}") for p in PHASES},
        "thought_tokens_per_step": median("thought/tokens"),
        "thought_tokens_per_s": median("throughput/sample_tokens_per_s"),
        "tokens_per_s": median("throughput/tokens_per_s"),
        "peak_memory_gib": _peak_memory_gib(),
        "parameters": num_parameters(trainer.model),
    }
    print(f"{'phase':<8} {'s/step':>9}")
    for phase, seconds in result["phase_seconds"].items():
        print(f"{phase:<8} {seconds:>9.4f}")
    print(f"{'total':<8} {step_time:>9.4f}")
    print(
        f"thought tokens/s {result['thought_tokens_per_s']:.1f} | tokens/s "
        f"{result['tokens_per_s']:.1f} | peak memory {result['peak_memory_gib']:.2f} GiB"
    )
    out = args.out or Path(__file__).parent / "results" / (
        f"{result['hardware']}_{args.config.stem}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
