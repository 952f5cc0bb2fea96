"""Clipped surrogate (Eq. 8), gradient mask, KL, NTP and loss mixing: rlp/objective.py."""

from __future__ import annotations

import math

import pytest
import torch

from rlp.config import ObjectiveConfig
from rlp.objective import (
    LossInputs,
    combine_losses,
    compute_policy_loss,
    count_thoughts,
    ntp_active,
    ntp_loss,
    rlp_policy_loss,
)


def _cfg(**kw) -> ObjectiveConfig:
    return ObjectiveConfig(**kw)


def _batch(n: int = 4, t: int = 10, seed: int = 0):
    """Random logps and a mask with prompt tokens first, a thought, then target/padding."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=gen) * 3
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        start = 2 + i % 2
        mask[i, start : start + 2 + (3 * i) % 5] = True
    adv = torch.randn(n, generator=gen)
    return logp, mask, adv


def test_on_policy_equals_plain_policy_gradient():
    logp, mask, adv = _batch()
    new = logp.clone().requires_grad_(True)
    loss, metrics = rlp_policy_loss(new, logp, adv, mask, _cfg())
    lengths = mask.sum(1).float()
    # With rho == 1 the value is -mean_i A_i ...
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    (grad,) = torch.autograd.grad(loss, new)
    # ... and the gradient is that of -(1/N) sum_i A_i (1/|c_i|) sum_u log pi(l_u).
    ref = logp.clone().requires_grad_(True)
    pg = -(adv * torch.where(mask, ref, 0.0).sum(1) / lengths).mean()
    (ref_grad,) = torch.autograd.grad(pg, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert metrics["ratio/mean"].item() == pytest.approx(1.0)
    assert metrics["clip/frac"].item() == 0.0


def test_gradient_only_on_thought_tokens_even_with_nan_elsewhere():
    logp, mask, adv = _batch()
    poisoned = logp.clone()
    poisoned[~mask] = float("nan")
    poisoned[0, 0] = float("inf")
    poisoned[1, -1] = float("-inf")
    old = logp.clone()
    old[~mask] = float("nan")
    ref = logp.clone() - 0.1
    ref[~mask] = float("nan")
    new = poisoned.clone().requires_grad_(True)
    loss, metrics = rlp_policy_loss(new, old, adv, mask, _cfg(kl_coef=0.1), logp_ref=ref)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    loss.backward()
    assert torch.equal(new.grad[~mask], torch.zeros(int((~mask).sum())))
    assert (new.grad[mask] != 0).all()


def test_advantages_and_old_logps_are_constants():
    logp, mask, adv = _batch()
    adv = adv.clone().requires_grad_(True)
    old = logp.clone().requires_grad_(True)
    new = (logp + 0.05).requires_grad_(True)
    loss, _ = rlp_policy_loss(new, old, adv, mask, _cfg())
    loss.backward()
    assert adv.grad is None and old.grad is None and new.grad is not None


def test_non_thought_values_do_not_change_loss_or_gradient():
    # Prefix / target positions: different values (e.g. the x_t position's logp) change nothing.
    logp, mask, adv = _batch()
    other = logp.clone()
    other[~mask] = torch.randn(int((~mask).sum())) * 10
    a = logp.clone().requires_grad_(True)
    b = other.clone().requires_grad_(True)
    la, _ = rlp_policy_loss(a, logp.clone(), adv, mask, _cfg())
    lb, _ = rlp_policy_loss(b, other.clone(), adv, mask, _cfg())
    assert la.item() == lb.item()
    la.backward()
    lb.backward()
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(
    "log_ratio, adv, clipped",
    [
        (math.log(1.5), 1.0, True),  # above 1 + eps_high, A > 0: clipped, no gradient
        (math.log(1.5), -1.0, False),  # above, A < 0: the unclipped term is the min
        (math.log(0.5), -1.0, True),  # below 1 - eps_low, A < 0: clipped
        (math.log(0.5), 1.0, False),  # below, A > 0: unclipped
        (math.log(1.1), 1.0, False),  # inside the trust region
        (math.log(0.95), -1.0, False),
    ],
)
def test_clip_semantics(log_ratio, adv, clipped):
    cfg = _cfg(eps_low=0.1, eps_high=0.3)
    old = torch.tensor([[-1.0, -2.0]])
    new = (old + log_ratio).requires_grad_(True)
    mask = torch.tensor([[True, True]])
    loss, metrics = rlp_policy_loss(new, old, torch.tensor([adv]), mask, cfg)
    ratio = math.exp(log_ratio)
    bound = min(max(ratio, 0.9), 1.3)
    assert loss.item() == pytest.approx(-min(ratio * adv, bound * adv), rel=1e-6)
    loss.backward()
    if clipped:
        assert torch.equal(new.grad, torch.zeros_like(new))
        assert metrics["clip/frac"].item() == 1.0
        key = "clip/frac_high" if adv > 0 else "clip/frac_low"
        assert metrics[key].item() == 1.0
    else:
        # d/dlogp of -(rho A)/|c| = -rho A / 2 per token.
        torch.testing.assert_close(new.grad, torch.full((1, 2), -ratio * adv / 2))
        assert metrics["clip/frac"].item() == 0.0


def test_clip_metrics_mixed_and_ratio_extremes():
    cfg = _cfg(eps_low=0.2, eps_high=0.2)
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.5, 1.0]]))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    _, m = rlp_policy_loss(new, old, torch.tensor([1.0, -1.0]), mask, cfg)
    assert m["clip/frac_high"].item() == pytest.approx(1 / 5)
    assert m["clip/frac_low"].item() == pytest.approx(1 / 5)
    assert m["clip/frac"].item() == pytest.approx(2 / 5)
    assert m["ratio/max"].item() == pytest.approx(1.5)
    assert m["ratio/min"].item() == pytest.approx(0.5)
    assert m["ratio/mean"].item() == pytest.approx((1.5 + 1 + 0.5 + 0.5 + 1.5) / 5)


def test_per_thought_length_normalisation():
    # A long and a short thought with equal A get equal total gradient weight (1/|c|).
    t = 12
    logp = torch.full((2, t), -1.0)
    mask = torch.zeros(2, t, dtype=torch.bool)
    mask[0, 1:3] = True  # |c| = 2
    mask[1, 1:11] = True  # |c| = 10
    new = logp.clone().requires_grad_(True)
    loss, _ = rlp_policy_loss(new, logp, torch.tensor([0.7, 0.7]), mask, _cfg())
    loss.backward()
    totals = new.grad.sum(dim=1)
    torch.testing.assert_close(totals, torch.full((2,), -0.7 / 2))
    # Per token the short thought weighs 5x more.
    assert new.grad[0, 1].item() == pytest.approx(5 * new.grad[1, 1].item())


def test_sum_reduction_under_micro_batching_matches_full_batch_mean():
    logp, mask, adv = _batch(n=7, t=9, seed=3)
    old = logp + 0.3 * torch.randn_like(logp)  # off-policy: some tokens clip
    mask[5] = False  # an empty row counts in neither numerator nor denominator
    cfg = _cfg(eps_low=0.1, eps_high=0.1, kl_coef=0.05)
    ref = logp - 0.2
    full = logp.clone().requires_grad_(True)
    loss_full, _ = rlp_policy_loss(full, old, adv, mask, cfg, ref)
    loss_full.backward()

    acc = logp.clone().requires_grad_(True)
    chunks = [(0, 2), (2, 3), (3, 7)]
    global_count = sum(count_thoughts(mask[a:b]) for a, b in chunks)
    assert global_count.item() == 6
    total = 0.0
    for a, b in chunks:
        part, metrics = rlp_policy_loss(
            acc[a:b], old[a:b], adv[a:b], mask[a:b], cfg, ref[a:b], reduction="sum"
        )
        assert metrics["loss/num_thoughts"].item() == count_thoughts(mask[a:b]).item()
        (part / global_count).backward()
        total += part.item() / global_count.item()
    assert total == pytest.approx(loss_full.item(), rel=1e-5)
    torch.testing.assert_close(acc.grad, full.grad)


def test_loss_outputs_reduce():
    logp, mask, adv = _batch()
    out = compute_policy_loss(LossInputs(logp.clone(), logp, adv, mask), _cfg())
    assert out.num_thoughts.item() == 4
    torch.testing.assert_close(out.reduce("mean"), out.loss_sum / 4)
    assert out.reduce("sum") is out.loss_sum
    result = rlp_policy_loss(logp.clone(), logp, adv, mask, _cfg(), reduction="sum")
    loss, metrics = result
    assert result.loss is loss and result.metrics is metrics
    torch.testing.assert_close(loss, out.loss_sum)
    with pytest.raises(ValueError):
        out.reduce("token")


def test_kl_k3_value_gradient_and_requirements():
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    adv = torch.zeros(1)
    with pytest.raises(ValueError, match="logp_ref"):
        rlp_policy_loss(logp, logp, adv, mask, _cfg(kl_coef=0.1))
    new = logp.clone().requires_grad_(True)
    loss, m = rlp_policy_loss(new, logp, adv, mask, _cfg(kl_coef=0.1), logp_ref=ref)
    d = ref[0, :2] - logp[0, :2]
    k3 = torch.exp(d) - d - 1
    assert m["kl/k3_mean"].item() == pytest.approx(k3.mean().item())
    assert loss.item() == pytest.approx(0.1 * k3.mean().item(), rel=1e-6)
    loss.backward()
    # d k3 / d logp_new = 1 - exp(d), times kl_coef / |c|.
    torch.testing.assert_close(new.grad[0, :2], 0.1 * (1 - torch.exp(d)) / 2)
    assert new.grad[0, 2] == 0
    # KL is ~0 when the reference equals the policy; kl_coef 0 only logs it.
    loss0, m0 = rlp_policy_loss(logp, logp, adv, mask, _cfg(), logp_ref=ref)
    assert loss0.item() == 0.0 and m0["loss/kl"].item() > 0


def test_input_validation():
    logp, mask, adv = _batch()
    with pytest.raises(ValueError, match="bool"):
        rlp_policy_loss(logp, logp, adv, mask.float(), _cfg())
    with pytest.raises(ValueError, match="shape"):
        rlp_policy_loss(logp, logp[:, :-1], adv, mask, _cfg())
    with pytest.raises(ValueError, match="advantages"):
        rlp_policy_loss(logp, logp, adv[:2], mask, _cfg())


def test_all_empty_mask_gives_zero_loss_and_neutral_metrics():
    logp = torch.randn(2, 3)
    _, mask, _ = _batch(n=2, t=3)
    mask[:] = False
    loss, m = rlp_policy_loss(logp, logp, torch.ones(2), mask, _cfg())
    assert loss.item() == 0.0
    assert m["ratio/max"].item() == 1.0 and m["ratio/min"].item() == 1.0


# --------------------------------------------------------------------------------------------
# NTP and mixing


def test_ntp_loss_sum_and_count():
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.25, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    total, count = ntp_loss(logp, mask)
    assert total.item() == pytest.approx(7.75) and count.item() == 5
    total.backward()
    assert logp.grad[0, 2] == 0 and torch.equal(logp.grad[mask], -torch.ones(5))


def test_combine_losses_weights_and_schedule():
    rl, ntp = torch.tensor(2.0), torch.tensor(3.0)
    cfg = _cfg(rl_weight=0.5, ntp_weight=0.1, ntp_every=3)
    assert combine_losses(rl, ntp, cfg, step=0).item() == pytest.approx(1.0 + 0.3)
    assert combine_losses(rl, ntp, cfg, step=1).item() == pytest.approx(1.0)
    assert combine_losses(rl, ntp, cfg, step=6).item() == pytest.approx(1.3)
    assert [ntp_active(cfg, s) for s in range(4)] == [True, False, False, True]
    # Default config: pure RLP, NTP never applied even if a value is passed.
    assert combine_losses(rl, ntp, _cfg(), step=0) is rl
    with pytest.raises(ValueError, match="NTP"):
        combine_losses(rl, None, cfg, step=3)


def test_rl_weight_zero_is_exactly_ntp():
    ntp = torch.tensor(1.2345, requires_grad=True)
    rl = torch.tensor(float("nan"), requires_grad=True)
    total = combine_losses(rl, ntp, _cfg(rl_weight=0.0, ntp_weight=1.0), step=5)
    assert total is ntp
    total = combine_losses(None, ntp, _cfg(rl_weight=0.0, ntp_weight=1.0), step=5)
    total.backward()
    assert ntp.grad.item() == 1.0
    with pytest.raises(ValueError, match="no loss term"):
        combine_losses(None, None, _cfg(rl_weight=0.0, ntp_weight=1.0, ntp_every=2), step=1)


def test_partial_shares_add_up_to_the_whole_objective():
    """Micro-batch shares (``partial=True``) with the step's global normalisers sum, in value
    and gradient, to combine_losses of the whole step's means."""
    cfg = _cfg(rl_weight=0.7, ntp_weight=0.2)
    gen = torch.Generator().manual_seed(0)
    rl_parts = torch.randn(3, generator=gen).requires_grad_()  # per-micro-batch sums of L_i
    ntp_parts = torch.randn(2, generator=gen).requires_grad_()  # per-micro-batch NLL sums
    n_thoughts, n_tokens = 11.0, 37.0
    shares = [combine_losses(x / n_thoughts, None, cfg, 0, partial=True) for x in rl_parts]
    shares += [combine_losses(None, x / n_tokens, cfg, 0, partial=True) for x in ntp_parts]
    grads = torch.autograd.grad(sum(shares), [rl_parts, ntp_parts])
    whole = combine_losses(rl_parts.sum() / n_thoughts, ntp_parts.sum() / n_tokens, cfg, 0)
    want = torch.autograd.grad(whole, [rl_parts, ntp_parts])
    assert sum(shares).item() == pytest.approx(whole.item(), abs=1e-6)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="no loss term"):
        combine_losses(None, None, cfg, 0, partial=True)
    with pytest.raises(ValueError, match="no RL loss"):
        combine_losses(None, None, cfg, 0)
