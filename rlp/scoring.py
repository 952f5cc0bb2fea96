"""Teacher-forced scoring of rollouts: S_pred, S_ema, behaviour log-probs, consistency.

All passes use one deterministic micro-batch layout (:func:`micro_batches`): the same rows, the
same right padding. The loss pass reuses it, so on-policy ratios are exactly 1 and S_pred and the
thought log-probs come from identical kernels (batch-variant kernels otherwise bias the ratio and
the reward; NeMo-RL ``dtensor-tp-accuracy``).

* S_pred(c) = log p_theta(x_t | prompt, thought)        (paper Eq. 3), no gradient
* S_ema     = log p_phi(x_t | x_<t), no thought           (paper Eq. 4), no gradient
* logp_old  = log pi_theta_old(thought tokens)            (ratio denominator, Eq. 8)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from rlp.model.logprobs import token_logprobs
from rlp.rollout import RolloutBatch

MicroBatch = tuple[slice, torch.Tensor, torch.Tensor]


@dataclass
class Scores:
    """No-grad scores of one rollout batch; padded tensors are kept per micro-batch."""

    logp_old: list[torch.Tensor]  # per micro-batch [mb, w]: behaviour log-probs (theta_old)
    logp_ref: list[torch.Tensor] | None  # per micro-batch [mb, w]: EMA log-probs (KL only)
    s_pred: torch.Tensor  # [n, K] log p_theta(target | prompt, thought)
    s_ema: torch.Tensor  # [n, K] log p_ema(target | prefix), repeated over the G thoughts
    consistency: float  # mean exp(|sampled - recomputed|) over thought tokens


def pad_batch(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``input_ids[b, w]`` and ``labels[b, w]`` (w = max len - 1)."""
    width = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        t = torch.tensor(seq, dtype=torch.long)
        inputs[i, : len(seq) - 1] = t[:-1]
        labels[i, : len(seq) - 1] = t[1:]
    return inputs, labels


def micro_batches(
    sequences: list[list[int]], size: int, pad_id: int, device: torch.device
) -> list[MicroBatch]:
    """Deterministic right-padded micro-batches: ``(rows, input_ids[mb, w], labels[mb, w])``."""
    out = []
    for first in range(0, len(sequences), size):
        rows = slice(first, min(first + size, len(sequences)))
        inputs, labels = pad_batch(sequences[rows], pad_id)
        out.append((rows, inputs.to(device), labels.to(device)))
    return out


def last_k(logp: torch.Tensor, sequences: list[list[int]], k: int) -> torch.Tensor:
    """Log-probs of the last k tokens of each right-padded sequence: ``[b, w] -> [b, k]``."""
    ends = torch.tensor([len(s) - 1 for s in sequences]).unsqueeze(1)
    idx = ends - k + torch.arange(k)
    return logp.gather(1, idx.to(logp.device))


def score_rollouts(
    model: torch.nn.Module,
    rollout: RolloutBatch,
    baseline: list[list[int]],
    teacher: Callable[[], AbstractContextManager],
    *,
    micro_batch: int,
    pad_id: int,
    device: torch.device,
    with_reference: bool = False,
) -> Scores:
    """Score a rollout batch without gradients.

    ``baseline`` holds one no-thought sequence per context (prefix + target); ``teacher()``
    returns a context in which ``model`` computes with the EMA weights. ``with_reference`` also
    scores the thought tokens with the teacher (for the optional KL term).
    """
    k = rollout.target_len
    batches = micro_batches(rollout.sequences, micro_batch, pad_id, device)
    logp_old, s_pred = [], []
    with torch.no_grad():
        for rows, inputs, labels in batches:
            logp = token_logprobs(model, inputs, labels)
            logp_old.append(logp)
            s_pred.append(last_k(logp, rollout.sequences[rows], k))
        with teacher():
            s_ema = torch.cat(
                [
                    last_k(token_logprobs(model, inputs, labels), baseline[rows], k)
                    for rows, inputs, labels in micro_batches(baseline, micro_batch, pad_id, device)
                ]
            )
            logp_ref = None
            if with_reference:
                logp_ref = [token_logprobs(model, inputs, labels) for _, inputs, labels in batches]
    return Scores(
        logp_old=logp_old,
        logp_ref=logp_ref,
        s_pred=torch.cat(s_pred).float().cpu(),
        s_ema=s_ema.float().cpu().repeat_interleave(rollout.num_thoughts, dim=0),
        consistency=logprob_consistency(rollout, logp_old, micro_batch),
    )


def logprob_consistency(
    rollout: RolloutBatch, logp_old: list[torch.Tensor], micro_batch: int
) -> float:
    """mean exp(|sampled - recomputed|) over thought tokens (NeMo-RL ``token_mult_prob_error``).

    1.0 means the sampler's recorded log-probs equal a teacher-forced recompute; peers treat
    values above ~1.05 as a framework bug.
    """
    errors = []
    for i, first in enumerate(range(0, rollout.num_rows, micro_batch)):
        rows = slice(first, min(first + micro_batch, rollout.num_rows))
        thought_mask, _ = rollout.label_masks(rows, logp_old[i].shape[1])
        recomputed = logp_old[i][thought_mask.to(logp_old[i].device)].float().cpu()
        sampled = torch.cat(rollout.behaviour_logp[rows]).float()
        errors.append((recomputed - sampled).abs())
    return float(torch.cat(errors).exp().mean())
