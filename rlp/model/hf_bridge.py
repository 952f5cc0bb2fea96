"""Live megatron models <-> Hugging Face weights: load HF weights into a built model, export one.

* :func:`load_hf_into_model`: fill this rank's TP shard of a built model from an HF directory or
  state dict (``checkpoint.init_from`` of an HF dir, ``rlp convert hf-to-mcore``, ``rlp eval``).
* :func:`gather_tp_shards` / :func:`export_to_hf`: gather the TP shards of a live model (or of an
  rlp checkpoint, loaded at the current TP size) and write an HF directory that
  ``transformers.AutoModelForCausalLM`` loads, with the tokenizer's real bos/eos/pad ids.

Either megatron layer spec works: parameter names go through
:func:`rlp.model.layer_keys.local_name` (TE's fused ``linear_qkv.layer_norm_weight`` is the local
``input_layernorm.weight``). The mapping itself is :mod:`rlp.model.hf_mapping`'s, the files
:mod:`rlp.model.hf_files`'. Megatron is imported lazily.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from rlp.config import ModelConfig
from rlp.model import sharded
from rlp.model.hf_files import (
    has_tokenizer_files,
    read_hf_config,
    read_hf_weights,
    save_hf_dir,
    tokenizer_token_ids,
)
from rlp.model.hf_mapping import (
    Arch,
    ConversionError,
    hf_to_mcore_shard,
    hf_to_model_config,
    mcore_shards_to_hf,
    model_config_to_hf,
)
from rlp.model.layer_keys import local_name


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
    eos_token: str | None = None,
) -> Path | None:
    """Write an HF model directory from a live model or from an rlp checkpoint directory.

    A live model needs ``model_cfg`` (family, RoPE base, ...); ``vocab_size`` defaults to the
    unpadded size :func:`rlp.model.build.build_model` recorded. A checkpoint path reads both from
    its metadata, builds the model at the current TP size (initialising a single process when
    nothing is) and uses the checkpoint's ``tokenizer/`` unless ``tokenizer_dir`` is given.
    ``config.json`` and ``generation_config.json`` get the tokenizer's bos/eos/pad ids (EOS as the
    run resolved it: ``eos_token``, for a checkpoint its ``config.yaml``'s ``tokenizer.eos_token``).
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
        token_ids = None
        if has_tokenizer_files(tokenizer_dir):
            token_ids = tokenizer_token_ids(tokenizer_dir, eos_token)  # type: ignore[arg-type]
        hf_state = mcore_shards_to_hf(shards, arch, vocab)
        dtype = dtype or next(iter(hf_state.values())).dtype
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
        hf_config = model_config_to_hf(model_cfg, vocab, dtype, token_ids)
        out = save_hf_dir(hf_state, hf_config, out_dir, tokenizer_dir)
    barrier()
    return out


def _run_tokenizer_settings(ckpt: Path) -> dict[str, Any]:
    """The ``tokenizer`` section of a checkpoint's ``config.yaml`` (empty when absent)."""
    path = ckpt / sharded.RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    cfg = yaml.safe_load(path.read_text())
    return (cfg.get("tokenizer") or {}) if isinstance(cfg, dict) else {}


def _export_checkpoint(
    ckpt: Path, out_dir: Path, tokenizer_dir: str | Path | None, dtype: torch.dtype | None
) -> Path | None:
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
        eos_token=_run_tokenizer_settings(ckpt).get("eos_token"),
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
