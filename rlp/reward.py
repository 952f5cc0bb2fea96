"""Information-gain reward and group-relative advantages (pure tensor maths).

This module owns the numbers that turn teacher-forced log-probabilities into advantages. It
imports only torch and :mod:`rlp.config`; the trainer passes tensors and a :class:`RewardConfig`.

Reward (paper Eqs. 3-5, ``docs/method.md`` section 5). For a context ``x_<t`` with target ``x_t``
and a sampled thought ``c``::

    S_pred(c) = log p_theta(x_t | x_<t, c)      (Eq. 3, same network as the policy)
    S_ema     = log p_phi(x_t | x_<t)           (Eq. 4, EMA network, no thought)
    r(c)      = S_pred(c) - S_ema               (Eq. 5, a constant: no gradient)

With ``target_tokens = K > 1`` the per-token gains over a span ``x_t .. x_{t+K-1}`` are summed
(``span_reduction: sum``) or discounted, ``sum_k gamma^k (S_pred,k - S_ema,k)``. That is an
extension (as in third-party "generalised RLP" prototypes), not RLP as published: the paper uses
exactly one target token.

Advantage (paper Eq. 7, ``docs/method.md`` section 6). For the G thoughts of one context::

    A_i = G / (G - 1) * (r_i - mean_j r_j)  =  r_i - mean_{j != i} r_j      (leave-one-out, RLOO)

No division by the group std (unlike GRPO); ``std_scale`` adds it as an option.

Why the EMA cancels (``docs/method.md`` section 7): S_ema is one scalar per context, shared by all G
thoughts, so ``r_i - mean_j r_j = S_pred,i - mean_j S_pred,j`` and any per-group shift-invariant
transform (centring, std scaling, clipping *after* centring) leaves phi out of the gradient. phi
matters only through non-shift-invariant steps, selected by config:

* ``baseline_mode: ema_only``   A = r (no centring): phi is the baseline itself.
* ``baseline_mode: batch_mean`` A = r - mean over all B*G rewards: S_ema differs per context, so
  it does not cancel within a group.
* ``reward_clip``               clips raw r before centring; where r sits relative to +-c depends
  on S_ema.

``advantage_clip`` acts after centring and therefore keeps phi irrelevant under ``group_mean_loo``.
"""

from __future__ import annotations

import torch

from rlp.config import RewardConfig

STD_EPS = 1e-6
"""Added to the group std under ``std_scale`` (rewards are log-prob differences, O(0.1-10))."""


def span_score(
    logp: torch.Tensor,  # [n, K] per-token log-probs of the target span
    cfg: RewardConfig,
    target_mask: torch.Tensor | None = None,  # [n, K] bool; False = token past the document end
) -> torch.Tensor:  # [n] fp32, detached
    """Reduce per-token target log-probs to one score per row (S_pred or S_ema of Eqs. 3-4).

    ``sum`` adds the K log-probs; ``discounted`` weights token k (0-based) by
    ``cfg.span_discount ** k``. ``target_mask`` drops tokens of a span cut short by the end of a
    document (their log-probs may be garbage, so they are selected out, not multiplied by 0).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [n, K], got shape {tuple(logp.shape)}")
    num_tokens = logp.shape[1]
    if num_tokens != cfg.target_tokens:
        raise ValueError(
            f"logp has K={num_tokens} target tokens but reward.target_tokens={cfg.target_tokens}"
        )
    logp = logp.detach().float()
    if target_mask is not None:
        if target_mask.shape != logp.shape or target_mask.dtype != torch.bool:
            raise ValueError("target_mask must be a bool tensor shaped like logp")
        logp = torch.where(target_mask, logp, 0.0)
    if cfg.span_reduction == "discounted" and num_tokens > 1:
        k = torch.arange(num_tokens, device=logp.device, dtype=torch.float32)
        logp = logp * cfg.span_discount**k
    elif cfg.span_reduction not in ("sum", "discounted"):
        raise ValueError(f"unknown reward.span_reduction {cfg.span_reduction!r}")
    return logp.sum(dim=-1)


@torch.no_grad()
def span_reward(
    logp_pred: torch.Tensor,  # [n, K] log p_theta(x_{t+k} | x_<t, c, x_t..x_{t+k-1})
    logp_ema: torch.Tensor,  # [n, K] (or broadcastable, e.g. [1, K]) log p_phi(... | x_<t, ...)
    cfg: RewardConfig,
    target_mask: torch.Tensor | None = None,  # [n, K] bool
) -> torch.Tensor:  # [n] fp32, detached
    """r = S_pred - S_ema (Eq. 5), with the K-token span reduction of :func:`span_score`.

    The reward is a constant of the policy gradient (stop-gradient through both scorers), so it is
    computed under ``no_grad`` on detached inputs. With K = 1 this is exactly
    ``logp_pred[:, 0] - logp_ema[:, 0]``.
    """
    logp_ema = logp_ema.expand_as(logp_pred)
    return span_score(logp_pred, cfg, target_mask) - span_score(logp_ema, cfg, target_mask)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,  # [B, G] rewards r (one row per context)
    cfg: RewardConfig,
    valid_mask: torch.Tensor | None = None,  # [B, G] bool; False = thought excluded
) -> torch.Tensor:  # [B, G] fp32 advantages, 0 where invalid
    """Advantages per ``cfg.baseline_mode`` (default: leave-one-out group mean, Eq. 7).

    Order: ``reward_clip`` on raw r -> baseline -> ``std_scale`` -> ``advantage_clip``. Under
    ``group_mean_loo`` (with or without ``std_scale``/``advantage_clip``) the per-context S_ema
    cancels exactly, ``r_i - r_bar = S_pred,i - mean_j S_pred,j``; ``ema_only``, ``batch_mean`` and
    ``reward_clip`` are the options through which phi reaches the gradient.

    * ``group_mean_loo``: ``A_i = n/(n-1) * (r_i - mean_valid r)`` over the n valid thoughts of
      the group, i.e. ``r_i - mean_{j != i, valid} r_j``; groups with n < 2 get A = 0 (there is no
      other thought to compare with).
    * ``ema_only``: ``A_i = r_i`` (the EMA score is the only baseline).
    * ``batch_mean``: ``A_i = r_i - mean of all valid r in the tensor``. The mean is over what this
      call sees (rank-local under data parallelism).
    * ``std_scale``: divide by the unbiased std of the group's valid (clipped) rewards plus
      :data:`STD_EPS`. A group with fewer than 2 valid thoughts or no reward spread has no std to
      divide by and carries no relative information, so it gets A = 0 in every mode.

    Invalid thoughts (``valid_mask`` False, e.g. failed or dropped samples) are excluded from every
    statistic and get A = 0; their reward values are never read, so NaN there is harmless. Group
    statistics run in float64: the tensor has only B*G entries, and it keeps the exact S_ema
    cancellation at ~1e-12 instead of fp32 rounding of large shared offsets.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if valid_mask is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    else:
        if valid_mask.shape != rewards.shape or valid_mask.dtype != torch.bool:
            raise ValueError("valid_mask must be a bool tensor shaped like rewards [B, G]")
        valid = valid_mask
    r = torch.where(valid, rewards.detach().double(), 0.0)
    if cfg.reward_clip is not None:
        r = r.clamp(-cfg.reward_clip, cfg.reward_clip)
    n = valid.sum(dim=-1, keepdim=True)  # [B, 1] valid thoughts per group
    n_f = n.double()
    group_mean = r.sum(dim=-1, keepdim=True) / n_f.clamp(min=1)  # [B, 1]
    usable = valid  # thoughts that may get a non-zero advantage

    if cfg.baseline_mode == "group_mean_loo":
        adv = n_f / (n_f - 1).clamp(min=1) * (r - group_mean)
        usable = usable & (n >= 2)
    elif cfg.baseline_mode == "ema_only":
        adv = r
    elif cfg.baseline_mode == "batch_mean":
        batch_mean = r.sum() / valid.sum().clamp(min=1)
        adv = r - batch_mean
    else:
        raise ValueError(f"unknown reward.baseline_mode {cfg.baseline_mode!r}")

    if cfg.std_scale:
        sq_dev = torch.where(valid, (r - group_mean) ** 2, 0.0)
        std = (sq_dev.sum(dim=-1, keepdim=True) / (n_f - 1).clamp(min=1)).sqrt()
        adv = adv / (std + STD_EPS)
        usable = usable & (n >= 2) & (_group_spread(r, valid) > 0)
    if cfg.advantage_clip is not None:
        adv = adv.clamp(-cfg.advantage_clip, cfg.advantage_clip)
    return torch.where(usable, adv, 0.0).float()


