"""torchrun --nproc-per-node 2 tp_logprobs.py OUT.json

Builds the same tiny models at TP=2 and then at TP=1 (DP=2) in one job and checks that

* every TP=2 parameter shard is exactly the matching slice of the TP=1 parameter (CPU init draws
  the full master weight from the same seed at any TP size), and
* per-token log-probs (``token_logprobs`` and ``score_sequences``) agree within 1e-5.

Rank 0 writes the measured differences to OUT.json; the pytest wrapper asserts on them.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as tdist

from rlp.config import ParallelConfig
from rlp.dist import init_distributed, shutdown
from rlp.model.build import build_model
from rlp.model.logprobs import score_sequences, token_logprobs
from rlp.model.parallel import initialize_model_parallel
from tests.model_helpers import tiny_model_config

SEED = 4321
CASES = {
    # GQA, tied, SDPA, vocab padded 200 -> 256 (the padding lives on TP rank 1 only).
    "llama_sdpa": (dict(), 200),
    # Qwen3: QK-norm, untied, head dim 32 != hidden / heads, megatron's unfused attention.
    "qwen3_unfused": (
        dict(family="qwen3", tie_embeddings=False, kv_channels=32, attention_backend="unfused"),
        256,
    ),
}


def tp_slice(full: torch.Tensor, param: torch.nn.Parameter, rank: int, size: int) -> torch.Tensor:
    """The part of a TP=1 weight that TP rank ``rank`` holds (megatron's strided split)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, param.partition_stride
    chunks = torch.split(full, full.size(dim) // (size * stride), dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def run_case(overrides: dict, vocab: int, tp: int, env) -> tuple[dict, torch.Tensor, list]:
    state = initialize_model_parallel(ParallelConfig(tp_size=tp), seed=SEED, env=env)
    model = build_model(tiny_model_config(**overrides), vocab, env.device).eval()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, 25), generator=gen)
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (9, 30, 4, 17)]
    with torch.no_grad():
        logp = token_logprobs(model, ids[:, :-1], ids[:, 1:])
        scored = score_sequences(model, seqs, micro_batch=3)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    attrs = {n: p for n, p in model.named_parameters()}
    state.destroy()
    return {"params": params, "attrs": attrs, "tp_rank": state.tp_rank}, logp, scored


def main(out_path: str) -> None:
    env = init_distributed(ParallelConfig(tp_size=2))
    torch.set_num_threads(1)
    report: dict[str, dict] = {}
    for name, (overrides, vocab) in CASES.items():
        t0 = time.perf_counter()
        tp2, logp2, scored2 = run_case(overrides, vocab, 2, env)
        tp1, logp1, scored1 = run_case(overrides, vocab, 1, env)
        weight_diff = 0.0
        for pname, shard in tp2["params"].items():
            want = tp_slice(tp1["params"][pname], tp2["attrs"][pname], tp2["tp_rank"], 2)
            assert want.shape == shard.shape, (pname, want.shape, shard.shape)
            weight_diff = max(weight_diff, (want - shard).abs().max().item())
        score_diff = max((a - b).abs().max().item() for a, b in zip(scored1, scored2))
        # Both TP ranks must hold identical log-probs (the CE is reduced over the TP group).
        gathered = [torch.empty_like(logp2) for _ in range(2)]
        tdist.all_gather(gathered, logp2)
        report[name] = {
            "weight_max_abs_diff": weight_diff,
            "logp_max_abs_diff": (logp1 - logp2).abs().max().item(),
            "score_max_abs_diff": score_diff,
            "tp_ranks_max_abs_diff": (gathered[0] - gathered[1]).abs().max().item(),
            "logp_mean": logp2.mean().item(),
            "seconds": time.perf_counter() - t0,
        }
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
