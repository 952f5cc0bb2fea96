"""The log-prob head (labels only, chunked, vocab-parallel) and the packed prefix-tree forward:
equal to full-logit references in values and gradients; recompute on == off on CPU."""

from __future__ import annotations

import random

import pytest
import torch

from tests.model_helpers import build_tiny_model

pytest.importorskip("megatron.core")

from rlp.layout import Branch, PrefixGroup, plan_micro_batches  # noqa: E402
from rlp.model.forward import (  # noqa: E402
    decoder_hidden,
    output_logits,
    tree_attention_supported,
)
from rlp.model.logprobs import (  # noqa: E402
    head_inputs,
    head_logprobs,
    label_logprobs,
    packed_logprobs,
    token_logprobs,
)

VOCAB = 200  # padded to 256: the padded rows must get no probability


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().item() + 1e-12
        assert (a[name] - b[name]).abs().max().item() <= atol + 1e-4 * scale, name


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    ("chunk_tokens", "chunk_vocab", "temperature"), [(5, 37, 0.7), (64, 4096, 1.0)]
)
def test_head_equals_log_softmax_of_full_logits_values_and_grads(
    tied: bool, chunk_tokens: int, chunk_vocab: int, temperature: float
) -> None:
    model = build_tiny_model(seed=3, vocab_size=VOCAB, tie_embeddings=tied)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    pos = torch.arange(11).expand(2, 11)
    where = torch.randint(0, 22, (30,), generator=gen)  # repeated positions on purpose
    tokens = torch.randint(0, VOCAB, (30,), generator=gen)
    weights = torch.randn(30, generator=gen)

    flat, reduce_grad = head_inputs(model, decoder_hidden(model, ids, pos))
    assert reduce_grad
    ours = head_logprobs(
        model,
        flat,
        where,
        tokens,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        chunk_vocab=chunk_vocab,
    )
    (ours * weights).sum().backward()
    got = _grads(model)

    logits = output_logits(model, decoder_hidden(model, ids, pos)).float()  # [s, b, V], masked
    ref = torch.log_softmax(logits / temperature, dim=-1).reshape(22, -1)[where, tokens]
    (ref * weights).sum().backward()
    want = _grads(model)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-6)
    _assert_grads_close(got, want)
    assert ours.dtype == torch.float32 and (ours < 0).all()


def test_label_logprobs_excludes_padded_rows_and_validates() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(10, 8, generator=gen)
    tokens = torch.tensor([0, 3, 5, 5])
    got = label_logprobs(hidden, weight, tokens, vocab_size=6, chunk_tokens=3, chunk_vocab=4)
    want = torch.log_softmax(hidden @ weight[:6].t(), -1)[torch.arange(4), tokens]
    torch.testing.assert_close(got, want)
    assert label_logprobs(hidden[:0], weight, tokens[:0]).shape == (0,)
    with pytest.raises(ValueError, match="temperature"):
        label_logprobs(hidden, weight, tokens, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[M, h\]"):
        label_logprobs(hidden, weight, tokens[:2])


def _groups(seed: int = 0) -> list[PrefixGroup]:
    rng = random.Random(seed)
    groups = []
    for prefix_len in (9, 4):
        prefix = [rng.randrange(VOCAB) for _ in range(prefix_len)]
        branches = []
        for n in (6, 11, 2, 8):
            tokens = [rng.randrange(VOCAB) for _ in range(n)]
            branches.append(Branch(tokens, (range(n - 1), [n - 1])))
        groups.append(PrefixGroup(prefix, branches))
    return groups


def _score(model, plan, temperatures=(0.7, 1.0)) -> dict[tuple[int, int], torch.Tensor]:
    """{(branch, label set): log-probs in label order} over a plan."""
    out = {}
    for mb in plan:
        sets = [(index.position, index.token, t) for index, t in zip(mb.labels, temperatures)]
        logps = packed_logprobs(model, mb.input_ids, mb.position_ids, mb.attention_mask(), sets)
        for k, logp in enumerate(logps):
            values, mask = mb.padded(logp, k)
            for row, branch in enumerate(mb.branches):
                out[(branch, k)] = values[row][mask[row]]
    return out


def _objective(scored: dict) -> torch.Tensor:
    return sum((i + 1) * v.sum() for i, (_, v) in enumerate(sorted(scored.items())))


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_packed_prefix_trees_equal_separate_rows_values_and_grads(backend: str) -> None:
    """Prefix trees (one row, and split by a small budget) == one causal row per thought ==
    megatron's own cross entropy on each full sequence, in log-probs (1e-5) and gradients."""
    model = build_tiny_model(seed=5, vocab_size=VOCAB, attention_backend=backend)
    assert tree_attention_supported(model)
    groups = _groups()
    plans = {
        "tree": plan_micro_batches(groups, 10_000),
        "split": plan_micro_batches(groups, 20),
        "rows": plan_micro_batches(groups, 10_000, share_prefix=False),
    }
    assert len(plans["tree"]) == 1 and len(plans["split"]) > 2 and not plans["rows"][0].packed
    scored, grads = {}, {}
    for name, plan in plans.items():
        scored[name] = _score(model, plan)
        _objective(scored[name]).backward()
        grads[name] = _grads(model)
    # Reference: megatron's cross entropy on prefix + branch, temperature 1 (set 1 only).
    flat = [(g.prefix, b) for g in groups for b in g.branches]
    for gid, (prefix, branch) in enumerate(flat):
        seq = torch.tensor([[*prefix, *branch.tokens]])
        with torch.no_grad():
            ref = token_logprobs(model, seq[:, :-1], seq[:, 1:])[0, len(prefix) - 1 :]
        torch.testing.assert_close(scored["tree"][(gid, 1)].detach(), ref[-1:], atol=1e-5, rtol=0)
    for name in ("split", "rows"):
        for key, value in scored["tree"].items():
            torch.testing.assert_close(value, scored[name][key], atol=1e-5, rtol=0)
        _assert_grads_close(grads["tree"], grads[name], atol=1e-5)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_on_cpu_equals_off(mode: str, monkeypatch) -> None:
    """model.recompute runs on CPU (cpu_compat row 12) and changes neither loss nor gradients."""
    from megatron.core import tensor_parallel

    plan = plan_micro_batches(_groups(seed=1), 10_000)
    results = {}
    for recompute in ("none", mode):
        calls = []
        original = tensor_parallel.checkpoint

        def counting(*args, _original=original, _calls=calls, **kwargs):
            _calls.append(1)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tensor_parallel, "checkpoint", counting)
        model = build_tiny_model(seed=7, vocab_size=VOCAB, recompute=recompute).train()
        loss = _objective(_score(model, plan))
        loss.backward()
        results[recompute] = (loss.item(), _grads(model), len(calls))
        monkeypatch.setattr(tensor_parallel, "checkpoint", original)
    assert results["none"][2] == 0 and results[mode][2] >= 2  # one per layer
    assert results["none"][0] == results[mode][0]
    _assert_grads_close(results["none"][1], results[mode][1], atol=0.0)
