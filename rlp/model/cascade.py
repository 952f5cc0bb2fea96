"""The cascade rollout engine: one ragged batch, shared-prefix KV, a graph-capturable decode step.

This module owns :class:`CascadeEngine`, the default :class:`rlp.model.engine.RolloutEngine`. It
generates on the live training weights through megatron's own layers
(:func:`rlp.model.forward.decoder_hidden`, RoPE at explicit per-row positions) with the KV store
of :mod:`rlp.model.kv_cache` plugged into every layer's ``SDPAttention``.

One ragged batch
    All ``P x G`` rows of a call (or of each ``max_batch_rows`` chunk) decode together. Each
    prompt is prefilled once at its own length (prompts sorted by length and packed into
    forwards of at most ``prefill_tokens`` padded tokens; right padding, causal attention, so the
    padding never reaches a real token), its KV stored once. Every row then decodes at its own
    position ``len(prompt) + t``: no length buckets, no prompt tokens forced through decode
    steps. Decode forwards per batch = ``max_new_tokens - 1`` at most (the first token comes from
    the prefill), fewer when every row stopped early.

Lock-step thoughts
    Generated token ``t`` of every row is produced by decode step ``t`` (step 0 = the prefill's
    logits), so the thought KV slot index, the output column and the stop window are the same
    for all rows at a step: one static index per step instead of per-row bookkeeping.

The decode step (:meth:`_Batch._step`)
    Reads its inputs from persistent device tensors (the step counter, the previous column of
    the output buffer, the row-slot map), runs the model, samples with
    :func:`rlp.model.sampler.choose_tokens` (top-k/top-p, the exponential race with
    :class:`rlp.model.sampler.KeyedNoise` keyed on (seed, DP rank, prompt, sample, step)), writes
    the token and log-prob, and applies stop sequences, EOS and the cap with device ops; it has
    no host sync and fixed shapes for a given (row slots, prompt slots, prefix length, thought
    capacity) class, and it is idempotent for a given step counter. On CUDA (``cuda_graphs``)
    it is captured once per class as a ``torch.cuda.CUDAGraph`` (after an eager warm-up of the
    same step, which the replay then recomputes identically) and replayed every step; on CPU it
    runs eagerly, the same code. The host looks at the batch every ``check_every`` steps (one
    scalar sync): it stops when every row is done and compacts to the next power-of-two class
    when at most ``compact_below`` of the row slots still run (finished rows, prompts whose rows
    all finished, prefix positions no running prompt needs). The thought store grows in blocks
    of ``kv_block`` tokens.

Equivalences (tests)
    Greedy tokens and recorded log-probs equal the reference :class:`rlp.model.sampler.Sampler`
    for mixed prompt lengths; sampled tokens equal ``Sampler(noise="keyed")``; log-probs equal a
    teacher-forced recompute; TP=2 equals TP=1 (the model's own TP layers, logits gathered over
    TP for sampling, the same keyed draws on every TP rank).

Leaving generation
    Handles are removed from the layers, the caches and graphs freed, and
    :func:`rlp.model.sampler.sampling_mode` restores train mode and clears the RoPE caches, so
    training sees the model exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlp.model.attention import SDPAttention
from rlp.model.build import unwrap
from rlp.model.forward import decoder_hidden, output_weight
from rlp.model.kv_cache import RolloutKV
from rlp.model.sampler import (
    KeyedNoise,
    SampleBatch,
    SamplingParams,
    _assemble,
    check_generation,
    choose_tokens,
    empty_batch,
    sampling_mode,
)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the cascade engine cannot drive ``model`` (None when it can)."""
    gpt = unwrap(model)
    for layer in gpt.decoder.layers:
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if not isinstance(core, SDPAttention):
            return (
                f"its core attention is {type(core).__name__}, not SDPAttention "
                "(model.attention_backend=sdpa with the local spec)"
            )
    if gpt.config.sequence_parallel:
        return "parallel.sequence_parallel=true scatters the one-token decode step"
    if not (gpt.pre_process and gpt.post_process):
        return "the model is split into pipeline stages"
    return None


