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
