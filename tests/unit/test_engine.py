"""Cascade rollout engine vs the reference sampler, on a real tiny megatron ``GPTModel`` (CPU).

Equalities checked: greedy tokens and raw log-probs for mixed prompt lengths; sampled tokens
under the same keyed noise (``Sampler(noise="keyed")``); recorded log-probs vs a teacher-forced
recompute; independence from batch layout (chunking, subsets, compaction, KV growth, completion
check period); stop/EOS/cap/forbid-first rules; G = 1 and G = 16; training after generation.
``init_method_std=0.2`` makes next-token distributions peaked (no near-ties in greedy decoding).
"""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import TINY_VOCAB, build_tiny_model

# Mixed lengths (2 .. 40 tokens) so one ragged batch holds very different positions.
PROMPTS = [
    [5, 17, 42, 99, 3, 7],
    [11, 12],
    [200, 201, 202, 203, 204, 205, 206, 207, 208, 209],
    list(range(30, 70)),
]
MANY_STOPS = [[t] for t in range(0, 256, 7)]
SAMPLED = dict(temperature=1.0, top_p=0.95, max_new_tokens=20, stop_sequences=MANY_STOPS)


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model(seed=7, init_method_std=0.2)
    m.eval()
    return m


def _params(**kw):
    from rlp.model.sampler import SamplingParams

    return SamplingParams(**kw)


def _engine(model, **kw):
    from rlp.model.cascade import CascadeEngine

    return CascadeEngine(model, **kw)


def _cascade(model, prompts=PROMPTS, g=3, seed=11, engine_kw=None, **params):
    engine = _engine(model, **(engine_kw or {}))
    out = engine.generate(prompts, g, _params(**params), seed)
    return out, engine.last_stats


def _reference(model, prompts=PROMPTS, g=3, seed=11, noise="keyed", **params):
    from rlp.model.sampler import Sampler

    return Sampler(noise=noise).sample(model, prompts, g, _params(**params), seed=seed)


def _assert_same(a, b, atol=1e-4):
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.stopped, b.stopped)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.prompt_index, b.prompt_index)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------
# Equality with the reference sampler


@pytest.mark.parametrize("g", [1, 2, 16])
def test_greedy_equals_reference_for_mixed_prompt_lengths(model, g):
    out, stats = _cascade(model, g=g, temperature=0.0, max_new_tokens=12)
    _assert_same(out, _reference(model, g=g, temperature=0.0, max_new_tokens=12))
    # One prefill and cap - 1 decode steps for all rows, whatever the prompt lengths.
    assert stats["prefill_forwards"] == 1 and stats["decode_steps"] == 11
    assert (out.logprobs < 0).all()  # real raw log-probs, not zeros


@pytest.mark.parametrize(
    "params",
    [
        SAMPLED,
        dict(temperature=0.7, top_k=20, max_new_tokens=16, forbid_first=[0, 7, 14]),
        dict(temperature=1.3, max_new_tokens=10, logprob_mode="tempered", eos_id=3),
        dict(temperature=0.8, top_p=0.9, max_new_tokens=10, logprob_mode="processed"),
    ],
    ids=["top_p+stops", "top_k+forbid", "tempered+eos", "processed"],
)
def test_sampled_equals_reference_under_the_same_noise_keys(model, params):
    out, _ = _cascade(model, g=4, **params)
    _assert_same(out, _reference(model, g=4, **params))
    assert len({tuple(s) for s in out.sequences()[:4]}) > 1  # really sampled


@pytest.mark.parametrize("g", [1, 16])
def test_sampled_g1_and_g16_equal_reference(model, g):
    out, _ = _cascade(model, g=g, **SAMPLED)
    _assert_same(out, _reference(model, g=g, **SAMPLED))


def test_qwen3_qk_norm_model_equals_reference():
    net = build_tiny_model(seed=5, init_method_std=0.2, family="qwen3")
    out, _ = _cascade(net, **SAMPLED)
    _assert_same(out, _reference(net, **SAMPLED))


def test_samples_through_the_ddp_wrapper(model):
    from rlp.config import ParallelConfig
    from rlp.model.optimizer import wrap_ddp

    net = build_tiny_model(seed=7, init_method_std=0.2)  # the fixture's weights
    ddp = wrap_ddp(net, ParallelConfig())
    ddp.train()
    out, _ = _cascade(ddp, **SAMPLED)
    _assert_same(out, _cascade(model, **SAMPLED)[0])
    assert ddp.training and net.training


