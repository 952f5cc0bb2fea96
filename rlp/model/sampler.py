"""Autoregressive sampling on the live training weights: megatron's static KV cache, batched.

This module owns generation for rollouts: :class:`SamplingParams` (the distribution and the stop
rules), :class:`SampleBatch` (what comes back) and :class:`Sampler` (the decode loop). It calls
``GPTModel.forward`` directly (``docs/megatron-core.md`` §5, "custom KV-cache loop").

Layout and ragged prompts
    Prompts are sorted by length and grouped into *buckets* (at most ``max_batch_rows`` rows and
    at most ``max_prompt_spread`` tokens between the shortest and longest prompt). Within a bucket
    every row keeps its tokens at their true positions ``0..L_i-1`` (right padding, no masks): the
    shared ``L_min`` tokens are prefilled in one forward, and each longer prompt's remaining
    tokens are fed through the ordinary decode steps, *forced* instead of sampled (Megatron's
    static engine does the same). Left padding would need a padding mask in every decode step,
    which transformer-engine attention ignores (it runs decode with ``attn_mask_type=no_mask``),
    and would shift RoPE positions away from the teacher-forced recompute. The cost of this
    choice is at most ``max_prompt_spread`` extra decode steps per bucket, and one generation
    pass per bucket.

Sharing the prefix
    A bucket's ``P`` prompts are prefilled once (batch ``P``); the KV cache of every layer is then
    repeated ``num_samples`` times along batch. Rows are prompt-major: row ``p * G + g``.

Log-probs (``SamplingParams.logprob_mode``)
    ``"raw"`` (default) records log p(token) under the *unmodified* model distribution at
    temperature 1 over the full vocabulary: no temperature, top-k/top-p or ``forbid_first``. It
    equals a teacher-forced recompute with the same weights (``rlp.model.logprobs``), which is
    what the RLP importance ratio and the log-prob consistency metric compare against (TRL #3867,
    verl #2953 recorded temperature-scaled values and got ratios of 2). ``"tempered"`` records
    ``log_softmax(logits / T)`` over the full vocabulary (no top-k/top-p/``forbid_first``): it
    equals a teacher-forced recompute at the sampling temperature ``T`` (at ``T = 0``, greedy,
    it equals ``"raw"``). ``"processed"`` records the log-prob under the distribution actually
    sampled from (0 for greedy).

Randomness and parallelism
    ``Sampler(noise="generator")`` (default): one ``torch.Generator`` per bucket, seeded from
    ``(seed, dp_rank, bucket ordinal)``: identical on every TP rank, different across DP ranks.
    Each step draws exponential noise for all rows of the bucket in a fixed order and takes
    ``argmax(probs / noise)`` (an exact categorical draw). The draws therefore depend only on the
    seed and the bucket layout, not on which rows are still running, on the KV cache, or on
    prefix sharing: prompt ``p`` with ``G`` samples draws exactly what ``G`` copies of ``p`` with
    one sample each draw. ``Sampler(noise="keyed")`` uses :class:`KeyedNoise` instead: counter-
    based noise hashed from ``(seed, dp_rank, prompt index, sample index, generation step, token
    id)``, which does not depend on buckets or batch layout at all and is what
    :mod:`rlp.model.cascade` draws, so both engines sample identical tokens. Logits are
    gathered over TP inside the output layer (``runtime_gather_output=True``; the vocabulary is
    small next to the activations at decode), so all TP ranks sample identical tokens and stop
    at the same step. Padded vocabulary rows carry a -1e4 logit (``rlp.model.build``), so they
    are never sampled and do not shift the log-probs.

Throughput
    Per step, the Python work is independent of the batch size; the only host sync is one
    scalar (rows still running). When half of the running rows have finished, the KV cache is
    compacted to the rest. Sampling runs under ``torch.no_grad`` (not ``inference_mode``: cached
    tensors such as RoPE tables or CPU causal masks would otherwise be inference tensors that
    autograd refuses later), in eval mode, with the rotary-embedding cache cleared on both sides.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from rlp.model.build import unwrap

LogprobMode = Literal["raw", "tempered", "processed"]
NoiseMode = Literal["generator", "keyed"]


@dataclass
class SamplingParams:
    """The sampling distribution and the stop rules of one :meth:`Sampler.sample` call."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax, no randomness)."""
    top_p: float = 1.0
    """Nucleus sampling: smallest set of tokens with at least this mass; 1.0 disables."""
    top_k: int = 0
    """Keep the k most likely tokens (ties kept); 0 disables."""
    max_new_tokens: int = 256
    """Cap on generated tokens per row (stop sequences included)."""
    stop_sequences: list[list[int]] = field(default_factory=list)
    """Token sequences that end a row when they appear at the end of its generated tokens (the
    sequence is kept in the output). Matched on generated tokens only, never on the prompt."""
    eos_id: int | None = None
    """End-of-sequence id: a one-token stop sequence."""
    forbid_first: list[int] = field(default_factory=list)
    """Ids that may not be the first generated token (RLP: no empty thought)."""
    logprob_mode: LogprobMode = "raw"
    """Recorded log-prob: ``raw`` = unmodified model at temperature 1 (equals a teacher-forced
    recompute); ``tempered`` = ``log_softmax(logits / temperature)`` over the full vocabulary, no
    top-k/top-p/forbid-first (equals a teacher-forced recompute at that temperature; ``raw`` when
    greedy); ``processed`` = the distribution actually sampled from."""
    pad_id: int = 0
    """Id written after the end of each row in :attr:`SampleBatch.tokens`."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field to change."""
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("SamplingParams.stop_sequences must not contain an empty sequence")
        if self.logprob_mode not in ("raw", "tempered", "processed"):
            raise ValueError(
                f"SamplingParams.logprob_mode must be 'raw', 'tempered' or 'processed', "
                f"got {self.logprob_mode!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class SampleBatch:
    """Generated continuations, one row per sample, prompt-major (row = prompt * G + sample)."""

    tokens: torch.Tensor  # [n, T] int64, right-padded with pad_id; T = max(lengths)
    logprobs: torch.Tensor  # [n, T] fp32 behaviour log-prob of each token (0 on padding)
    lengths: torch.Tensor  # [n] int64 generated tokens (a matched stop sequence included)
    stopped: torch.Tensor  # [n] bool: True = stop sequence / EOS, False = hit max_new_tokens
    prompt_index: torch.Tensor  # [n] int64 index into the ``prompts`` argument

    @property
    def num_rows(self) -> int:
        return self.tokens.size(0)

    def sequences(self) -> list[list[int]]:
        """Generated ids of every row without padding (host lists)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


# --------------------------------------------------------------------------------------------
# Logit processing (pure tensor functions)


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    first: torch.Tensor | None = None,
    forbid_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of the distribution to sample from: forbid-first, temperature, top-k, top-p.

    ``logits`` [a, V] (any float dtype), ``first`` [a] bool (rows at their first generated
    token) -> [a, V] fp32 with excluded tokens at ``-inf``. ``forbid_ids`` [f] is
    ``params.forbid_first`` already on the device (built here when omitted; the decode loop
    passes it to avoid a host-to-device copy per step). Greedy (temperature 0) skips the
    scaling and truncation: only the argmax matters.
    """
    x = logits.float().clone()
    if params.forbid_first and first is not None:
        if forbid_ids is None:
            forbid_ids = torch.tensor(params.forbid_first, dtype=torch.long, device=x.device)
        # where() instead of `if first.any()`: no host sync.
        x[:, forbid_ids] = torch.where(first[:, None], float("-inf"), x[:, forbid_ids])
    if params.greedy:
        return x
    x.div_(params.temperature)
    vocab = x.size(-1)
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]
        x.masked_fill_(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top one always stays).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        x.masked_fill_(drop, float("-inf"))
    return x


