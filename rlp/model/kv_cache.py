"""The cascade engine's KV store: each prompt's keys/values once, each thought's own, and the
two-part (shared-prefix) attention that reads them.

This module owns the tensors the cascade rollout engine (:mod:`rlp.model.cascade`) caches and
the attention over them. While the engine generates, every layer's
:class:`rlp.model.attention.SDPAttention` holds a :class:`LayerKV` handle and hands it its
``query/key/value`` (already through megatron's TP linears, QK-norm and RoPE); the store writes
the cache and computes the attention, so nothing of the layer is re-implemented.

Layout (per layer; ``ng`` key/value groups of this TP rank, ``hn`` channels)
    prefix  ``kp, vp [Pc, ng, Lp, hn]``: one row per *prompt slot*, written once by the prefill;
            key positions at or beyond the prompt's length are masked (``prefix_bias``).
    thought ``kt, vt [A, ng, T, hn]``: one row per *row slot* (a sample still decoding). All rows
            decode in lock-step, so generated token ``t`` of every row sits in slot ``t``; the
            decode step that feeds token ``t`` writes it there (``t_index``) and masks slots
            ``> t`` (``thought_bias``).

Cascade attention (Hydragen, arXiv 2402.05099; FlashInfer's cascade attention)
    Softmax attention over the concatenation ``[prefix ; own thought]`` equals the log-sum-exp
    merge of attention over each part::

        o = (exp(lse_p) * o_p + exp(lse_t) * o_t) / (exp(lse_p) + exp(lse_t))

    The prefix part stacks the queries of a prompt's ``G`` rows (``G * heads_per_group`` query
    vectors per key group, ``slot_group``) against that prompt's keys, so each prompt's KV is
    read once per group of ``G`` per step instead of once per row; the thought part is one
    batched product per row. Scores and softmax are fp32; the probabilities are cast to the
    value dtype for the second product (as flash attention does).

Sizes
    The prefix store holds ``P x`` (longest prompt) positions; the thought store grows in blocks
    (:meth:`RolloutKV.grow`, ``rollout.kv_block``) as tokens are generated, never ``prompt +
    cap`` per row. :meth:`RolloutKV.compact` keeps the row slots and prompt slots still needed
    (finished rows and prompts whose rows all finished are dropped).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

Mode = Literal["prefill", "decode"]


@functools.cache
def _bmm_has_out_dtype(device_type: str) -> bool:
    """Whether ``torch.bmm(..., out_dtype=float32)`` works for bf16 on this device type (fp32
    scores from bf16 operands without an fp32 copy of the keys; CUDA in recent torch)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(2, 1, 4, dtype=torch.bfloat16, device=device_type)
        b = torch.ones(2, 3, 4, dtype=torch.bfloat16, device=device_type).transpose(1, 2)
        torch.bmm(a, b, out_dtype=torch.float32)  # a transposed operand, as for the keys
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32 for ``a [..., m, k]``, ``b [..., k, n]`` with equal batch dims."""
    if a.dtype == torch.float32:
        return torch.matmul(a, b)
    if _bmm_has_out_dtype(a.device.type):
        shape = (*a.shape[:-1], b.size(-1))
        a3 = a.reshape(-1, a.size(-2), a.size(-1))
        b3 = b.reshape(-1, b.size(-2), b.size(-1))
        return torch.bmm(a3, b3, out_dtype=torch.float32).view(shape)
    return torch.matmul(a, b).float()


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one part: ``q [B, ng, m, hn]``, ``k/v [B, ng, L, hn]``, additive
    ``bias`` (0 / -inf) broadcastable to ``[B, ng, m, L]`` -> (output ``[B, ng, m, hn]`` fp32,
    log-sum-exp of the scaled scores ``[B, ng, m]`` fp32). Every query needs one unmasked key."""
    scores = matmul_fp32(q, k.transpose(-1, -2)).mul_(scale).add_(bias)
    peak = scores.amax(dim=-1, keepdim=True)
    probs = scores.sub_(peak).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    out = matmul_fp32(probs.to(v.dtype), v).div_(total)
    return out, (peak + total.log()).squeeze(-1)