# --------------------------------------------------------------------------------------------
# Log-probs vs a teacher-forced recompute


@pytest.mark.parametrize("mode", ["raw", "tempered"])
def test_logprobs_match_teacher_forced_recompute(model, mode):
    from rlp.model.sampler import sampling_mode

    out, _ = _cascade(model, g=4, temperature=0.7, max_new_tokens=16, logprob_mode=mode, seed=3)
    recorded, recomputed = [], []
    for row, seq in enumerate(out.sequences()):
        prompt = PROMPTS[int(out.prompt_index[row])]
        with sampling_mode(model):
            logits = model(torch.tensor([prompt + seq]), None, None, runtime_gather_output=True)
        gen = logits[0, len(prompt) - 1 : -1].float()
        if mode == "tempered":
            gen = gen / 0.7
        target = torch.tensor(seq)[:, None]
        recomputed.append(torch.log_softmax(gen, -1).gather(1, target).squeeze(1))
        recorded.append(out.logprobs[row, : len(seq)])
    delta = (torch.cat(recorded) - torch.cat(recomputed)).abs()
    assert torch.exp(delta).mean().item() <= 1.001
    assert delta.max().item() < 1e-4


# --------------------------------------------------------------------------------------------
# Layout independence: chunks, subsets, compaction, KV growth, check period


def test_results_do_not_depend_on_batch_layout(model):
    whole, _ = _cascade(model, **SAMPLED)
    chunked, stats = _cascade(model, engine_kw={"max_batch_rows": 3}, **SAMPLED)
    _assert_same(whole, chunked)
    assert stats["batches"] == len(PROMPTS)  # 3 rows = one prompt of G=3 per batch
    tiny_prefill, stats = _cascade(model, engine_kw={"prefill_tokens": 1}, **SAMPLED)
    _assert_same(whole, tiny_prefill)
    assert stats["prefill_forwards"] == len(PROMPTS)
    # A prompt's rows depend on its index in the call, not on the other prompts.
    for i in (0, 3):
        alone, _ = _cascade(model, prompts=PROMPTS[: i + 1], **SAMPLED)
        rows = slice(3 * i, 3 * i + 3)
        width = int(alone.lengths[rows].max())
        assert torch.equal(alone.tokens[rows, :width], whole.tokens[rows, :width])


def test_compaction_growth_and_check_period_keep_results(model):
    params = {**SAMPLED, "stop_sequences": [[t] for t in range(0, 256, 17)]}
    base, stats = _cascade(model, g=4, engine_kw={"compact_below": 0.0}, **params)
    assert stats["compactions"] == 0
    # Rows end at many different steps (so compaction has work to do).
    assert base.lengths.unique().numel() >= 4 and base.stopped.any() and not base.stopped.all()
    for kw in (
        {"check_every": 1},
        {"check_every": 2, "kv_block": 3},
        {"check_every": 5, "kv_block": 1},
        {"check_every": 64},
    ):
        out, stats = _cascade(model, g=4, engine_kw=kw, **params)
        _assert_same(base, out)
        if kw["check_every"] <= 2:
            assert stats["compactions"] >= 2, stats


def test_decode_forwards_are_cap_plus_check_overshoot(model):
    # No stop rule: every row runs to the cap, one prefill + cap - 1 decode steps.
    _, stats = _cascade(model, g=2, temperature=1.0, max_new_tokens=9)
    assert stats["prefill_forwards"] == 1 and stats["decode_steps"] == 8
    # Every row stops at its first token: the loop ends at the first check (step 1).
    out, stats = _cascade(
        model, g=2, temperature=1.0, max_new_tokens=30, stop_sequences=[[t] for t in range(256)]
    )
    assert out.lengths.tolist() == [1] * 8 and stats["decode_steps"] == 0
    # With checks every 4 steps, rows done after step k cost at most 3 extra steps.
    out, stats = _cascade(model, g=2, engine_kw={"check_every": 4}, **SAMPLED)
    last = int(out.lengths.max())  # the last row's final token is step last - 1
    assert last - 1 <= stats["decode_steps"] <= last - 1 + 3


