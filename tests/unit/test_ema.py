"""EMA teacher: lazy init, update rule, state round trip, swap into a live model: rlp/ema.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlp.config import EMAConfig
from rlp.ema import EMA


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _perturb(model: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_lazy_init_copies_policy_on_first_update():
    model = _model()
    ema = EMA.from_config(EMAConfig(decay=0.9))
    assert not ema.initialized and ema.decay == 0.9
    ema.update(list(model.parameters()))  # first call: phi <- theta, no averaging
    assert ema.initialized
    for e, p in zip(ema.params, model.parameters()):
        assert torch.equal(e, p) and e.data_ptr() != p.data_ptr() and not e.requires_grad


def test_update_matches_manual_formula_and_leaves_policy_alone():
    model = _model()
    params = list(model.parameters())
    ema = EMA(decay=0.9)
    ema.initialize(params)
    expected = [p.detach().clone() for p in params]
    for _ in range(3):
        _perturb(model)
        before = [p.detach().clone() for p in params]
        ema.update(params)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, params)]
        assert all(torch.equal(b, p) for b, p in zip(before, params))
    for e, x in zip(ema.params, expected):
        torch.testing.assert_close(e, x, rtol=1e-6, atol=1e-7)
    # An explicit decay overrides the default for one call.
    _perturb(model)
    ema.update(params, decay=0.5)
    for e, x, p in zip(ema.params, expected, params):
        torch.testing.assert_close(e, 0.5 * x + 0.5 * p.detach(), rtol=1e-6, atol=1e-7)


def test_decay_zero_copies_and_decay_one_freezes():
    model = _model()
    params = list(model.parameters())
    ema = EMA(decay=0.999)
    ema.initialize(params)
    _perturb(model)
    ema.update(params, decay=0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.params, params))
    frozen = [e.clone() for e in ema.params]
    _perturb(model)
    ema.update(params, decay=1.0)
    assert all(torch.equal(e, f) for e, f in zip(ema.params, frozen))
    with pytest.raises(ValueError, match="decay"):
        ema.update(params, decay=1.5)


def test_shadow_is_fp32_for_a_bf16_model_and_narrower_dtypes_are_refused():
    model = _model(dtype=torch.bfloat16)
    ema = EMA.from_config(EMAConfig(decay=0.999))
    ema.initialize(list(model.parameters()))
    assert all(e.dtype == torch.float32 for e in ema.params)
    assert EMA.from_config(EMAConfig(dtype="float64")).dtype == torch.float64
    for narrow in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="float32"):
            EMA(dtype=narrow)


def test_bf16_policy_shadow_tracks_an_fp64_recursion_within_fp32_rounding():
    """tau = 0.999 on a bf16 model drifting a little every step (a bf16 shadow would be stuck:
    (1 - tau) * step is below bf16's resolution). The fp32 shadow equals the fp64 recursion
    phi_k = tau phi_{k-1} + (1 - tau) theta_k to within accumulated fp32 rounding."""
    tau, steps = 0.999, 200
    model = _model(seed=3, dtype=torch.bfloat16)
    params = list(model.parameters())
    ema = EMA(decay=tau)
    ema.initialize(params)
    exact = [p.detach().double() for p in params]
    bf16_shadow = [p.detach().clone() for p in params]  # what a policy-dtype shadow would do
    start = [e.clone() for e in ema.params]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        with torch.no_grad():  # an optimizer-sized drift of theta, stored in bf16
            for p in params:
                p.add_(0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))
            torch._foreach_lerp_(bf16_shadow, [p.detach() for p in params], 1 - tau)
        ema.update(params)
        exact = [tau * e + (1 - tau) * p.detach().double() for e, p in zip(exact, params)]
    for e, x, s0, b in zip(ema.params, exact, start, bf16_shadow):
        # Each lerp rounds once to fp32 (relative 2^-24); the errors add at most once per step.
        scale = x.abs().max().item() + 1.0
        ours = (e.double() - x).abs().max().item()
        assert ours < steps * 2**-23 * scale
        assert ((e - s0).abs() > 0).float().mean() > 0.99  # the shadow moved everywhere
        # The bf16 shadow's error is orders of magnitude larger (most elements never move).
        assert (b.double() - x).abs().max().item() > 100 * ours


def test_state_dict_round_trip():
    model = _model()
    params = list(model.parameters())
    ema = EMA(decay=0.99)
    ema.initialize(params)
    _perturb(model)
    ema.update(params)
    state = ema.state_dict()

    fresh = EMA(decay=0.5)
    fresh.load_state_dict(state)  # uninitialised: adopts the tensors
    assert fresh.decay == 0.99 and fresh.initialized
    assert all(torch.equal(a, b) for a, b in zip(fresh.params, ema.params))

    other = EMA(decay=0.99)
    other.initialize([torch.zeros_like(p) for p in params])
    storage = [e.data_ptr() for e in other.params]
    other.load_state_dict(state)  # initialised: copies in place
    assert [e.data_ptr() for e in other.params] == storage
    assert all(torch.equal(a, b) for a, b in zip(other.params, ema.params))

    with pytest.raises(ValueError, match="tensors"):
        other.load_state_dict({**state, "params": state["params"][:-1]})
    empty = EMA()
    empty.load_state_dict(EMA().state_dict())
    assert not empty.initialized


def test_copy_to():
    model, target = _model(0), _model(1)
    ema = EMA()
    ema.initialize(list(model.parameters()))
    ema.copy_to(list(target.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), target.parameters()))
    with pytest.raises(RuntimeError, match="not initialised"):
        EMA().copy_to(list(target.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["zero_copy", "cast_copy"])
def test_swap_into_runs_forward_with_ema_and_restores(dtype):
    policy, teacher = _model(0), _model(1)
    params = list(policy.parameters())
    ema = EMA(dtype=dtype)
    ema.initialize(list(teacher.parameters()))
    x = torch.randn(5, 4)
    originals = [p.detach().clone() for p in params]
    storages = [p.data_ptr() for p in params]
    with ema.swap_into(params):
        out = policy(x)
        assert not out.requires_grad  # no graph into the policy's parameters
    torch.testing.assert_close(out, teacher(x).detach())
    assert all(torch.equal(p, o) for p, o in zip(params, originals))
    assert [p.data_ptr() for p in params] == storages
    # EMA values themselves are untouched by the swap.
    assert all(torch.equal(e, t.to(e.dtype)) for e, t in zip(ema.params, teacher.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["zero_copy", "cast_copy"])
def test_swap_into_restores_on_exception(dtype):
    policy, teacher = _model(0), _model(1)
    params = list(policy.parameters())
    ema = EMA(dtype=dtype)
    ema.initialize(list(teacher.parameters()))
    originals = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="boom"), ema.swap_into(params):
        assert not torch.equal(params[0], originals[0])
        raise RuntimeError("boom")
    assert all(torch.equal(p, o) for p, o in zip(params, originals))
    assert torch.is_grad_enabled()
    # Usable again afterwards; nesting and updating inside a swap are refused.
    with ema.swap_into(params):
        with pytest.raises(RuntimeError, match="already"), ema.swap_into(params):
            pass
        with pytest.raises(RuntimeError, match="itself"):
            ema.update(params)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))


def test_shape_mismatch_is_an_error():
    ema = EMA()
    ema.initialize([torch.zeros(3), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="shape"):
        ema.update([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="expected 2"):
        ema.update([torch.zeros(3)])
