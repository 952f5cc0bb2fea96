"""TrainState: the only mutable progress record of a run, and RNG capture/restore.

Config (what to do) and TrainState (how far we got) stay separate: the config is written once into
the run directory, the state travels inside every checkpoint. Everything here is plain Python data
so checkpoints hold it without pickling live objects.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Counters of a run; serialisable with :meth:`to_dict` / :meth:`from_dict`."""

    step: int = 0
    """Optimizer steps completed."""
    contexts_seen: int = 0
    """RLP contexts (prefix, target) consumed, summed over DP ranks."""
    input_tokens: int = 0
    """Prompt tokens (system prompt + prefix) fed to the sampler, summed over DP ranks."""
    thought_tokens: int = 0
    """Sampled thought tokens (incl. ``</think>``), summed over DP ranks."""
    ntp_tokens: int = 0
    """Tokens trained with the next-token loss, summed over DP ranks."""
    skipped_steps: int = 0
    """Steps skipped because the loss or gradients were not finite."""
    bad_steps_in_a_row: int = 0
    """Consecutive non-finite steps (the run stops at ``optim.max_bad_steps``)."""
    data_cursor: dict[str, Any] = field(default_factory=dict)
    """This rank's data-stream cursor (per DP rank; stored per rank in checkpoints)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ValueError(f"train state has unknown fields {sorted(unknown)}")
        return cls(**raw)


def capture_rng() -> dict[str, Any]:
    """RNG states of Python, NumPy and torch (CPU and, when present, CUDA) on this rank."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (each rank passes its own derived seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 over the bytes of ``tensors`` (this rank's shards), for bit-exactness checks."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