def test_thought_kv_grows_with_what_is_generated(model):
    # Each row stores its prompt once (per prompt, not per row) and only generated tokens.
    _, short = _cascade(model, g=4, temperature=1.0, max_new_tokens=4, engine_kw={"kv_block": 4})
    _, long = _cascade(model, g=4, temperature=1.0, max_new_tokens=40, engine_kw={"kv_block": 4})
    gpt_kv_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * groups * head dim * fp32 bytes
    prefix_bytes = len(PROMPTS) * max(len(p) for p in PROMPTS) * gpt_kv_token
    # 16 rows; the thought store holds at most cap - 1 slots (the last token is never fed back).
    assert short["peak_kv_bytes"] == prefix_bytes + 16 * 3 * gpt_kv_token
    assert long["peak_kv_bytes"] == prefix_bytes + 16 * 39 * gpt_kv_token


# --------------------------------------------------------------------------------------------
# What CUDA-graph capture relies on, checked eagerly on CPU


SYNC_OPS = ("_local_scalar_dense", "nonzero", "aten.equal", "aten.item")


def test_decode_step_is_sync_free_static_and_idempotent(model, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from rlp.model import cascade

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if name.startswith("aten.index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 and isinstance(args[1], list) else [])
            ):
                name += " with a bool mask (nonzero)"  # boolean indexing syncs with the host
            shapes = [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.ops.append((name, tuple(shapes)))
            return out

    params = {**SAMPLED, "stop_sequences": [[t] for t in range(0, 256, 17)], "eos_id": 5}
    base, _ = _cascade(model, g=4, **params)
    traces = {}
    step = cascade._Batch._step

    def traced(self):
        with Trace() as trace:
            step(self)
        key = (self.kv.rows, self.kv.capacity, tuple(self.kv.kp[0].shape))
        traces.setdefault(key, []).append(trace.ops)

    monkeypatch.setattr(cascade._Batch, "_step", traced)
    out, stats = _cascade(model, g=4, engine_kw={"check_every": 2, "kv_block": 4}, **params)
    _assert_same(base, out)
    assert stats["compactions"] >= 1 and len(traces) >= 3  # several shape classes were used
    for steps in traces.values():
        ops = [name for name, _ in steps[0]]
        assert not [op for op in ops if any(s in op for s in SYNC_OPS)], "host sync in the step"
        assert all(other == steps[0] for other in steps[1:]), "shapes changed within a class"
    # Running each step twice (eager warm-up + graph replay on CUDA) changes nothing.
    monkeypatch.setattr(cascade._Batch, "_step", step)
    twice = cascade._Batch._run_step

    def run_twice(self):
        twice(self)
        twice(self)

    monkeypatch.setattr(cascade._Batch, "_run_step", run_twice)
    again, _ = _cascade(model, g=4, engine_kw={"check_every": 2, "kv_block": 4}, **params)
    _assert_same(base, again)


# --------------------------------------------------------------------------------------------
# Stop rules, forbid-first, cap


def _greedy(model, prompt, n=12):
    out, _ = _cascade(model, prompts=[prompt], g=1, temperature=0.0, max_new_tokens=n)
    return out.sequences()[0]


def test_two_token_stop_sequence_and_padding(model):
    ref = _greedy(model, PROMPTS[0])
    k = next(
        k
        for k in range(1, len(ref) - 1)
        if all((ref[j], ref[j + 1]) != (ref[k], ref[k + 1]) for j in range(k))
    )
    kw = dict(temperature=0.0, max_new_tokens=12, stop_sequences=[[ref[k], ref[k + 1]]])
    out, _ = _cascade(model, prompts=PROMPTS[:2], g=1, pad_id=999, **kw)
    assert out.lengths.tolist()[0] == k + 2 and out.stopped.tolist()[0]
    assert out.tokens[0, : k + 2].tolist() == ref[: k + 2]
    assert out.lengths.tolist()[1] > k + 2  # the other row ran on; row 0 is padded
    assert (out.tokens[0, k + 2 :] == 999).all() and (out.logprobs[0, k + 2 :] == 0).all()
    _assert_same(out, _reference(model, prompts=PROMPTS[:2], g=1, pad_id=999, **kw))


def test_eos_cap_and_stop_at_cap(model):
    ref = _greedy(model, PROMPTS[2])
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])
    out, _ = _cascade(
        model, prompts=[PROMPTS[2]], g=1, temperature=0.0, max_new_tokens=12, eos_id=ref[k]
    )
    assert out.lengths.tolist() == [k + 1] and out.stopped.tolist() == [True]
    capped, _ = _cascade(model, prompts=[PROMPTS[2]], g=1, temperature=0.0, max_new_tokens=5)
    assert capped.lengths.tolist() == [5] and capped.stopped.tolist() == [False]
    at_cap, _ = _cascade(
        model, prompts=[PROMPTS[2]], g=1, temperature=0.0, max_new_tokens=k + 1, eos_id=ref[k]
    )
    assert at_cap.lengths.tolist() == [k + 1] and at_cap.stopped.tolist() == [True]
    one, stats = _cascade(model, prompts=[PROMPTS[2]], g=2, temperature=1.0, max_new_tokens=1)
    assert one.lengths.tolist() == [1, 1] and stats["decode_steps"] == 0


