"""Per-token log-probabilities from a megatron ``GPTModel`` without gathering the vocabulary.

This module owns teacher-forced scoring, in two forms:

* **The log-prob head** (:func:`label_logprobs`, :func:`packed_logprobs`): log-probs only at the
  labels asked for (RLP: the thought tokens and the K target tokens), from final-norm hidden
  states (:func:`rlp.model.forward.decoder_hidden`, any positions and mask) and the output weight.
  It is chunked over labels and over the vocabulary, so no ``[tokens, vocab]`` fp32 tensor of a
  micro-batch is ever alive (one ``[chunk_tokens, chunk_vocab]`` block at a time), and
  vocab-parallel under TP: each rank reduces its own vocabulary shard to (max, sum-exp, target
  logit) per label, and three small all-reduces over the TP group combine them; the vocabulary is
  never gathered. A custom autograd function recomputes each block's logits in backward instead of
  keeping them. The gradient wrt the hidden states is all-reduced over TP (megatron's
  ``copy_to_tensor_model_parallel_region``); the gradient wrt this rank's weight shard stays
  local; tied embeddings get theirs through the shared weight. Padded vocabulary rows (ids >= the
  real vocabulary, :mod:`rlp.model.build`) are never part of the softmax: probability 0, no
  gradient, as the output-layer hook gives them. ``temperature`` T scores ``log_softmax(logits /
  T)`` (the sampling distribution without top-k/top-p). Under sequence parallelism the hidden
  states are gathered along the sequence first (its backward reduce-scatters).
* **Whole-sequence scoring** through megatron's cross entropy (:func:`token_logprobs`,
  :func:`score_sequences`): ``model(input_ids, position_ids, attention_mask, labels=targets)``
  returns per-token vocab-parallel cross entropy ``[b, s]`` (= -log p) without gathering the
  ``[b, s, V]`` logits, but with fp32 logits for every position. ``attention_mask=None`` selects
  causal attention.

All TP ranks of a group must call these functions with the same inputs (they run collectives).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as tdist
from megatron.core import parallel_state, tensor_parallel

from rlp.model.build import unwrap
from rlp.model.forward import decoder_hidden, output_weight

CHUNK_TOKENS = 1024
"""Labels per block of the log-prob head."""
CHUNK_VOCAB = 16384
"""Vocabulary rows per block: one block of fp32 logits is CHUNK_TOKENS x CHUNK_VOCAB x 4 bytes
(64 MiB), with a few temporaries of the same size."""


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``logp[b, s] = log p(target_ids[b, s] | input_ids[b, :s+1])`` in fp32.

    Shapes: ``input_ids`` and ``target_ids`` ``[b, s]`` int64 -> ``[b, s]`` float32. Grad flows
    when called in grad mode. Right padding is the caller's concern: entries past a sequence's
    end are computed (on pad tokens) and must be masked out by the caller. ``position_ids`` only
    matter for learned absolute position embeddings; RoPE models use positions ``0..s-1``.
    """
    if input_ids.shape != target_ids.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and target_ids {tuple(target_ids.shape)} must "
            "both be [batch, seq]"
        )
    # [b, s] per-token cross entropy = -log p(target).
    nll = model(input_ids, position_ids, None, labels=target_ids)
    return -nll.float()


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists into teacher-forcing tensors.

    Returns ``input_ids [n, L-1]``, ``target_ids [n, L-1]`` (inputs shifted by one) and
    ``lengths [n]`` = number of valid target positions per row (``len(seq) - 1``), where ``L`` is
    the longest sequence. Every sequence needs at least two tokens.
    """
    if not sequences:
        raise ValueError("pad_sequences needs at least one sequence")
    lengths = [len(s) for s in sequences]
    if min(lengths) < 2:
        raise ValueError("every sequence needs >= 2 tokens (one input, one target)")
    width = max(lengths)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    tokens = tokens.to(device)
    n_targets = torch.tensor(lengths, dtype=torch.long, device=device) - 1
    return tokens[:, :-1], tokens[:, 1:], n_targets


def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    micro_batch: int,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    sort_by_length: bool = True,
) -> list[torch.Tensor]:
    """Teacher-forced log-probs of every token after the first, per sequence.

    Returns one fp32 tensor per input sequence (same order), of length ``len(seq) - 1``:
    ``out[i][j] = log p(seq_i[j + 1] | seq_i[: j + 1])``. Slice what you need (e.g. the target
    token after a thought). Sequences are right-padded into micro-batches of ``micro_batch``
    rows; with ``sort_by_length`` similar lengths share a micro-batch (less padding). Causal
    attention makes each row independent of its neighbours and of its padding.

    Meant for scoring under ``torch.no_grad()`` (megatron's cross entropy keeps fp32 logits of
    every position of a micro-batch); training code uses :func:`packed_logprobs` on a token-budget
    plan (:mod:`rlp.layout`), which computes log-probs only at the labels.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if device is None:
        device = next(model.parameters()).device
    order = list(range(len(sequences)))
    if sort_by_length:
        order.sort(key=lambda i: len(sequences[i]), reverse=True)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for start in range(0, len(order), micro_batch):
        rows = order[start : start + micro_batch]
        inputs, targets, _ = pad_sequences([sequences[i] for i in rows], pad_id, device)
        logp = token_logprobs(model, inputs, targets)  # [rows, L-1]
        for k, i in enumerate(rows):
            # Lengths from the python lists: no device->host sync per row.
            out[i] = logp[k, : len(sequences[i]) - 1]
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# The log-prob head: labels only, chunked, vocab-parallel


