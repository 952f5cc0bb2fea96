"""RLP training losses: clipped policy-gradient surrogate on thought tokens, KL, next-token loss.

This module owns the differentiable objective (pure tensor maths; imports only torch and
:mod:`rlp.config`). The trainer passes per-token log-probs, advantages and masks.

Clipped surrogate (paper Eq. 8, Alg. 1 lines 13-14, ``docs/method.md`` section 6). For thought i
with tokens u in c_i (``thought_mask``; includes the sampled ``</think>``)::

    rho_u = exp(log pi_theta(l_u | prefix_u) - log pi_old(l_u | prefix_u))
    L_i   = -(1/|c_i|) sum_u min(rho_u A_i, clip(rho_u, 1 - eps_low, 1 + eps_high) A_i)
    L     = (1/N) sum_i L_i                     (N = number of thoughts, B*G in the paper)

Per-thought mean, then mean over thoughts ("sequence-mean" GRPO, not DAPO's token sum). A_i and
pi_old are constants. With one optimizer pass per rollout (``ppo_epochs: 1``) rho == 1 and this is
the plain policy gradient ``-(1/N) sum_i A_i (1/|c_i|) sum_u log pi_theta(l_u)`` in gradient.

Optional KL to a reference (the EMA model), per token with the k3 estimator (Schulman, 2020)::

    k3_u = exp(d_u) - d_u - 1,  d_u = log pi_ref(l_u) - log pi_theta(l_u)     (>= 0, unbiased)

normalised like L_i and added with ``kl_coef`` (paper: 0; Table S.1 tried 1e-4 and 1e-3).

Gradient accumulation: the trainer needs ``sum_i L_i`` and N separately so that it can divide by
the *global* thought count across micro-batches and data-parallel ranks (a mean of per-micro-batch
means would weight thoughts unequally). :func:`rlp_policy_loss` returns either reduction and always
reports N in its metrics.

Optional next-token loss (the paper's method has none; its introduction mentions interleaving):
:func:`ntp_loss` returns (sum of token NLLs, token count) and :func:`combine_losses` mixes it in
with ``ntp_weight`` every ``ntp_every`` steps.

The loss that is backpropagated is :func:`combine_losses`' value, nothing else (the trainer applies
no weight of its own): for the whole step

    L_total = rl_weight * (1/N) sum_i L_i  +  ntp_weight * (1/T) sum_tokens NLL    (active terms)

and, under gradient accumulation, each micro-batch backpropagates
``combine_losses(its sum_i L_i / N, its NLL sum / T, partial=True)`` with the step's global N and
T, so the accumulated gradient is exactly that of L_total (linearity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from rlp.config import ObjectiveConfig

Reduction = Literal["mean", "sum"]


@dataclass
class LossInputs:
    """Tensors for the policy loss on one micro-batch of n thoughts padded to length T."""

    logp_new: torch.Tensor
    """[n, T] log pi_theta of each token (carries the gradient)."""
    logp_old: torch.Tensor
    """[n, T] log pi_old of each token (behaviour policy; treated as a constant)."""
    advantages: torch.Tensor
    """[n] advantage A_i per thought (treated as a constant)."""
    thought_mask: torch.Tensor
    """[n, T] bool, True on thought tokens (incl. ``</think>``); all else gets no gradient."""
    logp_ref: torch.Tensor | None = None
    """[n, T] reference (EMA) log-probs for the KL term; required when ``kl_coef > 0``."""


@dataclass
class LossOutputs:
    """Sum-reduced loss, its denominator and detached metrics for one micro-batch."""

    loss_sum: torch.Tensor
    """0-d: sum_i (L_i + kl_coef * KL_i) over thoughts with at least one token."""
    num_thoughts: torch.Tensor
    """0-d int64: thoughts with at least one thought token (the loss denominator)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached 0-d tensors (no host sync here); see :func:`compute_policy_loss`."""

    def reduce(self, reduction: Reduction = "mean") -> torch.Tensor:
        """``sum``: the numerator; ``mean``: divided by this micro-batch's own thought count."""
        if reduction == "sum":
            return self.loss_sum
        if reduction == "mean":
            return self.loss_sum / self.num_thoughts.clamp(min=1)
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


class PolicyLoss(NamedTuple):
    """Result of :func:`rlp_policy_loss`: unpacks as ``loss, metrics`` or reads as attributes."""

    loss: torch.Tensor
    """0-d loss with the requested reduction."""
    metrics: dict[str, torch.Tensor]
    """Detached 0-d metric tensors (see :func:`compute_policy_loss`)."""


def count_thoughts(thought_mask: torch.Tensor) -> torch.Tensor:  # [n, T] bool -> 0-d int64
    """Thoughts with at least one thought token: the denominator the loss uses.

    The trainer sums this over micro-batches (and all-reduces over DP) *before* the backward passes
    to scale ``reduction="sum"`` losses by the global count without a host sync.
    """
    return thought_mask.any(dim=-1).sum()


