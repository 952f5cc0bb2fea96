"""Hugging Face <-> megatron ``GPTModel`` mapping of configs and tensors (Llama and Qwen3).

Pure functions over configs and state dicts (no megatron, no files; ``transformers`` only for
:func:`model_config_to_hf`, imported lazily):

* :func:`hf_to_model_config` / :func:`model_config_to_hf`: HF config <->
  :class:`~rlp.config.ModelConfig`; features rlp models lack (biases, RoPE scaling, sliding
  windows) are errors, not silent approximations.
* :func:`hf_to_mcore_shard` / :func:`mcore_shards_to_hf`: HF state dict <-> one TP rank's megatron
  tensors under local-spec names (:mod:`rlp.model.layer_keys` maps them to the TE spec).
  Megatron's layout per rank: ``linear_qkv`` is column-parallel and fused per query group (``[q
  heads of group g; k_g; v_g]`` for each group, whole groups per TP rank), ``linear_fc1`` is
  ``[gate shard; up shard]``, ``linear_proj`` / ``linear_fc2`` are row-parallel (split along the
  input dim), embedding and output rows are vocab-parallel over the *padded* vocabulary (padding
  rows are zero).

RoPE needs no permutation: HF Llama/Qwen3 use rotate-half, which is megatron's
``rotary_interleaved=False``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rlp.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""Supported HF ``model_type`` -> the ``architectures`` entry written on export."""
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""Special-token ids an HF ``config.json`` / ``generation_config.json`` records."""

# Per-layer (HF suffix, megatron local-spec suffix) pairs. Norms are replicated on TP ranks.
_NORMS = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
)
_QK_NORMS = (
    ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
    ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"),
)
_ROW_PARALLEL = (  # split along dim 1 (the input features)
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
)


class ConversionError(ValueError):
    """An HF model or checkpoint that cannot be mapped; the message names what differs."""


# --------------------------------------------------------------------------------------------
# Configs


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def _rope_theta(cfg: Any) -> float:
    """RoPE base from transformers 5 ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    params = _get(cfg, "rope_parameters") or {}
    scaling = _get(cfg, "rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConversionError(
            f"RoPE scaling type {rope_type!r} is not supported (rlp models use plain RoPE); "
            "convert a checkpoint without rope scaling"
        )
    return float(params.get("rope_theta", _get(cfg, "rope_theta", 10000.0)))


