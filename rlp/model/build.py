"""Build the policy network: a megatron-core ``GPTModel`` in the Llama / Qwen3 layout.

This module owns the translation ``ModelConfig`` -> ``TransformerConfig`` + layer spec +
``GPTModel``: RMSNorm, SwiGLU, RoPE (``rotary_base``), grouped-query attention, optional QK-norm
(always on for ``family: qwen3``), tied or untied embeddings, no biases, and a vocabulary padded
to a multiple of ``make_vocab_size_divisible_by * tp_size``.

Layer spec: transformer-engine only when ``import transformer_engine`` works **and** CUDA is
present (per ``model.transformer_impl``); otherwise megatron's local spec, whose core attention
is :class:`rlp.model.attention.SDPAttention` for ``attention_backend: sdpa`` or megatron's
unfused ``DotProductAttention`` for ``unfused``.

Padded vocabulary rows are not tokens: a forward hook on the output layer sets their logits to
``PADDED_VOCAB_LOGIT`` so they get no probability mass anywhere (NTP loss, scoring via
``labels=``, sampling from gathered logits), which keeps log-probs equal to an HF model's.

TP and PP sizes come from megatron's ``parallel_state`` (:mod:`rlp.model.parallel`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from rlp.config import ConfigError, ModelConfig

PADDED_VOCAB_LOGIT = -1.0e4
"""Logit of padded vocabulary rows: exp() underflows to 0 against any real logit, yet it stays
finite under temperature scaling and in ``p * log p`` (``-inf`` would give NaN there)."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``lcm(divisible_by, tp_size)``.

    Unlike Megatron-LM's ``divisible_by * tp_size`` rule, the padded size does not change with
    ``tp_size`` whenever ``tp_size`` divides ``divisible_by`` (the usual case: 64 or 128 with TP
    1/2/4/8), so checkpoints reshard between TP sizes without touching the embedding shape.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if divisible_by < 1 or tp_size < 1:
        raise ValueError(
            f"model.make_vocab_size_divisible_by ({divisible_by}) and parallel.tp_size "
            f"({tp_size}) must be >= 1"
        )
    multiple = math.lcm(divisible_by, tp_size)
    return -(-vocab_size // multiple) * multiple


def resolve_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """Parameter dtype: ``auto`` = bfloat16 on GPU, float32 on CPU."""
    if model_cfg.params_dtype == "float32":
        return torch.float32
    if model_cfg.params_dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    """Whether transformer-engine imports. A half-installed TE raises RuntimeError ("cudnn
    shared object not found"), not ImportError, so every exception counts as "not available"."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(model_cfg: ModelConfig, device: torch.device) -> bool:
    """Resolve ``model.transformer_impl`` against what this machine has."""
    usable = device.type == "cuda" and transformer_engine_available()
    if model_cfg.transformer_impl == "transformer_engine" and not usable:
        raise ConfigError(
            "model.transformer_impl=transformer_engine needs CUDA and an importable "
            "transformer_engine; set model.transformer_impl=auto or local"
        )
    return model_cfg.transformer_impl != "local" and usable


def _check_tp_divides(model_cfg: ModelConfig, tp_size: int) -> None:
    for what, n in (
        ("num_attention_heads", model_cfg.num_attention_heads),
        ("num_query_groups", model_cfg.num_query_groups),
    ):
        if n % tp_size:
            raise ConfigError(
                f"the running tensor-parallel size {tp_size} (parallel.tp_size) does not divide "
                f"model.{what}={n}; choose a parallel.tp_size that divides both "
                f"{model_cfg.num_attention_heads} heads and {model_cfg.num_query_groups} groups"
            )


def transformer_config(
    model_cfg: ModelConfig,
    device: torch.device,
    *,
    tp_size: int = 1,
    pp_size: int = 1,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for a Llama/Qwen3 model (fusions needing TE/Apex off)."""
    dtype = resolve_dtype(model_cfg, device)
    on_cpu = device.type != "cuda"
    if on_cpu and sequence_parallel:
        raise ConfigError("parallel.sequence_parallel=true needs GPU transformer-engine norms")
    with warnings.catch_warnings():
        # model.recompute=selective asks for core-attention recompute on purpose; megatron warns
        # that a fused TE attention would not need it on every build.
        warnings.filterwarnings("ignore", message=r".*'core_attn' to recompute.*")
        return _transformer_config(model_cfg, dtype, on_cpu, tp_size, pp_size, sequence_parallel)


def _transformer_config(
    model_cfg: ModelConfig,
    dtype: torch.dtype,
    on_cpu: bool,
    tp_size: int,
    pp_size: int,
    sequence_parallel: bool,
) -> TransformerConfig:
    return TransformerConfig(
        **_architecture(model_cfg),
        # Parallelism and precision.
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=on_cpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Megatron's default "full" is a deprecated alias of [] that warns on every build.
        cuda_graph_scope=[],
        **recompute_settings(model_cfg.recompute),
    )


def recompute_settings(mode: str) -> dict[str, Any]:
    """``model.recompute`` -> megatron's recompute fields. ``full``: every layer's input is kept
    and the layer recomputed in backward (uniform, one layer per chunk); ``selective``: only the
    core attention is recomputed; ``none``: everything is kept. Applies in training mode with
    grad (the loss pass); on CPU through :mod:`rlp.model.cpu_compat` row 12."""
    if mode == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if mode == "none":
        return {}
    raise ConfigError(f"model.recompute must be none, selective or full, got {mode!r}")


def _architecture(model_cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.kv_channels,
        # Llama / Qwen3 block: pre-RMSNorm, SwiGLU MLP, no biases, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=model_cfg.qk_layernorm or model_cfg.family == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        attention_softmax_in_fp32=True,
        # Fusions that need TE / Apex / CUDA extensions stay off: they fail on CPU and the local
        # spec gains little from them on GPU.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(model_cfg: ModelConfig, device: torch.device) -> ModuleSpec:
    """Transformer-layer spec: TE when usable, else local with SDPA or unfused core attention."""
    qk_norm = model_cfg.qk_layernorm or model_cfg.family == "qwen3"
    if use_transformer_engine(model_cfg, device):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")
    if model_cfg.attention_backend == "sdpa":
        from rlp.model.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def _mask_padded_vocab_hook(
    vocab_size: int, padded: int, tp_rank: int, tp_size: int
) -> Callable[[torch.nn.Module, tuple, tuple], tuple]:
    """Forward hook on the output layer: logits of ids >= ``vocab_size`` -> PADDED_VOCAB_LOGIT."""
    per_rank = padded // tp_size
    local_start = vocab_size - tp_rank * per_rank  # first padded column on this rank's shard

    def hook(module: torch.nn.Module, args: tuple, output: tuple) -> tuple:
        logits, bias = output
        # [s, b, V/tp] normally; [s, b, V] when the caller asked for gathered logits.
        start = vocab_size if logits.size(-1) == padded else local_start
        if start < logits.size(-1):
            logits[..., max(start, 0) :] = PADDED_VOCAB_LOGIT
        return logits, bias

    return hook


def model_vocab_size(model_cfg: ModelConfig, vocab_size: int) -> int:
    """The model's real vocabulary: ``model.vocab_size`` when set (it must hold every id of the
    ``vocab_size``-token tokenizer), else ``vocab_size``. Rows past the tokenizer (Qwen3's
    checkpoints have 151,936 rows for ~151,670 tokens) stay in the softmax, as in the HF model;
    only TP padding beyond ``model.vocab_size`` is masked."""
    if model_cfg.vocab_size is None:
        return vocab_size
    if model_cfg.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} tokens (with <think>/</think>); set model.vocab_size to null or to at "
            f"least {vocab_size}"
        )
    return model_cfg.vocab_size


