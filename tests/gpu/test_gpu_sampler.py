"""GPU sampler checks: bf16 decode throughput (printed) and log-prob consistency in bf16.

Skipped without CUDA. Run with ``pytest tests/gpu/test_gpu_sampler.py -s`` to see the numbers.
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = 32_000


@pytest.fixture(scope="module")
def model():
    from rlp.model.build import build_model
    from tests.model_helpers import init_single_process, tiny_model_config

    state = init_single_process(seed=1)
    cfg = tiny_model_config(
        num_layers=8,
        hidden_size=1024,
        ffn_hidden_size=2816,
        num_attention_heads=16,
        num_query_groups=4,
        max_position_embeddings=2048,
        params_dtype="bfloat16",
        transformer_impl="auto",
        init_method_std=0.05,
    )
    m = build_model(cfg, VOCAB, state.device)
    m.eval()
    return m


def _prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=gen).tolist()


def test_bf16_sampling_throughput(model):
    from rlp.model.sampler import Sampler, SamplingParams

    params = SamplingParams(temperature=0.7, max_new_tokens=256)
    prompts = _prompts(4, 256)
    sampler = Sampler()
    sampler.sample(model, prompts[:1], 4, SamplingParams(max_new_tokens=8), seed=0)  # warm-up
    for g in (16, 64):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = sampler.sample(model, prompts, g, params, seed=1)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = int(out.lengths.sum())
        print(
            f"\nsampler bf16: {len(prompts)} prompts x {g} samples, prompt 256, "
            f"{params.max_new_tokens} new: {tokens} tokens in {elapsed:.2f} s = "
            f"{tokens / elapsed:,.0f} tokens/s ({out.num_rows} rows)"
        )
        assert tokens == out.num_rows * params.max_new_tokens  # no stop rule: every row capped


def test_bf16_logprobs_match_teacher_forced(model):
    from rlp.model.logprobs import score_sequences
    from rlp.model.sampler import Sampler, SamplingParams

    prompts = [p[: 40 + 17 * i] for i, p in enumerate(_prompts(4, 120, seed=3))]
    out = Sampler().sample(
        model, prompts, 8, SamplingParams(temperature=1.0, max_new_tokens=64), seed=2
    )
    seqs = out.sequences()
    full = [prompts[int(i)] + s for i, s in zip(out.prompt_index.tolist(), seqs)]
    with torch.no_grad():
        scored = score_sequences(model, full, micro_batch=8)
    deltas = []
    for row, s in enumerate(seqs):
        plen = len(prompts[int(out.prompt_index[row])])
        deltas.append((out.logprobs[row, : len(s)] - scored[row][plen - 1 :]).abs())
    metric = torch.exp(torch.cat(deltas)).mean().item()
    print(f"\nsampler bf16 log-prob consistency mean exp(|delta|) = {metric:.5f}")
    assert metric <= 1.05  # the rollout's alert threshold (rollout.logprob_consistency_alert)