def compute_policy_loss(inputs: LossInputs, cfg: ObjectiveConfig) -> LossOutputs:
    """Clipped surrogate (Eq. 8) + optional k3 KL, sum-reduced over thoughts.

    Masking uses ``torch.where`` before any arithmetic, so non-thought positions contribute exactly
    zero loss and receive exactly zero gradient even when their log-probs are NaN or inf (padding,
    prompt positions scored by a model that was never asked for them).

    Metrics (token-level over thought tokens unless stated): ``loss/rl`` (mean L_i), ``loss/kl``
    (mean per-thought KL), ``loss/total`` (mean of the optimised per-thought loss), ``kl/k3_mean``,
    ``clip/frac_low`` (rho < 1 - eps_low with A < 0), ``clip/frac_high`` (rho > 1 + eps_high with
    A > 0), ``clip/frac`` (either: the tokens whose gradient the clip removed), ``ratio/mean``,
    ``ratio/min``, ``ratio/max``, ``loss/num_thoughts``, ``loss/num_tokens``.
    """
    mask = inputs.thought_mask
    logp_new, logp_old, adv = inputs.logp_new, inputs.logp_old, inputs.advantages
    if mask.dtype != torch.bool:
        raise ValueError(f"thought_mask must be bool, got {mask.dtype}")
    if logp_new.dim() != 2 or logp_new.shape != logp_old.shape or logp_new.shape != mask.shape:
        raise ValueError(
            "logp_new, logp_old and thought_mask must share one [n, T] shape, got "
            f"{tuple(logp_new.shape)}, {tuple(logp_old.shape)}, {tuple(mask.shape)}"
        )
    if adv.shape != logp_new.shape[:1]:
        raise ValueError(f"advantages must be [n]={logp_new.shape[0]}, got {tuple(adv.shape)}")
    if cfg.kl_coef > 0 and inputs.logp_ref is None:
        raise ValueError("objective.kl_coef > 0 needs logp_ref (the EMA model's log-probs)")

    # fp32 for the ratio: exp of a bf16 difference would quantise rho to ~1e-2 steps around 1.
    lp_new = torch.where(mask, logp_new.float(), 0.0)
    lp_old = torch.where(mask, logp_old.detach().float(), 0.0)
    adv = adv.detach().float().unsqueeze(-1)  # [n, 1], broadcast over the thought's tokens
    ratio = torch.exp(lp_new - lp_old)  # [n, T]; exactly 1 off the mask
    low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    surrogate = torch.minimum(ratio * adv, ratio.clamp(low, high) * adv)  # PPO pessimistic bound

    num_tokens = mask.sum(dim=-1)  # [n] |c_i|
    has_tokens = num_tokens > 0
    inv_len = 1.0 / num_tokens.clamp(min=1).float()  # [n]; rows without tokens sum to 0 anyway

    def per_thought_mean(token_values: torch.Tensor) -> torch.Tensor:  # [n, T] -> [n]
        return torch.where(mask, token_values, 0.0).sum(dim=-1) * inv_len

    rl_per_thought = -per_thought_mean(surrogate)  # [n]
    loss_sum = rl_per_thought.sum()
    kl_per_thought = None
    k3 = None
    if inputs.logp_ref is not None:
        lp_ref = torch.where(mask, inputs.logp_ref.detach().float(), 0.0)
        log_ref_ratio = lp_ref - lp_new
        k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0  # [n, T], 0 off the mask
        kl_per_thought = per_thought_mean(k3)
        if cfg.kl_coef > 0:
            loss_sum = loss_sum + cfg.kl_coef * kl_per_thought.sum()

    num_thoughts = has_tokens.sum()
    with torch.no_grad():
        metrics = _metrics(
            mask, ratio, adv, low, high, rl_per_thought, kl_per_thought, k3, loss_sum, num_thoughts
        )
    return LossOutputs(loss_sum=loss_sum, num_thoughts=num_thoughts, metrics=metrics)


def _metrics(
    mask: torch.Tensor,  # [n, T] bool
    ratio: torch.Tensor,  # [n, T]
    adv: torch.Tensor,  # [n, 1]
    low: float,
    high: float,
    rl_per_thought: torch.Tensor,  # [n]
    kl_per_thought: torch.Tensor | None,  # [n]
    k3: torch.Tensor | None,  # [n, T]
    loss_sum: torch.Tensor,  # 0-d
    num_thoughts: torch.Tensor,  # 0-d int64
) -> dict[str, torch.Tensor]:
    tokens = mask.sum()
    tok_den = tokens.clamp(min=1).float()
    thought_den = num_thoughts.clamp(min=1).float()
    ratio = ratio.detach()
    clip_low = mask & (ratio < low) & (adv < 0)
    clip_high = mask & (ratio > high) & (adv > 0)
    # max/min over an empty mask would be -inf/+inf; report 1 (the on-policy value) instead.
    ratio_max = torch.where(mask, ratio, float("-inf")).amax()
    ratio_min = torch.where(mask, ratio, float("inf")).amin()
    out = {
        "loss/rl": rl_per_thought.detach().sum() / thought_den,
        "loss/total": loss_sum.detach() / thought_den,
        "clip/frac_low": clip_low.sum() / tok_den,
        "clip/frac_high": clip_high.sum() / tok_den,
        "clip/frac": (clip_low | clip_high).sum() / tok_den,
        "ratio/mean": torch.where(mask, ratio, 0.0).sum() / tok_den,
        "ratio/max": torch.where(tokens > 0, ratio_max, 1.0),
        "ratio/min": torch.where(tokens > 0, ratio_min, 1.0),
        "loss/num_thoughts": num_thoughts.float(),
        "loss/num_tokens": tokens.float(),
    }
    if kl_per_thought is not None and k3 is not None:
        out["loss/kl"] = kl_per_thought.detach().sum() / thought_den
        out["kl/k3_mean"] = k3.detach().sum() / tok_den
    return out