def cascade_attention(
    q: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    prefix_bias: torch.Tensor,
    kt: torch.Tensor,
    vt: torch.Tensor,
    thought_bias: torch.Tensor,
    slot_group: torch.Tensor,
    row_group: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per row over ``[its prompt's prefix ; its own thought]``.

    ``q [A, ng, hpg, hn]`` (``hpg`` query heads per key group, megatron's GQA order);
    ``kp/vp [Pc, ng, Lp, hn]`` with ``prefix_bias [Pc, 1, 1, Lp]``; ``kt/vt [A, ng, T, hn]`` with
    ``thought_bias`` broadcastable to ``[A, 1, 1, T]``. ``slot_group [Pc * G]``: the row of each
    (prompt slot, member) pair, ``A`` where the pair has no row; ``row_group [A]``: each row's
    pair index ``prompt_slot * G + member``. Returns ``[A, ng, hpg, hn]`` in ``q.dtype``.
    """
    a, ng, hpg, hn = q.shape
    pc = kp.size(0)
    g = slot_group.numel() // pc
    # Prefix part: the G rows of a prompt slot share one product with its keys.
    q_ext = torch.cat([q, q.new_zeros(1, ng, hpg, hn)])
    qg = q_ext.index_select(0, slot_group).view(pc, g, ng, hpg, hn).transpose(1, 2)
    o_p, lse_p = partial_attention(qg.reshape(pc, ng, g * hpg, hn), kp, vp, prefix_bias, scale)
    o_p = o_p.view(pc, ng, g, hpg, hn).transpose(1, 2).reshape(pc * g, ng, hpg, hn)
    lse_p = lse_p.view(pc, ng, g, hpg).transpose(1, 2).reshape(pc * g, ng, hpg)
    o_p, lse_p = o_p.index_select(0, row_group), lse_p.index_select(0, row_group)
    # Thought part: each row against its own generated tokens.
    o_t, lse_t = partial_attention(q, kt, vt, thought_bias, scale)
    lse = torch.logaddexp(lse_p, lse_t)
    w_p = (lse_p - lse).exp_().unsqueeze(-1)
    w_t = (lse_t - lse).exp_().unsqueeze(-1)
    return (o_p * w_p + o_t * w_t).to(q.dtype)


class LayerKV:
    """One layer's handle on the store (what ``SDPAttention.rollout_kv`` holds)."""

    def __init__(self, store: RolloutKV, index: int) -> None:
        self.store = store
        self.index = index

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: object,
    ) -> torch.Tensor:
        """``SDPAttention.forward`` while the engine runs: ``[sq, b, heads, hn]`` inputs ->
        ``[sq, b, heads * hn]``."""
        return self.store.attend(
            self.index, module, query, key, value, attention_mask, attn_mask_type
        )


class RolloutKV:
    """Prefix and thought KV of every layer of one generation batch (see the module docstring).

    ``num_prompts`` prompt slots of up to ``prefix_len`` positions; ``group`` rows per prompt.
    The engine drives it: :attr:`mode` and :attr:`prefill_slots` during the prefill,
    :meth:`set_layout` / :meth:`set_step` / :meth:`grow` / :meth:`compact` while decoding.
    """

    def __init__(self, num_layers: int, num_prompts: int, prefix_len: int, group: int) -> None:
        self.num_layers = num_layers
        self.num_prompts = num_prompts
        self.prefix_len = prefix_len
        self.group = group
        self.mode: Mode = "prefill"
        self.prefill_slots: torch.Tensor | None = None  # [c] prompt slots of the prefill chunk
        self.kp: list[torch.Tensor | None] = [None] * num_layers
        self.vp: list[torch.Tensor | None] = [None] * num_layers
        self.kt: list[torch.Tensor | None] = [None] * num_layers
        self.vt: list[torch.Tensor | None] = [None] * num_layers
        self.rows = 0  # A: row slots
        self.capacity = 0  # T: thought slots
        self.slot_group: torch.Tensor | None = None
        self.row_group: torch.Tensor | None = None
        self.prefix_bias: torch.Tensor | None = None
        self.t_index: torch.Tensor | None = None
        self.thought_bias: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None  # arange(T)

    def handles(self) -> list[LayerKV]:
        return [LayerKV(self, i) for i in range(self.num_layers)]

    # ------------------------------------------------------------------ attention

    def attend(
        self,
        index: int,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: object,
    ) -> torch.Tensor:
        if self.mode == "prefill":
            self._store_prefix(index, key, value)
            # The prefill itself is ordinary causal attention over the right-padded prompts.
            return module.attend(query, key, value, attention_mask, attn_mask_type)
        return self._decode(index, module, query, key, value)

    def _store_prefix(self, index: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write a prefill chunk's ``key/value [L, c, ng, hn]`` into its prompt slots."""
        length, _, ng, hn = key.shape
        if self.kp[index] is None:
            # Zeros, not empty: masked positions must hold finite numbers (0 * NaN = NaN).
            shape = (self.num_prompts, ng, self.prefix_len, hn)
            self.kp[index] = key.new_zeros(shape)
            self.vp[index] = value.new_zeros(shape)
        slots = self.prefill_slots
        self.kp[index][:, :, :length].index_copy_(0, slots, key.permute(1, 2, 0, 3))
        self.vp[index][:, :, :length].index_copy_(0, slots, value.permute(1, 2, 0, 3))

    def _decode(
        self,
        index: int,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step: ``query [1, A, np, hn]``, ``key/value [1, A, ng, hn]``."""
        sq, a, n_heads, hn = query.shape
        ng = key.size(2)
        if sq != 1 or a != self.rows:
            raise RuntimeError(f"decode expects [1, {self.rows}, ...] queries, got {query.shape}")
        kt, vt = self.kt[index], self.vt[index]
        kt.index_copy_(2, self.t_index, key[0].unsqueeze(2))
        vt.index_copy_(2, self.t_index, value[0].unsqueeze(2))
        out = cascade_attention(
            query[0].reshape(a, ng, n_heads // ng, hn),
            self.kp[index],
            self.vp[index],
            self.prefix_bias,
            kt,
            vt,
            self.thought_bias,
            self.slot_group,
            self.row_group,
            module.softmax_scale,
        )
        return out.reshape(1, a, n_heads * hn)

    # ------------------------------------------------------------------ decode state

    def start_decode(self, rows: int, capacity: int) -> None:
        """Allocate the thought store (``rows`` slots of ``capacity`` tokens) after the prefill."""
        for i in range(self.num_layers):
            kp = self.kp[i]
            if kp is None:
                raise RuntimeError(f"layer {i} was not prefilled (is its attention SDPAttention?)")
            shape = (rows, kp.size(1), capacity, kp.size(3))
            self.kt[i] = kp.new_zeros(shape)
            self.vt[i] = kp.new_zeros(shape)
        self.rows, self.mode = rows, "decode"
        self._set_capacity(capacity)

    def set_layout(
        self, slot_group: torch.Tensor, row_group: torch.Tensor, prefix_bias: torch.Tensor
    ) -> None:
        """Row/prompt slot maps and the prefix mask (see :func:`cascade_attention`)."""
        self.slot_group, self.row_group, self.prefix_bias = slot_group, row_group, prefix_bias

    def set_step(self, t_index: torch.Tensor) -> None:
        """Thought slot ``t_index`` ([1] int64, on the device) is written by this step; slots
        beyond it are masked. Device ops only (part of a captured decode step)."""
        self.t_index = t_index
        self.thought_bias = torch.where(self._slots <= t_index, 0.0, float("-inf")).view(
            1, 1, 1, -1
        )

    def grow(self, capacity: int) -> None:
        """Enlarge the thought store to ``capacity`` slots (contents kept)."""
        if capacity <= self.capacity:
            return
        for i in range(self.num_layers):
            for store in (self.kt, self.vt):
                old = store[i]
                new = old.new_zeros(old.size(0), old.size(1), capacity, old.size(3))
                new[:, :, : old.size(2)] = old
                store[i] = new
        self._set_capacity(capacity)

    def compact(self, row_index: torch.Tensor, prompt_index: torch.Tensor, prefix_len: int) -> None:
        """Keep row slots ``row_index`` and prompt slots ``prompt_index`` (in that order; repeats
        allowed for padding) and the first ``prefix_len`` prefix positions."""
        for i in range(self.num_layers):
            self.kt[i] = self.kt[i].index_select(0, row_index)
            self.vt[i] = self.vt[i].index_select(0, row_index)
            self.kp[i] = self.kp[i][:, :, :prefix_len].index_select(0, prompt_index)
            self.vp[i] = self.vp[i][:, :, :prefix_len].index_select(0, prompt_index)
        self.rows = row_index.numel()

    def _set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        device = self.kt[0].device
        self._slots = torch.arange(capacity, device=device)

    def nbytes(self) -> int:
        """Bytes held by the caches now."""
        tensors = [t for store in (self.kp, self.vp, self.kt, self.vt) for t in store]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def free(self) -> None:
        for store in (self.kp, self.vp, self.kt, self.vt):
            for i in range(self.num_layers):
                store[i] = None
        self.slot_group = self.row_group = self.prefix_bias = None
        self.t_index = self.thought_bias = self._slots = None
