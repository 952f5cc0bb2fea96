"""Model build: Llama/Qwen3 layouts, vocab padding, SDPA vs megatron's unfused attention."""

from __future__ import annotations

import pytest
import torch

from rlp.config import ConfigError
from tests.model_helpers import TINY_VOCAB, build_tiny_model, init_single_process, tiny_model_config

pytest.importorskip("megatron.core")

from megatron.core.inference.contexts import StaticInferenceContext  # noqa: E402

from rlp.model.build import (  # noqa: E402
    PADDED_VOCAB_LOGIT,
    _check_tp_divides,
    build_model,
    num_parameters,
    padded_vocab_size,
    resolve_dtype,
    transformer_config,
    unwrap,
)

CPU = torch.device("cpu")


def _ids(b: int, s: int, vocab: int = TINY_VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("vocab", "div", "tp", "want"),
    [
        (256, 64, 1, 256),
        (200, 64, 1, 256),
        (200, 64, 2, 256),
        (300, 64, 2, 320),
        (300, 64, 1, 320),
        (1, 8, 4, 8),
        (10, 6, 4, 12),
    ],
)
def test_padded_vocab_size(vocab: int, div: int, tp: int, want: int) -> None:
    padded = padded_vocab_size(vocab, div, tp)
    assert padded == want and padded % tp == 0 and padded >= vocab


def test_padded_vocab_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="tp_size"):
        padded_vocab_size(100, 64, 0)


