"""Teacher-forced log-probs: equality with log_softmax, padding invariance, grad behaviour."""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import TINY_VOCAB, build_tiny_model

pytest.importorskip("megatron.core")

from rlp.model.logprobs import pad_sequences, score_sequences, token_logprobs  # noqa: E402


def _ids(b: int, s: int, seed: int = 0, vocab: int = TINY_VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _reference_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """log_softmax of the full logits (no labels path), gathered at the targets, in fp64."""
    logits = model(inputs, None, None).double()  # [b, s, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]


@pytest.mark.parametrize("vocab", [TINY_VOCAB, 200])  # 200: padded to 256, padded rows masked
def test_token_logprobs_equal_log_softmax_of_logits(vocab: int) -> None:
    model = build_tiny_model(seed=21, vocab_size=vocab).eval()
    ids = _ids(3, 17, vocab=vocab)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logp = token_logprobs(model, inputs, targets)
        ref = _reference_logprobs(model, inputs, targets)
    assert logp.dtype == torch.float32 and logp.shape == (3, 16)
    assert (logp <= 0).all()
    torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=1e-5)


def test_token_logprobs_grad_and_no_grad() -> None:
    model = build_tiny_model(seed=22)
    ids = _ids(2, 9)
    with torch.no_grad():
        assert token_logprobs(model, ids[:, :-1], ids[:, 1:]).grad_fn is None
    logp = token_logprobs(model, ids[:, :-1], ids[:, 1:])
    # The gradient of sum(logp) w.r.t. the logits equals the autograd reference's.
    logp[0, :4].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _reference_logprobs(model, ids[:, :-1], ids[:, 1:])[0, :4].sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad.to(grads[name].dtype), atol=1e-6, rtol=1e-4)
    assert grads["embedding.word_embeddings.weight"].abs().sum() > 0


def test_token_logprobs_rejects_mismatched_shapes() -> None:
    model = build_tiny_model(seed=23)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        token_logprobs(model, _ids(2, 5), _ids(2, 6))


def test_pad_sequences() -> None:
    inputs, targets, n = pad_sequences([[1, 2, 3, 4], [5, 6]], pad_id=9)
    assert inputs.tolist() == [[1, 2, 3], [5, 6, 9]]
    assert targets.tolist() == [[2, 3, 4], [6, 9, 9]]
    assert n.tolist() == [3, 1]
    with pytest.raises(ValueError, match=">= 2 tokens"):
        pad_sequences([[1]], pad_id=0)


def test_score_sequences_right_padding_invariance_and_order() -> None:
    model = build_tiny_model(seed=24).eval()
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 40, 12, 2, 33, 7]
    seqs = [torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist() for n in lengths]
    with torch.no_grad():
        batched = score_sequences(model, seqs, micro_batch=4, pad_id=0)
        unsorted = score_sequences(model, seqs, micro_batch=3, pad_id=7, sort_by_length=False)
        alone = [score_sequences(model, [s], micro_batch=1)[0] for s in seqs]
    for seq, b, u, a in zip(seqs, batched, unsorted, alone):
        assert b.shape == (len(seq) - 1,)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u, a, atol=1e-5, rtol=1e-5)
    # Element j scores seq[j + 1] given seq[: j + 1]: check one against token_logprobs directly.
    s = torch.tensor(seqs[2])[None]
    with torch.no_grad():
        direct = token_logprobs(model, s[:, :-1], s[:, 1:])[0]
    torch.testing.assert_close(batched[2], direct, atol=1e-5, rtol=1e-5)
