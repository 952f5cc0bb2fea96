"""Reward (Eqs. 3-5) and group advantage (Eq. 7) maths: rlp/reward.py."""

from __future__ import annotations

import math

import pytest
import torch

from rlp.config import RewardConfig
from rlp.reward import STD_EPS, group_advantages, reward_stats, span_reward, span_score


def _cfg(**kw) -> RewardConfig:
    return RewardConfig(**kw)


# --------------------------------------------------------------------------------------------
# span_reward


def test_span_reward_single_token_is_difference_and_detached():
    pred = torch.tensor([[-1.0], [-2.5], [-0.1]], requires_grad=True)
    ema = torch.tensor([[-1.5], [-2.0], [-0.1]], requires_grad=True)
    r = span_reward(pred, ema, _cfg())
    assert r.shape == (3,)
    torch.testing.assert_close(r, torch.tensor([0.5, -0.5, 0.0]))
    assert not r.requires_grad


def test_null_thought_gives_zero_reward_and_advantage():
    # Scorer ignores the thought and phi = theta: S_pred == S_ema for every thought.
    logp = torch.randn(8, 1) - 3.0
    r = span_reward(logp, logp.clone(), _cfg())
    assert torch.equal(r, torch.zeros(8))
    assert torch.equal(group_advantages(r.view(2, 4), _cfg()), torch.zeros(2, 4))


def test_span_reward_sum_and_discounted():
    pred = torch.tensor([[-1.0, -2.0, -3.0]])
    ema = torch.tensor([[-2.0, -2.5, -5.0]])  # per-token gains 1.0, 0.5, 2.0
    assert span_reward(pred, ema, _cfg(target_tokens=3)).item() == pytest.approx(3.5)
    disc = _cfg(target_tokens=3, span_reduction="discounted", span_discount=0.5)
    assert span_reward(pred, ema, disc).item() == pytest.approx(1.0 + 0.5 * 0.5 + 0.25 * 2.0)


