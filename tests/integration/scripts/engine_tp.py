"""Cascade engine under torchrun with 2 gloo processes: TP=2 (identical samples on both TP ranks),
then TP=1 x DP=2 (different samples per DP rank). Rank 0 saves the samples for the pytest process
to compare with a single-process (TP=1) run. Usage: ``engine_tp.py OUT.pt``.
"""

from __future__ import annotations

import sys

import torch

from rlp.config import ParallelConfig
from rlp.dist import init_distributed, shutdown
from rlp.model.build import build_model
from rlp.model.cascade import CascadeEngine
from rlp.model.parallel import initialize_model_parallel
from rlp.model.sampler import SampleBatch, SamplingParams
from tests.integration.scripts.sampler_tp import gather
from tests.integration.test_engine_tp import CASES, ENGINE, MODEL_SEED, PROMPTS, SAMPLES, SEED
from tests.model_helpers import TINY_VOCAB, tiny_model_config


def sample_all(model: torch.nn.Module) -> dict[str, tuple[SampleBatch, dict]]:
    engine = CascadeEngine(model, **ENGINE)
    out = {}
    for name, kw in CASES.items():
        batch = engine.generate(PROMPTS, SAMPLES, SamplingParams(**kw), SEED)
        out[name] = (batch, dict(engine.last_stats))
    return out


def main(out_path: str) -> None:
    results: dict[str, object] = {}

    # --- TP = 2: both ranks must draw the same tokens and record the same log-probs.
    cfg = ParallelConfig(tp_size=2)
    env = init_distributed(cfg)
    state = initialize_model_parallel(cfg, seed=MODEL_SEED, env=env)
    model = build_model(tiny_model_config(init_method_std=0.2), TINY_VOCAB, state.device)
    for name, (batch, stats) in sample_all(model).items():
        for field in ("tokens", "logprobs", "lengths", "stopped"):
            ranks = gather(getattr(batch, field), state.tp_group)
            assert torch.equal(ranks[0], ranks[1]), f"TP ranks differ in {name}.{field}"
        results[f"tp2/{name}"] = {
            "tokens": batch.tokens,
            "logprobs": batch.logprobs,
            "lengths": batch.lengths,
        }
        results[f"tp2/{name}/compactions"] = stats["compactions"]
    state.destroy()

    # --- TP = 1 x DP = 2: replicas must draw different samples from the same seed.
    cfg = ParallelConfig(tp_size=1)
    state = initialize_model_parallel(cfg, seed=MODEL_SEED, env=env)
    assert state.dp_size == 2
    model = build_model(tiny_model_config(init_method_std=0.2), TINY_VOCAB, state.device)
    for name, (batch, _) in sample_all(model).items():
        ranks = gather(batch.tokens, state.dp_group)
        greedy = CASES[name].get("temperature") == 0.0
        assert torch.equal(ranks[0], ranks[1]) == greedy, f"DP ranks: {name} greedy={greedy}"
        if state.dp_rank == 0:
            results[f"dp2rank0/{name}"] = {
                "tokens": batch.tokens,
                "logprobs": batch.logprobs,
                "lengths": batch.lengths,
            }
    state.destroy()

    if env.rank == 0:
        torch.save(results, out_path)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
