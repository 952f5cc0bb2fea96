"""Shared helpers for tests that build megatron models (import lazily: megatron costs ~5 s).

* :func:`tiny_model_config` - a 2-layer, width-64 Llama config (GQA 4 heads / 2 groups).
* :func:`init_single_process` - world-size-1 process group + megatron parallel state, created
  once per process and re-seeded on every call.
* :func:`build_tiny_model` - both of the above plus ``build_model``.
* :func:`free_port` / :func:`run_torchrun` - multi-process (TP=2 / DP=2) tests as subprocesses.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from rlp.config import ModelConfig, ParallelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_VOCAB = 256


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """A tiny Llama-style config (2 layers, hidden 64, 4 heads, 2 KV groups); fields overridable."""
    base = ModelConfig(
        family="llama",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        max_position_embeddings=256,
        make_vocab_size_divisible_by=64,
        params_dtype="float32",
        transformer_impl="local",
    )
    return dataclasses.replace(base, **overrides)


def init_single_process(seed: int = 1234, tp_size: int = 1) -> Any:
    """World-size-1 dist + megatron parallel state (created once per process); re-seeds RNGs.

    Returns the :class:`rlp.model.parallel.ParallelState`.
    """
    from rlp.dist import init_distributed
    from rlp.model.parallel import initialize_model_parallel

    cfg = ParallelConfig(tp_size=tp_size)
    env = init_distributed(cfg)
    return initialize_model_parallel(cfg, seed=seed, env=env)


def build_tiny_model(
    seed: int = 1234, vocab_size: int = TINY_VOCAB, **overrides: Any
) -> torch.nn.Module:
    """A freshly seeded tiny model on CPU (``overrides`` go to :func:`tiny_model_config`)."""
    from rlp.model.build import build_model

    state = init_single_process(seed)
    return build_model(tiny_model_config(**overrides), vocab_size, state.device)


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``torchrun --master-port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    script: str | Path, *args: str, nproc: int = 2, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun --nproc-per-node nproc script args`` from the venv; raise with its output.

    One thread per process (two gloo ranks share the machine's two cores).
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
