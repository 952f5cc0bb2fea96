"""Hugging Face model directories on disk: weights, configs and tokenizer files, read and written.

No megatron here. Writing uses ``huggingface_hub.save_torch_state_dict`` (safetensors, sharded with
a ``model.safetensors.index.json`` above ``max_shard_size``, the layout transformers writes and
reads). The special-token ids written into ``config.json`` and ``generation_config.json`` are the
tokenizer's own (:func:`tokenizer_token_ids`), so ``generate`` stops at the model's real EOS.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rlp.model.hf_mapping import TOKEN_ID_FIELDS, ConversionError

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
"""Files copied with a tokenizer (never weights or ``config.json``, so a model dir can serve).
The first eight decide the token ids (:func:`has_tokenizer_files`)."""

MAX_SHARD_SIZE = "4GB"
"""safetensors file size cap of exported models (like transformers' sharded saves)."""


def has_tokenizer_files(directory: str | Path | None) -> bool:
    """Whether ``directory`` holds the files of a tokenizer (not only a chat template)."""
    path = Path(directory) if directory else None
    return path is not None and any((path / name).is_file() for name in TOKENIZER_FILES[:8])


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
    """The weights of an HF model directory (safetensors, sharded or not, or ``.bin`` loaded with
    ``weights_only=True``: tensors only, nothing executes)."""
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


def tokenizer_token_ids(
    tokenizer_dir: str | Path, eos_token: str | None = None
) -> dict[str, int | None]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a tokenizer as rlp resolves
    them (:func:`rlp.tokenizer.load_tokenizer`; ``eos_token`` is the run's
    ``tokenizer.eos_token`` override). A tokenizer rlp cannot train with (no EOS at all) gives
    its own declared ids; any id the tokenizer lacks is None."""
    from rlp.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(str(tokenizer_dir), eos_token=eos_token)
    except TokenizerError:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        return {name: getattr(hf, name, None) for name in TOKEN_ID_FIELDS}
    bos = tok.hf.bos_token_id
    return {"bos_token_id": bos, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def write_generation_config(out_dir: str | Path, token_ids: Mapping[str, int | None]) -> Path:
    """``generation_config.json`` with ``token_ids``; other settings of an existing one (e.g.
    copied with the tokenizer: sampling defaults) are kept."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    if (out / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(out))
    else:
        gen = GenerationConfig()
    for name in TOKEN_ID_FIELDS:
        setattr(gen, name, token_ids.get(name))
    gen.save_pretrained(str(out))
    return out / "generation_config.json"


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor that covers its whole storage (safetensors refuses views,
    e.g. the unpadded rows of a padded embedding)."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def save_hf_dir(
    hf_state: Mapping[str, torch.Tensor],
    hf_config: Any,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Write safetensors (sharded above ``max_shard_size``), ``config.json``, the tokenizer files
    and a ``generation_config.json`` carrying ``hf_config``'s bos/eos/pad ids."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: _own_storage(t.detach().cpu()) for k, t in hf_state.items()}
    save_torch_state_dict(state, str(out), max_shard_size=max_shard_size, metadata={"format": "pt"})
    hf_config.save_pretrained(str(out))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    write_generation_config(out, {k: getattr(hf_config, k, None) for k in TOKEN_ID_FIELDS})
    return out
