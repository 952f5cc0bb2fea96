"""Free the optimizer's device memory while rollouts are generated, and bring it back.

This module owns :func:`offloaded`, a context manager around generation (``rollout.offload``):

* **grad buffers**: megatron DDP's ``offload_grad_buffers()`` releases the storage of every
  gradient buffer (``param.main_grad`` views stay valid objects) and ``restore_grad_buffers()``
  reallocates and zeroes it. The trainer zeroes gradients before every backward anyway.
* **optimizer state** (Adam moments, step counters) of every leaf optimizer moves to host memory
  and back. Megatron's own ``MegatronOptimizer.offload_to_cpu()`` also moves every parameter in
  the optimizer's groups, which for the fp32 optimizer *are the model weights* (and for the
  fp32 distributed optimizer views into them); here only state tensors, and fp32 main params that
  share no storage with a model parameter (the bf16 master copies), move.

On CPU the state "moves" to where it already is; only the grad-buffer release does something.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def _leaf_optimizers(optimizer: object) -> list[object]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _model_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@contextlib.contextmanager
def _quiet_storage() -> Iterator[None]:
    """Megatron's buffer offload uses ``Tensor.storage()``, which warns (TypedStorage)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        yield


@contextlib.contextmanager
def offloaded(ddp: torch.nn.Module | None, optimizer: object | None) -> Iterator[None]:
    """Release grad buffers and move optimizer state to the host for the duration."""
    on_cuda = torch.cuda.is_available()
    moved: list[tuple[object, object, torch.device]] = []  # (container, key, device)
    params: list[tuple[torch.Tensor, torch.device]] = []
    if optimizer is not None:
        shared = _model_storages(ddp) if ddp is not None else set()
        for leaf in _leaf_optimizers(optimizer):
            inner = getattr(leaf, "optimizer", None)
            if inner is None:
                continue
            for state in inner.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                        moved.append((state, key, value.device))
                        state[key] = value.to("cpu")
            for group in inner.param_groups:
                for p in group["params"]:
                    if p.device.type == "cpu" or p.untyped_storage().data_ptr() in shared:
                        continue
                    params.append((p, p.device))
                    p.data = p.data.to("cpu")
    grads = ddp is not None and hasattr(ddp, "offload_grad_buffers")
    if grads:
        with _quiet_storage():
            ddp.offload_grad_buffers(synchronize=on_cuda, empty_cache=on_cuda)
    try:
        yield
    finally:
        if grads:
            with _quiet_storage():
                ddp.restore_grad_buffers(synchronize=on_cuda)
        for state, key, device in moved:
            state[key] = state[key].to(device)
        for p, device in params:
            p.data = p.data.to(device)
