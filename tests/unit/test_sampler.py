"""Sampler: log-prob consistency, KV cache vs recompute, prefix sharing, stop rules, processing.

All tests run a real tiny megatron ``GPTModel`` (2 layers, width 64, vocab 256) on CPU.
``init_method_std=0.2`` makes its next-token distributions peaked enough that greedy decoding
has no near-ties (fp32 rounding between code paths could otherwise flip an argmax).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.model_helpers import TINY_VOCAB, build_tiny_model

PROMPTS = [[5, 17, 42, 99, 3, 7], [11, 12], [200, 201, 202, 203, 204, 205, 206, 207, 208, 209]]


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model(seed=7, init_method_std=0.2)
    m.eval()
    return m


def _params(**kw):
    from rlp.model.sampler import SamplingParams

    return SamplingParams(**kw)


def _sample(model, prompts=PROMPTS, g=3, seed=11, sampler_kw=None, **params):
    from rlp.model.sampler import Sampler

    return Sampler(**(sampler_kw or {})).sample(model, prompts, g, _params(**params), seed=seed)


def _assert_same(a, b, atol=1e-4, same_prompts=True):
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.stopped, b.stopped)
    assert torch.equal(a.tokens, b.tokens)
    if same_prompts:
        assert torch.equal(a.prompt_index, b.prompt_index)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


def _greedy_reference(model, prompt, n=12):
    return _sample(model, [prompt], g=1, temperature=0.0, max_new_tokens=n).sequences()[0]


# Many one-token stop sequences: rows end after a few tokens at varied lengths, which
# exercises per-row stopping and KV-cache compaction.
MANY_STOPS = [[t] for t in range(0, 256, 7)]


# --------------------------------------------------------------------------------------------
# (1) recorded log-probs == teacher-forced recompute


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 0), (1.3, 1.0, 20), (0.0, 1, 0)])
def test_raw_logprobs_match_teacher_forced_recompute(model, temperature, top_p, top_k):
    from rlp.model.logprobs import score_sequences

    batch = _sample(
        model,
        g=4,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=16,
        stop_sequences=MANY_STOPS[:10],
        forbid_first=[0, 7, 14],
    )
    seqs = batch.sequences()
    full = [PROMPTS[int(i)] + s for i, s in zip(batch.prompt_index, seqs)]
    with torch.no_grad():
        scored = score_sequences(model, full, micro_batch=5)
    recorded, recomputed = [], []
    for row, s in enumerate(seqs):
        plen = len(PROMPTS[int(batch.prompt_index[row])])
        recorded.append(batch.logprobs[row, : len(s)])
        recomputed.append(scored[row][plen - 1 :])  # log p of the generated tokens
        assert recomputed[-1].numel() == len(s)
    delta = (torch.cat(recorded) - torch.cat(recomputed)).abs()
    assert torch.exp(delta).mean().item() <= 1.0001
    assert delta.max().item() < 1e-4
    # The recorded values are real log-probs (not zeros): a plain probability < 1.
    assert (torch.cat(recorded) < 0).all()


def test_processed_logprobs_are_under_the_sampling_distribution(model):
    from rlp.model.sampler import sampling_mode

    batch = _sample(model, g=2, temperature=0.7, max_new_tokens=8, logprob_mode="processed", seed=3)
    raw = _sample(model, g=2, temperature=0.7, max_new_tokens=8, seed=3)
    assert torch.equal(batch.tokens, raw.tokens)  # the mode changes what is recorded, not draws
    for row, s in enumerate(batch.sequences()):
        prompt = PROMPTS[int(batch.prompt_index[row])]
        ids = torch.tensor([prompt + s])
        with sampling_mode(model):
            logits = model(ids, None, None, runtime_gather_output=True)[0].float()  # [L, V]
        gen_logits = logits[len(prompt) - 1 : -1]  # predict the generated tokens
        target = torch.tensor(s)[:, None]
        expected = torch.log_softmax(gen_logits / 0.7, -1).gather(1, target).squeeze(1)
        unscaled = torch.log_softmax(gen_logits, -1).gather(1, target).squeeze(1)
        torch.testing.assert_close(batch.logprobs[row, : len(s)], expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(raw.logprobs[row, : len(s)], unscaled, atol=1e-4, rtol=0)
        assert not torch.allclose(expected, unscaled, atol=1e-3)
    greedy = _sample(model, temperature=0.0, max_new_tokens=4, logprob_mode="processed")
    assert torch.equal(greedy.logprobs, torch.zeros_like(greedy.logprobs))


@pytest.mark.parametrize("noise", ["generator", "keyed"])
def test_tempered_logprobs_equal_a_recompute_at_the_temperature(model, noise):
    from rlp.model.sampler import sampling_mode

    kw = dict(g=2, temperature=0.7, top_k=30, top_p=0.9, forbid_first=[1, 2], max_new_tokens=8)
    tempered = _sample(model, logprob_mode="tempered", sampler_kw={"noise": noise}, **kw)
    raw = _sample(model, sampler_kw={"noise": noise}, **kw)
    assert torch.equal(tempered.tokens, raw.tokens)  # the mode changes what is recorded only
    for row, s in enumerate(tempered.sequences()):
        prompt = PROMPTS[int(tempered.prompt_index[row])]
        with sampling_mode(model):
            logits = model(torch.tensor([prompt + s]), None, None, runtime_gather_output=True)
        gen_logits = logits[0, len(prompt) - 1 : -1].float()
        expected = torch.log_softmax(gen_logits / 0.7, -1).gather(1, torch.tensor(s)[:, None])
        torch.testing.assert_close(
            tempered.logprobs[row, : len(s)], expected.squeeze(1), atol=1e-4, rtol=0
        )
    # Greedy has no tempered distribution: the recorded values are the raw ones.
    greedy_t = _sample(model, temperature=0.0, max_new_tokens=4, logprob_mode="tempered")
    greedy_r = _sample(model, temperature=0.0, max_new_tokens=4)
    _assert_same(greedy_t, greedy_r, atol=0)


def test_keyed_noise_is_layout_free_and_exponential():
    from rlp.model.sampler import KeyedNoise

    noise = KeyedNoise(seed=5, vocab=4096, device=torch.device("cpu"))
    p = torch.arange(8).repeat_interleave(4)
    g = torch.arange(4).repeat(8)
    keys = noise.row_keys(p, g)
    e = noise(keys, 3)  # [32, 4096]
    assert e.min() > 0 and torch.isfinite(e).all()
    # Exp(1): mean 1, variance 1, P(E > 1) = 1/e (1.3e5 values: sigma of the mean is 0.003).
    assert abs(e.mean().item() - 1) < 0.02 and abs(e.var().item() - 1) < 0.05
    assert abs((e > 1).float().mean().item() - math.exp(-1)) < 0.01
    # A row's noise depends on (prompt, sample, step) only: any subset / order gives its values.
    perm = torch.tensor([7, 30, 2])
    assert torch.equal(noise(noise.row_keys(p[perm], g[perm]), 3), e[perm])
    assert torch.equal(noise(keys, torch.full((32,), 3)), e)
    # ... and differs between steps, samples, seeds.
    assert not torch.equal(noise(keys, 4), e)
    assert not torch.equal(e[0], e[1])
    other = KeyedNoise(seed=6, vocab=4096, device=torch.device("cpu"))
    assert not torch.equal(other(other.row_keys(p, g), 3), e)


def test_keyed_sampler_is_independent_of_buckets_and_prompt_grouping(model):
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=12, stop_sequences=MANY_STOPS)
    keyed = {"noise": "keyed"}
    together = _sample(model, g=3, sampler_kw=keyed, **kw)
    split = _sample(model, g=3, sampler_kw={**keyed, "max_prompt_spread": 0}, **kw)
    _assert_same(together, split)
    assert len({tuple(s) for s in together.sequences()[:3]}) > 1  # really sampled
    generator = _sample(model, g=3, **kw)
    assert not torch.equal(generator.tokens, together.tokens)  # a different noise source


# --------------------------------------------------------------------------------------------
# (2) KV cache == full recompute; (3) shared prefix == repeated prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_matches_no_cache(model, temperature):
    kw = dict(temperature=temperature, max_new_tokens=20, stop_sequences=MANY_STOPS)
    cached = _sample(model, g=4, **kw)
    recomputed = _sample(model, g=4, sampler_kw={"no_cache": True}, **kw)
    uncompacted = _sample(model, g=4, sampler_kw={"compact_below": 0.0}, **kw)
    _assert_same(cached, recomputed)
    _assert_same(cached, uncompacted)
    # The stop set made rows end at different steps (so compaction really ran).
    assert cached.lengths.unique().numel() >= 3 and cached.stopped.any()


def test_shared_prefix_equals_prefilling_each_copy(model):
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=12, stop_sequences=MANY_STOPS)
    shared = _sample(model, prompts=PROMPTS[:2], g=3, **kw)
    repeated = _sample(model, prompts=[p for p in PROMPTS[:2] for _ in range(3)], g=1, **kw)
    _assert_same(shared, repeated, same_prompts=False)
    assert shared.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert repeated.prompt_index.tolist() == [0, 1, 2, 3, 4, 5]
    # Sampling really happened: the three samples of a prompt are not all identical.
    assert len({tuple(s) for s in shared.sequences()[:3]}) > 1


def test_mixed_prompt_lengths_equal_one_prompt_per_call(model):
    together = _sample(model, g=2, temperature=0.0, max_new_tokens=10)
    separate = _sample(
        model, g=2, temperature=0.0, max_new_tokens=10, sampler_kw={"max_prompt_spread": 0}
    )
    _assert_same(together, separate)
    for i, prompt in enumerate(PROMPTS):
        alone = _sample(model, prompts=[prompt], g=2, temperature=0.0, max_new_tokens=10)
        assert torch.equal(alone.tokens, together.tokens[2 * i : 2 * i + 2, : alone.tokens.size(1)])
        torch.testing.assert_close(
            alone.logprobs,
            together.logprobs[2 * i : 2 * i + 2, : alone.tokens.size(1)],
            atol=1e-4,
            rtol=0,
        )


def test_max_batch_rows_splits_without_changing_greedy_output(model):
    whole = _sample(model, g=2, temperature=0.0, max_new_tokens=6)
    split = _sample(model, g=2, temperature=0.0, max_new_tokens=6, sampler_kw={"max_batch_rows": 2})
    _assert_same(whole, split)


# --------------------------------------------------------------------------------------------
# (4) stop rules, forbid_first


def _first_unique_bigram(seq):
    for k in range(1, len(seq) - 1):
        if all((seq[j], seq[j + 1]) != (seq[k], seq[k + 1]) for j in range(k)):
            return k
    raise AssertionError(f"no unique bigram in {seq}")


def test_two_token_stop_sequence_split_across_steps(model):
    ref = _greedy_reference(model, PROMPTS[0])
    k = _first_unique_bigram(ref)
    out = _sample(
        model,
        prompts=[PROMPTS[0]],
        g=1,
        temperature=0.0,
        max_new_tokens=12,
        stop_sequences=[[ref[k], ref[k + 1]]],
        pad_id=999,
    )
    assert out.lengths.tolist() == [k + 2] and out.stopped.tolist() == [True]
    assert out.tokens[0, : k + 2].tolist() == ref[: k + 2]
    # Padding after the stop: pad a second prompt's longer row against it.
    both = _sample(
        model,
        prompts=[PROMPTS[0], PROMPTS[1]],
        g=1,
        temperature=0.0,
        max_new_tokens=12,
        stop_sequences=[[ref[k], ref[k + 1]]],
        pad_id=999,
    )
    assert both.lengths.tolist()[0] == k + 2 and both.lengths.tolist()[1] > k + 2
    assert (both.tokens[0, k + 2 :] == 999).all()
    assert (both.logprobs[0, k + 2 :] == 0).all()


def test_eos_stops_and_cap_does_not_count_as_stopped(model):
    ref = _greedy_reference(model, PROMPTS[2])
    k = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])
    out = _sample(
        model, prompts=[PROMPTS[2]], g=1, temperature=0.0, max_new_tokens=12, eos_id=ref[k]
    )
    assert out.lengths.tolist() == [k + 1] and out.stopped.tolist() == [True]
    assert out.tokens[0].tolist() == ref[: k + 1]
    capped = _sample(model, prompts=[PROMPTS[2]], g=1, temperature=0.0, max_new_tokens=5)
    assert capped.lengths.tolist() == [5] and capped.stopped.tolist() == [False]
    # A stop exactly at the cap counts as stopped.
    at_cap = _sample(
        model, prompts=[PROMPTS[2]], g=1, temperature=0.0, max_new_tokens=k + 1, eos_id=ref[k]
    )
    assert at_cap.lengths.tolist() == [k + 1] and at_cap.stopped.tolist() == [True]


def test_stop_sequences_match_generated_tokens_only(model):
    prompt = PROMPTS[0]
    ref = _greedy_reference(model, prompt)
    # [last prompt token, first generated token] spans the boundary: must not stop there.
    assert (prompt[-1], ref[0]) not in set(zip(ref, ref[1:]))  # precondition of this test
    out = _sample(
        model,
        prompts=[prompt],
        g=1,
        temperature=0.0,
        max_new_tokens=12,
        stop_sequences=[[prompt[-1], ref[0]]],
    )
    assert out.lengths.tolist() == [12] and out.stopped.tolist() == [False]


def test_forbid_first_masks_only_the_first_generated_token(model):
    ref = _greedy_reference(model, PROMPTS[1])
    out = _sample(
        model, prompts=[PROMPTS[1]], g=1, temperature=0.0, max_new_tokens=3, forbid_first=[ref[0]]
    )
    assert out.tokens[0, 0].item() != ref[0]
    forbidden = list(range(128))
    many = _sample(
        model, prompts=PROMPTS, g=16, temperature=1.0, max_new_tokens=6, forbid_first=forbidden
    )
    assert (many.tokens[:, 0] >= 128).all()
    assert (many.tokens[:, 1:] < 128).any()  # later tokens are free


# --------------------------------------------------------------------------------------------
# (5) greedy, top-k, top-p, seeds


def test_greedy_is_deterministic_and_topk1_equals_greedy(model):
    greedy = _sample(model, temperature=0.0, max_new_tokens=10)
    again = _sample(model, temperature=0.0, max_new_tokens=10, seed=999)
    top1 = _sample(model, temperature=1.0, top_k=1, max_new_tokens=10)
    nucleus = _sample(model, temperature=1.0, top_p=1e-6, max_new_tokens=10)
    for other in (again, top1, nucleus):
        assert torch.equal(greedy.tokens, other.tokens)
        torch.testing.assert_close(greedy.logprobs, other.logprobs, atol=1e-5, rtol=0)


def test_seed_reproduces_and_changes_samples(model):
    a = _sample(model, temperature=1.0, max_new_tokens=8, seed=1)
    b = _sample(model, temperature=1.0, max_new_tokens=8, seed=1)
    c = _sample(model, temperature=1.0, max_new_tokens=8, seed=2)
    _assert_same(a, b, atol=0)
    assert not torch.equal(a.tokens, c.tokens)


def test_process_logits_top_k_top_p_forbid():
    from rlp.model.sampler import process_logits

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = lambda x: torch.isfinite(x).tolist()  # noqa: E731
    assert kept(process_logits(logits, _params(top_k=2))) == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    # Nucleus 0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it.
    assert kept(process_logits(logits, _params(top_p=0.7))) == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    assert kept(process_logits(logits, _params(top_p=0.8))) == [
        [True, True, False, False],
        [False, False, True, True],
    ]
    assert kept(process_logits(logits, _params(top_p=0.81)))[0] == [True, True, True, False]
    first = torch.tensor([True, False])
    out = process_logits(logits, _params(temperature=0.0, forbid_first=[0, 3]), first)
    assert kept(out) == [[False, True, True, False], [True, True, True, True]]
    scaled = process_logits(logits, _params(temperature=0.5))
    torch.testing.assert_close(scaled, logits * 2)


def test_draw_tokens_matches_the_distribution():
    from rlp.model.sampler import draw_tokens

    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05, 0.0])
    n = 40_000
    logits = probs.log().expand(n, -1)
    noise = torch.empty(n, 5).exponential_(generator=gen)
    counts = torch.bincount(draw_tokens(logits, noise), minlength=5).float() / n
    sigma = torch.sqrt(probs * (1 - probs) / n)
    assert ((counts - probs).abs() <= 5 * sigma + 1e-9).all(), counts
    assert counts[4] == 0


def test_plan_buckets():
    from rlp.model.sampler import plan_buckets

    lengths = [10, 300, 12, 50, 290]
    assert plan_buckets(lengths, 4, None, 128) == [[0, 2, 3], [4, 1]]
    assert plan_buckets(lengths, 4, 8, 1000) == [[0, 2], [3, 4], [1]]
    assert plan_buckets(lengths, 4, 2, 1000) == [[0], [2], [3], [4], [1]]  # G rows never split
    assert plan_buckets(lengths, 1, None, 0) == [[0], [2], [3], [4], [1]]


# --------------------------------------------------------------------------------------------
# Model state, validation


def test_restores_train_mode_and_clears_rope_cache():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    net = build_tiny_model(seed=3)
    net.train()
    net.decoder.layers[0].eval()  # a mixed state must come back exactly
    _sample(net, temperature=1.0, max_new_tokens=4)
    assert net.training and not net.decoder.layers[0].training
    assert net.decoder.layers[1].training
    assert RotaryEmbedding.forward.cache_info().currsize == 0
    # Training right after sampling works (no inference tensors leaked into caches).
    ids = torch.randint(0, TINY_VOCAB, (2, 8))
    loss = net(ids, None, None, labels=ids).mean()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_validation_errors(model):
    from rlp.model.sampler import Sampler

    with pytest.raises(ValueError, match="temperature"):
        _sample(model, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        _sample(model, top_p=0.0)
    with pytest.raises(ValueError, match="empty sequence"):
        _sample(model, stop_sequences=[[]])
    with pytest.raises(ValueError, match="at least one token"):
        _sample(model, prompts=[[1], []])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _sample(model, prompts=[[1] * 200], max_new_tokens=100)  # model has 256 positions
    with pytest.raises(ValueError, match="num_samples"):
        Sampler().sample(model, PROMPTS, 0, _params(), seed=0)
    empty = Sampler().sample(model, [], 4, _params(), seed=0)
    assert empty.num_rows == 0


def test_output_shapes_and_dtypes(model):
    out = _sample(model, g=2, temperature=1.0, max_new_tokens=7, stop_sequences=MANY_STOPS)
    n = len(PROMPTS) * 2
    assert out.tokens.shape == (n, int(out.lengths.max())) and out.tokens.dtype == torch.long
    assert out.logprobs.dtype == torch.float32 and out.stopped.dtype == torch.bool
    assert ((out.lengths >= 1) & (out.lengths <= 7)).all()
    assert not math.isnan(out.logprobs.sum().item())


@pytest.mark.parametrize(
    "overrides", [{"attention_backend": "unfused"}, {"family": "qwen3"}], ids=["unfused", "qwen3"]
)
def test_kv_cache_matches_no_cache_other_architectures(overrides):
    net = build_tiny_model(seed=5, init_method_std=0.2, **overrides)
    kw = dict(temperature=1.0, max_new_tokens=10, stop_sequences=MANY_STOPS)
    _assert_same(_sample(net, **kw), _sample(net, sampler_kw={"no_cache": True}, **kw))


def test_samples_through_the_ddp_wrapper(model):
    from rlp.config import ParallelConfig
    from rlp.model.optimizer import wrap_ddp

    net = build_tiny_model(seed=7, init_method_std=0.2)
    ddp = wrap_ddp(net, ParallelConfig())
    ddp.train()
    kw = dict(temperature=1.0, max_new_tokens=8)
    _assert_same(_sample(ddp, **kw), _sample(model, **kw))  # same seed-7 weights as `model`
    assert ddp.training and net.training
