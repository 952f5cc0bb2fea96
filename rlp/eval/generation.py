"""Model side of the evaluation: build a ``generate_fn`` from a checkpoint.

This module owns the one adapter between a checkpoint on disk and the runner's
``generate_fn(prompts, num_samples, temperature, max_new_tokens, seed) -> list[list[str]]``
contract (see :mod:`rlp.eval.runner`). With :mod:`rlp.eval.megatron_generation` it is the only
part of :mod:`rlp.eval` that touches torch / transformers, and it imports them lazily (the
megatron module is imported only when that backend is chosen).

The ``hf`` backend: a local **Hugging Face model directory** (``config.json`` + weights +
tokenizer files, as written by ``save_pretrained``), loaded with ``AutoModelForCausalLM`` and
``AutoTokenizer``. Generation is batched with left padding, greedy when ``temperature == 0`` and
plain temperature sampling otherwise (``top_p = 1``, ``top_k`` off, so the model's own
``generation_config`` cannot silently change the protocol), and stops at EOS or at the prompt
set's stop strings. It runs on CUDA when available (bf16) and on CPU otherwise (fp32).

The Megatron backend (rlp's own model and KV-cache sampler, tensor parallelism, HF directories
and rlp checkpoints) lives in :mod:`rlp.eval.megatron_generation`; :func:`load_generate_fn`
dispatches between the two (``backend="hf" | "megatron" | "auto"``).

Both generators also implement :class:`ChainModel` (tokenization, teacher-forced log-probs,
greedy tokens), which the faithfulness probes, the step information gain and the lm-eval
adapter use. The HF path scores with one forward and an fp32 ``log_softmax`` over its logits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from rlp.eval.prompts import STOP_STRINGS, truncate_at_stop

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rlp.eval.megatron_generation import MegatronGenerator

logger = logging.getLogger(__name__)


@runtime_checkable
class ChainModel(Protocol):
    """What the reasoning-quality measurements and the lm-eval adapter need from a loaded model.

    Both backends provide it (:class:`HFGenerator`, :class:`rlp.eval.megatron_generation.
    MegatronGenerator`): the ``generate_fn`` contract with optional per-call ``stop_strings``,
    tokenization as the generator tokenizes, and teacher-forced log-probs / greedy tokens of
    token sequences (``len(seq) - 1`` values each, for positions ``1..len-1``).
    """

    max_positions: int | None

    def __call__(
        self,
        prompts: list[str],
        num_samples: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
        *,
        stop_strings: Sequence[str] | None = None,
    ) -> list[list[str]]: ...

    def encode(self, text: str, *, special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]: ...

    def argmax(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]: ...


class HFGenerator:
    """Callable ``generate_fn`` over a Hugging Face causal LM (see the module docstring).

    ``batch_size`` bounds the number of *sequences* per ``model.generate`` call: a call with
    ``P`` prompts and ``n`` samples runs ``P * n`` sequences in chunks of ``batch_size``.
    Each call reseeds torch with its ``seed``, so equal calls give equal outputs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        stop_strings: Sequence[str] = STOP_STRINGS,
        top_p: float = 1.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_strings = tuple(stop_strings)
        self.top_p = top_p
        self.device = next(model.parameters()).device
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    "the tokenizer has neither a pad nor an eos token; add one "
                    "(tokenizer.pad_token = ...) and save it with the checkpoint"
                )
            tokenizer.pad_token = tokenizer.eos_token
        # EOS: the model's generation config may list several ids (e.g. end-of-text and
        # end-of-turn); fall back to the tokenizer's.
        model_gen = getattr(model, "generation_config", None)
        model_eos = getattr(model_gen, "eos_token_id", None) if model_gen is not None else None
        self.eos_token_id: int | list[int] | None = (
            model_eos if model_eos is not None else tokenizer.eos_token_id
        )
        max_pos = getattr(model.config, "max_position_embeddings", None)
        self.max_positions: int | None = int(max_pos) if max_pos else None

    def __call__(
        self,
        prompts: list[str],
        num_samples: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
        *,
        stop_strings: Sequence[str] | None = None,
    ) -> list[list[str]]:
        """The ``generate_fn`` contract; ``stop_strings`` replaces the generator's stop strings
        for this call (``None``: the ones it was built with)."""
        import torch

        stops = self.stop_strings if stop_strings is None else tuple(stop_strings)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        greedy = temperature == 0
        # Greedy samples are identical: generate once per prompt and repeat.
        per_prompt = 1 if greedy else num_samples
        sequences = [p for p in prompts for _ in range(per_prompt)]
        torch.manual_seed(seed)
        texts: list[str] = []
        for start in range(0, len(sequences), self.batch_size):
            texts.extend(
                self._generate_chunk(
                    sequences[start : start + self.batch_size],
                    greedy,
                    temperature,
                    max_new_tokens,
                    stops,
                )
            )
        out: list[list[str]] = []
        for i in range(len(prompts)):
            row = texts[i * per_prompt : (i + 1) * per_prompt]
            out.append(row * num_samples if greedy else row)
        return out

    def _generate_chunk(
        self,
        prompts: list[str],
        greedy: bool,
        temperature: float,
        max_new_tokens: int,
        stops: tuple[str, ...],
    ) -> list[str]:
        import torch
        from transformers import GenerationConfig

        max_len = None
        if self.max_positions is not None:
            max_len = self.max_positions - max_new_tokens
            if max_len < 1:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} does not fit the model's "
                    f"{self.max_positions} positions; lower --max-new-tokens"
                )
        self.tokenizer.truncation_side = "left"
        enc = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=max_len is not None,
            max_length=max_len,
            add_special_tokens=True,
        )
        if max_len is not None and enc["input_ids"].shape[1] >= max_len:
            logger.warning("a prompt was cut from the left to %d tokens to fit the model", max_len)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        # transformers fills every field left at None from the model's own generation_config,
        # so each knob that shapes the distribution is set explicitly (neutral where unused).
        sampling: dict[str, Any] = {}
        if not greedy:
            sampling = {
                "temperature": temperature,
                "top_p": self.top_p,
                "top_k": 0,
                "min_p": 0.0,
                "typical_p": 1.0,
            }
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_token_id,
            stop_strings=list(stops) or None,
            **sampling,
        )
        with torch.inference_mode():
            generated = self.model.generate(
                **enc, generation_config=config, tokenizer=self.tokenizer
            )
        new_tokens = generated[:, enc["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, stops) for t in decoded]

    # ------------------------------------------------------------------ tokens, teacher forcing

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special=True`` adds what ``tokenizer(text)`` adds (BOS)."""
        return [int(t) for t in self.tokenizer(text, add_special_tokens=special)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped, as completions are decoded)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced ``log p(seq[j + 1] | seq[: j + 1])`` per sequence (``len - 1`` values):
        fp32 ``log_softmax`` of the model's logits."""
        return [lp for lp, _ in self._forward(sequences)]

    def argmax(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """The greedy next token after every prefix ``seq[: j + 1]`` (``len - 1`` ids)."""
        return [best for _, best in self._forward(sequences)]

    def _forward(self, sequences: Sequence[Sequence[int]]) -> list[tuple[list[float], list[int]]]:
        import torch

        seqs = [[int(t) for t in seq] for seq in sequences]
        for i, seq in enumerate(seqs):
            if len(seq) < 2:
                raise ValueError(f"sequence {i} has {len(seq)} tokens; scoring needs >= 2")
            if self.max_positions is not None and len(seq) > self.max_positions + 1:
                raise ValueError(
                    f"sequence {i} has {len(seq)} tokens; the model reads at most "
                    f"{self.max_positions} (plus the last, predicted one); cut it first"
                )
        out: list[tuple[list[float], list[int]]] = [([], []) for _ in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = len(seqs[rows[0]])
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = logp.gather(-1, ids[:, 1:, None])[..., 0]
            best = logits[:, :-1].argmax(dim=-1)
            for r, i in enumerate(rows):
                n = len(seqs[i]) - 1
                out[i] = (target[r, :n].double().tolist(), best[r, :n].tolist())
        return out


BACKENDS = ("auto", "megatron", "hf")
"""``auto`` = ``megatron`` when megatron-core imports, else ``hf``."""


def resolve_backend(backend: str) -> str:
    """``megatron`` or ``hf`` for a :data:`BACKENDS` name (``auto`` tries to import megatron)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    from rlp.eval.megatron_generation import megatron_available

    return "megatron" if megatron_available() else "hf"


def load_generate_fn(
    checkpoint: str | Path,
    tp: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    *,
    device: str | None = None,
    dtype: str | None = None,
    stop_strings: Sequence[str] = STOP_STRINGS,
    top_p: float = 1.0,
    backend: str = "hf",
    max_batch_rows: int | None = None,
    score_tokens: int = 4096,
) -> HFGenerator | MegatronGenerator:
    """Build the runner's ``generate_fn`` from a checkpoint with the chosen ``backend``.

    ``backend="hf"`` (the default, for backward compatibility): a local Hugging Face model
    directory through transformers (:class:`HFGenerator`); ``tp`` must be 1 and ``batch_size``
    bounds the sequences per ``generate`` call. ``backend="megatron"``: an HF directory or an
    rlp checkpoint through rlp's model and sampler
    (:func:`rlp.eval.megatron_generation.load_megatron_generate_fn`), with ``tp`` ranks
    (``torchrun --nproc-per-node tp``); all prompts of a call are decoded together, at most
    ``max_batch_rows`` rows at a time (``batch_size`` is not used), and teacher-forced scoring
    holds at most ``score_tokens`` padded tokens per forward (the hf backend scores
    ``batch_size`` sequences per forward). ``backend="auto"``: megatron when megatron-core
    imports, else hf.

    ``seed`` seeds torch before loading; every generate call then samples with its own seed.
    ``device`` defaults to ``cuda`` when available, else ``cpu``; ``dtype`` to ``bfloat16`` on
    CUDA and ``float32`` on CPU.
    """
    if resolve_backend(backend) == "megatron":
        from rlp.eval.megatron_generation import load_megatron_generate_fn

        return load_megatron_generate_fn(
            checkpoint,
            tp,
            seed,
            device=device,
            dtype=dtype,
            stop_strings=stop_strings,
            top_p=top_p,
            max_batch_rows=max_batch_rows,
            score_tokens=score_tokens,
        )
    return _load_hf_generate_fn(
        checkpoint,
        tp,
        batch_size,
        seed,
        device=device,
        dtype=dtype,
        stop_strings=stop_strings,
        top_p=top_p,
    )


def _load_hf_generate_fn(
    checkpoint: str | Path,
    tp: int,
    batch_size: int,
    seed: int,
    *,
    device: str | None,
    dtype: str | None,
    stop_strings: Sequence[str],
    top_p: float,
) -> HFGenerator:
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"--checkpoint {path} is not a directory; pass a Hugging Face "
            "model directory (with config.json) written by save_pretrained"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--checkpoint {path} has no config.json, so it is not a Hugging Face model "
            "directory. Evaluate an rlp (Megatron) checkpoint with --backend megatron, or "
            "export it with `rlp convert mcore-to-hf` and pass that directory."
        )
    if tp != 1:
        raise ValueError(
            f"--tp {tp}: the Hugging Face backend runs the model on one device; "
            "pass --tp 1, or use --backend megatron for tensor parallelism"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = (
        getattr(torch, dtype)
        if dtype
        else (torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(dev)
    model.eval()
    return HFGenerator(
        model, tokenizer, batch_size=batch_size, stop_strings=stop_strings, top_p=top_p
    )