def test_resolve_dtype() -> None:
    cfg = tiny_model_config(params_dtype="auto")
    assert resolve_dtype(cfg, CPU) == torch.float32
    assert resolve_dtype(cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(tiny_model_config(params_dtype="bfloat16"), CPU) == torch.bfloat16


def test_llama_tied_shapes_and_layout() -> None:
    model = build_tiny_model(seed=1)
    cfg = model.config
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert model.share_embeddings_and_output_weights
    assert model.output_layer.weight is None  # the embedding matrix is reused
    layer = model.decoder.layers[0]
    # GQA: 4 query heads + 2 x 2 KV groups, head dim 16.
    assert layer.self_attention.linear_qkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert layer.mlp.linear_fc1.weight.shape == (2 * 128, 64)  # SwiGLU gate + up
    assert type(layer.self_attention.core_attention).__name__ == "SDPAttention"
    assert all(p.dtype == torch.float32 for p in model.parameters())

    ids = _ids(2, 12)
    with torch.no_grad():
        logits = model(ids, None, None)
        nll = model(ids, None, None, labels=ids)
    assert logits.shape == (2, 12, TINY_VOCAB)
    assert nll.shape == (2, 12) and torch.isfinite(nll).all()


def test_untied_qwen3_qk_norm_and_kv_channels() -> None:
    model = build_tiny_model(
        seed=2, family="qwen3", tie_embeddings=False, kv_channels=32, rotary_base=1e6
    )
    assert not model.share_embeddings_and_output_weights
    assert model.output_layer.weight.shape == (TINY_VOCAB, 64)
    assert not torch.equal(model.output_layer.weight, model.embedding.word_embeddings.weight)
    attn = model.decoder.layers[0].self_attention
    # qwen3 implies per-head RMSNorm on queries and keys over kv_channels.
    assert type(attn.q_layernorm).__name__ == "RMSNorm" and attn.q_layernorm.weight.shape == (32,)
    assert attn.linear_qkv.weight.shape == ((4 + 2 * 2) * 32, 64)
    assert attn.linear_proj.weight.shape == (64, 4 * 32)
    with torch.no_grad():
        assert model(_ids(1, 8), None, None).shape == (1, 8, TINY_VOCAB)


def test_mha_and_rotary_base_is_wired() -> None:
    ids = _ids(1, 32)
    a = build_tiny_model(seed=3, num_query_groups=4)
    b = build_tiny_model(seed=3, num_query_groups=4, rotary_base=500.0)
    assert a.decoder.layers[0].self_attention.linear_qkv.weight.shape == (3 * 64, 64)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        # Same weights, different RoPE base -> different outputs (position 0 is unaffected).
        la, lb = a(ids, None, None), b(ids, None, None)
    torch.testing.assert_close(la[:, 0], lb[:, 0])
    assert (la[:, 1:] - lb[:, 1:]).abs().max() > 1e-3


def test_padded_vocab_rows_get_no_probability() -> None:
    model = build_tiny_model(seed=4, vocab_size=200)  # padded to 256
    assert model.rlp_vocab_size == 200 and model.vocab_size == 256
    ids = _ids(2, 10, vocab=200)
    logits = model(ids, None, None)
    assert logits.shape == (2, 10, 256)
    assert torch.all(logits[..., 200:] == PADDED_VOCAB_LOGIT)
    probs = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(probs[..., :200].sum(-1), torch.ones(2, 10, dtype=torch.float64))
    # The labels path sees the same masked logits, and gradients flow through the hook.
    nll = model(ids, None, None, labels=ids)
    torch.testing.assert_close(
        nll, -torch.log_softmax(logits.detach(), -1).gather(-1, ids[..., None])[..., 0]
    )
    nll.sum().backward()
    assert model.embedding.word_embeddings.weight.grad[200:].abs().max() == 0


def _sdpa_and_unfused(seed: int = 5, **overrides: object) -> tuple[torch.nn.Module, ...]:
    sdpa = build_tiny_model(seed=seed, attention_backend="sdpa", **overrides)
    unfused = build_tiny_model(seed=seed, attention_backend="unfused", **overrides)
    assert type(unfused.decoder.layers[0].self_attention.core_attention).__name__ == (
        "DotProductAttention"
    )
    unfused.load_state_dict(sdpa.state_dict())
    return sdpa, unfused


@pytest.mark.parametrize("overrides", [{}, {"family": "qwen3", "num_query_groups": 1}])
def test_sdpa_matches_unfused_forward_and_backward(overrides: dict) -> None:
    sdpa, unfused = _sdpa_and_unfused(**overrides)
    ids = _ids(3, 24)
    loss_s = sdpa(ids, None, None, labels=ids)
    loss_u = unfused(ids, None, None, labels=ids)
    torch.testing.assert_close(loss_s, loss_u, atol=1e-5, rtol=1e-5)
    loss_s.mean().backward()
    loss_u.mean().backward()
    for (name, ps), pu in zip(sdpa.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(ps.grad, pu.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_sdpa_matches_unfused_with_explicit_padding_mask() -> None:
    sdpa, unfused = _sdpa_and_unfused(seed=6)
    b, s = 2, 16
    ids = _ids(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    mask = causal.expand(b, 1, s, s).clone()
    mask[0, :, :, :5] = True  # row 0: the first 5 keys are left padding (rows 0-4 fully masked)
    with torch.no_grad():
        out_s = sdpa(ids, None, mask)
        out_u = unfused(ids, None, mask)
    assert torch.isfinite(out_s).all()
    torch.testing.assert_close(out_s, out_u, atol=1e-5, rtol=1e-5)


def test_kv_cache_prefill_decode_matches_full_forward() -> None:
    """The sampler's path: prefill a prompt, then decode with attention_mask=None."""
    sdpa, unfused = _sdpa_and_unfused(seed=7)
    ids = _ids(2, 20)
    prompt_len = 12
    with torch.no_grad():
        full = sdpa.eval()(ids, None, None)
        for model in (sdpa, unfused.eval()):
            ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=20)
            step = model(
                ids[:, :prompt_len], None, None, inference_context=ctx, runtime_gather_output=True
            )
            # The static context materialises only the last position's logits.
            torch.testing.assert_close(step[:, -1], full[:, prompt_len - 1], atol=1e-5, rtol=1e-5)
            ctx.sequence_len_offset += prompt_len
            ctx.enable_decode_mode()
            for t in range(prompt_len, 20):
                step = model(
                    ids[:, t : t + 1],
                    torch.full((2, 1), t),
                    None,
                    inference_context=ctx,
                    runtime_gather_output=True,
                )
                torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
                ctx.sequence_len_offset += 1


def test_sdpa_multi_token_chunk_after_cache_is_causal() -> None:
    """A 4-token chunk appended to a KV cache attends causally (bottom-right aligned)."""
    sdpa = build_tiny_model(seed=8).eval()
    ids = _ids(1, 16)
    with torch.no_grad():
        full = sdpa(ids, None, None)
        ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=16)
        sdpa(ids[:, :12], None, None, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += 12
        chunk = sdpa(ids[:, 12:], None, None, inference_context=ctx, runtime_gather_output=True)
        ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=16)
        ctx.materialize_only_last_token_logits = False
        sdpa(ids[:, :12], None, None, inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += 12
        all_chunk = sdpa(ids[:, 12:], None, None, inference_context=ctx, runtime_gather_output=True)
    torch.testing.assert_close(chunk[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(all_chunk, full[:, 12:], atol=1e-5, rtol=1e-5)


def test_same_seed_same_weights_different_seed_different() -> None:
    a, b, c = build_tiny_model(seed=9), build_tiny_model(seed=9), build_tiny_model(seed=10)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embedding.word_embeddings.weight, c.embedding.word_embeddings.weight)


def test_num_parameters_and_unwrap() -> None:
    model = build_tiny_model(seed=11, tie_embeddings=False)
    h, f, v, layers = 64, 128, TINY_VOCAB, 2
    per_layer = h * (4 + 4) * 16 + 4 * 16 * h + 2 * f * h + f * h + 2 * h  # qkv, proj, mlp, norms
    want = v * h * 2 + layers * per_layer + h  # embedding, output layer, layers, final norm
    assert num_parameters(model) == want
    assert num_parameters(model, exclude_embeddings=True) == want - 2 * v * h

    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(Wrapper(model))) is model
    with pytest.raises(TypeError, match="GPTModel"):
        unwrap(torch.nn.Linear(2, 2))


def test_config_errors_name_the_key() -> None:
    init_single_process()
    with pytest.raises(ConfigError, match="parallel.tp_size"):
        _check_tp_divides(tiny_model_config(num_attention_heads=6, num_query_groups=3), 4)
    with pytest.raises(ConfigError, match="model.recompute"):
        transformer_config(tiny_model_config(recompute="some"), CPU)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        build_model(tiny_model_config(vocab_size=TINY_VOCAB - 1), TINY_VOCAB, CPU)
    with pytest.raises(ConfigError, match="model.transformer_impl"):
        build_model(tiny_model_config(transformer_impl="transformer_engine"), TINY_VOCAB, CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with CUDA")
def test_cpu_shims() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    from rlp.model import cpu_compat

    init_single_process()
    assert cpu_compat.is_applied()
    cpu_compat.apply()  # idempotent
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    want = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
    assert torch.equal(tutils.get_default_causal_mask(3), want)
    assert torch.equal(fused_softmax.get_default_causal_mask(3), want)
    x = torch.ones(2)
    assert x.type() == "torch.cuda.FloatTensor"  # megatron's type-string checks pass
    assert x.type(torch.float64).dtype == torch.float64  # conversions are untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with CUDA")
def test_cpu_rng_tracker_forks_without_touching_the_default_stream() -> None:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draws() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        init_single_process(seed=77)
        with tracker.fork():
            a = torch.rand(4)
        with tracker.fork():
            b = torch.rand(4)  # the forked stream continues where it stopped
        return a, b, torch.rand(4)

    a, b, default = draws()
    init_single_process(seed=77)
    assert torch.equal(default, torch.rand(4))  # forks left the default stream alone
    assert not torch.equal(a, b) and not torch.equal(a, default)
    a2, b2, _ = draws()  # re-seeding reproduces the forked stream
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_model_vocab_size_is_honoured_over_the_tokenizer() -> None:
    """model.vocab_size (e.g. Qwen3's 151,936 rows for ~151,670 tokens) sizes the embedding and
    keeps its rows past the tokenizer in the softmax; only TP padding beyond it is masked."""
    init_single_process()
    model = build_model(tiny_model_config(vocab_size=300), TINY_VOCAB, CPU)
    assert model.rlp_vocab_size == 300
    assert model.embedding.word_embeddings.weight.shape[0] == 320  # padded to a multiple of 64
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]), None, None)
    assert (logits[..., 256:300] > -100).all() and (logits[..., 300:] == -1.0e4).all()
