"""Evaluation through rlp's own megatron model and KV-cache sampler, with tensor parallelism.

This module owns the Megatron backend of the runner's ``generate_fn`` contract
(``generate_fn(prompts, num_samples, temperature, max_new_tokens, seed) -> list[list[str]]``,
see :mod:`rlp.eval.runner`): :func:`load_megatron_generate_fn` builds a
:class:`MegatronGenerator` from

* a **Hugging Face model directory** (``config.json`` ->
  :func:`rlp.model.hf_mapping.hf_to_model_config` -> :func:`rlp.model.build.build_model` ->
  :func:`rlp.model.hf_bridge.load_hf_into_model`), or
* an **rlp checkpoint** (a step directory or a checkpoints root: its newest complete step). The
  model config comes from the checkpoint's ``metadata.json`` (else its ``config.yaml``), the
  tokenizer from its ``tokenizer/`` directory (else ``tokenizer.path`` of ``config.yaml``), and the
  weights are loaded with :func:`rlp.model.sharded.load_checkpoint` (resharded to any TP size,
  tokenizer hash checked).

Generation matches the Hugging Face path (:class:`rlp.eval.generation.HFGenerator`) on the same
weights: prompts are tokenized by the same ``transformers`` tokenizer call (special tokens such
as BOS added exactly as ``tokenizer(prompt)`` adds them, no chat template, cut from the left to
fit ``max_position_embeddings - max_new_tokens``), completions decoded with
``skip_special_tokens=True``, temperature 0 is greedy (one row per prompt, repeated), sampling is
plain temperature sampling (``top_p = 1``, no top-k), generation stops at EOS (every id of the
model's ``generation_config``) and at the stop strings. Greedy text equals the HF path's up to
float rounding of the logits (``tests/unit/test_eval_megatron.py``).

Batching: the prompts of a call are decoded together by a rollout engine
(:func:`rlp.model.engine.build_engine`; by default the cascade engine, which prefills each
prompt at its own length, stores its KV once for its ``num_samples`` rows and decodes the
ragged batch in about ``max_new_tokens`` steps whatever the prompt lengths; models it cannot
drive fall back to the reference :class:`rlp.model.sampler.Sampler`). ``max_batch_rows`` caps
the rows decoded together (default: all). The prompts of a call, sorted by length, are split
where two neighbours differ by more than ``bucket_gap`` tokens (default: the call's
``max_new_tokens``, so a call is nearly always one batch). The split matters for the reference
sampler only: it feeds the longer prompts' remaining tokens through decode steps, so a batch
costs about ``spread + max_new_tokens`` steps there. Batch ``i > 0`` of a call samples with a
seed derived from ``(seed, i)``.

Stop strings are matched twice. A stop string that tokenizes *stably* (see
:func:`token_stop_sequences`; e.g. ``"\\n\\nProblem:"`` for byte-level BPE) also becomes a
token stop sequence of the sampler, which ends that row early; this is only an optimisation.
Every decoded completion is then cut with :func:`rlp.eval.prompts.truncate_at_stop`, so the text
never depends on whether the token-level match fired.

Tensor parallelism: every TP rank must make the same sampler calls. Global rank 0 (the
*leader*) runs the evaluation loop; each call tokenizes and checks the prompts, then broadcasts
the ids and sampling arguments, and the other ranks (the *followers*) sit in
:meth:`MegatronGenerator.serve`, running the same sampler call until
:meth:`MegatronGenerator.close` tells them to stop. Only the leader decodes, scores and writes
files. The world size must equal ``tp`` (one model replica).

Randomness: the sampler draws from a generator seeded by the batch seed and its bucket, so equal
calls give equal outputs and TP=1 and TP=2 draw the same samples.

Teacher forcing (for the reasoning-quality measurements and the lm-evaluation-harness adapter):
:meth:`MegatronGenerator.score` returns per-token log-probs of given token sequences through the
library's :func:`rlp.model.logprobs.score_sequences` (vocab-parallel cross entropy, no gathered
logits), :meth:`MegatronGenerator.argmax` the greedy next token at every position (logits
gathered over TP, as the sampler does). Both are requests of the same leader/follower protocol,
so they work under TP; micro-batches hold at most ``score_tokens`` padded tokens. ``__call__``
takes optional per-call ``stop_strings`` (lm-eval's ``until``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlp.eval.prompts import STOP_STRINGS, truncate_at_stop

logger = logging.getLogger(__name__)

_SAFETY_PREFIXES = ("x", "7.", "a)", "$ ", "\n", " ")
_SAFETY_SUFFIXES = ("", " A", "2", "\n")
"""Contexts in which a token stop sequence must decode to its stop string (no early cut)."""
_USUAL_PREFIXES = ("x", "7.", "a)")
_USUAL_SUFFIXES = ("", " A")
"""Ordinary text around a stop string, where it must tokenize as on its own to be useful."""


def megatron_available() -> bool:
    """Whether megatron-core imports (through :mod:`rlp.model`, the only place that uses it)."""
    try:
        import rlp.model.build  # noqa: F401
    except ImportError:
        return False
    return True


def token_stop_sequences(
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    stop_strings: Sequence[str],
) -> list[list[int]]:
    """Token sequences of the stop strings that tokenize stably, for the sampler's stop rule.

    ``encode``/``decode`` work without special tokens. A stop string ``s`` with ids
    ``t = encode(s)`` is kept when

    * it is *safe*: ``decode(t) == s`` and ``decode(encode(p) + t + encode(q)) == p + s + q`` for
      a set of contexts ``p``/``q``, so a row that ends in ``t`` has really written ``s`` (a
      SentencePiece tokenizer whose standalone encode starts with a space marker fails here);
    * it is *useful*: ``encode(p + s + q) == encode(p) + t + encode(q)`` after ordinary text, so
      a model that writes ``s`` the usual way emits ``t``.

    A miss only costs time (the row runs on to EOS or the cap); the text is the same, because
    every completion is cut with :func:`rlp.eval.prompts.truncate_at_stop` afterwards.
    """
    out: list[list[int]] = []
    for s in stop_strings:
        ids = encode(s)
        if not ids or decode(ids) != s or ids in out:
            continue
        safe = all(
            decode(encode(p) + ids + encode(q)) == p + s + q
            for p in _SAFETY_PREFIXES
            for q in _SAFETY_SUFFIXES
        )
        useful = all(
            encode(p + s + q) == encode(p) + ids + encode(q)
            for p in _USUAL_PREFIXES
            for q in _USUAL_SUFFIXES
        )
        if safe and useful:
            out.append(ids)
    return out


def split_at_gaps(lengths: Sequence[int], gap: int) -> list[list[int]]:
    """Prompt indices sorted by length, split where neighbouring lengths differ by > ``gap``."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for j, i in enumerate(order):
        if not groups or lengths[i] - lengths[order[j - 1]] > gap:
            groups.append([])
        groups[-1].append(i)
    return groups