def test_span_reward_target_mask_ignores_tokens_past_document_end():
    pred = torch.tensor([[-1.0, float("nan")], [-1.0, -2.0]])
    ema = torch.tensor([[-2.0, float("nan")], [-1.5, -1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    r = span_reward(pred, ema, _cfg(target_tokens=2), mask)
    torch.testing.assert_close(r, torch.tensor([1.0, -0.5]))


def test_span_reward_broadcasts_shared_ema_score():
    pred = torch.tensor([[-1.0], [-2.0], [-4.0]])
    r = span_reward(pred, torch.tensor([[-3.0]]), _cfg())
    torch.testing.assert_close(r, torch.tensor([2.0, 1.0, -1.0]))


def test_span_score_rejects_wrong_k():
    with pytest.raises(ValueError, match="target_tokens"):
        span_score(torch.zeros(2, 3), _cfg(target_tokens=1))


# --------------------------------------------------------------------------------------------
# group_advantages: leave-one-out (Eq. 7)


def test_loo_identity_and_zero_sum():
    gen = torch.Generator().manual_seed(0)
    for groups in (2, 3, 16):
        r = torch.randn(32, groups, generator=gen, dtype=torch.float64) * 3
        adv = group_advantages(r, _cfg())
        loo = torch.stack(
            [
                r[:, i] - torch.cat([r[:, :i], r[:, i + 1 :]], dim=1).mean(dim=1)
                for i in range(groups)
            ],
            dim=1,
        )
        torch.testing.assert_close(adv.double(), loo, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            adv.sum(dim=1).double(), torch.zeros(32, dtype=torch.float64), rtol=0, atol=1e-5
        )
        scale = groups / (groups - 1)
        torch.testing.assert_close(
            adv.double(), scale * (r - r.mean(1, keepdim=True)), rtol=0, atol=1e-6
        )


def test_ema_cancels_under_group_centring_property():
    """Shifting S_ema per group leaves A unchanged: r_i - r_bar = S_pred,i - mean S_pred."""
    gen = torch.Generator().manual_seed(1)
    invariant = [
        _cfg(),
        _cfg(std_scale=True),
        _cfg(advantage_clip=0.5),  # clip after centring stays shift-invariant
        _cfg(std_scale=True, advantage_clip=1.0),
    ]
    for _ in range(200):
        b, g = (
            torch.randint(1, 6, (1,), generator=gen).item(),
            torch.randint(2, 9, (1,), generator=gen).item(),
        )
        s_pred = torch.randn(b, g, generator=gen) * 2 - 3
        s_ema_a = torch.randn(b, 1, generator=gen) * 5 - 3
        s_ema_b = torch.randn(b, 1, generator=gen) * 5 - 3
        for cfg in invariant:
            a = group_advantages(s_pred - s_ema_a, cfg)
            b_ = group_advantages(s_pred - s_ema_b, cfg)
            torch.testing.assert_close(a, b_, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg(baseline_mode="ema_only"),
        _cfg(baseline_mode="batch_mean"),
        _cfg(reward_clip=1.0),
    ],
    ids=["ema_only", "batch_mean", "reward_clip"],
)
def test_ema_matters_for_non_shift_invariant_options(cfg):
    s_pred = torch.tensor([[-1.0, -1.5, -0.2, -3.0], [-0.5, -0.7, -2.0, -1.0]])
    s_ema_a = torch.tensor([[-1.0], [-0.5]])
    s_ema_b = torch.tensor([[-2.5], [0.5]])
    a = group_advantages(s_pred - s_ema_a, cfg)
    b = group_advantages(s_pred - s_ema_b, cfg)
    assert (a - b).abs().max() > 0.1


def test_ema_only_and_batch_mean_values():
    r = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    torch.testing.assert_close(group_advantages(r, _cfg(baseline_mode="ema_only")), r)
    torch.testing.assert_close(group_advantages(r, _cfg(baseline_mode="batch_mean")), r - 3.0)


def test_reward_clip_applies_before_centring():
    r = torch.tensor([[-5.0, 0.0, 0.5, 4.0]])
    adv = group_advantages(r, _cfg(reward_clip=1.0))
    clipped = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    torch.testing.assert_close(adv, 4 / 3 * (clipped - clipped.mean()))


def test_advantage_clip_applies_after_centring():
    r = torch.tensor([[-3.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(r, _cfg(advantage_clip=2.0))
    torch.testing.assert_close(adv, torch.tensor([[-2.0, 0.0, 0.0, 2.0]]))


def test_std_scale():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(r, _cfg(std_scale=True))
    first = r[0]
    expected = 4 / 3 * (first - first.mean()) / (first.std() + STD_EPS)
    torch.testing.assert_close(adv[0], expected)
    assert torch.equal(adv[1], torch.zeros(4))  # zero-spread group: no signal, no 1/eps blow-up
    # Scaling the rewards does not change std-scaled advantages.
    torch.testing.assert_close(
        group_advantages(10 * r, _cfg(std_scale=True)), adv, atol=1e-5, rtol=0
    )


def test_std_scale_zero_spread_group_is_zero_in_ema_only_mode():
    r = torch.tensor([[-2.0, -2.0, -2.0]])
    adv = group_advantages(r, _cfg(baseline_mode="ema_only", std_scale=True))
    assert torch.equal(adv, torch.zeros(1, 3))


def test_valid_mask_loo_over_valid_thoughts_only():
    r = torch.tensor(
        [
            [1.0, float("nan"), 3.0, 5.0],
            [2.0, 7.0, float("nan"), float("nan")],
            [4.0, float("nan"), float("nan"), float("nan")],
        ]
    )
    valid = ~torch.isnan(r)
    adv = group_advantages(r, _cfg(), valid_mask=valid)
    assert torch.isfinite(adv).all()
    sub = torch.tensor([1.0, 3.0, 5.0])
    torch.testing.assert_close(adv[0, valid[0]], 1.5 * (sub - sub.mean()))
    torch.testing.assert_close(adv[1, :2], torch.tensor([-5.0, 5.0]))
    assert torch.equal(adv[2], torch.zeros(4))  # < 2 valid thoughts: zero advantage
    assert torch.equal(adv[~valid], torch.zeros(int((~valid).sum())))


def test_valid_mask_in_batch_mean_and_std_scale():
    r = torch.tensor([[1.0, 100.0], [3.0, 5.0]])
    valid = torch.tensor([[True, False], [True, True]])
    adv = group_advantages(r, _cfg(baseline_mode="batch_mean"), valid_mask=valid)
    torch.testing.assert_close(adv, torch.tensor([[-2.0, 0.0], [0.0, 2.0]]))
    adv = group_advantages(r, _cfg(std_scale=True), valid_mask=valid)
    assert torch.equal(adv[0], torch.zeros(2))
    assert adv[1, 1] > 0


def test_group_advantages_shape_checks():
    with pytest.raises(ValueError, match="B, G"):
        group_advantages(torch.zeros(4), _cfg())
    with pytest.raises(ValueError, match="valid_mask"):
        group_advantages(torch.zeros(2, 2), _cfg(), valid_mask=torch.ones(2, 2))


def test_advantages_are_constants():
    r = torch.randn(2, 4, requires_grad=True)
    assert not group_advantages(r, _cfg()).requires_grad


# --------------------------------------------------------------------------------------------
# reward_stats


def test_reward_stats_values():
    r = torch.tensor([[-1.0, 1.0, 2.0], [0.5, 0.5, float("nan")]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    adv = group_advantages(r, _cfg(), valid_mask=valid)
    s_pred = torch.tensor([[-2.0, 0.0, 1.0], [-0.5, -0.5, 0.0]])
    s_ema = torch.tensor([-1.0, -1.0])
    stats = reward_stats(r, adv, s_pred=s_pred, s_ema=s_ema, valid_mask=valid)
    vals = torch.tensor([-1.0, 1.0, 2.0, 0.5, 0.5])
    assert stats["reward/mean"] == pytest.approx(vals.mean().item())
    assert stats["reward/std"] == pytest.approx(vals.std().item())
    assert stats["reward/frac_positive"] == pytest.approx(0.8)
    assert stats["reward/s_pred_mean"] == pytest.approx(-0.4)
    assert stats["reward/s_ema_mean"] == pytest.approx(-1.0)
    assert stats["reward/frac_zero_std_groups"] == pytest.approx(0.5)
    assert stats["advantage/abs_mean"] == pytest.approx(adv[valid].abs().mean().item())
    assert all(math.isfinite(v) for v in stats.values())
    assert set(stats) == {
        "reward/mean",
        "reward/std",
        "reward/frac_positive",
        "reward/s_pred_mean",
        "reward/s_ema_mean",
        "advantage/abs_mean",
        "reward/frac_zero_std_groups",
    }
