#!/usr/bin/env python
"""Rollout engines head to head: generation time, tokens/s, forwards per rollout, HBM roofline.

    # CPU acceptance shape: the tiny config, prefixes spread over 8..400 tokens
    OMP_NUM_THREADS=1 python benchmarks/rollout_throughput.py --config tiny_cpu \
        data.min_prefix_tokens=8 data.max_prefix_tokens=400
    # GPU: Qwen3-1.7B shape, random bf16 weights, 16 contexts x G=16 x 512 new tokens
    python benchmarks/rollout_throughput.py --preset qwen3_1p7b

Builds the config's model with random weights (one process, TP=1) and, per repeat, a rollout
batch shaped like the trainer's: ``rollout.contexts_per_step`` prompts whose lengths are drawn
uniformly from ``[data.min_prefix_tokens, data.max_prefix_tokens]`` (+ ``<think>``),
``rollout.num_thoughts`` samples each, ``rollout.max_thought_tokens`` cap, the rollout's
temperature/top-p/top-k, a ``</think>`` stop, EOS and forbid-first (random weights rarely stop,
so nearly every row runs to the cap). Each engine is built as the trainer builds it
(:func:`rlp.model.engine.engine_from_config`: ``reference`` = the bucketed sampler with
``rollout.sample_batch_size`` rows, ``cascade`` = the default engine) and both generate the
same prompts; the order alternates between repeats (interleaved, so machine load hits both).

Reported per engine: median seconds per rollout (the trainer's sample phase minus the data
fetch and layout), generated tokens/s, decoder forwards per rollout (prefill + decode), and the
ratio cascade/reference. On CUDA also the HBM roofline fraction: the bytes a decode of this
rollout must read at least (all weights every step, each running prompt's KV once per step and
each running row's own thought KV, counted from the generated lengths) over the peak bandwidth,
divided by the measured time. Numbers are measurements, not assertions: compare runs from the
same machine only. The JSON result goes to ``--out`` (default
``benchmarks/results/<hardware>_rollout_<name>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

try:
    import rlp  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rlp.config import Config, ParallelConfig, load_config
from rlp.data.demo import DEMO_VOCAB_SIZE

PRESETS: dict[str, tuple[str, list[str]]] = {
    # The paper's per-GPU share at a 512-token cap; prefixes 128..1024 keep the reference
    # engine's run (one bucket per 128 tokens of spread) to a couple of minutes on an H100.
    "qwen3_1p7b": (
        "qwen3_1p7b_32xh100",
        [
            "rollout.contexts_per_step=16",
            "rollout.num_thoughts=16",
            "rollout.max_thought_tokens=512",
            "data.min_prefix_tokens=128",
            "data.max_prefix_tokens=1024",
            "rollout.use_system_prompt=false",
        ],
    ),
}
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12}
"""Datasheet HBM bandwidth (bytes/s) by device-name fragment (first match wins)."""


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_")
    return f"cpu{torch.get_num_threads()}t"


def _peak_bandwidth(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _build(cfg: Config, vocab: int):
    from rlp.dist import init_distributed
    from rlp.model.build import build_model
    from rlp.model.parallel import initialize_model_parallel

    parallel = ParallelConfig(tp_size=1)
    env = init_distributed(parallel)
    state = initialize_model_parallel(parallel, seed=cfg.run.seed, env=env)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=None)
    model = build_model(model_cfg, vocab, state.device)
    model.eval()
    return model, state.device


class Synthetic:
    """Random prompts of uniformly drawn lengths; stop/EOS/forbid-first as the rollout's."""

    def __init__(self, cfg: Config, vocab: int | None) -> None:
        from rlp.model.sampler import SamplingParams

        self.cfg = cfg
        self.vocab = vocab or cfg.model.vocab_size or DEMO_VOCAB_SIZE + 2
        self.model, self.device = _build(cfg, self.vocab)
        self.rng = random.Random(cfg.run.seed)
        r = cfg.rollout
        close_id, eos_id = self.vocab - 2, self.vocab - 1
        self.params = SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_thought_tokens,
            stop_sequences=[[close_id]],
            eos_id=eos_id,
            forbid_first=[close_id, eos_id] if r.forbid_empty_thought else [],
        )

    def next_batch(self) -> list[list[int]]:
        lo, hi = self.cfg.data.min_prefix_tokens, self.cfg.data.max_prefix_tokens
        think_open, rng = self.vocab - 3, self.rng
        return [
            [rng.randrange(self.vocab - 3) for _ in range(rng.randint(lo, hi))] + [think_open]
            for _ in range(self.cfg.rollout.contexts_per_step)
        ]

    def warm_up(self, engine) -> None:
        from rlp.model.sampler import SamplingParams

        engine.generate(self.next_batch()[:2], 2, SamplingParams(max_new_tokens=4), seed=0)

    def generate(self, engine, prompts, seed: int) -> tuple[list[int], list[int]]:
        out = engine.generate(prompts, self.cfg.rollout.num_thoughts, self.params, seed)
        return [len(p) for p in prompts], out.lengths.tolist()