def test_stop_sequences_match_generated_tokens_only(model):
    prompt = PROMPTS[0]
    ref = _greedy(model, prompt)
    assert (prompt[-1], ref[0]) not in set(zip(ref, ref[1:]))  # precondition
    out, _ = _cascade(
        model,
        prompts=[prompt],
        g=1,
        temperature=0.0,
        max_new_tokens=12,
        stop_sequences=[[prompt[-1], ref[0]]],
    )
    assert out.lengths.tolist() == [12] and out.stopped.tolist() == [False]


def test_forbid_first_masks_only_the_first_token(model):
    ref = _greedy(model, PROMPTS[1])
    out, _ = _cascade(
        model, prompts=[PROMPTS[1]], g=1, temperature=0.0, max_new_tokens=3, forbid_first=[ref[0]]
    )
    assert out.tokens[0, 0].item() != ref[0]
    many, _ = _cascade(
        model, g=16, temperature=1.0, max_new_tokens=6, forbid_first=list(range(128))
    )
    assert (many.tokens[:, 0] >= 128).all()
    assert (many.tokens[:, 1:] < 128).any()


def test_seeds(model):
    a, _ = _cascade(model, temperature=1.0, max_new_tokens=8, seed=1)
    b, _ = _cascade(model, temperature=1.0, max_new_tokens=8, seed=1)
    c, _ = _cascade(model, temperature=1.0, max_new_tokens=8, seed=2)
    _assert_same(a, b, atol=0)
    assert not torch.equal(a.tokens, c.tokens)


# --------------------------------------------------------------------------------------------
# The cascade attention itself


