"""Megatron DDP wrapping, the AdamW optimizer, the LR schedule and one optimizer step.

This module owns the training-side plumbing between a built ``GPTModel`` and an update:

* :func:`wrap_ddp` - megatron ``DistributedDataParallel`` (fp32 grad buffers, no overlap, optional
  distributed optimizer).
* :func:`build_optimizer` - megatron AdamW (``get_megatron_optimizer``): fp32 params on CPU;
  bf16 params with fp32 main params on GPU. Weight decay skips biases and 1-D params (norms).
* :func:`lr_at` (pure) + :func:`set_lr` - the schedule; the trainer sets the LR before each step.
* :func:`zero_grad`, :func:`finalize_grads`, :func:`optimizer_step` - one update
  (:func:`step` = the last two).

The trainer runs its own micro-batch loop (no ``get_forward_backward_func``), so after the last
backward it must call :func:`finalize_grads`: megatron's ``finalize_model_grads`` all-reduces the
DP gradients (averaged over DP ranks). Without it every rank silently steps on its local grads
(``docs/megatron-core.md`` §4 rule 7). With equal per-rank batches and a per-rank mean loss,
DP=N then reproduces the single-process update on the concatenated batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import clip_grads as _clip_grads

from rlp.config import ConfigError, OptimConfig, ParallelConfig
from rlp.model.build import unwrap


def wrap_ddp(model: torch.nn.Module, parallel_cfg: ParallelConfig) -> DistributedDataParallel:
    """Wrap an unwrapped ``GPTModel`` in megatron DDP (gradients reduced in fp32, no overlap)."""
    gpt = unwrap(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        # Overlap needs CUDA streams and the schedule's hooks; our loop reduces after backward.
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    return DistributedDataParallel(config=gpt.config, ddp_config=ddp_config, module=gpt)


def build_optimizer(
    ddp_model: DistributedDataParallel,
    optim_cfg: OptimConfig,
    parallel_cfg: ParallelConfig,
    dtype: torch.dtype,
) -> MegatronOptimizer:
    """Megatron AdamW over ``ddp_model`` (the DDP config decides distributed vs replicated state).

    ``dtype`` is the model's parameter dtype (:func:`rlp.model.build.resolve_dtype`): bfloat16
    gives megatron's mixed-precision optimizer with fp32 main params, float32 the plain one.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"model.params_dtype must resolve to float32 or bfloat16, got {dtype}")
    if optim_cfg.lr < 0 or optim_cfg.min_lr < 0:
        raise ConfigError("optim.lr and optim.min_lr must be >= 0")
    if ddp_model.ddp_config.use_distributed_optimizer != parallel_cfg.use_distributed_optimizer:
        raise ConfigError(
            "the DDP wrapper and parallel.use_distributed_optimizer disagree; build both from "
            "the same parallel config"
        )
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        decoupled_weight_decay=True,  # AdamW
        adam_beta1=optim_cfg.beta1,
        adam_beta2=optim_cfg.beta2,
        adam_eps=optim_cfg.eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel_cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, [ddp_model])
    # Megatron leaves per-group weight decay to its LR scheduler; apply wd_mult once now so
    # norms and biases (wd_mult = 0) are not decayed before the first set_lr call.
    set_lr(optimizer, optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    return optimizer


def lr_at(step: int, optim_cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the number of steps already taken).

    Linear warmup over ``warmup_steps`` (step 0 gets ``lr / warmup_steps``, never 0), then either
    constant ``lr`` or a half-cosine from ``lr`` to ``min_lr`` reaching ``min_lr`` at ``max_steps``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak, warmup = optim_cfg.lr, optim_cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        return peak
    if optim_cfg.schedule != "cosine":
        raise ConfigError(f"optim.schedule must be constant or cosine, got {optim_cfg.schedule!r}")
    decay_steps = max_steps - warmup
    if decay_steps <= 0:
        return peak
    progress = min(1.0, (step - warmup) / decay_steps)
    return optim_cfg.min_lr + (peak - optim_cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: MegatronOptimizer, lr: float, *, weight_decay: float | None = None) -> None:
    """Set every param group's LR (times its ``lr_mult``) and optionally its weight decay
    (times its ``wd_mult``: 0 for biases and norms)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def zero_grad(ddp_model: DistributedDataParallel, optimizer: MegatronOptimizer) -> None:
    """Clear the DDP grad buffers and the optimizer's (main) grads before a new step."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


def finalize_grads(ddp_model: DistributedDataParallel) -> None:
    """All-reduce (average) gradients over data-parallel ranks after the last backward."""
    finalize_model_grads([ddp_model])


@dataclass(frozen=True)
class StepResult:
    """Outcome of :func:`optimizer_step`."""

    applied: bool
    """False when the step was skipped because the gradients were not finite."""
    grad_norm: float
    """Global gradient norm before clipping (over all TP/DP shards)."""


def _leaf_optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


@torch.no_grad()
def optimizer_step(optimizer: MegatronOptimizer) -> StepResult:
    """Clip to ``clip_grad`` and update, unless the global grad norm is NaN/Inf (then skip).

    Same sequence as megatron's ``ChainedOptimizer.step`` (prepare grads, global norm, clip,
    step), except that a non-finite norm skips the update instead of writing NaN into the
    weights; the trainer counts skipped steps against ``optim.max_bad_steps``.
    """
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return StepResult(applied=False, grad_norm=grad_norm)
    for leaf in _leaf_optimizers(optimizer):
        params = leaf.get_parameters()
        if params and leaf.config.clip_grad > 0.0:
            # Looked up on the module at call time so the CPU shim's version is used (row 6).
            _clip_grads.clip_grad_by_total_norm_fp32(
                params,
                max_norm=leaf.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=leaf.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    applied = optimizer.step_with_ready_grads()
    return StepResult(applied=bool(applied), grad_norm=grad_norm)


def step(ddp_model: DistributedDataParallel, optimizer: MegatronOptimizer) -> tuple[bool, float]:
    """The whole update after the last backward: :func:`finalize_grads` + :func:`optimizer_step`.

    Returns ``(applied, grad_norm)``. Collective: every rank must call it (or none).
    """
    finalize_grads(ddp_model)
    result = optimizer_step(optimizer)
    return result.applied, result.grad_norm
