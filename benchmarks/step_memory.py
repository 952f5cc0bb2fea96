#!/usr/bin/env python
"""Peak memory per phase (and MFU on GPU) of one RLP step at a given model shape.

    OMP_NUM_THREADS=2 python benchmarks/step_memory.py --label paper_slice   # defaults below
    python benchmarks/step_memory.py --layers 28 --label qwen3_1p7b          # full depth (GPU)

Builds a random-weight Llama/Qwen3-shaped model (``--layers/--hidden/--ffn/--heads/--groups/
--head-dim/--qk-norm/--vocab``; defaults: two layers of Qwen3-1.7B with its 151,936-token
vocabulary), its megatron DDP + AdamW and the EMA teacher, then runs one step's phases through
the trainer's own methods: ``score`` (S_pred, S_ema, behaviour log-probs), ``loss`` (forward +
backward), ``optim`` (AdamW step), ``ema`` (EMA update). Per phase it reports the peak memory:

* GPU: ``torch.cuda.max_memory_allocated`` after resetting the peak at the phase start;
* CPU: the process's peak resident set (``VmHWM`` from ``/proc/self/status``) after resetting the
  high-water mark through ``/proc/self/clear_refs`` ("5"), i.e. everything the process holds
  (weights, gradients, optimizer state, EMA, and the phase's transients).

**Thoughts are synthetic**: ``--contexts`` contexts with a ``--prefix``-token prefix (no system
prompt) and G = ``--thoughts`` thoughts of exactly ``--thought`` random token ids each, none
closing itself, so every thought hits the cap (``</think>`` appended) deterministically; the
sampler is not run (its memory is the rollout engine's, measured by its own benchmark), and the
recorded behaviour log-probs are zeros (the consistency metric is meaningless here).

MFU (GPU only): model FLOPs per phase / (phase time x ``--peak-tflops``), counting 2N FLOPs per
scored token (forward) and 6N per trained token (forward + backward), N = matmul parameters
(output layer included), plus attention: 4 x d_attn x (visible keys) per token and layer forward
(x3 for training), visible keys = the token's position + 1 (prefix trees: its own branch and the
prefix). The loss phase of a step with full recompute does a second forward (8N); it is counted
as 6N, as MFU conventions do.

Also reported: forward tokens per context with prefix sharing (packed trees) vs without (one row
per thought), and the label positions whose log-probs are computed.

The script drives private trainer methods and so also runs against an older checkout
(``PYTHONPATH=/path/to/old/checkout``, which then uses ``--micro-batch`` rows instead of the
token budget); results go to ``benchmarks/results/step_memory_<label>.json``. An old-code run
whose micro-batch does not fit in memory can be extrapolated from two smaller ones, linearly in
the micro-batch rows (``--thoughts`` = ``--micro-batch``: one micro-batch, the same rows):

    python benchmarks/step_memory.py --compare AFTER.json OLD_MB2.json OLD_MB4.json \
        --extrapolate-to 16 --label paper_slice_summary
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

try:
    import rlp  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from rlp import config as rlp_config
from rlp.config import from_dict

PHASES = ("score", "loss", "optim", "ema")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak TFLOP/s by device name fragment (``--peak-tflops`` overrides)."""


# ----------------------------------------------------------------------------------- memory


def _read_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _read_hwm_bytes()


def _current_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# ----------------------------------------------------------------------------------- setup


def _has(section: Any, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(section)}


