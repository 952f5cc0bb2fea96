"""Per-token log-probabilities from a megatron ``GPTModel`` without gathering the vocabulary.

This module owns teacher-forced scoring: :func:`token_logprobs` for one padded batch (with or
without grad) and :func:`score_sequences` for a list of variable-length sequences (right-padded
into micro-batches; the trainer's S_pred, S_ema and thought-token recomputation).

``model(input_ids, position_ids, attention_mask, labels=targets)`` returns megatron's per-token
vocab-parallel cross entropy ``[b, s]`` (= -log p), computed from each TP rank's vocabulary shard
with two small all-reduces; the ``[b, s, V]`` logits are never gathered. ``attention_mask=None``
selects causal attention (the SDPA core attention and megatron's unfused one both build the
causal mask; on CPU the latter needs :mod:`rlp.model.cpu_compat`).

All TP ranks of a group must call these functions with the same inputs (they run collectives).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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

    Meant for scoring under ``torch.no_grad()``; in grad mode every micro-batch's graph stays alive
    until the caller's backward, so training code should micro-batch with :func:`pad_sequences`
    and :func:`token_logprobs` itself.
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