def _group_seed(seed: int, group: int) -> int:
    """The seed of a call's ``group``-th decode batch (group 0 keeps ``seed``)."""
    if group == 0:
        return seed
    digest = hashlib.sha256(f"rlp-eval-group:{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class MegatronGenerator:
    """Callable ``generate_fn`` over a megatron ``GPTModel`` and an rlp rollout engine.

    Build it with :func:`load_megatron_generate_fn`. ``tokenizer`` is an
    :class:`rlp.tokenizer.Tokenizer`; its ``transformers`` tokenizer (``tokenizer.hf``) encodes
    prompts and decodes completions exactly as the HF path does. ``vocab_size`` is the model's
    unpadded vocabulary (prompt ids at or above it are refused), ``max_positions`` the model's
    position limit and ``eos_ids`` every id that ends a completion. ``max_batch_rows`` caps the
    rows decoded together (None = all rows of a call); ``bucket_gap`` is the prompt length gap
    that splits a call into separate decode batches (None = the call's ``max_new_tokens``).
    ``score_tokens`` bounds the padded tokens of one teacher-forced forward in :meth:`score` /
    :meth:`argmax` (the logits of that many tokens are held at once). With ``world_size > 1``
    the leader (``rank == 0``) is called and the other ranks run :meth:`serve` (see the module
    docstring).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        vocab_size: int,
        max_positions: int,
        eos_ids: Sequence[int],
        stop_strings: Sequence[str] = STOP_STRINGS,
        top_p: float = 1.0,
        max_batch_rows: int | None = None,
        bucket_gap: int | None = None,
        score_tokens: int = 4096,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not eos_ids:
            raise ValueError("eos_ids must name at least one end-of-sequence id")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.model = model
        self.tokenizer = tokenizer
        self.hf_tokenizer = tokenizer.hf
        self.vocab_size = vocab_size
        self.max_positions = max_positions
        self.eos_ids = list(dict.fromkeys(int(e) for e in eos_ids))
        self.stop_strings = tuple(stop_strings)
        self.top_p = top_p
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        if bucket_gap is not None and bucket_gap < 0:
            raise ValueError(f"bucket_gap must be >= 0 or None, got {bucket_gap}")
        self.max_batch_rows = max_batch_rows
        self.bucket_gap = bucket_gap
        self.rank = rank
        self.world_size = world_size
        self._closed = False
        if score_tokens < 1:
            raise ValueError(f"score_tokens must be >= 1, got {score_tokens}")
        self.score_tokens = score_tokens
        self._stop_cache: dict[tuple[str, ...], list[list[int]]] = {}
        self.token_stops = self._token_stops_for(self.stop_strings)
        model.eval()

    @property
    def is_leader(self) -> bool:
        """True on the rank that runs the evaluation loop (global rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ the generate_fn contract

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
        if not self.is_leader:
            raise RuntimeError(
                f"rank {self.rank} is a follower: only rank 0 calls the generator, the other "
                "ranks run MegatronGenerator.serve()"
            )
        if self._closed:
            raise RuntimeError("this MegatronGenerator was closed; load a new one")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        greedy = temperature == 0
        per_prompt = 1 if greedy else num_samples  # greedy samples are identical
        # Tokenized (and checked) here, so the followers only ever see valid sampler calls.
        ids = self.encode_prompts(prompts, max_new_tokens)
        stops = self.stop_strings if stop_strings is None else tuple(stop_strings)
        args = (ids, per_prompt, float(temperature), int(max_new_tokens), int(seed))
        payload = (args, self._token_stops_for(stops))
        self._broadcast(("generate", payload))
        sequences = self._generate_ids(*payload)
        texts = [
            truncate_at_stop(self.hf_tokenizer.decode(seq, skip_special_tokens=True), stops)
            for seq in sequences
        ]
        out = []
        for i in range(len(prompts)):
            row = texts[i * per_prompt : (i + 1) * per_prompt]
            out.append(row * num_samples if greedy else row)
        return out

    def serve(self) -> int:
        """Follower loop: run what the leader asks (generate, score, argmax) until it closes;
        returns the leader's exit code."""
        if self.is_leader:
            raise RuntimeError("serve() runs on the follower ranks (rank != 0) only")
        while True:
            kind, payload = self._broadcast(None)
            if kind == "stop":
                self._closed = True
                return int(payload)
            if kind == "generate":
                self._generate_ids(*payload)
            elif kind == "score":
                self._score(payload)
            elif kind == "argmax":
                self._argmax(payload)
            else:
                raise RuntimeError(f"unknown request {kind!r} from the leader")

    def close(self, exit_code: int = 0) -> None:
        """Leader: release the followers from :meth:`serve` (they return ``exit_code``).

        Idempotent; a no-op in a single process.
        """
        if self.is_leader and not self._closed:
            self._closed = True
            self._broadcast(("stop", int(exit_code)))

    def _broadcast(self, message: Any) -> Any:
        if self.world_size == 1:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special=True`` adds what ``tokenizer(text)`` adds (BOS)."""
        return [int(t) for t in self.hf_tokenizer(text, add_special_tokens=special)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped, as completions are decoded)."""
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ teacher forcing

    def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced ``log p(seq[j + 1] | seq[: j + 1])`` per sequence (``len - 1`` values),
        through :func:`rlp.model.logprobs.score_sequences` (collective over TP)."""
        seqs = self._checked_sequences(sequences)
        self._broadcast(("score", seqs))
        return self._score(seqs)

    def argmax(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """The greedy next token after every prefix ``seq[: j + 1]`` (``len - 1`` ids per
        sequence), from the TP-gathered logits (collective over TP)."""
        seqs = self._checked_sequences(sequences)
        self._broadcast(("argmax", seqs))
        return self._argmax(seqs)

    def _checked_sequences(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        if not self.is_leader:
            raise RuntimeError(f"rank {self.rank} is a follower: only rank 0 calls score()")
        if self._closed:
            raise RuntimeError("this MegatronGenerator was closed; load a new one")
        seqs = [[int(t) for t in seq] for seq in sequences]
        for i, seq in enumerate(seqs):
            if len(seq) < 2:
                raise ValueError(f"sequence {i} has {len(seq)} tokens; scoring needs >= 2")
            if len(seq) > self.max_positions + 1:
                raise ValueError(
                    f"sequence {i} has {len(seq)} tokens; the model reads at most "
                    f"{self.max_positions} (plus the last, predicted one); cut it first"
                )
            if max(seq) >= self.vocab_size or min(seq) < 0:
                raise ValueError(f"sequence {i} has ids outside the {self.vocab_size}-token vocab")
        return seqs

    def _micro_batches(self, seqs: Sequence[Sequence[int]]) -> list[list[int]]:
        """Indices of ``seqs``, longest first, in groups of at most ``score_tokens`` padded
        tokens (at least one row each)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * len(seqs[groups[-1][0]]) <= self.score_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _score(self, seqs: list[list[int]]) -> list[list[float]]:
        from rlp.model.logprobs import score_sequences

        device = next(self.model.parameters()).device
        out: list[list[float]] = [[] for _ in seqs]
        with torch.no_grad():
            for group in self._micro_batches(seqs):
                logps = score_sequences(
                    self.model,
                    [seqs[i] for i in group],
                    micro_batch=len(group),
                    pad_id=self.tokenizer.pad_id,
                    device=device,
                )
                for i, lp in zip(group, logps):
                    out[i] = lp.double().tolist()
        return out

    def _argmax(self, seqs: list[list[int]]) -> list[list[int]]:
        from rlp.model.logprobs import pad_sequences

        device = next(self.model.parameters()).device
        out: list[list[int]] = [[] for _ in seqs]
        with torch.no_grad():
            for group in self._micro_batches(seqs):
                inputs, _, _ = pad_sequences(
                    [seqs[i] for i in group], self.tokenizer.pad_id, device
                )
                b, s = inputs.shape
                pos = torch.arange(s, device=device).expand(b, s)
                logits = self.model(inputs, pos, None, runtime_gather_output=True)  # [b, s, V]
                best = logits.argmax(dim=-1).tolist()
                for row, i in enumerate(group):
                    out[i] = best[row][: len(seqs[i]) - 1]
        return out

    # ------------------------------------------------------------------ generation

    def _token_stops_for(self, stop_strings: tuple[str, ...]) -> list[list[int]]:
        """Token stop sequences of ``stop_strings`` (cached per tuple)."""
        if stop_strings not in self._stop_cache:
            self._stop_cache[stop_strings] = token_stop_sequences(
                lambda s: list(self.hf_tokenizer.encode(s, add_special_tokens=False)),
                lambda ids: self.hf_tokenizer.decode(ids),
                stop_strings,
            )
        return self._stop_cache[stop_strings]

    def _generate_ids(self, args: tuple[Any, ...], token_stops: list[list[int]]) -> list[list[int]]:
        """:meth:`_sample` with this call's token stop sequences (same on every rank)."""
        saved = self.token_stops
        self.token_stops = token_stops
        try:
            return self._sample(*args)
        finally:
            self.token_stops = saved

    def encode_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Prompt ids as the HF path builds them (special tokens added, cut from the left to
        leave ``max_new_tokens`` positions)."""
        max_len = self.max_positions - max_new_tokens
        if max_len < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} does not fit the model's {self.max_positions} "
                "positions; lower --max-new-tokens"
            )
        tok = self.hf_tokenizer
        side = tok.truncation_side
        tok.truncation_side = "left"
        try:
            enc = tok(list(prompts), add_special_tokens=True, truncation=True, max_length=max_len)
        finally:
            tok.truncation_side = side
        ids = [list(map(int, x)) for x in enc["input_ids"]]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompt {i} tokenizes to no tokens; it needs some text")
            if len(row) >= max_len:
                logger.warning(
                    "a prompt was cut from the left to %d tokens to fit the model", max_len
                )
            bad = [t for t in row if t >= self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {i} contains token ids {sorted(set(bad))[:4]} outside the model's "
                    f"{self.vocab_size}-token vocabulary (special tokens the tokenizer added, "
                    "such as <think>, that the model was not trained with); remove them from the "
                    "prompt or evaluate a checkpoint trained with this tokenizer"
                )
        return ids

    def _sample(
        self,
        ids: list[list[int]],
        per_prompt: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[int]]:
        """Generated ids of ``per_prompt`` rows per prompt, prompt-major (collective over TP)."""
        from rlp.model.engine import build_engine
        from rlp.model.sampler import SamplingParams

        greedy = temperature == 0
        params = SamplingParams(
            temperature=temperature,
            top_p=1.0 if greedy else self.top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            stop_sequences=[*self.token_stops, *([e] for e in self.eos_ids[1:])],
            eos_id=self.eos_ids[0],
            pad_id=self.tokenizer.pad_id,
        )
        gap = max_new_tokens if self.bucket_gap is None else self.bucket_gap
        lengths = [len(x) for x in ids]
        sequences: list[list[int]] = [[] for _ in range(len(ids) * per_prompt)]
        engine = build_engine(
            self.model, max_batch_rows=self.max_batch_rows, max_prompt_spread=max(lengths)
        )
        for g, group in enumerate(split_at_gaps(lengths, gap)):
            # Within a group every prompt shares one decode loop (rows permitting).
            batch = engine.generate(
                [ids[i] for i in group], per_prompt, params, _group_seed(seed, g)
            )
            for row, seq in enumerate(batch.sequences()):
                p, k = divmod(row, per_prompt)
                sequences[group[p] * per_prompt + k] = seq
        return sequences

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Destroy megatron's groups and the process group (end of a multi-process launch).

        Collective. Call it on every rank after :meth:`close` / :meth:`serve`; single-process
        runs keep theirs (tests and notebooks build several models in one process).
        """
        if self.world_size > 1:
            from rlp.dist import shutdown
            from rlp.model.parallel import destroy_model_parallel

            destroy_model_parallel()
            shutdown()


# --------------------------------------------------------------------------------------------
# Loading


def _eos_ids(dirs: Sequence[Path], tokenizer: Any) -> list[int]:
    """EOS ids as transformers' ``model.generation_config`` has them: ``generation_config.json``
    first, then ``config.json``, then the tokenizer's EOS."""
    for name in ("generation_config.json", "config.json"):
        for d in dirs:
            f = d / name
            if not f.is_file():
                continue
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
            if eos is not None:
                return [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return [int(tokenizer.eos_id)]


def _read_yaml_sections(path: Path) -> dict[str, Any]:
    import yaml

    f = path / "config.yaml"
    if not f.is_file():
        return {}
    raw = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    return raw if isinstance(raw, dict) else {}


def _model_config(raw: dict[str, Any], where: str) -> Any:
    from rlp.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise ValueError(f"{where}: the stored model config is unreadable ({e})") from None


def check_launch(tp: int) -> tuple[int, int]:
    """(rank, world size) of this launch; the world must be exactly one TP group."""
    from rlp.dist import detect_launch

    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    info = detect_launch()
    if info.world_size != tp:
        if info.world_size == 1:
            raise ValueError(
                f"--tp {tp} needs {tp} processes, one per tensor-parallel rank: launch with "
                f"`torchrun --nproc-per-node {tp} benchmarks/evaluate.py ... --tp {tp}` (or srun "
                f"with {tp} tasks), or pass --tp 1"
            )
        raise ValueError(
            f"this launch has {info.world_size} processes but --tp is {tp}: evaluation runs one "
            f"model replica, so start exactly --tp processes (torchrun --nproc-per-node {tp})"
        )
    return info.rank, info.world_size


def load_megatron_generate_fn(
    checkpoint: str | Path,
    tp: int = 1,
    seed: int = 0,
    *,
    device: str | None = None,
    dtype: str | None = None,
    stop_strings: Sequence[str] = STOP_STRINGS,
    top_p: float = 1.0,
    max_batch_rows: int | None = None,
    bucket_gap: int | None = None,
    score_tokens: int = 4096,
) -> MegatronGenerator:
    """Build a :class:`MegatronGenerator` from an HF model directory or an rlp checkpoint.

    Collective when ``tp > 1`` (every rank calls it; the launch must have exactly ``tp``
    processes). Initialises ``torch.distributed`` and megatron's parallel state unless they
    exist (same TP size). ``device``: ``None`` = CUDA when available, else CPU; ``"cpu"`` forces
    gloo on CPU. ``dtype``: ``"float32"`` / ``"bfloat16"``; ``None`` = bfloat16 on CUDA,
    float32 on CPU (as the HF path). ``max_batch_rows`` / ``bucket_gap`` / ``score_tokens``: see
    :class:`MegatronGenerator`. ``seed`` seeds initialisation only (the weights are then
    overwritten); every generate call samples with its own seed.
    """
    from rlp.config import ConfigError, ParallelConfig
    from rlp.model.build import build_model
    from rlp.model.hf_bridge import load_hf_into_model
    from rlp.model.hf_mapping import ConversionError, hf_to_model_config
    from rlp.model.sharded import CheckpointError, is_complete
    from rlp.tokenizer import TokenizerError

    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"--checkpoint {path} is not a directory; pass a Hugging Face model directory "
            "(with config.json) or an rlp checkpoint (a step_* directory or a checkpoints root)"
        )
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16 (or None for auto), got {dtype!r}")
    if device is not None and not device.startswith(("cpu", "cuda")):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    rank, world = check_launch(tp)
    hf_dir = (path / "config.json").is_file() and not is_complete(path)
    try:
        if hf_dir:
            model_cfg, vocab, tok_dir, cfg_sections = _hf_source(path, hf_to_model_config)
            eos_dirs = [path]
        else:
            path, model_cfg, vocab, tok_dir, cfg_sections = _rlp_source(path)
            eos_dirs = [tok_dir]
        tokenizer = _load_tokenizer(tok_dir, cfg_sections.get("tokenizer") or {})
        model_cfg = dataclasses.replace(model_cfg, params_dtype=dtype or "auto")
        heads, groups = model_cfg.num_attention_heads, model_cfg.num_query_groups
        if heads % tp or groups % tp:
            raise ValueError(
                f"--tp {tp} must divide the model's {heads} attention heads and {groups} "
                "key/value groups; pick a --tp that divides both"
            )
        backend = "auto" if device is None else ("gloo" if device == "cpu" else "nccl")
        model = _build(
            ParallelConfig(tp_size=tp, backend=backend), seed, model_cfg, vocab, build_model, device
        )
        if hf_dir:
            load_hf_into_model(model, path)
        else:
            from rlp.model.sharded import load_checkpoint
            from rlp.tokenizer import tokenizer_hash

            load_checkpoint(path, model=model, tokenizer_hash=tokenizer_hash(tok_dir))
    except (CheckpointError, ConversionError, ConfigError, TokenizerError) as e:
        raise ValueError(f"--checkpoint {path}: {e}") from None
    return MegatronGenerator(
        model,
        tokenizer,
        vocab_size=vocab,
        max_positions=model_cfg.max_position_embeddings,
        eos_ids=_eos_ids(eos_dirs, tokenizer),
        stop_strings=stop_strings,
        top_p=top_p,
        max_batch_rows=max_batch_rows,
        bucket_gap=bucket_gap,
        score_tokens=score_tokens,
        rank=rank,
        world_size=world,
    )


def _hf_source(path: Path, hf_to_model_config: Callable[[Any], Any]) -> tuple[Any, ...]:
    from rlp.model.hf_files import read_hf_config

    model_cfg = hf_to_model_config(read_hf_config(path))
    return model_cfg, int(model_cfg.vocab_size), path, {}


def _rlp_source(path: Path) -> tuple[Any, ...]:
    from rlp.model.sharded import (
        METADATA_FILE,
        TOKENIZER_SUBDIR,
        is_complete,
        list_checkpoints,
        read_metadata,
        resolve_checkpoint,
    )

    if not is_complete(path) and not list_checkpoints(path) and not (path / "dist").is_dir():
        raise FileNotFoundError(
            f"--checkpoint {path} has no config.json (not a Hugging Face model directory) and is "
            f"not an rlp checkpoint (no {METADATA_FILE} + COMPLETE marker, no complete step_* "
            "directories); pass an HF model directory or an rlp checkpoint"
        )
    ckpt = resolve_checkpoint(path)
    meta = read_metadata(ckpt)
    sections = _read_yaml_sections(ckpt)
    raw_model = meta.get("model_config") or sections.get("model")
    if not raw_model:
        raise ValueError(
            f"{ckpt} records no model config (metadata.json model_config or config.yaml model:); "
            "it cannot be rebuilt for evaluation"
        )
    model_cfg = _model_config(raw_model, str(ckpt))
    vocab = meta.get("vocab_size") or model_cfg.vocab_size
    if not vocab:
        raise ValueError(f"{ckpt}/{METADATA_FILE} records no vocab_size")
    tok_dir = ckpt / TOKENIZER_SUBDIR
    if not tok_dir.is_dir():
        configured = (sections.get("tokenizer") or {}).get("path")
        if not configured or not Path(configured).exists():
            raise ValueError(
                f"{ckpt} has no {TOKENIZER_SUBDIR}/ directory and its config.yaml names no "
                f"existing tokenizer.path ({configured!r}); copy the run's tokenizer files into "
                f"{tok_dir}"
            )
        tok_dir = Path(configured)
    return ckpt, model_cfg, int(vocab), tok_dir, sections


def _load_tokenizer(tok_dir: Path, tok_section: dict[str, Any]) -> Any:
    from rlp.tokenizer import load_tokenizer

    keys = ("think_open", "think_close", "eos_token")
    kw = {k: tok_section[k] for k in keys if tok_section.get(k)}
    return load_tokenizer(tok_dir, **kw)


def _build(
    parallel_cfg: Any,
    seed: int,
    model_cfg: Any,
    vocab: int,
    build_model: Callable,
    device: str | None,
) -> torch.nn.Module:
    from rlp.dist import init_distributed
    from rlp.model.parallel import initialize_model_parallel

    env = init_distributed(parallel_cfg)
    if device is not None and env.device.type != torch.device(device).type:
        raise ValueError(
            f"device {device!r} was asked for, but torch.distributed already runs on "
            f"{env.device} ({env.backend})"
        )
    state = initialize_model_parallel(parallel_cfg, seed=seed, env=env)
    return build_model(model_cfg, vocab, state.device)