def _config(args: argparse.Namespace) -> Any:
    """A validated Config for this shape, in the keys the running checkout knows."""
    new = _has(rlp_config.ObjectiveConfig, "max_tokens_per_micro_batch")
    model = {
        "family": "qwen3" if args.qk_norm else "llama",
        "num_layers": args.layers,
        "hidden_size": args.hidden,
        "ffn_hidden_size": args.ffn,
        "num_attention_heads": args.heads,
        "num_query_groups": args.groups,
        "kv_channels": args.head_dim,
        "qk_layernorm": args.qk_norm,
        "max_position_embeddings": max(8192, args.prefix + args.thought + 8),
        "rotary_base": 1e6,
        "tie_embeddings": True,
        "params_dtype": args.dtype,
        "transformer_impl": "local",
    }
    objective: dict[str, Any] = {"rl_weight": 1.0, "ntp_weight": 0.0}
    if new:
        model["recompute"] = args.recompute
        objective["max_tokens_per_micro_batch"] = args.budget
    else:
        if args.recompute != "none":
            model["recompute_activations"] = True
        objective["thought_micro_batch"] = args.micro_batch
    raw = {
        "run": {"output_dir": "/tmp/rlp-step-memory", "device": "auto"},
        "model": model,
        "data": {"max_prefix_tokens": args.prefix, "min_prefix_tokens": 1},
        "rollout": {
            "contexts_per_step": args.contexts,
            "num_thoughts": args.thoughts,
            "max_thought_tokens": args.thought,
            "use_system_prompt": False,
        },
        "objective": objective,
        "ema": {"decay": 0.999},
    }
    return from_dict(raw), new


def _tokenizer_ids(vocab: int) -> SimpleNamespace:
    """Special ids for the synthetic run (no real tokenizer of this vocabulary is needed)."""
    return SimpleNamespace(
        pad_id=0,
        eos_id=vocab - 1,
        think_open_id=vocab - 2,
        think_close_id=vocab - 3,
        vocab_size=vocab,
        encode=lambda text: [],
    )


def _synthetic_rollout(args: argparse.Namespace, cfg: Any, tok: SimpleNamespace):
    from rlp.data.contexts import Context
    from rlp.rollout import build_prompt, layout_rollouts

    gen = torch.Generator().manual_seed(0)
    hi = args.vocab - 3  # ordinary ids only: no thought closes itself, none stops on EOS
    contexts = [
        Context(
            prefix=torch.randint(1, hi, (args.prefix,), generator=gen).tolist(),
            target=torch.randint(1, hi, (1,), generator=gen).tolist(),
        )
        for _ in range(args.contexts)
    ]
    prompts = [build_prompt(c.prefix, [], tok.think_open_id) for c in contexts]
    n = args.contexts * args.thoughts
    thoughts = [torch.randint(1, hi, (args.thought,), generator=gen).tolist() for _ in range(n)]
    logps = [torch.zeros(args.thought) for _ in range(n)]
    rollout = layout_rollouts(contexts, prompts, thoughts, logps, [False] * n, tok, cfg.rollout)
    return contexts, rollout


def _trainer(cfg: Any, new: bool, vocab: int, tok: SimpleNamespace) -> Any:
    """The trainer's phase methods on components built here (no data stream, no sampler)."""
    from rlp import dist
    from rlp.ema import EMA
    from rlp.model import build as model_build
    from rlp.model import optimizer as model_optim
    from rlp.model.parallel import initialize_model_parallel
    from rlp.state import TrainState
    from rlp.trainer import Trainer

    env = dist.init_distributed(cfg.parallel)
    ps = initialize_model_parallel(cfg.parallel, cfg.run.seed, env)
    t = Trainer.__new__(Trainer)
    t.cfg, t.env, t.ps, t.device = cfg, env, ps, env.device
    t.tokenizer, t.system_ids, t.state = tok, [], TrainState()
    t.model = model_build.build_model(cfg.model, vocab, t.device)
    t.ddp = model_optim.wrap_ddp(t.model, cfg.parallel)
    dtype = model_build.resolve_dtype(cfg.model, t.device)
    t.optimizer = model_optim.build_optimizer(t.ddp, cfg.optim, cfg.parallel, dtype)
    t.ema = EMA.from_config(cfg.ema) if new else EMA()
    t._rewards = t._advantages = None
    if new:
        from rlp.model.forward import tree_attention_supported

        t._packed = tree_attention_supported(t.model)
    return t