def build_model(
    model_cfg: ModelConfig,
    vocab_size: int,
    device: torch.device,
    *,
    sequence_parallel: bool = False,
) -> GPTModel:
    """Build this rank's shard of the policy model on ``device`` (unwrapped, no DDP).

    ``vocab_size`` is the tokenizer's (or a checkpoint's) size; ``model.vocab_size``, when set,
    overrides it (:func:`model_vocab_size`).

    Needs megatron's parallel state (:func:`rlp.model.parallel.initialize_model_parallel`); the
    same seed gives the same full weights at any TP size because CPU initialisation draws the
    full master weight and slices it (GPU init draws per shard and does not have this property).
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron parallel state is not initialised; call "
            "rlp.model.parallel.initialize_model_parallel() before build_model()"
        )
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size != 1:
        raise ConfigError("parallel.pp_size must be 1 (the in-process sampler has no PP support)")
    _check_tp_divides(model_cfg, tp_size)
    if sequence_parallel and not use_transformer_engine(model_cfg, device):
        raise ConfigError(
            "parallel.sequence_parallel=true needs the transformer-engine layer spec (megatron's "
            "local spec uses torch norms, which do not support it); set it to false"
        )
    config = transformer_config(
        model_cfg, device, tp_size=tp_size, pp_size=pp_size, sequence_parallel=sequence_parallel
    )
    vocab_size = model_vocab_size(model_cfg, vocab_size)
    padded = padded_vocab_size(vocab_size, model_cfg.make_vocab_size_divisible_by, tp_size)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model_cfg, device),
        vocab_size=padded,
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model_cfg.rotary_base,  # type: ignore[arg-type]  # float bases are fine
    )
    model.to(device)
    # The unpadded size, for consumers that map ids back to tokens (the sampler, HF export).
    model.rlp_vocab_size = vocab_size  # type: ignore[assignment]
    if padded > vocab_size:
        model.output_layer.register_forward_hook(
            _mask_padded_vocab_hook(
                vocab_size, padded, parallel_state.get_tensor_model_parallel_rank(), tp_size
            )
        )
    return model


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The ``GPTModel`` inside DDP / Float16Module wrappers (anything with ``.module``)."""
    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, GPTModel):
        raise TypeError(f"expected a GPTModel (possibly wrapped), got {type(model).__name__}")
    return model


def num_parameters(model: torch.nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Parameters of the full (unsharded) model: TP-sharded tensors are summed over the TP group.

    Tied embeddings count once. Collective over the TP group when tp_size > 1.
    """
    gpt = unwrap(model)
    sharded = replicated = 0
    for name, p in gpt.named_parameters():
        if exclude_embeddings and name.startswith(("embedding.", "output_layer.")):
            continue
        if getattr(p, "tensor_model_parallel", False):
            sharded += p.numel()
        else:
            replicated += p.numel()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if tp_size > 1:
        t = torch.tensor([sharded], dtype=torch.int64, device=next(gpt.parameters()).device)
        torch.distributed.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
        sharded = int(t.item())
    return sharded + replicated