def hf_to_model_config(hf_config: Any) -> ModelConfig:
    """Our :class:`ModelConfig` for an HF Llama/Qwen3 config (object or ``config.json`` dict)."""
    family = _get(hf_config, "model_type")
    if family not in ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        raise ConversionError(f"unsupported HF model_type {family!r}: rlp converts {supported}")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if _get(hf_config, flag, False):
            raise ConversionError(f"HF config sets {flag}=true, which rlp models do not support")
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act={_get(hf_config, 'hidden_act')!r}; only silu (SwiGLU)")
    hidden, heads = _get(hf_config, "hidden_size"), _get(hf_config, "num_attention_heads")
    head_dim = _get(hf_config, "head_dim") or hidden // heads
    return ModelConfig(
        family=family,
        num_layers=_get(hf_config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=_get(hf_config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=_get(hf_config, "num_key_value_heads") or heads,
        # None keeps configs tidy when the head size is the usual hidden / heads.
        kv_channels=None if head_dim * heads == hidden else head_dim,
        vocab_size=_get(hf_config, "vocab_size"),
        max_position_embeddings=_get(hf_config, "max_position_embeddings", 4096),
        rotary_base=_rope_theta(hf_config),
        norm_epsilon=float(_get(hf_config, "rms_norm_eps", 1e-5)),
        qk_layernorm=family == "qwen3",
        tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        init_method_std=float(_get(hf_config, "initializer_range", 0.02)),
    )


def model_config_to_hf(
    model_cfg: ModelConfig,
    vocab_size: int,
    dtype: torch.dtype,
    token_ids: Mapping[str, int | None] | None = None,
) -> Any:
    """The transformers config (``LlamaConfig`` / ``Qwen3Config``) for an rlp model.

    ``token_ids``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of the model's tokenizer
    (:func:`rlp.model.hf_files.tokenizer_token_ids`). Missing ids are written as ``null``, never
    as the config class's defaults (LlamaConfig's bos=1, eos=2 are some other tokenizer's ids).
    """
    from transformers import AutoConfig

    if model_cfg.qk_layernorm and model_cfg.family == "llama":
        raise ConversionError(
            "model.family=llama with model.qk_layernorm=true has no HF equivalent (HF Llama has "
            "no QK-norm); export it as family qwen3 or train without qk_layernorm"
        )
    heads = model_cfg.num_attention_heads
    return AutoConfig.for_model(
        model_cfg.family,
        architectures=[ARCHITECTURES[model_cfg.family]],
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=model_cfg.num_query_groups,
        head_dim=model_cfg.kv_channels or model_cfg.hidden_size // heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rms_norm_eps=model_cfg.norm_epsilon,
        rope_theta=model_cfg.rotary_base,
        tie_word_embeddings=model_cfg.tie_embeddings,
        initializer_range=model_cfg.init_method_std,
        attention_bias=False,
        hidden_act="silu",
        dtype=str(dtype).removeprefix("torch."),
        **{name: (token_ids or {}).get(name) for name in TOKEN_ID_FIELDS},
    )


# --------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class Arch:
    """The shape facts the mapping needs (from a ModelConfig or a built model)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    padded_vocab: int
    qk_norm: bool
    tied: bool

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, padded_vocab: int) -> Arch:
        return cls(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.ffn_hidden_size,
            num_heads=cfg.num_attention_heads,
            num_groups=cfg.num_query_groups,
            head_dim=cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads,
            padded_vocab=padded_vocab,
            qk_norm=cfg.qk_layernorm or cfg.family == "qwen3",
            tied=cfg.tie_embeddings,
        )


def _chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ConversionError(f"dim {dim} of shape {tuple(t.shape)} does not split {size} ways")
    return t.chunk(size, dim=dim)[rank]


def _pad_rows(t: torch.Tensor, rows: int, new_tokens: int = 0) -> torch.Tensor:
    """Extend a vocabulary matrix to ``rows``: ``new_tokens`` rows for tokens the tokenizer added
    (e.g. ``<think>``) get the mean HF row, as transformers' ``resize_token_embeddings`` does,
    so they start as ordinary-looking tokens; the remaining padding rows are zero."""
    if t.shape[0] + new_tokens > rows:
        raise ConversionError(
            f"HF vocabulary {t.shape[0]} + {new_tokens} added tokens exceeds the model's padded "
            f"vocab {rows}"
        )
    mean = t.mean(dim=0, keepdim=True).expand(new_tokens, *t.shape[1:])
    return torch.cat([t, mean, t.new_zeros(rows - t.shape[0] - new_tokens, *t.shape[1:])])


class _Reader:
    """HF tensors by name: records which were used and names the missing ones."""

    def __init__(self, hf: Mapping[str, torch.Tensor]) -> None:
        self.hf, self.used = hf, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.hf:
            raise ConversionError(f"HF weights lack {key!r} (is this a Llama/Qwen3 checkpoint?)")
        self.used.add(key)
        return self.hf[key]


def hf_to_mcore_shard(
    hf: Mapping[str, torch.Tensor],
    arch: Arch,
    tp_rank: int = 0,
    tp_size: int = 1,
    *,
    vocab_size: int | None = None,
    used: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s megatron tensors (local-spec names) from an HF state dict.

    ``vocab_size``: the model's real (unpadded) vocabulary, when it differs from the HF one:
    tokens the tokenizer added get the mean row, HF rows past it are dropped (default: the HF
    vocabulary). ``used`` (optional) collects the HF keys read.
    """
    a, r, n, get = arch, tp_rank, tp_size, _Reader(hf)
    if a.num_groups % n or a.num_heads % a.num_groups:
        raise ConversionError(
            f"tp_size {n} must divide the {a.num_groups} query groups, which must divide the "
            f"{a.num_heads} heads"
        )

    def vocab_rows(key: str) -> torch.Tensor:
        rows = get(key)
        added = 0 if vocab_size is None else vocab_size - rows.shape[0]
        if added < 0:
            # HF checkpoints may pad their embedding beyond the tokenizer (Qwen3: 151936 rows
            # for 151669 tokens); ids past the tokenizer's vocabulary never occur.
            warnings.warn(
                f"{key}: dropping {-added} HF rows past the model's vocab_size {vocab_size}",
                stacklevel=3,
            )
            rows, added = rows[:vocab_size], 0
        return _chunk(_pad_rows(rows, a.padded_vocab, added), 0, r, n)

    out = {
        "embedding.word_embeddings.weight": vocab_rows("model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": get("model.norm.weight"),
    }
    if not a.tied:
        out["output_layer.weight"] = vocab_rows("lm_head.weight")
    for i in range(a.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (
            get(f"{src}self_attn.{x}_proj.weight").reshape(a.num_groups, -1, a.hidden_size)
            for x in "qkv"
        )
        qkv = _chunk(torch.cat([q, k, v], dim=1), 0, r, n)  # whole query groups per rank
        out[dst + "self_attention.linear_qkv.weight"] = qkv.reshape(-1, a.hidden_size)
        gate, up = (_chunk(get(f"{src}mlp.{x}_proj.weight"), 0, r, n) for x in ("gate", "up"))
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        for hf_name, name in _ROW_PARALLEL:
            out[dst + name] = _chunk(get(src + hf_name), 1, r, n)
        for hf_name, name in _NORMS + (_QK_NORMS if a.qk_norm else ()):
            out[dst + name] = get(src + hf_name)
    if used is not None:
        used |= get.used
    return out


def mcore_shards_to_hf(
    shards: list[Mapping[str, torch.Tensor]], arch: Arch, vocab_size: int
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_mcore_shard`: per-TP-rank tensors (local names) -> HF state dict.

    ``vocab_size`` is the unpadded vocabulary; padding rows are dropped. Tied models get no
    ``lm_head.weight`` (HF re-ties it on load, as ``save_pretrained`` does).
    """
    a, first = arch, shards[0]

    def cat(key: str, dim: int) -> torch.Tensor:
        return torch.cat([s[key] for s in shards], dim=dim)

    out = {
        "model.embed_tokens.weight": cat("embedding.word_embeddings.weight", 0)[:vocab_size],
        "model.norm.weight": first["decoder.final_layernorm.weight"],
    }
    if not a.tied:
        out["lm_head.weight"] = cat("output_layer.weight", 0)[:vocab_size]
    q_rows = a.num_heads // a.num_groups * a.head_dim
    for i in range(a.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = cat(src + "self_attention.linear_qkv.weight", 0)
        parts = qkv.reshape(a.num_groups, -1, a.hidden_size).split(
            [q_rows, a.head_dim, a.head_dim], dim=1
        )
        for x, t in zip("qkv", parts):
            out[f"{dst}self_attn.{x}_proj.weight"] = t.reshape(-1, a.hidden_size)
        halves = [s[src + "mlp.linear_fc1.weight"].chunk(2) for s in shards]
        out[dst + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves])
        out[dst + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves])
        for hf_name, name in _ROW_PARALLEL:
            out[dst + hf_name] = cat(src + name, 1)
        for hf_name, name in _NORMS + (_QK_NORMS if a.qk_norm else ()):
            out[dst + hf_name] = first[src + name]
    return {k: v.contiguous() for k, v in out.items()}
