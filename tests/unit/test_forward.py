"""rlp.model.forward: explicit positions equal GPTModel.forward; a prefix tree equals its rows."""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import TINY_VOCAB, build_tiny_model

pytest.importorskip("megatron.core")

from rlp.model.forward import decoder_hidden, output_logits  # noqa: E402


def _ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_default_positions_equal_gpt_forward(qk_norm: bool) -> None:
    model = build_tiny_model(seed=3, qk_layernorm=qk_norm).eval()
    ids = _ids(2, 13)
    pos = torch.arange(13).expand(2, 13)
    with torch.no_grad():
        ref = model(ids, None, None)  # [b, s, V]
        ours = output_logits(model, decoder_hidden(model, ids, pos)).transpose(0, 1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_prefix_tree_equals_separate_rows() -> None:
    """[prompt | thought A | thought B] with a tree mask and restarted positions gives the
    logits of the two rows prompt+A and prompt+B."""
    model = build_tiny_model(seed=4).eval()
    prompt, a, b = _ids(1, 5, 1)[0], _ids(1, 4, 2)[0], _ids(1, 3, 3)[0]
    packed = torch.cat([prompt, a, b])[None]
    p, la, lb = len(prompt), len(a), len(b)
    pos = torch.cat([torch.arange(p), p + torch.arange(la), p + torch.arange(lb)])[None]
    seg = torch.tensor([0] * p + [1] * la + [2] * lb)
    s = packed.size(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    visible = causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    mask = ~visible[None, None]  # True = masked
    with torch.no_grad():
        tree = output_logits(model, decoder_hidden(model, packed, pos, mask))[:, 0]  # [s, V]
        row_a = model(torch.cat([prompt, a])[None], None, None)[0]
        row_b = model(torch.cat([prompt, b])[None], None, None)[0]
    torch.testing.assert_close(tree[: p + la], row_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree[p + la :], row_b[p:], atol=1e-5, rtol=1e-5)


def test_grad_flows_through_explicit_positions() -> None:
    model = build_tiny_model(seed=5)
    ids = _ids(1, 7)
    pos = torch.arange(7)[None]
    logits = output_logits(model, decoder_hidden(model, ids, pos))
    logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_layers_share_one_additive_mask_per_forward() -> None:
    """The bool tree mask becomes one additive tensor for every layer of a forward (not one
    per layer kept for backward); an in-place change or a new mask gives a new one, and it is
    released with its source."""
    from rlp.model import attention

    model = build_tiny_model(seed=5)
    seen: list[torch.Tensor] = []
    original = attention.additive_mask

    def spy(mask: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = original(mask, dtype, device)
        seen.append(out)
        return out

    s = 9
    mask = ~torch.ones(s, s, dtype=torch.bool).tril()
    mask[6:, 3:6] = True  # a second branch that does not see the first one
    ids, pos = _ids(1, s, 4), torch.arange(s)[None]
    tree = mask[None, None]
    attention.additive_mask = spy
    try:
        decoder_hidden(model, ids, pos, tree).sum().backward()
    finally:
        attention.additive_mask = original
    assert len(seen) == 2 and seen[0] is seen[1]  # two layers, one tensor
    assert id(tree) not in attention._ADDITIVE_MASKS._entries  # released after the layers
    assert torch.equal(seen[0] == 0, ~mask[None, None])
    assert seen[0][0, 0, 0, 1] == torch.finfo(torch.float32).min

    first = attention.additive_mask(mask, torch.float32, torch.device("cpu"))
    assert attention.additive_mask(mask, torch.float32, torch.device("cpu")) is first
    assert attention.additive_mask(mask, torch.float64, torch.device("cpu")) is not first
    mask[8, 0] = True  # in place: a new version
    changed = attention.additive_mask(mask, torch.float32, torch.device("cpu"))
    assert changed is not first and changed[8, 0] < 0
    with torch.no_grad():  # scoring: a transient copy per layer, nothing kept
        assert attention.additive_mask(mask, torch.float32, torch.device("cpu")) is not changed
    before = len(attention._ADDITIVE_MASKS._entries)
    del mask, tree  # (the view keeps its base alive)
    assert len(attention._ADDITIVE_MASKS._entries) == before - 1
