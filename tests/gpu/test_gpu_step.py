"""GPU tier: the training step's log-prob head and prefix trees in bf16 on one CUDA device.

* the chunked head equals log_softmax of the gathered full logits (bf16 logits, fp32 softmax);
* packed prefix trees (local spec, SDPA with a tree mask) equal one causal row per thought;
* with the transformer-engine spec the trainer falls back to rows (no arbitrary mask).
"""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import init_single_process, tiny_model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = 32000
SHAPE = dict(
    num_layers=2,
    hidden_size=512,
    ffn_hidden_size=1408,
    num_attention_heads=8,
    num_query_groups=2,
    max_position_embeddings=2048,
    make_vocab_size_divisible_by=128,
    params_dtype="bfloat16",
)


def _build(seed: int, **overrides):
    from rlp.model.build import build_model

    state = init_single_process(seed)
    return build_model(tiny_model_config(**{**SHAPE, **overrides}), VOCAB - 7, state.device)


def _groups():
    from rlp.layout import Branch, PrefixGroup

    gen = torch.Generator().manual_seed(0)
    out = []
    for prefix_len in (300, 40):
        prefix = torch.randint(0, VOCAB - 7, (prefix_len,), generator=gen).tolist()
        branches = []
        for n in (200, 17, 90, 3):
            tokens = torch.randint(0, VOCAB - 7, (n,), generator=gen).tolist()
            branches.append(Branch(tokens, (range(n - 1), [n - 1])))
        out.append(PrefixGroup(prefix, branches))
    return out


def _scores(model, plan, device):
    from rlp.model.logprobs import packed_logprobs

    out = {}
    with torch.no_grad():
        for mb in plan:
            on = mb.to(device)
            sets = [(index.position, index.token, 0.7) for index in on.labels]
            logps = packed_logprobs(
                model, on.input_ids, on.position_ids, on.attention_mask(device), sets
            )
            for k, logp in enumerate(logps):
                values, mask = on.padded(logp, k)
                for row, branch in enumerate(on.branches):
                    out[(branch, k)] = values[row][mask[row]].float().cpu()
    return out


def test_bf16_head_equals_full_logits_and_trees_equal_rows() -> None:
    from rlp.layout import plan_micro_batches
    from rlp.model.forward import decoder_hidden, output_logits, tree_attention_supported
    from rlp.model.logprobs import head_inputs, head_logprobs

    model = _build(seed=1, transformer_impl="local").eval()
    device = next(model.parameters()).device
    assert tree_attention_supported(model)
    ids = torch.randint(0, VOCAB - 7, (2, 257), device=device)
    pos = torch.arange(257, device=device).expand(2, 257)
    where = torch.randint(0, 2 * 257, (600,), device=device)
    tokens = torch.randint(0, VOCAB - 7, (600,), device=device)
    with torch.no_grad():
        hidden = decoder_hidden(model, ids, pos)
        flat, _ = head_inputs(model, hidden)
        ours = head_logprobs(model, flat, where, tokens, temperature=0.7, chunk_vocab=4096)
        logits = output_logits(model, hidden).float()
        ref = torch.log_softmax(logits / 0.7, -1).reshape(2 * 257, -1)[where, tokens]
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)

    groups = _groups()
    trees = _scores(model, plan_micro_batches(groups, 4096), device)
    rows = _scores(model, plan_micro_batches(groups, 4096, share_prefix=False), device)
    # bf16 activations: kernels differ between the tree and the row layout.
    worst = max((trees[k] - rows[k]).abs().max().item() for k in trees)
    print(f"\nbf16 tree vs rows max |d logp| = {worst:.2e}")
    assert worst < 0.1


def test_transformer_engine_spec_falls_back_to_rows() -> None:
    from rlp.model.build import transformer_engine_available
    from rlp.model.forward import tree_attention_supported

    if not transformer_engine_available():
        pytest.skip("transformer-engine is not installed")
    model = _build(seed=2, transformer_impl="transformer_engine")
    assert not tree_attention_supported(model)