def plan_row_chunks(num_prompts: int, g: int, max_rows: int | None) -> list[list[int]]:
    """Consecutive prompt indices per batch: at most ``max_rows`` rows (at least one prompt)."""
    per = num_prompts if max_rows is None else max(1, max_rows // g)
    return [list(range(i, min(i + per, num_prompts))) for i in range(0, num_prompts, per)]


def _size_class(count: int, limit: int) -> int:
    """Smallest power of two >= ``count``, at most ``limit``."""
    return min(limit, 1 << max(0, math.ceil(math.log2(max(count, 1)))))


class CascadeEngine:
    """The default rollout engine (see the module docstring); bound to ``model``.

    Args:
        check_every: decode steps between host checks (completion, compaction).
        kv_block: thought KV grows in blocks of this many tokens.
        cuda_graphs: capture the decode step as a CUDA graph on GPU (ignored on CPU).
        prefill_tokens: padded prompt tokens per prefill forward (at least one prompt).
        max_batch_rows: most rows decoded together (None = all rows of a call).
        compact_below: compact when at most this fraction of the row slots still runs
            (0 = never).
    """

    name = "cascade"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        check_every: int = 16,
        kv_block: int = 128,
        cuda_graphs: bool = True,
        prefill_tokens: int = 16384,
        max_batch_rows: int | None = None,
        compact_below: float = 0.5,
    ) -> None:
        for name, value in (
            ("check_every", check_every),
            ("kv_block", kv_block),
            ("prefill_tokens", prefill_tokens),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        if not 0 <= compact_below < 1:
            raise ValueError(f"compact_below must be in [0, 1), got {compact_below}")
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the cascade engine cannot drive this model: {reason}")
        self.model = model
        self.check_every = check_every
        self.kv_block = kv_block
        self.cuda_graphs = cuda_graphs
        self.prefill_tokens = prefill_tokens
        self.max_batch_rows = max_batch_rows
        self.compact_below = compact_below
        self.last_stats: dict[str, int] = {}
        """Counters of the last :meth:`generate` call (summed over its batches): ``batches``,
        ``prefill_forwards``, ``decode_steps``, ``compactions``, ``graph_captures``,
        ``peak_kv_bytes``."""

    def generate(
        self, prompts: list[list[int]], num_samples: int, params: SamplingParams, seed: int
    ) -> SampleBatch:
        """Draw ``num_samples`` continuations of every prompt; rows ``p * num_samples + g``.

        Collective over the TP group (every TP rank calls it with the same arguments).
        """
        params.validate()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gpt = unwrap(self.model)
        check_generation(gpt, prompts, params)
        device = next(gpt.parameters()).device
        self.last_stats = dict.fromkeys(
            (
                "batches",
                "prefill_forwards",
                "decode_steps",
                "compactions",
                "graph_captures",
                "peak_kv_bytes",
            ),
            0,
        )
        if not prompts:
            return empty_batch(device)
        keyed = None if params.greedy else KeyedNoise(seed, gpt.vocab_size, device)
        parts = []
        with sampling_mode(self.model):
            for chunk in plan_row_chunks(len(prompts), num_samples, self.max_batch_rows):
                batch = _Batch(self, gpt, chunk, [prompts[i] for i in chunk], num_samples, params)
                parts.append((chunk, batch.run(keyed)))
        return _assemble(parts, len(prompts), num_samples, params.pad_id, device)


class _Batch:
    """The decoding state of one ragged batch (``prompt_ids``: indices into the call's prompts)."""

    def __init__(
        self,
        engine: CascadeEngine,
        gpt: torch.nn.Module,
        prompt_ids: Sequence[int],
        prompts: list[list[int]],
        g: int,
        params: SamplingParams,
    ) -> None:
        self.engine, self.gpt, self.params, self.g = engine, gpt, params, g
        self.prompts = prompts
        self.device = device = next(gpt.parameters()).device
        self.num_prompts = p = len(prompts)
        self.n = n = p * g
        self.cap = params.max_new_tokens
        lens = [len(x) for x in prompts]
        self.lens = lens
        self.plen = torch.as_tensor(lens, device=device)  # [P]
        self.row_prompt = torch.arange(p, device=device).repeat_interleave(g)  # [n]
        self.row_sample = torch.arange(g, device=device).repeat(p)  # [n]
        self.prompt_ids = torch.as_tensor(list(prompt_ids), device=device)
        # Per-row state; index n is a scratch row that padding slots read and write.
        self.plen_row = torch.cat([self.plen[self.row_prompt], self.plen.new_zeros(1)])
        self.out_tok = torch.full((n + 1, self.cap), params.pad_id, dtype=torch.long, device=device)
        self.out_lp = torch.zeros(n + 1, self.cap, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(n + 1, dtype=torch.long, device=device)
        self.stopped = torch.zeros(n + 1, dtype=torch.bool, device=device)
        self.done = torch.zeros(n + 1, dtype=torch.bool, device=device)
        self.done[n] = True
        self.step_t = torch.zeros(1, dtype=torch.long, device=device)
        self._stop_rules(params)
        self.layers = [layer.self_attention.core_attention for layer in gpt.decoder.layers]
        self.kv = RolloutKV(len(self.layers), p, max(lens), g)
        self.use_graphs = engine.cuda_graphs and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = None
        self.keyed: KeyedNoise | None = None
        self.row_keys: torch.Tensor | None = None

    def _stop_rules(self, params: SamplingParams) -> None:
        """Stop sequences (+ EOS) as a right-aligned table ``[S, m]`` with a wildcard mask."""
        stops = [list(s) for s in params.stop_sequences]
        if params.eos_id is not None:
            stops.append([params.eos_id])
        self.stop_table = None
        if not stops:
            return
        m = max(len(s) for s in stops)
        table = torch.zeros(len(stops), m, dtype=torch.long)
        wild = torch.ones(len(stops), m, dtype=torch.bool)
        for i, s in enumerate(stops):
            table[i, m - len(s) :] = torch.as_tensor(s)
            wild[i, m - len(s) :] = False
        self.stop_table = table.to(self.device)
        self.stop_wild = wild.to(self.device)
        self.stop_len = torch.as_tensor([len(s) for s in stops], device=self.device)
        self.window = torch.arange(1 - m, 1, device=self.device)  # offsets of the stop window

    # ------------------------------------------------------------------ the batch

    def run(
        self, keyed: KeyedNoise | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate -> (tokens [n, T], logprobs [n, T], lengths [n], stopped [n])."""
        stats = self.engine.last_stats
        stats["batches"] += 1
        self.keyed = keyed
        if keyed is not None:
            keys = keyed.row_keys(self.prompt_ids[self.row_prompt], self.row_sample)
            self.row_keys = torch.cat([keys, keys.new_zeros(1)])
        for layer, handle in zip(self.layers, self.kv.handles()):
            layer.rollout_kv = handle
        try:
            logits = self._prefill()
            self._first_token(logits)
            if self.cap > 1:
                self._decode()
            stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], self._peak_kv)
            return self._result()
        finally:
            for layer in self.layers:
                layer.rollout_kv = None
            self.graph = self.pool = None
            self.kv.free()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer on ``hidden [s, b, h]`` -> TP-gathered fp32 logits ``[s, b, V]``."""
        gpt = self.gpt
        weight = output_weight(gpt) if gpt.share_embeddings_and_output_weights else None
        logits, _ = gpt.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits.float()

    def _prefill(self) -> torch.Tensor:
        """Prefill every prompt at its own length -> last-position logits ``[P, V]``."""
        order = sorted(range(self.num_prompts), key=lambda i: self.lens[i])
        chunks: list[list[int]] = []
        for i in order:  # ascending lengths: a chunk's last prompt is its longest
            if chunks and (len(chunks[-1]) + 1) * self.lens[i] <= self.engine.prefill_tokens:
                chunks[-1].append(i)
            else:
                chunks.append([i])
        out = None
        self.kv.mode = "prefill"
        for chunk in chunks:
            width = self.lens[chunk[-1]]
            host = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, i in enumerate(chunk):
                host[r, : self.lens[i]] = torch.as_tensor(self.prompts[i], dtype=torch.long)
            tokens = host.to(self.device)
            positions = torch.arange(width, device=self.device).expand(len(chunk), width)
            slots = torch.as_tensor(chunk, device=self.device)
            self.kv.prefill_slots = slots
            hidden = decoder_hidden(self.gpt, tokens, positions)  # [width, c, h]
            last = hidden[self.plen[slots] - 1, torch.arange(len(chunk), device=self.device)]
            logits = self._logits(last.unsqueeze(0))[0]  # [c, V]
            if out is None:
                out = logits.new_empty(self.num_prompts, logits.size(-1))
            out[slots] = logits
            self.engine.last_stats["prefill_forwards"] += 1
        self.kv.prefill_slots = None
        self._peak_kv = self.kv.nbytes()
        return out

    def _first_token(self, logits: torch.Tensor) -> None:
        """Step 0: sample every row's first token from its prompt's prefill logits."""
        rows = torch.arange(self.n, device=self.device)
        noise = None if self.keyed is None else self.keyed(self.row_keys[rows], self.step_t)
        first = torch.ones(self.n, dtype=torch.bool, device=self.device)
        forbid = torch.tensor(self.params.forbid_first, dtype=torch.long, device=self.device)
        tok, lp = choose_tokens(logits[self.row_prompt], self.params, first, noise, forbid)
        self._record(rows, self.step_t, tok, lp)

    def _record(
        self, rows: torch.Tensor, t: torch.Tensor, tok: torch.Tensor, lp: torch.Tensor
    ) -> None:
        """Write step ``t``'s tokens of ``rows`` and apply stop/EOS/cap rules (device ops)."""
        cols = t.expand(rows.numel())
        alive = ~self.done[rows]
        self.out_tok.index_put_((rows, cols), tok)
        self.out_lp.index_put_((rows, cols), lp)
        count = t + 1  # tokens generated by each running row, this one included
        hit = torch.zeros_like(alive)
        if self.stop_table is not None:
            idx = (t + self.window).clamp_min(0)  # [m] columns of the stop window
            window = self.out_tok[rows[:, None], idx[None, :]]  # [a, m]
            match = (window[:, None, :] == self.stop_table[None]) | self.stop_wild[None]
            hit = (match.all(dim=-1) & (count >= self.stop_len)[None, :]).any(dim=-1) & alive
        finish = alive & (hit | (count >= self.cap))
        self.stopped.index_put_((rows,), self.stopped[rows] | hit)
        self.lengths.index_put_((rows,), torch.where(finish, count, self.lengths[rows]))
        self.done.index_put_((rows,), self.done[rows] | finish)

    # ------------------------------------------------------------------ decoding

    def _decode(self) -> None:
        engine, stats = self.engine, self.engine.last_stats
        self._set_layout(
            torch.arange(self.n, device=self.device),
            torch.arange(self.num_prompts, device=self.device),
            max(self.lens),
        )
        self.kv.start_decode(self.n, min(engine.kv_block, self.cap - 1))
        for step in range(1, self.cap):
            if (step - 1) % engine.check_every == 0:
                running = int((~self.done[: self.n]).sum())  # the host sync
                if running == 0:
                    break
                if running <= engine.compact_below * self.kv.rows:
                    self._compact()
            if step - 1 >= self.kv.capacity:
                blocks = -(-step // engine.kv_block)
                self.kv.grow(min(blocks * engine.kv_block, self.cap - 1))
                self.graph = None
            self._peak_kv = max(self._peak_kv, self.kv.nbytes())
            self.step_t.fill_(step)
            self._run_step()
            stats["decode_steps"] += 1

    def _run_step(self) -> None:
        if not self.use_graphs:
            self._step()
            return
        if self.graph is None:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # Warm-up on a side stream (allocator, cuBLAS handles, lazily built tables), then
            # capture. The step is idempotent, so the replay recomputes the same result.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: data-loader threads may touch CUDA while this thread captures.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._step()
            self.graph = graph
            self.engine.last_stats["graph_captures"] += 1
        self.graph.replay()

    def _step(self) -> None:
        """One decode step at the step counter ``t``: feed token ``t - 1`` of every row slot,
        sample token ``t``. Device ops on persistent tensors only (captured on CUDA)."""
        rows = self.slot_row  # [A] original row ids (padding slots -> scratch row n)
        t = self.step_t
        prev = t - 1
        tokens = self.out_tok[rows, prev.expand(rows.numel())]  # [A]
        positions = self.plen_row[rows] + prev  # [A]
        self.kv.set_step(prev)
        hidden = decoder_hidden(self.gpt, tokens[:, None], positions[:, None])  # [1, A, h]
        logits = self._logits(hidden)[0]  # [A, V]
        noise = None if self.keyed is None else self.keyed(self.row_keys[rows], t)
        tok, lp = choose_tokens(logits, self.params, None, noise)
        self._record(rows, t, tok, lp)

    # ------------------------------------------------------------------ layout

    def _set_layout(self, slot_row: torch.Tensor, prompt_slots: torch.Tensor, prefix_len: int):
        """Install row slots ``slot_row [A]`` (original rows, ``n`` = padding) and prompt slots
        ``prompt_slots [Pc]`` (prompt indices, repeats = padding) with ``prefix_len`` keys."""
        n, g, device = self.n, self.g, self.device
        self.slot_row = slot_row
        a, pc = slot_row.numel(), prompt_slots.numel()
        real = slot_row < n
        rows = slot_row[real]
        # Padding slots repeat a real prompt with identical KV: whichever copy a prompt maps to,
        # its rows' queries and outputs use that same copy.
        pslot_of = torch.full((self.num_prompts,), -1, dtype=torch.long, device=device)
        pslot_of[prompt_slots] = torch.arange(pc, device=device)
        self.pslot_of = pslot_of
        group = pslot_of[self.row_prompt[rows]] * g + self.row_sample[rows]
        slot_group = torch.full((pc * g,), a, dtype=torch.long, device=device)
        slot_group[group] = torch.arange(a, device=device)[real]
        row_group = torch.zeros(a, dtype=torch.long, device=device)
        row_group[real] = group
        keys = torch.arange(prefix_len, device=device)
        visible = keys[None, :] < self.plen[prompt_slots][:, None]
        prefix_bias = torch.where(visible, 0.0, float("-inf")).view(pc, 1, 1, prefix_len)
        self.prompt_slots = prompt_slots
        self.kv.set_layout(slot_group, row_group, prefix_bias.to(torch.float32))

    def _compact(self) -> None:
        """Drop finished rows, prompts without running rows and unneeded prefix positions."""
        running = (~self.done[: self.n]).nonzero().squeeze(1)  # sorted original row ids
        a = _size_class(running.numel(), self.kv.rows)
        if a >= self.kv.rows:
            return
        slot_of = torch.full((self.n + 1,), -1, dtype=torch.long, device=self.device)
        slot_of[self.slot_row] = torch.arange(self.kv.rows, device=self.device)
        row_index = slot_of[running]
        pad = a - running.numel()
        row_index = torch.cat([row_index, row_index[:1].expand(pad)])
        slot_row = torch.cat([running, running.new_full((pad,), self.n)])
        active = torch.unique(self.row_prompt[running])  # sorted prompt indices
        pc = _size_class(active.numel(), self.prompt_slots.numel())
        active = torch.cat([active, active[:1].expand(pc - active.numel())])
        longest = int(self.plen[active].max())
        prefix_len = min(self.kv.kp[0].size(2), -(-longest // 16) * 16)
        self.kv.compact(row_index, self.pslot_of[active], prefix_len)
        self._set_layout(slot_row, active, prefix_len)
        self.graph = None
        self.engine.last_stats["compactions"] += 1

    def _result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        lengths = self.lengths[:n]
        width = int(lengths.max())
        valid = torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        tokens = torch.where(valid, self.out_tok[:n, :width], self.params.pad_id)
        logprobs = torch.where(valid, self.out_lp[:n, :width], 0.0)
        return tokens, logprobs, lengths, self.stopped[:n]
