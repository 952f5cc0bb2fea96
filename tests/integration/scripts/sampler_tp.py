"""Sampler under torchrun with 2 gloo processes: TP=2 (identical samples on both TP ranks), then
TP=1 x DP=2 (different samples per DP rank). Rank 0 saves the samples for the pytest process to
compare with a single-process (TP=1) run. Usage: ``sampler_tp.py OUT.pt``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from rlp.config import ParallelConfig
from rlp.dist import init_distributed, shutdown
from rlp.model.build import build_model
from rlp.model.parallel import initialize_model_parallel
from rlp.model.sampler import SampleBatch, Sampler, SamplingParams
from tests.integration.test_sampler_tp import CASES, MODEL_SEED, PROMPTS, SAMPLES, SEED
from tests.model_helpers import TINY_VOCAB, tiny_model_config


def sample_all(model: torch.nn.Module) -> dict[str, SampleBatch]:
    return {
        name: Sampler().sample(model, PROMPTS, SAMPLES, SamplingParams(**kw), seed=SEED)
        for name, kw in CASES.items()
    }


def gather(t: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """All-gather a tensor whose shape may differ across ranks (padded to the max width)."""
    size = torch.tensor(list(t.shape), dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    width = max(int(s[-1]) for s in sizes)
    padded = torch.nn.functional.pad(t, (0, width - t.size(-1)), value=-7)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return out


def main(out_path: str) -> None:
    results: dict[str, dict[str, torch.Tensor]] = {}

    # --- TP = 2: both ranks must draw the same tokens and record the same log-probs.
    cfg = ParallelConfig(tp_size=2)
    env = init_distributed(cfg)
    state = initialize_model_parallel(cfg, seed=MODEL_SEED, env=env)
    model = build_model(tiny_model_config(init_method_std=0.2), TINY_VOCAB, state.device)
    for name, batch in sample_all(model).items():
        for field in ("tokens", "logprobs", "lengths", "stopped"):
            ranks = gather(getattr(batch, field), state.tp_group)
            assert torch.equal(ranks[0], ranks[1]), f"TP ranks differ in {name}.{field}"
        results[f"tp2/{name}"] = {"tokens": batch.tokens, "logprobs": batch.logprobs}
    state.destroy()

    # --- TP = 1 x DP = 2: replicas must draw different samples from the same seed.
    cfg = ParallelConfig(tp_size=1)
    state = initialize_model_parallel(cfg, seed=MODEL_SEED, env=env)
    assert state.dp_size == 2
    model = build_model(tiny_model_config(init_method_std=0.2), TINY_VOCAB, state.device)
    for name, batch in sample_all(model).items():
        ranks = gather(batch.tokens, state.dp_group)
        greedy = CASES[name].get("temperature") == 0.0
        assert torch.equal(ranks[0], ranks[1]) == greedy, f"DP ranks: {name} greedy={greedy}"
        if state.dp_rank == 0:
            results[f"dp2rank0/{name}"] = {"tokens": batch.tokens, "logprobs": batch.logprobs}
    state.destroy()

    if env.rank == 0:
        torch.save(results, out_path)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
