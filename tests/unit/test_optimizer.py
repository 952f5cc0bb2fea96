"""LR schedule, param-group hyperparameters, skipped bad steps, optimizer checkpoint fixes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlp.config import OptimConfig, ParallelConfig
from tests.model_helpers import TINY_VOCAB, build_tiny_model

pytest.importorskip("megatron.core")

from megatron.core import dist_checkpointing  # noqa: E402

from rlp.model import cpu_compat  # noqa: E402
from rlp.model.build import unwrap  # noqa: E402
from rlp.model.logprobs import token_logprobs  # noqa: E402
from rlp.model.optimizer import (  # noqa: E402
    build_optimizer,
    finalize_grads,
    lr_at,
    optimizer_step,
    set_lr,
    wrap_ddp,
    zero_grad,
)


def test_lr_constant_with_warmup() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg, max_steps=10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_at(0, OptimConfig(lr=2e-6), max_steps=5) == 2e-6  # paper default: constant
    with pytest.raises(ValueError):
        lr_at(-1, cfg, max_steps=10)


def test_lr_cosine() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=2, schedule="cosine")
    lrs = [lr_at(s, cfg, max_steps=12) for s in range(14)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone decay after warmup
    assert lrs[12] == lrs[13] == pytest.approx(0.1)  # min_lr at and after max_steps


def _setup(use_distributed_optimizer: bool = False, seed: int = 31, **optim: float):
    model = build_tiny_model(seed=seed)
    pcfg = ParallelConfig(use_distributed_optimizer=use_distributed_optimizer)
    ddp = wrap_ddp(model, pcfg)
    opt = build_optimizer(ddp, OptimConfig(**optim), pcfg, torch.float32)
    return model, ddp, opt


def _train_step(ddp, opt, ids: torch.Tensor, lr: float = 1e-3):
    zero_grad(ddp, opt)
    loss = -token_logprobs(ddp, ids[:, :-1], ids[:, 1:]).mean()
    loss.backward()
    finalize_grads(ddp)
    set_lr(opt, lr)
    return loss.item(), optimizer_step(opt)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (4, 17), generator=torch.Generator().manual_seed(seed))


def test_weight_decay_skips_norms_and_set_lr() -> None:
    _, _, opt = _setup(weight_decay=0.1, lr=1e-3)
    groups = opt.param_groups
    decayed = [g for g in groups if g["weight_decay"] > 0]
    plain = [g for g in groups if g["weight_decay"] == 0]
    assert decayed and plain
    assert all(p.dim() == 1 for g in plain for p in g["params"])  # norms only
    assert all(p.dim() == 2 for g in decayed for p in g["params"])
    set_lr(opt, 5e-4, weight_decay=0.2)
    assert {g["lr"] for g in groups} == {5e-4}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.2}


def test_non_finite_gradients_skip_the_update() -> None:
    model, ddp, opt = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    zero_grad(ddp, opt)
    ids = _ids()
    (-token_logprobs(ddp, ids[:, :-1], ids[:, 1:]).mean() * float("nan")).backward()
    finalize_grads(ddp)
    result = optimizer_step(opt)
    assert not result.applied and math.isnan(result.grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # The next, healthy step trains normally.
    _, result = _train_step(ddp, opt, ids)
    assert result.applied and math.isfinite(result.grad_norm)
    assert not torch.equal(before[0], next(model.parameters()))


def _adam_steps(opt) -> list[torch.Tensor]:
    return [s["step"] for leaf in opt.chained_optimizers for s in leaf.optimizer.state.values()]


def test_fix_optimizer_after_load_unshares_step() -> None:
    """Row 11: megatron's load hands every param state the same `step` tensor."""
    _, ddp, opt = _setup(use_distributed_optimizer=True)
    _train_step(ddp, opt, _ids())
    opt.load_state_dict(opt.state_dict())
    steps = _adam_steps(opt)
    if cpu_compat.uses_torch_adam():
        assert len({id(s) for s in steps}) < len(steps)  # the megatron behaviour being fixed
    cpu_compat.fix_optimizer_after_load(opt)
    steps = _adam_steps(opt)
    assert len({id(s) for s in steps}) == len(steps)
    _train_step(ddp, opt, _ids(1))
    assert {float(s) for s in _adam_steps(opt)} == {2.0}


def test_distributed_optimizer_checkpoint_round_trip(tmp_path: Path) -> None:
    """Rows 9-11: a fresh distributed optimizer loads a checkpoint and resumes bit-exactly."""
    model, ddp, opt = _setup(use_distributed_optimizer=True, seed=41, weight_decay=0.1)
    for i in range(2):
        _train_step(ddp, opt, _ids(i))
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}

    def sharded(m, o, is_loading: bool) -> dict:
        model_sd = unwrap(m).sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": o.sharded_state_dict(model_sd, is_loading=is_loading, metadata=meta),
        }

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(sharded(model, opt, False), str(ckpt))
    want_loss, want = _train_step(ddp, opt, _ids(2))
    after_loss, _ = _train_step(ddp, opt, _ids(3))

    model2, ddp2, opt2 = _setup(use_distributed_optimizer=True, seed=999, weight_decay=0.1)
    cpu_compat.prepare_optimizer_for_load(opt2)  # rows 9 and 10
    state = dist_checkpointing.load(sharded(model2, opt2, True), str(ckpt))
    unwrap(model2).load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    cpu_compat.fix_optimizer_after_load(opt2)  # row 11
    got_loss, got = _train_step(ddp2, opt2, _ids(2))
    got_after, _ = _train_step(ddp2, opt2, _ids(3))
    assert got_loss == want_loss and got.grad_norm == want.grad_norm
    assert got_after == after_loss