def _block_logits(hidden: torch.Tensor, weight: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """fp32 ``(hidden @ weight.T) / T`` for one block; the product in the model dtype, like the
    output layer (bf16 logits upcast), so recorded and recomputed log-probs agree."""
    logits = (hidden @ weight.t()).float()
    return logits if inv_temp == 1.0 else logits * inv_temp


class _LabelLogprobs(torch.autograd.Function):
    """log p(token | hidden) over a vocabulary sharded across the TP group; blocks recomputed in
    backward. Inputs: hidden [M, h], weight [V/tp, h], tokens [M] (global ids)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        vocab_start: int,
        vocab_real: int,
        inv_temp: float,
        group: object,
        reduce_grad: bool,
        chunk_tokens: int,
        chunk_vocab: int,
    ) -> torch.Tensor:
        m_rows = hidden.size(0)
        device = hidden.device
        run_max = torch.full((m_rows,), float("-inf"), device=device)
        run_sum = torch.zeros(m_rows, device=device)
        target = torch.zeros(m_rows, device=device)
        local = tokens - vocab_start  # this shard's column of each label (may lie outside)
        for p0 in range(0, m_rows, chunk_tokens):
            p1 = min(p0 + chunk_tokens, m_rows)
            h = hidden[p0:p1]
            m, s, t = run_max[p0:p1], run_sum[p0:p1], target[p0:p1]
            lab = local[p0:p1]
            for v0 in range(0, vocab_real, chunk_vocab):
                v1 = min(v0 + chunk_vocab, vocab_real)
                z = _block_logits(h, weight[v0:v1], inv_temp)  # [cp, cv] fp32
                new_max = torch.maximum(m, z.amax(dim=-1))
                s.mul_(torch.exp(m - new_max)).add_(torch.exp(z - new_max[:, None]).sum(dim=-1))
                m.copy_(new_max)
                hit = (lab >= v0) & (lab < v1)
                col = (lab - v0).clamp(0, v1 - v0 - 1)
                t.add_(torch.where(hit, z.gather(1, col[:, None])[:, 0], 0.0))
                del z
        if group is not None and tdist.get_world_size(group) > 1:
            global_max = run_max.clone()
            tdist.all_reduce(global_max, op=tdist.ReduceOp.MAX, group=group)
            run_sum.mul_(torch.exp(run_max - global_max))  # a shard without real rows adds 0
            tdist.all_reduce(run_sum, group=group)
            tdist.all_reduce(target, group=group)
            run_max = global_max
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(hidden, weight, tokens, lse)  # type: ignore[attr-defined]
        meta = (vocab_start, vocab_real, inv_temp, group, reduce_grad, chunk_tokens, chunk_vocab)
        ctx.meta = meta  # type: ignore[attr-defined]
        return target - lse

    @staticmethod
    def backward(ctx: object, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        hidden, weight, tokens, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        meta = ctx.meta  # type: ignore[attr-defined]
        vocab_start, vocab_real, inv_temp, group, reduce_grad, ct, cv = meta
        need_h, need_w = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        m_rows = hidden.size(0)
        grad_out = grad_out.float()
        local = tokens - vocab_start
        grad_h = torch.zeros(m_rows, hidden.size(1), device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        # d logp / d logit_v = (1[v = label] - p_v) / T; p_v = exp(z_v - lse), padded rows: 0.
        for v0 in range(0, vocab_real, cv):
            v1 = min(v0 + cv, vocab_real)
            w = weight[v0:v1]
            gw = torch.zeros(v1 - v0, hidden.size(1), device=hidden.device) if need_w else None
            for p0 in range(0, m_rows, ct):
                p1 = min(p0 + ct, m_rows)
                h = hidden[p0:p1]
                g = grad_out[p0:p1]
                z = _block_logits(h, w, inv_temp)
                dz = torch.exp(z.sub_(lse[p0:p1, None])).mul_(-g[:, None])
                del z
                lab = local[p0:p1]
                hit = (lab >= v0) & (lab < v1)
                col = (lab - v0).clamp(0, v1 - v0 - 1)
                dz.scatter_add_(1, col[:, None], torch.where(hit, g, 0.0)[:, None])
                if inv_temp != 1.0:
                    dz.mul_(inv_temp)
                dz = dz.to(hidden.dtype)
                if grad_h is not None:
                    grad_h[p0:p1] += (dz @ w).float()
                if gw is not None:
                    gw += (dz.t() @ h).float()
            if grad_w is not None and gw is not None:
                grad_w[v0:v1] = gw.to(weight.dtype)
        if grad_h is not None:
            if reduce_grad and group is not None and tdist.get_world_size(group) > 1:
                tdist.all_reduce(grad_h, group=group)
            grad_h = grad_h.to(hidden.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def label_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    group: object = None,
    reduce_grad: bool = True,
    chunk_tokens: int = CHUNK_TOKENS,
    chunk_vocab: int = CHUNK_VOCAB,
) -> torch.Tensor:
    """``log softmax(hidden @ W.T / T)[token]`` per row, fp32 ``[M]``, without a ``[M, V]`` tensor.

    ``hidden`` [M, h] and ``tokens`` [M] (global ids, < ``vocab_size``); ``weight`` is this rank's
    vocabulary shard ``[V/tp, h]`` starting at global id ``vocab_start``; only ids below
    ``vocab_size`` (the real vocabulary; None = all) take part in the softmax. ``group``: the TP
    process group the vocabulary is sharded over (None = not sharded). ``reduce_grad``:
    all-reduce the hidden-state gradient over ``group`` (False when the caller's own collective,
    a sequence-parallel gather, reduces it).
    """
    if hidden.dim() != 2 or tokens.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [M, h] and tokens [M], got {tuple(hidden.shape)}, "
            f"{tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError("chunk_tokens and chunk_vocab must be >= 1")
    total = weight.size(0) if vocab_size is None else vocab_size
    vocab_real = max(0, min(weight.size(0), total - vocab_start))
    if hidden.size(0) == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _LabelLogprobs.apply(
        hidden,
        weight,
        tokens,
        vocab_start,
        vocab_real,
        1.0 / temperature,
        group,
        reduce_grad,
        chunk_tokens,
        chunk_vocab,
    )


def head_inputs(model: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Decoder output ``[s(/tp), b, h]`` -> the full-sequence ``[s * b, h]`` view the label
    positions index, and whether the head must all-reduce its hidden gradient over TP (not under
    sequence parallelism, where the gather's backward reduce-scatters it)."""
    gpt = unwrap(model)
    sequence_parallel = bool(getattr(gpt.config, "sequence_parallel", False))
    if sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True
        )
    return hidden.reshape(-1, hidden.size(-1)), not sequence_parallel


