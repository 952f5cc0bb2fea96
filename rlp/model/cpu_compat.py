"""Runtime shims that let megatron-core 0.16 run on CPU-only torch with gloo.

This module owns every CPU workaround ``rlp`` needs (``docs/megatron-core.md`` §3, rows 1-7, 9-11
and 12) and nothing else:

* :func:`apply` installs rows 1-7 and 12, each guarded by ``not torch.cuda.is_available()`` so
  GPU runs never see them. It is idempotent and must run **before**
  ``tensor_parallel.model_parallel_cuda_manual_seed`` (:mod:`rlp.model.parallel` calls it).
  Row 12 makes megatron's activation recompute (``model.recompute: selective|full``) run on CPU:
  its ``CheckpointFunction`` saves and restores the CUDA generator state around the recompute;
  on CPU there is none (the CPU generator and the tracker's named CPU states are restored by
  megatron itself), so reading it returns ``None`` and restoring it does nothing.
* :func:`prepare_optimizer_for_load` / :func:`fix_optimizer_after_load` implement rows 9-11, the
  distributed-optimizer checkpoint-load fixes. They depend on whether megatron fell back to
  ``torch.optim.AdamW`` (no Apex/TE fused Adam), not on CUDA: GPU images without TE need them too.

Row 8 (``current_stream`` stubs) is only needed by megatron-core 0.19; the legacy static inference
engine's workaround is not needed because ``rlp`` does not use that engine.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

_APPLIED = False

# Factory functions whose ``device=`` megatron hard-codes to "cuda" (row 4).
_FACTORIES = (
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "eye",
    "linspace",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "randint_like",
)


def is_applied() -> bool:
    """Whether :func:`apply` installed the shims in this process."""
    return _APPLIED


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_device_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__rlp_cpu_shim__ = True  # type: ignore[attr-defined]
    return wrapper


@functools.lru_cache(maxsize=64)
def _causal_mask(sq: int) -> torch.Tensor:
    # [sq, sq] bool, True = masked (future positions).
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """CPU twin of ``transformer.utils.get_default_causal_mask`` (bool [sq, sq], True = masked)."""
    return _causal_mask(sq)


@functools.lru_cache(maxsize=64)
def _cpu_sliding_window_causal_mask(
    sq: int, skv: int, window_size: tuple[int, int]
) -> torch.Tensor:
    """CPU twin of ``get_sliding_window_causal_mask`` (bool [sq, skv], True = masked)."""
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _make_cpu_rng_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG states, kept as CPU generator states.

        Keeps the TP-aware dropout semantics (``fork('model-parallel-rng')`` differs per TP rank,
        the default state is shared) without any CUDA generator.
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def _clip_grad_by_total_norm_fp32(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Scale every existing grad by ``max_norm / (total_norm + 1e-6)`` when that is < 1.

    Same maths as megatron's version, minus its ``param.grad.type() == 'torch.cuda.FloatTensor'``
    assertion and its CUDA overflow buffer.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [g.detach() for p in parameters if (g := getattr(p, attr, None)) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def apply() -> None:
    """Install the CPU shims (rows 1-7); a no-op with CUDA or when already applied."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return

    # ``with torch.device("meta")`` (transformers' model init) intercepts the factory functions
    # it finds in a set cached on first use. Fill that cache with the *original* functions before
    # row 4 wraps them; otherwise a transformers model built later in this process silently gets
    # real, uninitialised RoPE buffers (SmolLM2 logits off by up to 35).
    import torch.utils._device as _torch_device

    _torch_device._device_constructors()

    # Row 2: ~220 megatron sites do ``device=torch.cuda.current_device()``, which asserts
    # "Torch not compiled with CUDA enabled" (first hit: RotaryEmbedding.get_emb).
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]

    # Row 4: literals such as ``torch.tensor([1.0], device='cuda')`` (optimizer.py, clip_grads.py,
    # schedules.py, tensor_parallel/data.py) and ``.cuda()`` calls raise without CUDA.
    for name in _FACTORIES:
        fn = getattr(torch, name)
        if not getattr(fn, "__rlp_cpu_shim__", False):
            setattr(torch, name, _cpu_device_factory(fn))
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    # Row 5: ``torch.cuda.synchronize()`` / ``empty_cache()`` (dist-checkpoint writer preload,
    # optimizer offload) raise without CUDA; on CPU there is nothing to wait for or free.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]

    # Row 7: ``Tensor.type()`` string checks ("Wrapped parameters must be one of
    # torch.cuda.FloatTensor ..." in distrib_optimizer.py, Float16OptimizerWithFloat16Params).
    # Only the zero-argument form (a query) is changed; conversions keep the original.
    original_type = torch.Tensor.type
    if not getattr(original_type, "__rlp_cpu_shim__", False):

        def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                return original_type(self, *args, **kwargs)
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name

        tensor_type.__rlp_cpu_shim__ = True  # type: ignore[attr-defined]
        torch.Tensor.type = tensor_type  # type: ignore[method-assign,assignment]

    # Megatron modules are imported only now, after the torch-level patches, so nothing they
    # evaluate at import time sees the CUDA-only versions.
    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    # Row 3: ``get_default_causal_mask`` hard-codes device="cuda" and is used whenever
    # attention_mask=None (decode steps, maskless scoring). fused_softmax imports it by name.
    for module in (tutils, fused_softmax):
        module.get_default_causal_mask = _cpu_default_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask

    # Row 6: ``assert param.grad.type() == 'torch.cuda.FloatTensor'`` in clip_grads.py:167 plus a
    # CUDA overflow buffer. optimizer.py imports the function by name.
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    # Row 1: ``model_parallel_cuda_manual_seed`` -> ``CudaRNGStatesTracker.add`` ->
    # ``torch.cuda.get_rng_state()`` asserts without CUDA. Install the CPU tracker once: a second
    # install would drop the states seeded since.
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, _tracker_class()):
        mrandom._CUDA_RNG_STATE_TRACKER = _tracker_class()()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # Row 12: activation recompute (``tensor_parallel.checkpoint``) calls
    # ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` through the module globals in
    # ``_get_all_rng_states`` / ``_set_all_rng_states``; the CPU state and the tracker's named
    # states are saved and restored next to them, so the CUDA part can be empty.
    mrandom._get_cuda_rng_state = _no_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_no_cuda_rng_state

    _APPLIED = True


