"""The rollout-engine seam: what generates thoughts, chosen by ``rollout.engine``.

This module owns the :class:`RolloutEngine` protocol and the factories. An engine is bound to the
live (training) model when it is built and answers one call::

    engine.generate(prompts, num_samples, params, seed) -> SampleBatch

(:class:`rlp.model.sampler.SamplingParams` / :class:`rlp.model.sampler.SampleBatch`; rows
prompt-major, ``p * num_samples + g``; collective over the TP group). The trainer, the held-out
evaluator, the evaluation backend and the benchmarks go through it. Behaviour log-probs are
recomputed by the trainer whatever the engine, so every engine gives exact ratios.

Engines
    ``cascade`` (default, :class:`rlp.model.cascade.CascadeEngine`): one ragged batch per DP rank,
    shared-prefix KV, keyed draws, a CUDA-graph decode step. It needs every layer's core
    attention to be :class:`rlp.model.attention.SDPAttention` (``model.attention_backend=sdpa``,
    local spec) and no sequence parallelism; otherwise :func:`build_engine` logs one line and
    falls back to the reference sampler with the same keyed draws.

    ``reference`` (:class:`ReferenceEngine`): :class:`rlp.model.sampler.Sampler`, megatron's
    static KV cache, length buckets; the slow, simple implementation the cascade engine is
    tested against.

Either can run inside :func:`rlp.model.offload.offloaded` (``rollout.offload``) so the optimizer
state and gradient buffers leave the GPU while thoughts are generated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from rlp import dist
from rlp.model.cascade import CascadeEngine, unsupported_reason
from rlp.model.offload import offloaded
from rlp.model.sampler import NoiseMode, SampleBatch, Sampler, SamplingParams

if TYPE_CHECKING:
    from rlp.config import RolloutConfig

EngineKind = Literal["cascade", "reference"]
_FALLBACK_LOGGED: set[int] = set()  # models whose fallback was logged (once per model)
ENGINES: tuple[str, ...] = ("cascade", "reference")


class RolloutEngine(Protocol):
    """Generates continuations with the model it was built for."""

    name: str

    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed: int
    ) -> SampleBatch:
        """``num_samples`` continuations of every prompt, rows ``p * num_samples + g``."""
        ...


class ReferenceEngine:
    """:class:`rlp.model.sampler.Sampler` bound to a model (the reference implementation)."""

    name = "reference"

    def __init__(self, model: torch.nn.Module, sampler: Sampler) -> None:
        self.model = model
        self.sampler = sampler

    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed: int
    ) -> SampleBatch:
        return self.sampler.sample(self.model, prompts, num_samples, params, seed=seed)


class OffloadingEngine:
    """An engine whose calls run inside a context (e.g. :func:`rlp.model.offload.offloaded`)."""

    def __init__(
        self, engine: RolloutEngine, context: Callable[[], contextlib.AbstractContextManager]
    ) -> None:
        self.engine = engine
        self.context = context
        self.name = engine.name

    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed: int
    ) -> SampleBatch:
        with self.context():
            return self.engine.generate(prompts, num_samples, params, seed)


def build_engine(
    model: torch.nn.Module,
    kind: str = "cascade",
    *,
    max_batch_rows: int | None = None,
    max_prompt_spread: int = 128,
    check_every: int = 16,
    kv_block: int = 128,
    cuda_graphs: bool = True,
    prefill_tokens: int = 16384,
    reference_noise: NoiseMode = "generator",
) -> RolloutEngine:
    """An engine of ``kind`` bound to ``model``.

    ``max_batch_rows`` caps the rows decoded together (None = all rows of a call);
    ``max_prompt_spread`` and ``reference_noise`` configure the reference sampler, the other
    arguments the cascade engine (:class:`rlp.model.cascade.CascadeEngine`). A ``cascade``
    request on a model the cascade engine cannot drive logs why and returns the reference
    sampler with keyed noise (the cascade engine's draws).
    """
    if kind not in ENGINES:
        raise ValueError(f"unknown rollout engine {kind!r}; choose one of {', '.join(ENGINES)}")
    if kind == "cascade":
        reason = unsupported_reason(model)
        if reason is None:
            return CascadeEngine(
                model,
                check_every=check_every,
                kv_block=kv_block,
                cuda_graphs=cuda_graphs,
                prefill_tokens=prefill_tokens,
                max_batch_rows=max_batch_rows,
            )
        if id(model) not in _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(id(model))
            dist.print0(
                f"[rlp] rollout.engine=cascade cannot drive this model ({reason}); generating "
                "with the reference sampler instead"
            )
        reference_noise = "keyed"
    sampler = Sampler(
        max_batch_rows=max_batch_rows, max_prompt_spread=max_prompt_spread, noise=reference_noise
    )
    return ReferenceEngine(model, sampler)


def engine_from_config(
    model: torch.nn.Module,
    cfg: RolloutConfig,
    *,
    ddp: torch.nn.Module | None = None,
    optimizer: object | None = None,
) -> RolloutEngine:
    """The engine ``cfg.engine`` with the ``rollout`` section's options.

    The reference sampler decodes at most ``rollout.sample_batch_size`` rows together; the
    cascade engine decodes all rows of a call (one ragged batch per DP rank). With
    ``rollout.offload`` the calls release ``ddp``'s grad buffers and move ``optimizer``'s state
    to the host while they run.
    """
    engine = build_engine(
        model,
        cfg.engine,
        max_batch_rows=cfg.sample_batch_size if cfg.engine == "reference" else None,
        check_every=cfg.check_every,
        kv_block=cfg.kv_block,
        cuda_graphs=cfg.cuda_graphs,
        prefill_tokens=cfg.prefill_tokens,
    )
    if cfg.offload:
        return OffloadingEngine(engine, lambda: offloaded(ddp, optimizer))
    return engine