def rlp_policy_loss(
    logp_new: torch.Tensor,  # [n, T]
    logp_old: torch.Tensor,  # [n, T]
    advantages: torch.Tensor,  # [n]
    thought_mask: torch.Tensor,  # [n, T] bool
    cfg: ObjectiveConfig,
    logp_ref: torch.Tensor | None = None,  # [n, T]
    *,
    reduction: Reduction = "mean",
) -> PolicyLoss:  # (0-d loss, detached metrics)
    """Functional form of :func:`compute_policy_loss`.

    ``reduction="mean"`` divides by this call's own thought count (the paper's L for a whole batch).
    ``reduction="sum"`` returns ``sum_i L_i``; under gradient accumulation the trainer divides it by
    the global thought count (:func:`count_thoughts` summed over micro-batches and DP ranks), which
    makes the accumulated gradient equal to that of the mean over the whole global batch.
    """
    out = compute_policy_loss(
        LossInputs(logp_new, logp_old, advantages, thought_mask, logp_ref), cfg
    )
    return PolicyLoss(out.reduce(reduction), out.metrics)


def ntp_loss(
    logp: torch.Tensor,  # [b, s] log p_theta(x_{j+1} | x_<=j) of the packed target tokens
    loss_mask: torch.Tensor,  # [b, s] bool, True on tokens that count
) -> tuple[torch.Tensor, torch.Tensor]:  # (0-d sum of NLL, 0-d int64 token count)
    """Next-token negative log-likelihood as (sum, count) for token-weighted accumulation.

    The trainer divides the accumulated sum by the global token count (micro-batches x DP ranks).
    Masked positions are selected out with ``torch.where`` (no gradient, NaN-safe).
    """
    if loss_mask.dtype != torch.bool or loss_mask.shape != logp.shape:
        raise ValueError("loss_mask must be a bool tensor shaped like logp [b, s]")
    nll_sum = -torch.where(loss_mask, logp.float(), 0.0).sum()
    return nll_sum, loss_mask.sum()


def rl_active(cfg: ObjectiveConfig) -> bool:
    """Whether the RLP surrogate is part of the objective at all (``rl_weight > 0``)."""
    return cfg.rl_weight > 0


def ntp_active(cfg: ObjectiveConfig, step: int) -> bool:
    """Whether the next-token loss applies at optimizer step ``step`` (0-based).

    Applied when ``ntp_weight > 0`` and ``step % ntp_every == 0`` (so step 0 includes it).
    """
    return cfg.ntp_weight > 0 and step % cfg.ntp_every == 0


def combine_losses(
    rl: torch.Tensor | None,  # 0-d normalised RLP loss (or None when not computed)
    ntp: torch.Tensor | None,  # 0-d normalised NTP loss (or None when not computed)
    cfg: ObjectiveConfig,
    step: int,
    *,
    partial: bool = False,
) -> torch.Tensor:  # 0-d
    """``rl_weight * rl + ntp_weight * ntp`` with each term present only when active: the value
    the trainer backpropagates (and logs as ``loss/total``).

    An inactive term is left out of the graph entirely rather than multiplied by 0, so with
    ``rl_weight = 0`` the result is exactly ``ntp_weight * ntp`` (plain continued pretraining; a
    NaN in an unused RL value cannot leak in). A value passed for a term that is inactive at
    ``step`` is ignored (the trainer may compute it for logging).

    ``partial=True``: one micro-batch's share under gradient accumulation (module doc): an active
    term may be missing (it lives in another micro-batch); at least one term must be present.
    """
    terms: list[torch.Tensor] = []
    if rl_active(cfg):
        if rl is None and not partial:
            raise ValueError("objective.rl_weight > 0 but no RL loss was given")
        if rl is not None:
            terms.append(rl if cfg.rl_weight == 1.0 else cfg.rl_weight * rl)
    if ntp_active(cfg, step):
        if ntp is None and not partial:
            raise ValueError(f"the NTP loss is active at step {step} but none was given")
        if ntp is not None:
            terms.append(ntp if cfg.ntp_weight == 1.0 else cfg.ntp_weight * ntp)
    if not terms:
        raise ValueError(
            f"no loss term is both active and given at step {step} (objective.rl_weight="
            f"{cfg.rl_weight}, ntp_weight={cfg.ntp_weight}, ntp_every={cfg.ntp_every})"
        )
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]
