"""Teacher-forced scoring of rollouts: S_pred, S_ema, behaviour log-probs, consistency.

All passes use one deterministic layout (:func:`plan_rollout`): each context's prompt once with
its G continuations as a prefix tree (:mod:`rlp.layout`), trees packed into micro-batches by the
token budget ``objective.max_tokens_per_micro_batch``. The loss pass reuses the same plan, so
on-policy ratios are exactly 1 and S_pred and the thought log-probs come from identical kernels
(batch-variant kernels otherwise bias the ratio and the reward; NeMo-RL ``dtensor-tp-accuracy``).
Log-probs are computed only at the labels (:func:`rlp.model.logprobs.packed_logprobs`): the
thought tokens at the policy temperature, the K target tokens raw.

* S_pred(c) = log p_theta(x_t | prompt, thought)        (paper Eq. 3), no gradient, T = 1
* S_ema     = log p_phi(x_t | x_<t), no thought           (paper Eq. 4), no gradient, T = 1
* logp_old  = log pi_theta_old(thought tokens)            (ratio denominator, Eq. 8), at the
  policy temperature (:func:`rlp.rollout.policy_temperature`)

When the model's core attention cannot take a tree mask (transformer-engine), the plan falls back
to one right-padded causal row per thought (``packed=False``): same labels, same values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from rlp.layout import MicroBatch, plan_micro_batches
from rlp.model.logprobs import packed_logprobs
from rlp.rollout import TARGET_LABELS, THOUGHT_LABELS, RolloutBatch, baseline_groups


@dataclass
class Scores:
    """No-grad scores of one rollout batch; thought log-probs are kept per micro-batch of
    :attr:`plan` (flat, in label order)."""

    plan: list[MicroBatch]
    """The rollout layout shared by scoring and the loss pass."""
    logp_old: list[torch.Tensor]  # per micro-batch [M]: behaviour log-probs (theta_old)
    logp_ref: list[torch.Tensor] | None  # per micro-batch [M]: EMA log-probs (KL only)
    s_pred: torch.Tensor  # [n, K] log p_theta(target | prompt, thought)
    s_ema: torch.Tensor  # [n, K] log p_ema(target | prefix), repeated over the G thoughts
    consistency: float  # mean exp(|sampled - recomputed|) over thought tokens
    temperature: float  # temperature of the thought log-probs


def plan_rollout(rollout: RolloutBatch, max_tokens: int, *, packed: bool, pad_id: int = 0):
    """The micro-batch plan of a rollout batch (packed prefix trees, or causal rows)."""
    return plan_micro_batches(rollout.groups(), max_tokens, share_prefix=packed, pad_id=pad_id)


def micro_batch_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    device: torch.device,
    label_sets: Sequence[tuple[int, float]],
) -> list[torch.Tensor]:
    """Log-probs of the label sets ``(index, temperature)`` of ``mb`` from one forward on
    ``device`` (the tree mask is built there for this forward only)."""
    on = mb.to(device)
    sets = [(on.labels[k].position, on.labels[k].token, t) for k, t in label_sets]
    mask = on.attention_mask(device)
    out = packed_logprobs(model, on.input_ids, on.position_ids, mask, sets)
    del mask
    return out


def target_scores(
    model: torch.nn.Module,
    plan: list[MicroBatch],
    num_rows: int,
    k: int,
    device: torch.device,
) -> torch.Tensor:
    """``[num_rows, K]`` raw log-probs of the target label set of every branch of ``plan``."""
    out = torch.zeros(num_rows, k)
    for mb in plan:
        (logp,) = micro_batch_logprobs(model, mb, device, [(TARGET_LABELS, 1.0)])
        values, _ = mb.padded(logp.float().cpu(), TARGET_LABELS)
        out[mb.branches] = values[:, :k]
    return out


def score_rollouts(
    model: torch.nn.Module,
    rollout: RolloutBatch,
    baseline: Sequence[Sequence[int]],
    teacher: Callable[[], AbstractContextManager],
    *,
    max_tokens: int,
    pad_id: int,
    device: torch.device,
    temperature: float = 1.0,
    packed: bool = True,
    with_reference: bool = False,
) -> Scores:
    """Score a rollout batch without gradients.

    ``baseline`` holds one no-thought sequence per context (prefix + target); ``teacher()``
    returns a context in which ``model`` computes with the EMA weights. ``temperature`` is the
    policy log-prob temperature of the thought tokens. ``with_reference`` also scores the thought
    tokens with the teacher (for the optional KL term).
    """
    k = rollout.target_len
    plan = plan_rollout(rollout, max_tokens, packed=packed, pad_id=pad_id)
    sets = [(THOUGHT_LABELS, temperature), (TARGET_LABELS, 1.0)]
    logp_old: list[torch.Tensor] = []
    s_pred = torch.zeros(rollout.num_rows, k)
    with torch.no_grad():
        for mb in plan:
            thought, target = micro_batch_logprobs(model, mb, device, sets)
            logp_old.append(thought)
            values, _ = mb.padded(target.float().cpu(), TARGET_LABELS)
            s_pred[mb.branches] = values[:, :k]
        base_plan = plan_micro_batches(
            baseline_groups(baseline, k), max_tokens, share_prefix=packed, pad_id=pad_id
        )
        with teacher():
            s_ema = target_scores(model, base_plan, len(baseline), k, device)
            logp_ref = None
            if with_reference:
                logp_ref = [
                    micro_batch_logprobs(model, mb, device, [(THOUGHT_LABELS, temperature)])[0]
                    for mb in plan
                ]
    return Scores(
        plan=plan,
        logp_old=logp_old,
        logp_ref=logp_ref,
        s_pred=s_pred,
        s_ema=s_ema.repeat_interleave(rollout.num_thoughts, dim=0),
        consistency=logprob_consistency(rollout, plan, logp_old),
        temperature=temperature,
    )


def logprob_consistency(
    rollout: RolloutBatch, plan: list[MicroBatch], logp_old: list[torch.Tensor]
) -> float:
    """mean exp(|sampled - recomputed|) over thought tokens (NeMo-RL ``token_mult_prob_error``).

    1.0 means the sampler's recorded log-probs equal a teacher-forced recompute at the same
    temperature; peers treat values above ~1.05 as a framework bug. Thoughts without gradient
    tokens (invalid) are left out; 1.0 when there is none.
    """
    errors = []
    for mb, logp in zip(plan, logp_old):
        counts = mb.labels[THOUGHT_LABELS].counts
        for row, recomputed in zip(mb.branches, torch.split(logp.float().cpu(), counts)):
            if len(recomputed):
                sampled = rollout.behaviour_logp[row][: len(recomputed)].float()
                errors.append((recomputed - sampled).abs())
    if not errors:
        return 1.0
    return float(torch.cat(errors).exp().mean())
