"""Theory facts of the paper (docs/method.md section 11) checked through rlp.reward + rlp.objective.

* v2 section 9.2 numeric example (advantages, one softmax policy step, J before/after).
* Unbiasedness (v2 section 9): E[(1/G) sum_i A_i grad log pi(c_i)] = grad J, Monte Carlo.
* Replicator dynamics (v2 section 9): with all rewards negative the least-bad thought still gets a
  positive advantage and J rises at rate Var_pi[r].
"""

from __future__ import annotations

import pytest
import torch

from rlp.config import ObjectiveConfig, RewardConfig
from rlp.objective import rlp_policy_loss
from rlp.reward import group_advantages

PAPER_REWARDS = torch.tensor([[-0.8, -0.6, -0.5, -0.3]])


def _policy_grad(logits: torch.Tensor, thoughts: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """grad_z of the RLP loss for one-token thoughts ``thoughts`` [n] of a softmax policy z [k]."""
    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, dim=-1)[thoughts].unsqueeze(-1)  # [n, 1]: |c_i| = 1
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, _ = rlp_policy_loss(logp, logp.detach(), adv, mask, ObjectiveConfig())
    (grad,) = torch.autograd.grad(loss, z)
    return grad


def test_paper_numeric_example():
    adv = group_advantages(PAPER_REWARDS, RewardConfig())
    torch.testing.assert_close(
        adv, torch.tensor([[-0.3333, -0.0667, 0.0667, 0.3333]]), atol=5e-5, rtol=0
    )
    eta = 0.5
    z = torch.zeros(4)  # uniform start
    pi0 = torch.softmax(z, -1)
    assert (pi0 @ PAPER_REWARDS[0]).item() == pytest.approx(-0.5500, abs=5e-5)
    var0 = pi0 @ (PAPER_REWARDS[0] - pi0 @ PAPER_REWARDS[0]) ** 2
    assert var0.item() == pytest.approx(0.0325, abs=5e-5)

    # The example's update z_i += eta * A_i is gradient descent on the RLP loss: with each of the
    # G thoughts sampled once, grad_z L = -(1/G) sum_i A_i (e_i - pi) = -A / G (sum_i A_i = 0).
    grad = _policy_grad(z, torch.arange(4), adv[0])
    torch.testing.assert_close(grad, -adv[0] / 4)
    z1 = z - (eta * 4) * grad
    torch.testing.assert_close(z1, eta * adv[0])
    pi1 = torch.softmax(z1, -1)
    torch.testing.assert_close(
        pi1, torch.tensor([0.2101, 0.2401, 0.2566, 0.2932]), atol=5e-5, rtol=0
    )
    assert (pi1 @ PAPER_REWARDS[0]).item() == pytest.approx(-0.5284, abs=5e-5)


def test_monte_carlo_unbiasedness():
    """Mean of (1/G) sum_i A_i grad log pi(c_i) over groups matches grad J (RLOO is unbiased)."""
    gen = torch.Generator().manual_seed(1234)
    k, groups, g = 5, 40_000, 4
    logits = torch.tensor([0.3, -0.2, 0.8, 0.0, -1.0])
    mean_reward = torch.tensor([-2.0, -1.0, -0.5, -3.0, 0.5])
    pi = torch.softmax(logits, -1)
    true_grad = pi * (mean_reward - pi @ mean_reward)  # grad_z sum_c pi(c) E[r | c]

    thoughts = torch.multinomial(pi.expand(groups, k), g, replacement=True, generator=gen)
    rewards = mean_reward[thoughts] + 0.5 * torch.randn(groups, g, generator=gen)  # noisy scorer
    adv = group_advantages(rewards, RewardConfig())
    # Minus the loss gradient of all groups at once is the mean of the per-group estimators.
    estimate = -_policy_grad(logits, thoughts.reshape(-1), adv.reshape(-1))

    # Per-group estimator samples for a standard error: (1/G) sum_i A_i (e_{c_i} - pi).
    onehot = torch.nn.functional.one_hot(thoughts, k).float()
    per_group = (adv.unsqueeze(-1) * (onehot - pi)).mean(dim=1)  # [groups, k]
    torch.testing.assert_close(per_group.mean(0), estimate, rtol=0, atol=1e-5)
    stderr = per_group.std(0) / groups**0.5
    assert ((estimate - true_grad).abs() <= 4 * stderr + 1e-6).all()

    # Without the G/(G-1) factor the baseline includes r_i itself and the mean shrinks by 1 - 1/G.
    shrunk = (g - 1) / g * true_grad
    assert ((estimate - shrunk).abs() > 4 * stderr).any()


def test_replicator_sign_all_negative_rewards():
    r = PAPER_REWARDS
    assert (r < 0).all()
    adv = group_advantages(r, RewardConfig())[0]
    assert adv[r[0].argmax()] > 0  # the least-bad thought is reinforced
    assert adv[r[0].argmin()] < 0
    assert torch.equal(torch.argsort(adv), torch.argsort(r[0]))  # order preserved

    # Replicator dynamics d pi_i / dt = pi_i (r_i - J): J rises at rate Var_pi[r] >= 0.
    pi = torch.full((4,), 0.25, dtype=torch.float64)
    rr = r[0].double()
    dt, j_prev = 1e-3, float(pi @ rr)
    for step in range(2000):
        j = pi @ rr
        var = pi @ (rr - j) ** 2
        pi_next = pi + dt * pi * (rr - j)
        j_next = float(pi_next @ rr)
        if step % 500 == 0:
            assert (j_next - float(j)) / dt == pytest.approx(float(var), rel=1e-2)
        assert j_next >= j_prev
        pi, j_prev = pi_next, j_next
    assert pi.argmax() == r[0].argmax()
    assert j_prev > -0.5