def head_logprobs(
    model: torch.nn.Module,
    flat_hidden: torch.Tensor,
    positions: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    reduce_grad: bool = True,
    chunk_tokens: int = CHUNK_TOKENS,
    chunk_vocab: int = CHUNK_VOCAB,
) -> torch.Tensor:
    """Log-probs ``[M]`` of ``tokens`` predicted at rows ``positions`` of ``flat_hidden`` (from
    :func:`head_inputs`) through the model's output weight (tied or not), vocab-parallel."""
    gpt = unwrap(model)
    weight = output_weight(gpt)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp_size > 1 else None
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * weight.size(0)
    vocab_size = getattr(gpt, "rlp_vocab_size", None)
    return label_logprobs(
        flat_hidden.index_select(0, positions),
        weight,
        tokens,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        temperature=temperature,
        group=group,
        reduce_grad=reduce_grad,
        chunk_tokens=chunk_tokens,
        chunk_vocab=chunk_vocab,
    )


def packed_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    label_sets: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    *,
    chunk_tokens: int = CHUNK_TOKENS,
    chunk_vocab: int = CHUNK_VOCAB,
) -> list[torch.Tensor]:
    """One forward of ``input_ids`` [b, s] at ``position_ids`` with ``attention_mask`` (bool,
    True = masked; None = causal), then the head once per ``(positions, tokens, temperature)``
    label set: fp32 log-probs ``[M_k]`` each. Positions index the sequence-major flattened hidden
    states (``position * b + row``, :mod:`rlp.layout`). Grad flows in grad mode."""
    hidden = decoder_hidden(model, input_ids, position_ids, attention_mask)
    flat, reduce_grad = head_inputs(model, hidden)
    return [
        head_logprobs(
            model,
            flat,
            positions,
            tokens,
            temperature=temperature,
            reduce_grad=reduce_grad,
            chunk_tokens=chunk_tokens,
            chunk_vocab=chunk_vocab,
        )
        for positions, tokens, temperature in label_sets
    ]
