"""GPU checks of both rollout engines: bf16 decode throughput (printed), log-prob consistency in
bf16, the cascade engine's CUDA-graph replay against its eager step, memory after generation and
optimizer offload.

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


# --------------------------------------------------------------------------------------------
# The cascade engine


STOPS = [[t] for t in range(0, VOCAB, 97)]


def _cascade(model, **kw):
    from rlp.model.cascade import CascadeEngine

    return CascadeEngine(model, **kw)


def test_cascade_graph_replay_equals_eager(model):
    from rlp.model.sampler import SamplingParams

    prompts = [p[: 20 + 37 * i] for i, p in enumerate(_prompts(6, 300, seed=5))]
    for params in (
        SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=96, stop_sequences=STOPS),
        SamplingParams(temperature=0.0, max_new_tokens=40, eos_id=7),
    ):
        kw = dict(check_every=4, kv_block=16)
        graphs = _cascade(model, cuda_graphs=True, **kw)
        eager = _cascade(model, cuda_graphs=False, **kw)
        a = graphs.generate(prompts, 4, params, seed=3)
        b = eager.generate(prompts, 4, params, seed=3)
        assert graphs.last_stats["graph_captures"] >= 2 and eager.last_stats["graph_captures"] == 0
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        print(f"\ncascade graphs: {graphs.last_stats}")


def test_cascade_bf16_logprobs_match_teacher_forced(model):
    from rlp.model.logprobs import score_sequences
    from rlp.model.sampler import SamplingParams

    prompts = [p[: 40 + 17 * i] for i, p in enumerate(_prompts(4, 120, seed=3))]
    out = _cascade(model).generate(
        prompts, 8, SamplingParams(temperature=1.0, max_new_tokens=64), seed=2
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
    print(f"\ncascade bf16 log-prob consistency mean exp(|delta|) = {metric:.5f}")
    assert metric <= 1.05


def test_cascade_vs_reference_throughput(model):
    from rlp.model.engine import build_engine
    from rlp.model.sampler import SamplingParams

    params = SamplingParams(temperature=0.7, max_new_tokens=256)
    prompts = [p[: 64 + 40 * i] for i, p in enumerate(_prompts(8, 400, seed=9))]
    engines = {"reference": build_engine(model, "reference"), "cascade": build_engine(model)}
    for engine in engines.values():
        engine.generate(prompts[:1], 2, SamplingParams(max_new_tokens=8), seed=0)  # warm-up
    for name, engine in engines.items():
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, 16, params, seed=1)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = int(out.lengths.sum())
        print(f"\n{name}: {out.num_rows} rows x 256: {tokens / elapsed:,.0f} tokens/s")
        assert tokens == out.num_rows * params.max_new_tokens


def test_cascade_frees_its_memory_and_training_runs(model):
    from rlp.model.sampler import SamplingParams

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    prompts = _prompts(4, 200, seed=1)
    _cascade(model).generate(prompts, 16, SamplingParams(max_new_tokens=64), seed=0)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2**20  # caches and graphs are gone
    model.train()
    try:
        ids = torch.randint(0, VOCAB, (2, 64), device="cuda")
        model(ids, None, None, labels=ids).float().mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_offload_moves_optimizer_state_to_host_and_back():
    from rlp.config import OptimConfig, ParallelConfig
    from rlp.model.build import build_model
    from rlp.model.offload import offloaded
    from rlp.model.optimizer import build_optimizer, step, wrap_ddp, zero_grad
    from tests.model_helpers import init_single_process, tiny_model_config

    state = init_single_process(seed=2)
    net = build_model(tiny_model_config(params_dtype="bfloat16"), 512, state.device)
    ddp = wrap_ddp(net, ParallelConfig())
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3), ParallelConfig(), torch.bfloat16)
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    zero_grad(ddp, opt)
    ddp(ids, None, None, labels=ids).float().mean().backward()
    step(ddp, opt)
    leaves = getattr(opt, "chained_optimizers", [opt])
    states = [v for leaf in leaves for s in leaf.optimizer.state.values() for v in s.values()]
    saved = [v.clone() for v in states if isinstance(v, torch.Tensor)]
    with offloaded(ddp, opt):
        inner = [v for leaf in leaves for s in leaf.optimizer.state.values() for v in s.values()]
        assert all(v.device.type == "cpu" for v in inner if isinstance(v, torch.Tensor))
        assert all(p.is_cuda for p in net.parameters())  # the weights stay for generation
    after = [v for leaf in leaves for s in leaf.optimizer.state.values() for v in s.values()]
    after = [v for v in after if isinstance(v, torch.Tensor)]
    assert all(v.is_cuda for v in after)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(after, saved))
    zero_grad(ddp, opt)
    ddp(ids, None, None, labels=ids).float().mean().backward()
    assert step(ddp, opt)[0]