@pytest.mark.parametrize("hpg", [1, 3])
def test_cascade_attention_equals_attention_over_the_concatenation(hpg):
    from rlp.model.kv_cache import cascade_attention

    gen = torch.Generator().manual_seed(0)
    ng, hn, g, pc, t = 2, 8, 3, 3, 5
    prompt_len = [4, 9, 1]
    lp = max(prompt_len)
    rows = [(0, 0), (0, 2), (2, 1), (1, 0), (1, 1)]  # (prompt slot, member); member (0,1) idle
    a = len(rows)
    q = torch.randn(a, ng, hpg, hn, generator=gen)
    kp, vp = torch.randn(2, pc, ng, lp, hn, generator=gen)
    kt, vt = torch.randn(2, a, ng, t, hn, generator=gen)
    keys = torch.arange(lp)
    prefix_bias = torch.where(keys[None] < torch.tensor(prompt_len)[:, None], 0.0, -torch.inf)
    step = 3  # thought slots 0..3 are visible
    thought_bias = torch.where(torch.arange(t) <= step, 0.0, -torch.inf).view(1, 1, 1, t)
    slot_group = torch.full((pc * g,), a)
    row_group = torch.tensor([p * g + m for p, m in rows])
    slot_group[row_group] = torch.arange(a)
    out = cascade_attention(
        q, kp, vp, prefix_bias.view(pc, 1, 1, lp), kt, vt, thought_bias, slot_group, row_group, 0.3
    )
    for r, (p, _) in enumerate(rows):
        k = torch.cat([kp[p, :, : prompt_len[p]], kt[r, :, : step + 1]], dim=1)  # [ng, L, hn]
        v = torch.cat([vp[p, :, : prompt_len[p]], vt[r, :, : step + 1]], dim=1)
        expected = torch.nn.functional.scaled_dot_product_attention(q[r], k, v, scale=0.3)
        torch.testing.assert_close(out[r], expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Leaving generation, factory, offload, validation


def test_training_is_unaffected_after_generation():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from rlp.model.attention import SDPAttention

    net = build_tiny_model(seed=3)
    net.train()
    net.decoder.layers[0].eval()
    _cascade(net, temperature=1.0, max_new_tokens=6)
    assert net.training and not net.decoder.layers[0].training and net.decoder.layers[1].training
    assert RotaryEmbedding.forward.cache_info().currsize == 0
    cores = [m for m in net.modules() if isinstance(m, SDPAttention)]
    assert cores and all(m.rollout_kv is None for m in cores)
    ids = torch.randint(0, TINY_VOCAB, (2, 8))
    before = net(ids, None, None, labels=ids)
    before.mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.zero_grad()
    # An error inside generation also leaves the model clean.
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _cascade(net, prompts=[[1] * 250], max_new_tokens=10)
    assert all(m.rollout_kv is None for m in cores) and net.training
    torch.testing.assert_close(net(ids, None, None, labels=ids), before)


def test_factory_and_fallback(capsys):
    from rlp.config import RolloutConfig
    from rlp.model.engine import OffloadingEngine, build_engine, engine_from_config

    net = build_tiny_model(seed=7, init_method_std=0.2)
    assert build_engine(net).name == "cascade"
    ref = build_engine(net, "reference", max_batch_rows=8)
    assert ref.name == "reference" and ref.sampler.noise == "generator"
    with pytest.raises(ValueError, match="unknown rollout engine"):
        build_engine(net, "vllm")
    unfused = build_tiny_model(seed=7, init_method_std=0.2, attention_backend="unfused")
    fallback = build_engine(unfused)
    assert fallback.name == "reference" and fallback.sampler.noise == "keyed"
    assert "cannot drive this model" in capsys.readouterr().out
    # The fallback draws what the cascade engine draws on the same weights.
    params = _params(**SAMPLED)
    _assert_same(
        fallback.generate(PROMPTS, 2, params, 5), build_engine(net).generate(PROMPTS, 2, params, 5)
    )
    cfg = RolloutConfig(engine="cascade", check_every=3, kv_block=5, offload=True)
    engine = engine_from_config(net, cfg)
    assert isinstance(engine, OffloadingEngine) and engine.engine.check_every == 3
    assert engine_from_config(net, RolloutConfig(engine="reference")).sampler.max_batch_rows == 64


def test_offload_frees_grad_buffers_and_keeps_optimizer_state():
    from rlp.config import OptimConfig, ParallelConfig
    from rlp.model.offload import offloaded
    from rlp.model.optimizer import build_optimizer, step, wrap_ddp, zero_grad

    net = build_tiny_model(seed=7, init_method_std=0.2)
    ddp = wrap_ddp(net, ParallelConfig())
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3), ParallelConfig(), torch.float32)
    ids = torch.randint(0, TINY_VOCAB, (2, 8))

    def train_step():
        zero_grad(ddp, opt)
        ddp(ids, None, None, labels=ids).mean().backward()
        return step(ddp, opt)

    train_step()
    state = {k: v.clone() for s in opt.optimizer.state.values() for k, v in s.items()}
    buffers = [b.grad_data for b in ddp.buffers]
    sizes = [b.untyped_storage().size() for b in buffers]
    with offloaded(ddp, opt):
        assert all(b.untyped_storage().size() == 0 for b in buffers)
        _cascade(ddp, temperature=1.0, max_new_tokens=4)
    assert [b.untyped_storage().size() for b in buffers] == sizes
    after = {k: v for s in opt.optimizer.state.values() for k, v in s.items()}
    assert all(torch.equal(after[k], v) for k, v in state.items())
    ok, _ = train_step()  # training continues with the restored buffers
    assert ok


def test_validation(model):
    with pytest.raises(ValueError, match="num_samples"):
        _engine(model).generate(PROMPTS, 0, _params(), 0)
    with pytest.raises(ValueError, match="at least one token"):
        _engine(model).generate([[1], []], 2, _params(), 0)
    with pytest.raises(ValueError, match="check_every"):
        _engine(model, check_every=0)
    with pytest.raises(ValueError, match="cannot drive"):
        _engine(build_tiny_model(seed=1, attention_backend="unfused"))
    assert _engine(model).generate([], 4, _params(), 0).num_rows == 0


def test_config_keys_are_validated():
    from rlp.config import ConfigError, load_config

    assert load_config(None, []).rollout.engine == "cascade"
    assert load_config(None, ["rollout.engine=reference"]).rollout.engine == "reference"
    with pytest.raises(ConfigError, match="rollout.engine"):
        load_config(None, ["rollout.engine=vllm"])
    for key in ("check_every", "kv_block", "prefill_tokens"):
        with pytest.raises(ConfigError, match=f"rollout.{key} must be >= 1"):
            load_config(None, [f"rollout.{key}=0"])