# ----------------------------------------------------------------------------------- FLOPs


def _matmul_params(args: argparse.Namespace) -> int:
    h, f, d = args.hidden, args.ffn, args.head_dim
    attn = h * d * (args.heads + 2 * args.groups) + args.heads * d * h
    mlp = 3 * h * f
    return args.layers * (attn + mlp) + args.vocab * h  # + output layer


def _attention_flops(positions: torch.Tensor, args: argparse.Namespace) -> float:
    """Forward attention FLOPs of the tokens at ``positions`` (visible keys = position + 1)."""
    return 4.0 * args.heads * args.head_dim * args.layers * float((positions + 1).sum())


def _token_accounting(rollout: Any, scores: Any, new: bool, args: argparse.Namespace) -> dict:
    n = rollout.num_rows
    unpadded = sum(len(s) - 1 for s in rollout.sequences)
    padded_rows = n * (max(len(s) for s in rollout.sequences) - 1)
    out = {
        "thought_tokens_trained": int(rollout.thought_len.sum()),
        "sequence_tokens_one_row_per_thought": unpadded,
        "sequence_tokens_padded_rows": padded_rows,
    }
    if new:
        plan_tokens = sum(mb.num_tokens for mb in scores.plan)
        labels = sum(len(mb.labels[0].token) + len(mb.labels[1].token) for mb in scores.plan)
        out.update(
            {
                "forward_tokens": plan_tokens,
                "micro_batches": len(scores.plan),
                "logprob_positions": labels,
                "forward_attention_flops": sum(
                    _attention_flops(mb.position_ids.flatten(), args) for mb in scores.plan
                ),
            }
        )
    else:
        out.update(
            {
                "forward_tokens": padded_rows,
                "micro_batches": -(-n // args.micro_batch),
                "logprob_positions": padded_rows,  # megatron's CE: every position, full vocab
                "forward_attention_flops": n
                * _attention_flops(torch.arange(padded_rows // n), args),
            }
        )
    per = {k: v / rollout.num_contexts for k, v in out.items() if k != "micro_batches"}
    return {"total": out, "per_context": per}


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=6144)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--thoughts", type=int, default=16, help="G thoughts per context")
    p.add_argument("--contexts", type=int, default=1)
    p.add_argument("--prefix", type=int, default=1024, help="prefix tokens per context")
    p.add_argument("--thought", type=int, default=512, help="thought tokens (all hit this cap)")
    p.add_argument("--budget", type=int, default=16384, help="max_tokens_per_micro_batch")
    p.add_argument("--micro-batch", type=int, default=16, help="thought_micro_batch (old code)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="full")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--label", default="run")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compare", type=Path, nargs=3, metavar=("AFTER", "OLD_A", "OLD_B"))
    p.add_argument("--extrapolate-to", type=int, default=16)
    p.add_argument("--note", default=None, help="free text stored in the --compare summary")
    args = p.parse_args(argv)
    if args.compare:
        return _compare(args)

    cfg, new = _config(args)
    tok = _tokenizer_ids(args.vocab)
    t0 = time.perf_counter()
    trainer = _trainer(cfg, new, args.vocab, tok)
    contexts, rollout = _synthetic_rollout(args, cfg, tok)
    setup_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "label": args.label,
        "code": "token budget + prefix trees" if new else "row micro-batches (old)",
        "shape": {k: v for k, v in vars(args).items() if k not in ("out", "label")},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "setup_seconds": setup_s,
        "resident_after_setup_gib": _current_bytes() / 2**30,
        "phases": {},
    }
    print(f"[step_memory] {result['code']}: {result['parameters'] / 1e6:.0f}M parameters")

    def phase(name: str, fn):
        _reset_peak()
        start = _current_bytes()
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        peak = _peak_bytes()
        result["phases"][name] = {
            "seconds": seconds,
            "peak_gib": peak / 2**30,
            "start_gib": start / 2**30,
            "end_gib": _current_bytes() / 2**30,
        }
        print(f"[step_memory] {name:<6} {seconds:8.1f} s   peak {peak / 2**30:7.2f} GiB")
        return out

    scores = phase("score", lambda: trainer._score(contexts, rollout))
    metrics = phase("loss", lambda: trainer._loss_and_backward(rollout, scores, None))
    metrics.update(phase("optim", lambda: trainer._optimizer_step(metrics)))
    if new:
        phase("ema", lambda: trainer._ema_update(applied=metrics["optim/skipped"] == 0.0))
    else:
        phase("ema", lambda: trainer._ema_update())
    result["peak_gib"] = max(v["peak_gib"] for v in result["phases"].values())
    result["tokens"] = _token_accounting(rollout, scores, new, args)
    result["loss/total"] = metrics.get("loss/total")

    if torch.cuda.is_available():
        n_params = _matmul_params(args)
        tok_counts = result["tokens"]["total"]
        attn = tok_counts["forward_attention_flops"]
        flops = {
            "score": 2 * n_params * tok_counts["forward_tokens"] + attn,
            "loss": 6 * n_params * tok_counts["forward_tokens"] + 3 * attn,
        }
        peak = args.peak_tflops or next(
            (v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None
        )
        if peak:
            result["mfu"] = {
                name: flops[name] / (result["phases"][name]["seconds"] * peak * 1e12)
                for name in flops
            }
            result["peak_tflops"] = peak
        result["model_tflop"] = {k: v / 1e12 for k, v in flops.items()}

    out = args.out or Path(__file__).parent / "results" / f"step_memory_{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[step_memory] peak {result['peak_gib']:.2f} GiB; wrote {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """Per-phase peaks of AFTER against the old code, extrapolated linearly in the micro-batch
    rows from OLD_A and OLD_B (two runs of one micro-batch each) to ``--extrapolate-to`` rows."""
    after, old_a, old_b = (json.loads(p.read_text()) for p in args.compare)
    mb_a, mb_b = old_a["shape"]["micro_batch"], old_b["shape"]["micro_batch"]
    target = args.extrapolate_to
    phases = {}
    for name in PHASES:
        a, b = old_a["phases"][name]["peak_gib"], old_b["phases"][name]["peak_gib"]
        old = a + (b - a) / (mb_b - mb_a) * (target - mb_a)
        phases[name] = {
            "old_peak_gib": {f"mb{mb_a}": a, f"mb{mb_b}": b, f"mb{target}_extrapolated": old},
            "new_peak_gib": after["phases"][name]["peak_gib"],
            "new_over_old": after["phases"][name]["peak_gib"] / old,
        }
    old_peak = max(v["old_peak_gib"][f"mb{target}_extrapolated"] for v in phases.values())
    summary = {
        "label": args.label,
        "method": (
            f"old code: peak RSS per phase measured with micro-batches of {mb_a} and {mb_b} rows "
            f"(one micro-batch each) and extrapolated linearly to {target} rows"
        ),
        "phases": phases,
        "new_peak_gib": after["peak_gib"],
        "old_peak_gib_extrapolated": old_peak,
        "new_over_old": after["peak_gib"] / old_peak,
        "tokens_per_context": {
            "new": after["tokens"]["per_context"],
            "old_forward_tokens": old_b["tokens"]["per_context"]["forward_tokens"]
            / old_b["shape"]["thoughts"]
            * after["shape"]["thoughts"],
        },
        "sources": [str(p) for p in args.compare],
        "note": args.note,
    }
    out = args.out or Path(__file__).parent / "results" / f"step_memory_{args.label}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for name, v in phases.items():
        old = v["old_peak_gib"][f"mb{target}_extrapolated"]
        print(
            f"{name:<6} old {old:7.2f} GiB  new {v['new_peak_gib']:7.2f} GiB  "
            f"{v['new_over_old']:.0%}"
        )
    print(f"peak   old {old_peak:7.2f} GiB  new {after['peak_gib']:7.2f} GiB; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