class TrainerContexts:
    """The trainer's own contexts (its data stream) and sample-phase call
    (:func:`rlp.rollout.generate_rollouts`), on the trainer's freshly initialised model."""

    def __init__(self, name: str, overrides: list[str]) -> None:
        import tempfile

        from rlp.trainer import Trainer

        scratch = tempfile.mkdtemp(prefix="rlp-rollout-bench-")
        self.cfg = load_config(
            name,
            [
                *overrides,
                f"run.output_dir={scratch}",
                "checkpoint.resume=never",
                "checkpoint.save_on_signal=false",
                "log.wandb=disabled",
                "eval.every=0",
            ],
        )
        self.trainer = Trainer(self.cfg)
        self.model, self.device = self.trainer.model, self.trainer.device
        self.vocab = self.trainer.tokenizer.vocab_size

    def next_batch(self) -> list:
        return self.trainer.stream.next_contexts(self.cfg.rollout.contexts_per_step)

    def warm_up(self, engine) -> None:
        cfg = dataclasses.replace(self.cfg.rollout, max_thought_tokens=4)
        self._rollout(engine, self.next_batch()[:2], cfg, seed=0)

    def _rollout(self, engine, contexts, cfg, seed: int):
        from rlp.rollout import generate_rollouts

        return generate_rollouts(engine, contexts, self.trainer.tokenizer, cfg, seed)

    def generate(self, engine, contexts, seed: int) -> tuple[list[int], list[int]]:
        rollout = self._rollout(engine, contexts, self.cfg.rollout, seed)
        return rollout.prompt_len.tolist(), [len(t) for t in rollout.thoughts]


