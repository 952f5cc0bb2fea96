"""Megatron model-parallel state: TP/PP/DP groups and the seeded RNG streams.

This module owns the call into ``megatron.core.parallel_state`` and the seeding that goes with
it, and exposes the result as a small :class:`ParallelState` dataclass so callers never reach for
megatron's globals. On a CPU-only machine the CPU shims (:mod:`rlp.model.cpu_compat`) are installed
first, because seeding megatron's RNG tracker needs them.

Seeding follows Megatron-LM's ``_set_random_seed``: ``seed + 100 * pp_rank`` for python, numpy
and torch (identical on every TP and DP rank, so every replica initialises the same weights
without a broadcast), and ``model_parallel_cuda_manual_seed`` for the named TP-aware streams.
Per-DP-rank sampling seeds are the sampler's business.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from rlp.config import ConfigError, ParallelConfig
from rlp.dist import DistEnv, check_world_size
from rlp.model import cpu_compat


@dataclass
class ParallelState:
    """This rank's coordinates in the TP x DP x PP grid, and its process groups."""

    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    pp_rank: int
    pp_size: int
    tp_group: dist.ProcessGroup = field(repr=False)
    dp_group: dist.ProcessGroup = field(repr=False)
    pp_group: dist.ProcessGroup = field(repr=False)
    device: torch.device
    seed: int

    @property
    def is_tp_rank0(self) -> bool:
        """The rank of its TP group that loads data and writes per-replica outputs."""
        return self.tp_rank == 0

    def destroy(self) -> None:
        """Tear down megatron's model-parallel groups (the default process group stays)."""
        destroy_model_parallel()


def seed_everything(seed: int, pp_rank: int = 0) -> None:
    """Seed python, numpy, torch and megatron's named RNG streams (same on all TP/DP ranks)."""
    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_model_parallel(
    parallel_cfg: ParallelConfig, seed: int, env: DistEnv
) -> ParallelState:
    """Create megatron's TP/PP/DP groups on the default process group and seed the RNGs.

    Idempotent: a second call with the same TP/PP sizes only re-seeds (handy in tests that build
    several models in one process); different sizes need :meth:`ParallelState.destroy` first.
    """
    if not dist.is_initialized():
        raise RuntimeError("call rlp.dist.init_distributed() before initialize_model_parallel()")
    if not torch.cuda.is_available():
        # Before model_parallel_cuda_manual_seed, which needs the CPU RNG tracker (row 1).
        cpu_compat.apply()
    if parallel_cfg.sequence_parallel and not torch.cuda.is_available():
        raise ConfigError(
            "parallel.sequence_parallel=true needs transformer-engine norms on GPU; set it to "
            "false on CPU"
        )
    tp, pp = parallel_cfg.tp_size, parallel_cfg.pp_size
    world = dist.get_world_size()
    check_world_size(world, parallel_cfg)

    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if have != (tp, pp):
            raise RuntimeError(
                f"megatron model parallelism is already initialised with tp={have[0]}, "
                f"pp={have[1]}; call ParallelState.destroy() before re-initialising with "
                f"parallel.tp_size={tp}, parallel.pp_size={pp}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=parallel_cfg.timeout_minutes,
        )

    state = current_parallel_state(env.device, seed)
    seed_everything(seed, state.pp_rank)
    return state


def current_parallel_state(device: torch.device, seed: int) -> ParallelState:
    """A :class:`ParallelState` view of megatron's already-initialised globals."""
    return ParallelState(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        device=device,
        seed=seed,
    )


def destroy_model_parallel() -> None:
    """Tear down megatron's model-parallel groups if they exist."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
