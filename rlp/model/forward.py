"""Forward through a megatron ``GPTModel`` with explicit per-token positions and any mask.

This module owns the one forward path that ``GPTModel.forward`` cannot express: RoPE at
*per-token* positions. Megatron applies rotary embeddings at positions ``0..s-1`` of the packed
sequence whatever ``position_ids`` says (``position_ids`` only feed learned absolute embeddings),
so two layouts this library needs are out of its reach:

* a **prefix tree** in one row (a shared prompt followed by G thoughts, each thought restarting
  at the position right after the prompt, with a mask that keeps thoughts apart), and
* a **ragged decode batch** (each row at its own position).

:func:`decoder_hidden` runs megatron's own modules (embedding, every transformer layer with its
TP linears and norms, the final norm) and passes the rotary table *gathered at the given
positions*; nothing of the layer is re-implemented, so the local and the transformer-engine
specs, activation recompute and tensor parallelism behave exactly as in ``GPTModel.forward``.
:func:`output_logits` applies the output layer (vocab-parallel, ``[s, b, V/tp]``).

With ``position_ids = arange(s)`` and a causal mask the result equals ``GPTModel.forward`` (a
unit test checks it), so this path is a strict generalisation.
"""

from __future__ import annotations

import torch

from rlp.model.build import unwrap


def rotary_at(model: torch.nn.Module, position_ids: torch.Tensor) -> torch.Tensor | None:
    """Rotary frequencies at ``position_ids`` [b, s] -> ``[s, b, 1, rot_dim]`` (None without RoPE).

    The table covers the model's ``max_sequence_length`` positions (megatron caches it per
    length), so no host sync is needed to size it.
    """
    gpt = unwrap(model)
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None or gpt.position_embedding_type != "rope":
        return None
    table = rope(gpt.max_sequence_length)  # [L, 1, 1, rot_dim] fp32
    return table[:, 0][position_ids.t()]  # [s, b, 1, rot_dim]


def decoder_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final-norm hidden states ``[s, b, h]`` of ``input_ids`` [b, s] at ``position_ids`` [b, s].

    ``attention_mask``: bool, **True = masked**, broadcastable to ``[b, heads, s, s]`` (megatron's
    convention); ``None`` = causal. Under sequence parallelism the result is scattered along the
    sequence like megatron's decoder output. Grad flows in grad mode. Collective over TP.
    """
    if input_ids.shape != position_ids.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and position_ids {tuple(position_ids.shape)} "
            "must both be [batch, seq]"
        )
    gpt = unwrap(model)
    if not (gpt.pre_process and gpt.post_process):
        raise ValueError("decoder_hidden needs the whole model on this rank (parallel.pp_size=1)")
    hidden = gpt.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
    try:
        return gpt.decoder(
            hidden_states=hidden,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary_at(gpt, position_ids),
        )
    finally:
        if attention_mask is not None:
            from rlp.model.attention import release_additive_mask

            release_additive_mask(attention_mask)


def tree_attention_supported(model: torch.nn.Module) -> bool:
    """Whether every layer's core attention honours an arbitrary ``attention_mask`` (prefix trees,
    block-diagonal packing): :class:`rlp.model.attention.SDPAttention` and megatron's unfused
    ``DotProductAttention`` do; transformer-engine's core attention (fixed mask types) does not,
    so callers fall back to unpacked causal rows."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from rlp.model.attention import SDPAttention

    gpt = unwrap(model)
    for layer in gpt.decoder.layers:
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if type(core) not in (SDPAttention, DotProductAttention):
            return False
    return True


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's vocabulary shard of the output projection ``[V/tp, h]`` (tied or not)."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits ``[s, b, V/tp]`` of ``hidden`` [s, b, h] through the output layer
    (padded vocabulary rows masked by :mod:`rlp.model.build`'s hook)."""
    gpt = unwrap(model)
    weight = output_weight(gpt) if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(hidden, weight=weight)
    return logits
