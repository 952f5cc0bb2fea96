"""torch.distributed process-group setup and rank helpers (no megatron).

This module owns how an ``rlp`` process finds its place in the job:

* **torchrun** sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``.
* **srun** sets ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``; the rendezvous host
  is ``MASTER_ADDR`` or the first host of the step's node list, the port ``MASTER_PORT`` or a
  port derived from ``SLURM_JOB_ID`` (identical on every task without any communication).
* **plain python** is a world of one. A process group is still created (on an in-process
  ``HashStore``, so no port can collide) because megatron's ``parallel_state`` needs one.

:func:`init_distributed` is idempotent; :func:`shutdown` undoes it. The backend is NCCL with CUDA
and gloo without; with CUDA each process binds ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from rlp.config import ConfigError, ParallelConfig

Launcher = Literal["torchrun", "srun", "single"]

_DEFAULT_SLURM_PORT_BASE = 20000
_DEFAULT_SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, read from the launcher's environment variables."""

    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


@dataclass(frozen=True)
class DistEnv:
    """The initialised process group as the rest of ``rlp`` sees it."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: Launcher = "single"


_ENV: DistEnv | None = None


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        value = environ[key]
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list such as ``gpu[003-005,010],cpu01`` (``gpu003``).

    Uses ``scontrol show hostnames`` when available (it knows every syntax SLURM accepts) and a
    small parser for the common ``prefix[a-b,c]suffix`` forms otherwise.
    """
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to parsing below
    # The first entry ends at the first comma that is not inside brackets.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not match:
        if not first:
            raise RuntimeError(f"cannot find a host in SLURM node list {nodelist!r}")
        return first
    prefix, ranges, suffix = match.groups()
    lo = ranges.split(",")[0].split("-")[0]  # zero padding is kept: "003-005" -> "003"
    return f"{prefix}{lo}{suffix}"


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read the launcher's variables (torchrun wins over srun; neither means a single process)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            launcher="torchrun",
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
        )
    # SLURM_STEP_NUM_TASKS is set by srun only. A batch script also carries SLURM_PROCID=0 and
    # SLURM_NTASKS=<allocation>, but it is a single process: treating it as rank 0 of N would
    # wait forever for ranks that never start.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = first_slurm_host(nodelist)
        else:
            addr = "127.0.0.1"
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            # Deterministic per job, so concurrent jobs on a shared node rarely collide and every
            # task computes the same value without talking to the others.
            port = _DEFAULT_SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % _DEFAULT_SLURM_PORT_SPAN
        else:
            port = 29500
        return LaunchInfo(
            launcher="srun",
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
        )
    return LaunchInfo("single", 0, 1, 0, master_addr=None, master_port=None)


def resolve_backend(requested: str, cuda_available: bool | None = None) -> str:
    """``auto`` -> NCCL with CUDA, gloo without; NCCL without CUDA is a configuration error."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA; use parallel.backend=auto or gloo")
    if requested not in ("nccl", "gloo"):
        raise ConfigError(f"parallel.backend must be auto, gloo or nccl, got {requested!r}")
    return requested


def check_world_size(world_size: int, parallel_cfg: ParallelConfig) -> None:
    """The world must split into whole tensor x pipeline model replicas."""
    model_parallel = parallel_cfg.tp_size * parallel_cfg.pp_size
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp_size "
            f"({parallel_cfg.tp_size}) x parallel.pp_size ({parallel_cfg.pp_size}) = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or change "
            "parallel.tp_size"
        )


def init_distributed(
    parallel_cfg: ParallelConfig, *, environ: Mapping[str, str] | None = None
) -> DistEnv:
    """Create the default process group for this launch (idempotent) and return it."""
    global _ENV
    if _ENV is not None and dist.is_initialized():
        check_world_size(_ENV.world_size, parallel_cfg)
        return _ENV

    info = detect_launch(environ)
    check_world_size(info.world_size, parallel_cfg)
    if dist.is_initialized():
        # Someone (a test harness, a notebook) initialised torch.distributed already: adopt it.
        backend = dist.get_backend()
        cuda = backend == "nccl"
        _ENV = DistEnv(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=info.local_rank,
            device=torch.device("cuda", info.local_rank) if cuda else torch.device("cpu"),
            backend=backend,
            launcher=info.launcher,
        )
        check_world_size(_ENV.world_size, parallel_cfg)
        return _ENV

    backend = resolve_backend(parallel_cfg.backend)
    if backend == "nccl":
        n_gpus = torch.cuda.device_count()
        if info.local_rank >= n_gpus:
            raise RuntimeError(
                f"local rank {info.local_rank} has no GPU: only {n_gpus} visible on this node; "
                "start at most one process per GPU (torchrun --nproc-per-node / srun "
                "--ntasks-per-node)"
            )
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")

    timeout = datetime.timedelta(minutes=parallel_cfg.timeout_minutes)
    if info.launcher == "single":
        # An in-process store: nothing listens on a port, so parallel test runs cannot collide.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        # torchrun's agent may already host the store on MASTER_PORT
        # (TORCHELASTIC_USE_AGENT_STORE); only env:// knows to join it as a client.
        if info.launcher == "torchrun":
            init_method = "env://"
        else:
            init_method = f"tcp://{info.master_addr}:{info.master_port}"
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )
    _ENV = DistEnv(
        rank=info.rank,
        world_size=info.world_size,
        local_rank=info.local_rank,
        device=device,
        backend=backend,
        launcher=info.launcher,
    )
    return _ENV


def get_env() -> DistEnv:
    """The :class:`DistEnv` of :func:`init_distributed`; raises if it has not run."""
    if _ENV is None or not dist.is_initialized():
        raise RuntimeError("rlp.dist.init_distributed() has not been called in this process")
    return _ENV


def rank() -> int:
    """Global rank: from the process group, or from the launcher's env before it exists."""
    if dist.is_initialized():
        return dist.get_rank()
    return detect_launch().rank


def is_rank0() -> bool:
    """True on the process that logs, writes run files and prints progress."""
    return rank() == 0


def print0(*args: object, **kwargs: object) -> None:
    """``print`` on global rank 0 only (flushed, so logs interleave sensibly under srun)."""
    if is_rank0():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)  # type: ignore[call-overload]


def barrier() -> None:
    """Wait for every rank; a no-op without a process group or with a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    """Destroy the default process group (safe to call twice)."""
    global _ENV
    if dist.is_initialized():
        dist.destroy_process_group()
    _ENV = None