def _group_spread(
    r: torch.Tensor,  # [B, G]
    valid: torch.Tensor,  # [B, G] bool
) -> torch.Tensor:  # [B, 1] max - min of the valid rewards (0 for groups with < 2 valid)
    """Exact zero-spread test: max == min, unlike a std that rounding keeps slightly above 0."""
    hi = torch.where(valid, r, float("-inf")).amax(dim=-1, keepdim=True)
    lo = torch.where(valid, r, float("inf")).amin(dim=-1, keepdim=True)
    return torch.where(valid.any(dim=-1, keepdim=True), hi - lo, 0.0)


@torch.no_grad()
def reward_stats(
    rewards: torch.Tensor,  # [B, G]
    advantages: torch.Tensor,  # [B, G]
    *,
    s_pred: torch.Tensor | None = None,  # [B, G] S_pred per thought
    s_ema: torch.Tensor | None = None,  # [B] per context, or [B, G]
    valid_mask: torch.Tensor | None = None,  # [B, G] bool
) -> dict[str, float]:
    """Rank-local reward/advantage statistics over valid thoughts, for logging.

    ``reward/frac_zero_std_groups`` is the fraction of groups (with at least one valid thought)
    whose valid rewards are all equal, i.e. that give no learning signal under group centring; the
    replication failure mode is a flat ``reward/mean`` with this near 1. Empty inputs give 0.
    One host sync for the whole dict.
    """
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid_mask is None else valid_mask
    r = rewards.detach().double()
    count = valid.sum().double().clamp(min=1)

    def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.detach().double(), 0.0).sum() / mask.sum().double().clamp(min=1)

    mean = masked_mean(r, valid)
    var = torch.where(valid, (r - mean) ** 2, 0.0).sum() / (count - 1).clamp(min=1)
    groups = valid.any(dim=-1)
    zero_spread = (_group_spread(torch.where(valid, r, 0.0), valid).squeeze(-1) == 0) & groups
    values = {
        "reward/mean": mean,
        "reward/std": var.sqrt(),
        "reward/frac_positive": masked_mean((r > 0).double(), valid),
        "advantage/abs_mean": masked_mean(advantages.abs(), valid),
        "reward/frac_zero_std_groups": zero_spread.double().sum()
        / groups.sum().double().clamp(min=1),
    }
    if s_pred is not None:
        values["reward/s_pred_mean"] = masked_mean(s_pred, valid)
    if s_ema is not None:
        if s_ema.dim() == 1:  # one score per context: average over contexts with a valid thought
            values["reward/s_ema_mean"] = masked_mean(s_ema, groups)
        else:
            values["reward/s_ema_mean"] = masked_mean(s_ema, valid)
    stacked = torch.stack(list(values.values())).tolist()
    return dict(zip(values.keys(), stacked))
