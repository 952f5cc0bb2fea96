"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the local spec.

This module owns :class:`SDPAttention`, a drop-in for megatron's ``DotProductAttention`` (same
constructor and forward signature; see ``SelfAttentionSubmodules.core_attention``). Megatron's
unfused attention materialises ``[b, heads, sq, sk]`` scores in fp32; SDPA dispatches to flash /
memory-efficient kernels on GPU and a fused CPU kernel, and shares K/V across query groups
(``enable_gqa``) instead of repeating them.

Mask semantics (megatron's convention: bool, **True = masked**):

* ``attention_mask`` given: any bool tensor broadcastable to ``[b, heads, sq, sk]`` (megatron
  passes ``[b, 1, sq, sk]``). It is applied as an additive mask of the dtype's minimum, so a row
  masked everywhere attends uniformly (like megatron's ``masked_fill(-10000)``) instead of
  producing NaN that would then leak through the values into real positions. The additive copy
  is made once per mask and shared by all layers (:func:`additive_mask`).
* ``attention_mask=None`` and ``sq == 1``: no mask (a KV-cache decode step).
* ``attention_mask=None`` and ``sq > 1``: causal, aligned to the **end** of the keys: query ``i``
  sees keys ``<= sk - sq + i``. With ``sq == sk`` this is the ordinary causal mask (flash kernel via
  ``is_causal``); with ``sq < sk`` it is the correct mask for a multi-token chunk appended to a KV
  cache. (Megatron's unfused path switches to ``no_mask`` there and lets the chunk attend to its
  own future tokens; callers that need megatron's exact behaviour must pass a mask.)

Rollout hook: while the cascade rollout engine generates (:mod:`rlp.model.cascade`), every layer's
``rollout_kv`` is a handle to the engine's KV store (:class:`rlp.model.kv_cache.LayerKV`) and
:meth:`SDPAttention.forward` delegates to it: megatron's ``SelfAttention`` still computes q/k/v
with its TP linears, QK-norm and RoPE, and the store writes the cache and runs the shared-prefix
(cascade) attention. The engine sets ``rollout_kv`` back to ``None`` when it leaves generation, so
training never sees it.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

if TYPE_CHECKING:
    from rlp.model.kv_cache import LayerKV


class _AdditiveMasks:
    """The additive form of the bool mask of the current forward, made once for all layers.

    Megatron hands every layer the same ``attention_mask`` tensor. Converting it per layer would
    allocate ``s^2`` elements per layer, and without activation recompute autograd keeps each
    layer's copy for the backward pass (at a 16,384-token budget: 512 MiB per layer in bf16).
    One copy per (source mask, dtype, device) is kept until the forward has passed every layer
    (:func:`release_additive_mask`) or the source tensor is freed; an in-place change of the
    source (its version counter) invalidates it.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[int, dict[tuple[torch.dtype, torch.device], torch.Tensor]]]
        self._entries = {}

    def get(self, source: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = id(source)
        entry = self._entries.get(key)
        if entry is None or entry[0] != source._version:
            if entry is None:
                weakref.finalize(source, self._entries.pop, key, None)
            entry = (source._version, {})
            self._entries[key] = entry
        out = entry[1].get((dtype, device))
        if out is None:
            out = torch.zeros(source.shape, dtype=dtype, device=device)
            out.masked_fill_(source.to(device), torch.finfo(dtype).min)
            entry[1][(dtype, device)] = out
        return out

    def release(self, source: torch.Tensor) -> None:
        """Drop the copies of ``source`` (autograd keeps what the backward pass needs)."""
        self._entries.pop(id(source), None)


_ADDITIVE_MASKS = _AdditiveMasks()


def additive_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``attention_mask`` (bool, True = masked) as an additive mask: 0 where kept, the dtype's
    minimum where masked.

    With autograd on, every layer of one forward shares one copy (:class:`_AdditiveMasks`):
    autograd keeps the mask for the backward pass anyway. Without it (scoring, generation) each
    layer makes a transient copy that dies with the layer's attention, as a shared one would
    otherwise stay alive through the MLPs.
    """
    if not torch.is_grad_enabled():
        out = torch.zeros(attention_mask.shape, dtype=dtype, device=device)
        return out.masked_fill_(attention_mask.to(device), torch.finfo(dtype).min)
    return _ADDITIVE_MASKS.get(attention_mask, dtype, device)


def release_additive_mask(attention_mask: torch.Tensor) -> None:
    """Forget the additive copy of ``attention_mask`` once a forward has passed every layer, so
    it does not outlive the layers (e.g. during the log-prob head) unless autograd needs it."""
    _ADDITIVE_MASKS.release(attention_mask)


class SDPAttention(MegatronModule):
    """Scaled dot-product attention over megatron's ``[s, b, heads, head_dim]`` layout."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "SDPAttention does not support context parallelism; use the transformer-engine "
                "spec (model.transformer_impl=transformer_engine) for context_parallel_size > 1"
            )
        if config.window_size is not None:
            raise ValueError("SDPAttention does not implement sliding-window attention")
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"SDPAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}; "
                "use model.attention_backend=unfused"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        head_dim = divide(projection_size, config.num_attention_heads)
        # Megatron's apply_query_key_layer_scaling divides the scale by the layer number and
        # multiplies it back inside the softmax: the net scale is unchanged, so it is ignored.
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = attention_dropout
        if self.dropout_p is None:
            self.dropout_p = config.attention_dropout
        self.rollout_kv: LayerKV | None = None
        """Set by the cascade rollout engine while it generates (see the module docstring)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if self.rollout_kv is not None:
            if attention_bias is not None or packed_seq_params is not None:
                raise ValueError("the rollout KV store takes neither attention bias nor packing")
            return self.rollout_kv.attend(self, query, key, value, attention_mask, attn_mask_type)
        return self.attend(
            query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
        )

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """The attention itself (what :meth:`forward` runs outside rollouts)."""
        if packed_seq_params is not None:
            raise ValueError("packed sequences need the transformer-engine attention")
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support an attention bias")
        sq, b, n_heads, _ = query.shape
        sk, n_groups = key.size(0), key.size(2)

        # [s, b, h, d] -> [b, h, s, d] (views; SDPA handles the strides).
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)

        mask: torch.Tensor | None = None
        is_causal = False
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"attention_mask must be bool (True = masked), got {attention_mask.dtype}"
                )
            mask = additive_mask(attention_mask, q.dtype, q.device)
        elif sq > 1 and not (attn_mask_type == AttnMaskType.no_mask and sq == sk):
            if sq == sk:
                is_causal = True
            else:
                # Bottom-right aligned causal mask for a chunk appended to a KV cache.
                keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
                mask = torch.zeros(sq, sk, dtype=q.dtype, device=q.device)
                mask.masked_fill_(~keep, torch.finfo(q.dtype).min)

        enable_gqa = n_groups != n_heads
        if enable_gqa and mask is not None:
            # Only the flash kernel shares K/V across groups natively, and it takes no explicit
            # mask: repeat K/V so the memory-efficient kernel (not the s x s math path) is used.
            k = k.repeat_interleave(n_heads // n_groups, dim=1)
            v = v.repeat_interleave(n_heads // n_groups, dim=1)
            enable_gqa = False

        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=enable_gqa,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _dropout_rng(self, dropout_p: float) -> contextlib.AbstractContextManager[object]:
        """Attention dropout draws from the TP-rank-specific RNG stream, as in megatron."""
        if dropout_p > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()
