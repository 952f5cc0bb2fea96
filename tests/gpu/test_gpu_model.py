"""GPU tier: bf16 build, scoring and a mixed-precision optimizer step on one CUDA device.

Run with ``pytest -m gpu tests/gpu -s`` to see the timings.
"""

from __future__ import annotations

import time

import pytest
import torch

from rlp.config import OptimConfig, ParallelConfig
from tests.model_helpers import init_single_process, tiny_model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = 32000
SHAPE = dict(
    num_layers=4,
    hidden_size=512,
    ffn_hidden_size=1408,
    num_attention_heads=8,
    num_query_groups=2,
    max_position_embeddings=2048,
    make_vocab_size_divisible_by=128,
    params_dtype="auto",
    transformer_impl="auto",
)


def _timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up (kernel selection, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _build(seed: int, **overrides):
    from rlp.model.build import build_model

    state = init_single_process(seed)
    assert state.device.type == "cuda"
    return build_model(tiny_model_config(**{**SHAPE, **overrides}), VOCAB, state.device)


def test_bf16_build_and_score() -> None:
    from rlp.model.build import num_parameters, use_transformer_engine
    from rlp.model.logprobs import score_sequences, token_logprobs

    model = _build(seed=1).eval()
    assert all(p.dtype == torch.bfloat16 and p.is_cuda for p in model.parameters())
    te = use_transformer_engine(tiny_model_config(**SHAPE), torch.device("cuda"))
    print(f"\nparams={num_parameters(model) / 1e6:.1f}M transformer_engine={te}")

    ids = torch.randint(0, VOCAB, (16, 513), device="cuda")
    with torch.no_grad():
        logp = token_logprobs(model, ids[:, :-1], ids[:, 1:])
        logits = model(ids[:, :-1], None, None).float()
    assert logp.dtype == torch.float32 and logp.shape == (16, 512)
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    # bf16 logits -> fp32 CE vs fp32 log_softmax of the same bf16 logits.
    torch.testing.assert_close(logp, ref, atol=2e-2, rtol=2e-2)

    with torch.no_grad():
        t = _timed(lambda: token_logprobs(model, ids[:, :-1], ids[:, 1:]))
    print(f"token_logprobs 16x512: {t * 1e3:.1f} ms ({16 * 512 / t / 1e3:.0f}k tok/s)")

    seqs = [ids[i, : 64 + 24 * i].tolist() for i in range(16)]
    with torch.no_grad():
        t = _timed(lambda: score_sequences(model, seqs, micro_batch=8))
        scored = score_sequences(model, seqs, micro_batch=8)
    assert [len(s) for s in scored] == [len(s) - 1 for s in seqs]
    print(f"score_sequences 16 seqs (64..424 tokens): {t * 1e3:.1f} ms")


def test_sdpa_matches_unfused_bf16() -> None:
    from rlp.model.logprobs import token_logprobs

    sdpa = _build(seed=2, transformer_impl="local", attention_backend="sdpa").eval()
    unfused = _build(seed=2, transformer_impl="local", attention_backend="unfused").eval()
    unfused.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, VOCAB, (4, 257), device="cuda")
    with torch.no_grad():
        a = token_logprobs(sdpa, ids[:, :-1], ids[:, 1:])
        b = token_logprobs(unfused, ids[:, :-1], ids[:, 1:])
        ta = _timed(lambda: sdpa(ids, None, None))
        tb = _timed(lambda: unfused(ids, None, None))
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    print(f"\nforward 4x257: sdpa {ta * 1e3:.1f} ms, unfused {tb * 1e3:.1f} ms")


def test_mixed_precision_optimizer_step() -> None:
    from rlp.model.build import resolve_dtype
    from rlp.model.logprobs import token_logprobs
    from rlp.model.optimizer import (
        build_optimizer,
        finalize_grads,
        optimizer_step,
        set_lr,
        wrap_ddp,
        zero_grad,
    )

    model_cfg = tiny_model_config(**SHAPE)
    model = _build(seed=3)
    pcfg = ParallelConfig()
    ddp = wrap_ddp(model, pcfg)
    dtype = resolve_dtype(model_cfg, torch.device("cuda"))
    assert dtype == torch.bfloat16
    opt = build_optimizer(ddp, OptimConfig(lr=1e-4), pcfg, dtype)
    main_params = [p for g in opt.param_groups for p in g["params"]]
    assert main_params and all(p.dtype == torch.float32 for p in main_params)  # fp32 master copy

    ids = torch.randint(0, VOCAB, (8, 257), device="cuda")

    def step() -> tuple[float, object]:
        zero_grad(ddp, opt)
        loss = -token_logprobs(ddp, ids[:, :-1], ids[:, 1:]).mean()
        loss.backward()
        finalize_grads(ddp)
        set_lr(opt, 1e-4)
        return loss.item(), optimizer_step(opt)

    losses = []
    for _ in range(3):
        loss, result = step()
        assert result.applied
        losses.append(loss)
    assert losses[-1] < losses[0]
    t = _timed(step, repeats=3)
    print(f"\nfwd+bwd+AdamW 8x256 bf16: {t * 1e3:.1f} ms; losses {losses}")