def _no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    """CPU twin of megatron's ``_get_cuda_rng_state``: there is no CUDA generator."""
    return None


def _set_no_cuda_rng_state(*args: Any, **kwargs: Any) -> None:
    """CPU twin of megatron's ``_set_cuda_rng_state``: nothing to restore."""


@functools.lru_cache(maxsize=1)
def _tracker_class() -> type:
    return _make_cpu_rng_tracker_class()


# --------------------------------------------------------------------------------------------
# Rows 9-11: distributed-optimizer checkpoint loading with torch AdamW (no Apex / TE FusedAdam)


def uses_torch_adam() -> bool:
    """True when megatron's distributed optimizer fell back to ``torch.optim`` Adam/AdamW."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _sub_optimizers(optimizer: Any) -> list[Any]:
    """The leaf megatron optimizers of a (possibly chained) megatron optimizer."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _set_main_param_and_optimizer_states_present_keys(
    self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]
) -> None:
    """Row 10: copy only the keys present both in the checkpoint and in the live state.

    Megatron copies every live key, but torch AdamW's per-param ``step`` is not stored with the
    parameter state -> ``KeyError: 'step'`` on load. ``step`` is restored from the param groups.
    """
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _ORIGINAL_SET_STATES[0](self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    dst = {"param": main_param, **self.optimizer.state[main_param]}
    for key, value in tensors.items():
        if key in dst and isinstance(dst[key], torch.Tensor):
            dst[key].copy_(value)


_ORIGINAL_SET_STATES: list[Callable[..., None]] = []


def _install_set_states_fix() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    current = DistributedOptimizer._set_main_param_and_optimizer_states
    if current is _set_main_param_and_optimizer_states_present_keys:
        return
    _ORIGINAL_SET_STATES.append(current)
    DistributedOptimizer._set_main_param_and_optimizer_states = (  # type: ignore[method-assign]
        _set_main_param_and_optimizer_states_present_keys
    )


def prepare_optimizer_for_load(optimizer: Any) -> None:
    """Call before ``optimizer.sharded_state_dict(model_sd, is_loading=True)`` and ``load``.

    * Row 9: a fresh torch-AdamW distributed optimizer has no state, and
      ``DistributedOptimizer.state_dict()`` asserts ``len(steps) == 1`` while building the loading
      state dict. Initialise its states with dummy values (they are overwritten by the load).
    * Row 10: install the present-keys version of ``_set_main_param_and_optimizer_states``.

    A no-op when megatron uses Apex/TE fused Adam or for non-distributed optimizers.
    """
    if not uses_torch_adam():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _install_set_states_fix()
    for opt in _sub_optimizers(optimizer):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def fix_optimizer_after_load(optimizer: Any) -> None:
    """Call right after ``optimizer.load_state_dict(...)`` (row 11).

    Megatron's load assigns **one shared** ``step`` tensor to every parameter's state, and torch
    AdamW increments ``step`` in place once per parameter, so the first update after a resume
    uses a wrong bias correction (loss 5.0694 instead of 5.0634). Give each state its own copy.
    Harmless when the states already own their tensors or keep ``step`` in the param groups.
    """
    for opt in _sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()