def _ideal_bytes(model, prompt_lengths: list[int], g: int, lengths: list[int]) -> float:
    """Least bytes a decode of this rollout reads: weights + prefix KV once per running prompt +
    each running row's own thought KV, summed over decode steps 1 .. max(lengths) - 1."""
    from rlp.model.build import unwrap

    gpt = unwrap(model)
    weights = sum(p.numel() * p.element_size() for p in gpt.parameters())
    c = gpt.config
    kv_token = 2 * c.num_layers * c.num_query_groups * c.kv_channels * c.params_dtype.itemsize
    total = 0.0
    for step in range(1, max(lengths)):
        running = [r for r, n in enumerate(lengths) if n > step]
        active = {r // g for r in running}
        kv = sum(prompt_lengths[p] for p in active) + step * len(running)
        total += weights + kv * kv_token
    return total


def _decoder_forwards(model) -> list[int]:
    """A counter of decoder forwards (both engines run the decoder once per forward)."""
    from rlp.model.build import unwrap

    count = [0]
    unwrap(model).decoder.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="config file or bundled name")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--repeats", type=int, default=3, help="rollouts per engine")
    parser.add_argument(
        "--trainer",
        action="store_true",
        help="prompts from the trainer's data stream, timed through rlp.rollout.generate_rollouts",
    )
    parser.add_argument(
        "--vocab", type=int, default=None, help="synthetic prompts: default model.vocab_size"
    )
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="bytes/s")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if (args.config is None) == (args.preset is None):
        parser.error("give exactly one of --config and --preset")
    name, overrides = (args.config, []) if args.preset is None else PRESETS[args.preset]
    overrides = [*overrides, *args.overrides]
    if args.trainer:
        work: Synthetic | TrainerContexts = TrainerContexts(name, overrides)
    else:
        work = Synthetic(load_config(name, overrides), args.vocab)
    cfg, model, device = work.cfg, work.model, work.device
    forwards = _decoder_forwards(model)

    from rlp.model.engine import engine_from_config

    r = cfg.rollout
    engines = {
        kind: engine_from_config(model, dataclasses.replace(r, engine=kind))
        for kind in ("reference", "cascade")
    }
    for engine in engines.values():  # warm-up: allocator, kernels, RoPE tables
        work.warm_up(engine)
    peak_bw = _peak_bandwidth(args.peak_bandwidth)
    runs: dict[str, list[dict]] = {kind: [] for kind in engines}
    for repeat in range(args.repeats):
        batch = work.next_batch()
        order = list(engines) if repeat % 2 == 0 else list(reversed(engines))
        for kind in order:
            forwards[0] = 0
            _sync(device)
            start = time.perf_counter()
            prompt_lengths, lengths = work.generate(engines[kind], batch, seed=1000 + repeat)
            _sync(device)
            seconds = time.perf_counter() - start
            run = {
                "seconds": seconds,
                "tokens": sum(lengths),
                "forwards": forwards[0],
                "max_length": max(lengths),
                "prompt_lengths": sorted(prompt_lengths),
            }
            stats = getattr(engines[kind], "last_stats", None)
            if stats:
                run["stats"] = dict(stats)
            if peak_bw:
                ideal = _ideal_bytes(model, prompt_lengths, r.num_thoughts, lengths)
                run["roofline_fraction"] = ideal / peak_bw / seconds
            runs[kind].append(run)
            print(
                f"repeat {repeat} {kind:<9} {seconds:8.3f} s  {sum(lengths) / seconds:10.1f} "
                f"tok/s  forwards {forwards[0]:5d}  longest {max(lengths)}",
                flush=True,
            )

    def med(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[kind])

    summary = {
        kind: {
            "seconds_per_rollout": med(kind, "seconds"),
            "tokens_per_s": statistics.median(x["tokens"] / x["seconds"] for x in runs[kind]),
            "forwards_per_rollout": med(kind, "forwards"),
            **({"roofline_fraction": med(kind, "roofline_fraction")} if peak_bw else {}),
        }
        for kind in engines
    }
    ratios = [
        new["seconds"] / old["seconds"] for new, old in zip(runs["cascade"], runs["reference"])
    ]
    result = {
        "config": name,
        "preset": args.preset,
        "overrides": overrides,
        "hardware": _hardware(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "shape": {
            "contexts": r.contexts_per_step,
            "thoughts": r.num_thoughts,
            "max_new_tokens": r.max_thought_tokens,
            "prefix_tokens": [cfg.data.min_prefix_tokens, cfg.data.max_prefix_tokens],
            "vocab": work.vocab,
            "prompts": "trainer data stream" if args.trainer else "synthetic",
            "layers": cfg.model.num_layers,
            "hidden": cfg.model.hidden_size,
            "dtype": str(next(model.parameters()).dtype),
        },
        "peak_bandwidth": peak_bw,
        "summary": summary,
        "time_ratio_cascade_over_reference": {
            "median": statistics.median(ratios),
            "per_repeat": ratios,
        },
        "runs": runs,
    }
    print(f"{'engine':<10} {'s/rollout':>10} {'tokens/s':>10} {'forwards':>9}")
    for kind, s in summary.items():
        line = (
            f"{kind:<10} {s['seconds_per_rollout']:>10.3f} {s['tokens_per_s']:>10.1f} "
            f"{s['forwards_per_rollout']:>9.0f}"
        )
        if peak_bw:
            line += f"  roofline {100 * s['roofline_fraction']:.1f}%"
        print(line)
    print(f"time cascade / reference: {statistics.median(ratios):.3f} (median of {len(ratios)})")
    stem = args.preset or Path(name).stem + ("_trainer" if args.trainer else "")
    out = args.out or Path(__file__).parent / "results" / f"{_hardware()}_rollout_{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
