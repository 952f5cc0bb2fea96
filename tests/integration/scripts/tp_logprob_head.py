"""torchrun --nproc-per-node 2 tp_logprob_head.py OUT.json

The log-prob head on a packed prefix-tree micro-batch at TP=2 vs TP=1 (one job, same seeds):
per-label log-probs (thought labels at T=0.7, target labels raw) and the gradient of a weighted
sum of them w.r.t. every parameter shard (each TP=2 shard compared with the matching slice of
the TP=1 gradient; QK-norm grads summed over TP first, as megatron's finalize_model_grads
does). Small chunks so that both the label and the vocabulary loops run several times; the
vocabulary is padded 200 -> 256, the padding living on TP rank 1 only.

Rank 0 writes the measured differences to OUT.json; the pytest wrapper asserts on them.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as tdist
from megatron.core import parallel_state

from rlp.config import ParallelConfig
from rlp.dist import init_distributed, shutdown
from rlp.layout import Branch, PrefixGroup, plan_micro_batches
from rlp.model.build import build_model
from rlp.model.logprobs import packed_logprobs
from rlp.model.parallel import initialize_model_parallel
from tests.integration.scripts.tp_logprobs import tp_slice
from tests.model_helpers import tiny_model_config

SEED = 4321
VOCAB = 200
CASES = {
    "tied_sdpa": dict(),
    "untied_qwen3_unfused": dict(
        family="qwen3", tie_embeddings=False, kv_channels=32, attention_backend="unfused"
    ),
}


def groups() -> list[PrefixGroup]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for prefix_len in (7, 3):
        prefix = torch.randint(0, VOCAB, (prefix_len,), generator=gen).tolist()
        branches = []
        for n in (5, 9, 2):
            tokens = torch.randint(0, VOCAB, (n,), generator=gen).tolist()
            branches.append(Branch(tokens, (range(n - 1), [n - 1])))
        out.append(PrefixGroup(prefix, branches))
    return out


def run_case(overrides: dict, tp: int, env) -> tuple[torch.Tensor, dict, dict, int]:
    state = initialize_model_parallel(ParallelConfig(tp_size=tp), seed=SEED, env=env)
    model = build_model(tiny_model_config(**overrides), VOCAB, env.device)
    (mb,) = plan_micro_batches(groups(), 10_000)
    sets = [
        (mb.labels[0].position, mb.labels[0].token, 0.7),
        (mb.labels[1].position, mb.labels[1].token, 1.0),
    ]
    logps = packed_logprobs(
        model,
        mb.input_ids,
        mb.position_ids,
        mb.attention_mask(),
        sets,
        chunk_tokens=4,
        chunk_vocab=24,
    )
    values = torch.cat(logps)
    weights = torch.linspace(-1.0, 2.0, values.numel())
    (values * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if tp > 1:  # what megatron's finalize_model_grads does: QK-norm grads are partial per rank
        group = parallel_state.get_tensor_model_parallel_group()
        for name, grad in grads.items():
            if "q_layernorm" in name or "k_layernorm" in name:
                tdist.all_reduce(grad, group=group)
    attrs = {n: p for n, p in model.named_parameters()}
    rank = state.tp_rank
    state.destroy()
    return values.detach(), grads, attrs, rank


def main(out_path: str) -> None:
    env = init_distributed(ParallelConfig(tp_size=2))
    torch.set_num_threads(1)
    report = {}
    for name, overrides in CASES.items():
        v2, g2, attrs, rank = run_case(overrides, 2, env)
        v1, g1, _, _ = run_case(overrides, 1, env)
        grad_diff, grad_scale = 0.0, 0.0
        for pname, shard in g2.items():
            want = tp_slice(g1[pname], attrs[pname], rank, 2)
            assert want.shape == shard.shape, (pname, want.shape, shard.shape)
            grad_diff = max(grad_diff, (want - shard).abs().max().item())
            grad_scale = max(grad_scale, want.abs().max().item())
        gathered = [torch.empty_like(v2) for _ in range(2)]
        tdist.all_gather(gathered, v2)
        report[name] = {
            "logp_max_abs_diff": (v1 - v2).abs().max().item(),
            "grad_max_abs_diff": grad_diff,
            "grad_max_abs": grad_scale,
            "tp_ranks_max_abs_diff": (gathered[0] - gathered[1]).abs().max().item(),
            "num_labels": v2.numel(),
        }
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
