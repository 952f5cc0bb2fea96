"""EMA teacher phi: a shadow copy of the policy parameters for the no-thought baseline S_ema.

This module owns the EMA parameter set and its update rule (paper Alg. 1 lines 4 and 10,
``docs/method.md`` section 7)::

    phi <- theta                                   lazily, on the first batch (Alg. 1 line 4)
    phi <- tau * phi + (1 - tau) * theta           after every optimizer step (Alg. 1 line 10)

with tau = ``ema.decay`` = 0.999 by default. The update is one fused
``torch._foreach_lerp_(phi, theta, 1 - tau)`` (lerp(a, b, w) = a + w (b - a)).

Shard-local: :class:`EMA` works on whatever tensors it is given, with no communication. The trainer
passes ``list(model.parameters())``; under tensor parallelism those are the rank's own shards, so
phi has the policy's sharding for free, and data-parallel replicas stay identical because theta is.

Scoring S_ema without a second model: :meth:`EMA.swap_into` temporarily puts phi into the live
model's parameters for a forward pass and restores theta afterwards (also on exceptions); see its
docstring for the memory trade-off.

Precision: phi is always held in fp32 (``ema.dtype``; float64 allowed, nothing narrower), whatever
the parameter dtype, and cast into bf16 parameters for scoring. At tau = 0.999 the per-step
increment (1 - tau)(theta - phi) is usually far below bf16's 2^-8 relative resolution, so a bf16
shadow would round it away and never move (only 2-3% of its elements ever change). The trainer
skips the update on a skipped (non-finite) optimizer step.

Under the paper's advantage (Eq. 7) S_ema cancels and phi does not affect the gradient; the EMA is
then needed only for logging the information gain, or for ``baseline_mode``/``reward_clip``/KL
variants that make it matter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from rlp.config import EMAConfig


class EMA:
    """Exponential moving average of a list of parameter tensors (lazy-initialised, shard-local)."""

    def __init__(self, decay: float = 0.999, dtype: torch.dtype = torch.float32) -> None:
        """``dtype``: storage dtype of phi, float32 or float64 (narrower would freeze it)."""
        _check_decay(decay)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"EMA dtype must be torch.float32 or torch.float64, got {dtype}: at decay 0.999 a "
                "narrower shadow rounds every update away"
            )
        self.decay = decay
        self.dtype = dtype
        self.params: list[torch.Tensor] = []
        self.initialized = False
        self._swapped = False

    @classmethod
    def from_config(cls, cfg: EMAConfig) -> EMA:
        """``ema.decay`` and ``ema.dtype``."""
        return cls(decay=cfg.decay, dtype=getattr(torch, cfg.dtype))

    @torch.no_grad()
    def initialize(self, policy_params: Sequence[torch.Tensor]) -> None:
        """phi <- theta (Alg. 1 line 4): detached copies, on theta's device, in ``self.dtype``."""
        self.params = [p.detach().to(dtype=self.dtype, copy=True) for p in policy_params]
        self.initialized = True

    @torch.no_grad()
    def update(self, policy_params: Sequence[torch.Tensor], decay: float | None = None) -> None:
        """phi <- decay * phi + (1 - decay) * theta; initialises phi <- theta on the first call.

        ``decay`` defaults to ``self.decay``; 0 copies theta exactly.
        """
        if self._swapped:
            raise RuntimeError("EMA.update inside swap_into would average phi with itself")
        if not self.initialized:
            self.initialize(policy_params)
            return
        tau = self.decay if decay is None else decay
        _check_decay(tau)
        self._check_match(policy_params)
        theta = [p.detach() for p in policy_params]
        if tau == 0.0:
            torch._foreach_copy_(self.params, theta)
            return
        weight = 1.0 - tau
        # foreach kernels need equal dtypes; mixed pairs (fp32 phi, bf16 theta) go one tensor at a
        # time so the upcast copy of theta is a single tensor, never a whole model.
        same = [i for i, (e, p) in enumerate(zip(self.params, theta)) if e.dtype == p.dtype]
        if same:
            torch._foreach_lerp_([self.params[i] for i in same], [theta[i] for i in same], weight)
        if len(same) < len(theta):
            same_set = set(same)
            for i, (e, p) in enumerate(zip(self.params, theta)):
                if i not in same_set:
                    e.lerp_(p.to(e.dtype), weight)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.Tensor]) -> None:
        """Overwrite ``params`` with phi (cast to each target's dtype), e.g. to export the EMA."""
        self._require_init()
        self._check_match(params)
        for p, e in zip(params, self.params):
            p.copy_(e)

    @contextmanager
    def swap_into(self, model_params: Sequence[torch.Tensor]) -> Iterator[None]:
        """Run the body with phi in ``model_params``; restore theta bit-exactly on exit.

        Two paths, chosen per tensor:

        * phi has the parameter's dtype and device: zero-copy swap of the ``.data`` storage (no
          extra memory; the original storage object, e.g. a view into Megatron's contiguous param
          buffer, is put back unchanged).
        * otherwise (fp32 phi, bf16 model): theta is backed up, phi is cast into the parameter in
          place, and the backup is copied back. Costs one extra copy of those parameters in the
          model dtype for the duration of the block.

        The body runs under ``torch.no_grad()``: a graph through swapped-in values would send
        gradients to the policy's parameters. Not re-entrant.
        """
        self._require_init()
        self._check_match(model_params)
        if self._swapped:
            raise RuntimeError("EMA.swap_into is already active")
        swapped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its original .data)
        backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, backup copy of theta)
        self._swapped = True
        try:
            with torch.no_grad():
                for p, e in zip(model_params, self.params):
                    if e.dtype == p.dtype and e.device == p.device:
                        swapped.append((p, p.data))
                        p.data = e
                    else:
                        backups.append((p, p.detach().clone()))
                        p.copy_(e)
                yield
        finally:
            with torch.no_grad():
                for p, original in swapped:
                    p.data = original
                for p, backup in backups:
                    p.copy_(backup)
            self._swapped = False

    def state_dict(self) -> dict[str, Any]:
        """``decay``, ``initialized`` and ``params`` (the phi tensors, in policy order)."""
        return {"decay": self.decay, "initialized": self.initialized, "params": list(self.params)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore phi; copies in place (keeping device/dtype) when already initialised.

        On resume, call :meth:`initialize` with the policy first so that phi lands on the model's
        device and dtype; an uninitialised EMA adopts the loaded tensors' placement.
        """
        _check_decay(state["decay"])
        self.decay = state["decay"]
        if not state["initialized"]:
            self.params, self.initialized = [], False
            return
        loaded: list[torch.Tensor] = list(state["params"])
        if self.initialized:
            self._check_match(loaded)
            for e, src in zip(self.params, loaded):
                e.copy_(src)
        else:
            self.initialize(loaded)

    def _require_init(self) -> None:
        if not self.initialized:
            raise RuntimeError("EMA is not initialised: call initialize() or update() first")

    def _check_match(self, params: Sequence[torch.Tensor]) -> None:
        if len(params) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors, got {len(params)}")
        for i, (p, e) in enumerate(zip(params, self.params)):
            if p.shape != e.shape:
                raise ValueError(f"tensor {i}: shape {tuple(p.shape)} != EMA {tuple(e.shape)}")


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