def draw_tokens(processed: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Sample one id per row: ``argmax(softmax(processed) / noise)`` with Exp(1) noise.

    ``processed`` [a, V] fp32, ``noise`` [a, V] fp32 (None = greedy argmax) -> [a] int64. The
    exponential race is an exact categorical draw with a fixed number of random numbers per
    row, so rows never affect each other's stream.
    """
    if noise is None:
        return processed.argmax(dim=-1)
    probs = torch.softmax(processed, dim=-1)
    # exponential_ may return 0 on some backends; 0 / tiny keeps excluded tokens at 0.
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    first: torch.Tensor,
    noise: torch.Tensor | None,
    forbid_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's choice: ``logits`` [a, V] fp32, ``first`` [a] bool, ``noise`` [a, V]
    or None (greedy) -> (token ids [a] int64, recorded log-probs [a] fp32 per ``logprob_mode``).
    """
    processed = process_logits(logits, params, first, forbid_ids)
    tok = draw_tokens(processed, noise)
    if params.logprob_mode == "raw" or (params.logprob_mode == "tempered" and params.greedy):
        source = logits.float()
    elif params.logprob_mode == "tempered":
        source = logits.float() / params.temperature
    elif params.greedy:
        return tok, torch.zeros(tok.shape, dtype=torch.float32, device=tok.device)
    else:
        source = processed
    return tok, torch.log_softmax(source, dim=-1).gather(1, tok[:, None]).squeeze(1)


def sampling_generator(seed: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """Generator seeded from ``(seed, data-parallel rank, stream)``.

    Equal on all TP ranks of a replica, different across DP ranks (Megatron-LM PR #5983: equal
    seeds made DP replicas draw identical rollouts). The seed goes through SHA-256 so that
    nearby ``(seed, rank, stream)`` triples give unrelated streams.
    """
    digest = hashlib.sha256(f"rlp-sampler:{seed}:{data_parallel_rank()}:{stream}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen


def data_parallel_rank() -> int:
    """This process's data-parallel rank (0 before megatron's parallel state exists)."""
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_rank()
    return 0


# Odd 32-bit constants as signed int32 (torch has wrapping int32 multiplication, no uint32 maths).
_FMIX_M1 = 0x85EBCA6B - 2**32
_FMIX_M2 = 0xC2B2AE35 - 2**32
_GOLDEN = 0x9E3779B9 - 2**32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on an int32 tensor (wrapping arithmetic, logical shifts):
    a bijection of the 32-bit integers in which every output bit depends on every input bit."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _FMIX_M1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _FMIX_M2
    return x ^ ((x >> 16) & 0xFFFF)


def _counter(values: torch.Tensor, salt: int) -> torch.Tensor:
    """Well-mixed int32 key of each integer in ``values`` (any integer dtype) for field ``salt``."""
    return _fmix32(values.to(torch.int32) * _GOLDEN + salt)


class KeyedNoise:
    """Counter-based Exp(1) noise: one value per (seed, DP rank, prompt, sample, step, token id).

    The value for token ``v`` of sample ``g`` of prompt ``p`` at generation step ``t`` is a hash
    of those integers only (MurmurHash3 finaliser chain over int32 tensors, so it runs on any
    device, inside CUDA graphs, without host syncs). Draws therefore do not depend on batch
    layout, buckets, compaction or which other rows exist; they are identical on TP peers and
    differ across DP ranks (the rank is part of the seed key). ``u`` has 23 random bits,
    ``u = (m + 1/2) / 2^23``, so ``E = -log u`` lies in ``[6e-8, 16.6]`` and is never 0.
    """

    def __init__(self, seed: int, vocab: int, device: torch.device) -> None:
        digest = hashlib.sha256(f"rlp-noise:{seed}:{data_parallel_rank()}".encode()).digest()
        self.seed_key = int.from_bytes(digest[:4], "little", signed=True)
        self.vocab_keys = _counter(torch.arange(vocab, device=device), 4)  # [V] int32

    def row_keys(self, prompt_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        """int32 key [a] of each row from its prompt index and sample index ([a] integers)."""
        key = _fmix32(_counter(prompt_index, 1) ^ self.seed_key)
        return _fmix32(key ^ _counter(sample_index, 2))

    def __call__(self, row_keys: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
        """Exp(1) noise [a, V] fp32 for rows ``row_keys`` [a] at generation step ``step``
        (an int, or an integer tensor broadcastable to [a]: the row's generated-token index)."""
        if not isinstance(step, torch.Tensor):
            step = torch.tensor(step, device=row_keys.device)
        keys = _fmix32(row_keys ^ _counter(step, 3))  # [a]
        bits = _fmix32(keys[:, None] ^ self.vocab_keys[None, :])  # [a, V]
        u = ((bits >> 9) & 0x7FFFFF).float().add_(0.5).mul_(2.0**-23)
        return u.log_().neg_()


# --------------------------------------------------------------------------------------------
# Model mode and forwards


@contextlib.contextmanager
def sampling_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode + no_grad for the duration; restores every submodule's mode afterwards.

    Clears megatron's RoPE ``lru_cache`` on entry and exit so tables built for the inference
    sequence length (the KV cache size) do not linger into training (``docs/megatron-core.md`` §5).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    _clear_rotary_cache(model)
    try:
        with torch.no_grad():
            yield
    finally:
        _clear_rotary_cache(model)
        for m, training in modes:
            m.training = training


def _clear_rotary_cache(model: torch.nn.Module) -> None:
    for m in model.modules():
        cache_clear = getattr(type(m).forward, "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def _last_logits(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    start: int,
    ctx: StaticInferenceContext | None,
) -> torch.Tensor:
    """Forward ``tokens`` [b, s] at positions ``start..start+s-1`` -> last-position logits [b, V].

    Logits come back gathered over TP (``runtime_gather_output``; megatron asserts it whenever an
    inference context is passed in eval mode). With a context, megatron computes only the last
    position's logits.
    """
    b, s = tokens.shape
    pos = torch.arange(start, start + s, device=tokens.device).expand(b, s)
    out = model(tokens, pos, None, inference_context=ctx, runtime_gather_output=True)
    return out[:, -1, :].float()  # [b, V]


def _select_cache_rows(ctx: StaticInferenceContext, index: torch.Tensor) -> None:
    """Re-index every layer's cached keys/values along batch: row ``i`` <- row ``index[i]``.

    Used to share a prefill (``index = [0]*G + [1]*G + ...``) and to drop finished rows.
    """
    for layer, (k, v) in ctx.key_value_memory_dict.items():
        # [s_max, b, groups, head_dim] -> [s_max, len(index), groups, head_dim]
        ctx.key_value_memory_dict[layer] = (k.index_select(1, index), v.index_select(1, index))
    ctx.max_batch_size = index.numel()


def plan_buckets(
    lengths: Sequence[int], num_samples: int, max_rows: int | None, max_spread: int
) -> list[list[int]]:
    """Group prompt indices (sorted by length) into decode batches.

    A bucket holds at least one prompt, at most ``max_rows`` rows (``num_samples`` per prompt)
    and at most ``max_spread`` tokens between its shortest and longest prompt.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            cur = buckets[-1]
            fits_rows = max_rows is None or (len(cur) + 1) * num_samples <= max_rows
            if fits_rows and lengths[i] - lengths[cur[0]] <= max_spread:
                cur.append(i)
                continue
        buckets.append([i])
    return buckets


def check_generation(
    gpt: torch.nn.Module, prompts: list[list[int]], params: SamplingParams
) -> None:
    """Raise ``ValueError`` when ``gpt`` cannot generate ``params.max_new_tokens`` after every
    prompt (pipeline stages, flash decode, too few positions)."""
    if not (gpt.pre_process and gpt.post_process):
        raise ValueError("the sampler needs the whole model on this rank (parallel.pp_size=1)")
    if getattr(gpt.config, "flash_decode", False):
        raise ValueError("flash_decode is not supported by rlp's sampler; disable it")
    longest = max((len(p) for p in prompts), default=0) + params.max_new_tokens
    if longest > gpt.max_sequence_length:
        raise ValueError(
            f"a prompt of {longest - params.max_new_tokens} tokens plus max_new_tokens="
            f"{params.max_new_tokens} exceeds the model's {gpt.max_sequence_length} positions;"
            " raise model.max_position_embeddings or lower rollout.max_thought_tokens / "
            "data.max_prefix_tokens"
        )


def empty_batch(device: torch.device) -> SampleBatch:
    """The result of a call without rows."""
    empty = torch.zeros(0, 0, dtype=torch.long, device=device)
    return SampleBatch(
        tokens=empty,
        logprobs=empty.float(),
        lengths=torch.zeros(0, dtype=torch.long, device=device),
        stopped=torch.zeros(0, dtype=torch.bool, device=device),
        prompt_index=torch.zeros(0, dtype=torch.long, device=device),
    )


def _padded_vocab(gpt: torch.nn.Module) -> int:
    """Width of the gathered logits (the padded vocabulary)."""
    return gpt.vocab_size


# --------------------------------------------------------------------------------------------
# The sampler


class Sampler:
    """Batched autoregressive sampler over a megatron ``GPTModel`` (see the module docstring).

    Args:
        no_cache: recompute the whole sequence every step instead of using the KV cache (the
            slow reference implementation; same tokens and random draws).
        max_batch_rows: most rows decoded together; a prompt's ``num_samples`` rows are never
            split. ``None`` = all rows of a call in as few buckets as the spread allows.
        max_prompt_spread: most tokens between the shortest and longest prompt of a bucket
            (each extra token costs one batched decode step; a new bucket costs a generation).
        compact_below: compact the KV cache when at most this fraction of its rows still runs.
        noise: ``"generator"`` (one generator stream per bucket) or ``"keyed"``
            (:class:`KeyedNoise`: independent of buckets and batch layout; the cascade engine's).
    """

    def __init__(
        self,
        *,
        no_cache: bool = False,
        max_batch_rows: int | None = None,
        max_prompt_spread: int = 128,
        compact_below: float = 0.5,
        noise: NoiseMode = "generator",
    ) -> None:
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        if max_prompt_spread < 0:
            raise ValueError(f"max_prompt_spread must be >= 0, got {max_prompt_spread}")
        if not 0 <= compact_below < 1:
            raise ValueError(f"compact_below must be in [0, 1), got {compact_below}")
        if noise not in ("generator", "keyed"):
            raise ValueError(f"noise must be 'generator' or 'keyed', got {noise!r}")
        self.noise = noise
        self.no_cache = no_cache
        self.max_batch_rows = max_batch_rows
        self.max_prompt_spread = max_prompt_spread
        self.compact_below = compact_below

    def sample(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        num_samples: int,
        params: SamplingParams,
        seed: int,
    ) -> SampleBatch:
        """Draw ``num_samples`` continuations of every prompt.

        Collective over the TP group (every TP rank must call it with the same arguments).
        Returns tensors on the model's device, rows ``p * num_samples + g``.
        """
        params.validate()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gpt = unwrap(model)
        check_generation(gpt, prompts, params)
        device = next(gpt.parameters()).device
        n = len(prompts) * num_samples
        if n == 0:
            return empty_batch(device)
        buckets = plan_buckets(
            [len(p) for p in prompts], num_samples, self.max_batch_rows, self.max_prompt_spread
        )
        parts = []
        with sampling_mode(model):
            keyed = None
            if not params.greedy and self.noise == "keyed":
                keyed = KeyedNoise(seed, _padded_vocab(gpt), device)
            for ordinal, bucket in enumerate(buckets):
                # One stream per bucket: its draws do not depend on how long earlier buckets ran.
                gen = None
                if not params.greedy and keyed is None:
                    gen = sampling_generator(seed, device, ordinal)
                part = self._sample_bucket(
                    model, bucket, [prompts[i] for i in bucket], num_samples, params, gen, keyed
                )
                parts.append((bucket, part))
        return _assemble(parts, len(prompts), num_samples, params.pad_id, device)

    def _sample_bucket(
        self,
        model: torch.nn.Module,
        prompt_ids: list[int],
        prompts: list[list[int]],
        g: int,
        params: SamplingParams,
        gen: torch.Generator | None,
        keyed: KeyedNoise | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode one bucket (``prompt_ids``: the prompts' indices in the call) -> (tokens
        [n, T], logprobs [n, T], lengths [n], stopped [n])."""
        device = next(model.parameters()).device
        num_prompts, n = len(prompts), len(prompts) * g
        lens = [len(p) for p in prompts]
        l_min, l_max = min(lens), max(lens)
        width = l_max + params.max_new_tokens  # every position a row can ever hold

        host = torch.full((num_prompts, width), params.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            host[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        prompt_tokens = host.to(device)  # [P, width]
        seq = prompt_tokens.repeat_interleave(g, dim=0)  # [n, width] prompt, then generated ids
        plen = torch.as_tensor(lens, device=device).repeat_interleave(g)  # [n]
        logp = torch.zeros(n, width, dtype=torch.float32, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        length = torch.zeros(n, dtype=torch.long, device=device)
        rows = torch.arange(n, device=device)  # original ids of the rows still in the batch
        stops = [torch.as_tensor(s, dtype=torch.long, device=device) for s in params.stop_sequences]
        if params.eos_id is not None:
            stops.append(torch.tensor([params.eos_id], dtype=torch.long, device=device))
        forbid_ids = torch.tensor(params.forbid_first, dtype=torch.long, device=device)
        row_keys = None
        if keyed is not None:
            row_keys = keyed.row_keys(
                torch.as_tensor(prompt_ids, device=device).repeat_interleave(g),
                torch.arange(g, device=device).repeat(num_prompts),
            )

        ctx = None
        if self.no_cache:
            logits = _last_logits(model, seq[:, :l_min], 0, None)  # [n, V]
        else:
            # Prefill each distinct prompt once, then share its cache across its g rows.
            ctx = StaticInferenceContext(max_batch_size=num_prompts, max_sequence_length=width)
            logits = _last_logits(model, prompt_tokens[:, :l_min], 0, ctx)  # [P, V]
            share = torch.arange(num_prompts, device=device).repeat_interleave(g)  # [n]
            logits = logits[share]
            _select_cache_rows(ctx, share)
            ctx.increment_sequence_len_offset(l_min)
            ctx.enable_decode_mode()

        for pos in range(l_min, width):
            # logits [a, V] predict position `pos` of every running row.
            gen_idx = pos - plen[rows]  # [a] index among generated tokens; < 0 = still prompt
            noise = None
            if row_keys is not None:
                noise = keyed(row_keys[rows], gen_idx.clamp_min(0))
            elif gen is not None:
                # Drawn for all n rows in a fixed order, whatever is still running.
                noise = torch.empty(n, logits.size(-1), device=device).exponential_(generator=gen)
                noise = noise[rows] if rows.numel() < n else noise
            tok, lp = choose_tokens(logits, params, gen_idx == 0, noise, forbid_ids)
            forced = gen_idx < 0
            tok = torch.where(forced, seq[rows, pos], tok)
            seq[rows, pos] = tok
            logp[rows, pos] = torch.where(forced, 0.0, lp)

            # Stop rules, on generated tokens only.
            generating = ~forced & ~done[rows]
            count = gen_idx + 1  # generated tokens so far, this one included
            hit = torch.zeros_like(generating)
            for stop in stops:
                m = stop.numel()
                if pos - m + 1 >= 0:
                    window = seq[rows, pos - m + 1 : pos + 1]  # [a, m]
                    hit |= (window == stop).all(dim=-1) & (count >= m)
            hit &= generating
            finish = generating & (hit | (count >= params.max_new_tokens))
            stopped[rows] |= hit
            length[rows] = torch.where(finish, count, length[rows])
            done[rows] |= finish

            running = ~done[rows]
            n_running = int(running.sum())  # the one host sync per step
            if n_running == 0:
                break
            if n_running <= self.compact_below * rows.numel():
                keep = running.nonzero().squeeze(1)
                rows = rows[keep]
                if ctx is not None:
                    _select_cache_rows(ctx, keep)
            if ctx is not None:
                logits = _last_logits(model, seq[rows, pos : pos + 1], pos, ctx)
                ctx.increment_sequence_len_offset(1)
            else:
                logits = _last_logits(model, seq[rows, : pos + 1], 0, None)

        # Gather each row's generated span: positions plen .. plen + length - 1.
        t = int(length.max())
        offs = torch.arange(t, device=device)
        idx = (plen[:, None] + offs).clamp_(max=width - 1)  # [n, T]
        valid = offs[None, :] < length[:, None]
        tokens = torch.where(valid, seq.gather(1, idx), params.pad_id)
        logprobs = torch.where(valid, logp.gather(1, idx), 0.0)
        return tokens, logprobs, length, stopped


def _assemble(
    parts: list[tuple[list[int], tuple[torch.Tensor, ...]]],
    num_prompts: int,
    g: int,
    pad_id: int,
    device: torch.device,
) -> SampleBatch:
    """Scatter bucket results back to prompt-major row order."""
    n = num_prompts * g
    t = max(p[1][0].size(1) for p in parts)
    tokens = torch.full((n, t), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(n, t, dtype=torch.float32, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    for bucket, (b_tokens, b_logprobs, b_lengths, b_stopped) in parts:
        prompt_ids = torch.as_tensor(bucket, device=device)
        rows = (prompt_ids[:, None] * g + torch.arange(g, device=device)).flatten()
        width = b_tokens.size(1)
        tokens[rows, :width] = b_tokens
        logprobs[rows, :width] = b_logprobs
        lengths[rows] = b_lengths
        stopped[rows] = b_stopped
    prompt_index = torch.arange(num_prompts, device=device).repeat_interleave(g)
    return SampleBatch(tokens, logprobs, lengths, stopped, prompt_index)
