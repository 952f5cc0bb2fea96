"""Reader lanes: the replayable document sequence of one lane, and the cursor that restores it.

This module owns how one *lane* (a DataLoader worker's share of a DP rank's shards, see
:mod:`rlp.data.stream`) turns its shards into a document sequence, epoch after epoch, and how that
sequence continues exactly from a saved position. It has no notion of processes: the stream runs
lanes in DataLoader workers (or in-process) and merges them.

**Shuffle buffer.** A lane keeps ``B = data.shuffle_buffer`` documents; once full, each new document
replaces the one at slot ``floor(u_s * B)`` which is emitted; at the end of the lane's epoch the
buffer drains by random picks. The uniforms ``u_s`` are addressed by step number (counter-based
blocks seeded by ``(seed, stream, epoch, dp_rank, lane)``), so the buffer's content after ``k``
emissions is computable from ``k`` alone, without reading any data.

**Cursor.** Every document carries its lane's position: ``(epoch, pops, inputs)`` - documents
emitted by the buffer this epoch, and the lane's input count once its epoch input has ended - plus
skip counters (:data:`CURSOR_FIELDS`); the stream saves the position after the last *consumed*
document of each lane. Resuming recomputes the buffer's slots from ``pops`` (``O(pops)``
vectorised draws), re-reads the lane's shards up to the recorded input position, *decoding only
the <= B documents still in the buffer* and skipping the others' tar members unread (seeking in
local files; a stream reads through them). Shards that end before the oldest buffered document
are not even opened (nor downloaded): the manifest's per-shard counts, matched by base name (and
the cursor's record of shards that failed part-way), give their sizes. So a resume reads the few
shards the buffer reaches back into (a buffer slot survives ``k`` replacements with probability
``(1 - 1/B)^k``), whatever the epoch position; no work is repeated for earlier epochs. Without a
manifest the lane's earlier shards of the epoch are read again to count their samples.
Exactness needs the same shards (unchanged files), seed, DP layout, ``num_workers``,
``shuffle_buffer`` and sample layout; the stream's cursor records these and refuses a mismatch.

**Samples.** Pre-tokenised samples give their ``.npy`` ids (checked against the vocabulary and
the ``.json`` length); text samples (:func:`rlp.data.text.sample_text`) are tokenised here, in the
lane's worker process, with the run's tokenizer by the builder's rule
(:class:`rlp.data.text.TextEncoder`). A whitespace-only text is no document: it keeps its place
in the order (and in the cursor) and is skipped.

**Bad data.** Truncated/garbage/missing shards, checksum or count mismatches and bad samples
(no or invalid ``.npy``, ids out of range, no text) raise :class:`CorruptShardError` with
``on_corrupt=error``; with ``skip`` they are logged and counted (``skipped_shards``,
``skipped_samples``; documents read from a shard before its damage are kept). Counters are part
of the cursor, and a resume does not count again what the saved counters already cover. Only
``.npy`` (no pickle), ``.json``, ``.jsonl`` and ``.txt`` members are ever decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlp.data.format import (
    CorruptShardError,
    DataError,
    Manifest,
    decode_meta,
    decode_tokens,
    sha256_file,
)
from rlp.data.samples import ShardReader
from rlp.data.shards import epoch_shards
from rlp.data.text import TextEncoder, is_document, sample_text
from rlp.data.urls import is_local, url_name

log = logging.getLogger("rlp.data")

_DRAW_BLOCK = 4096
_STEADY, _DRAIN = 1, 2


CURSOR_FIELDS = ("epoch", "pops", "inputs", "skipped_shards", "skipped_samples", "short", "docs")
"""A lane's position: epoch; buffer emissions (``pops``) and input count (once known) in it;
skip counters; ``[shard index, samples]`` of this epoch's shards that failed part-way; documents
the lane has yielded in total (fixes the worker chunk boundaries). Always last: ``docs``."""


@dataclass(frozen=True)
class LanePlan:
    """Everything a lane needs (pickled into DataLoader workers)."""

    urls: tuple[str, ...]
    seed: int
    stream_tag: int
    dp_rank: int
    dp_size: int
    lanes: int
    shuffle_shards: bool
    shuffle_buffer: int
    on_corrupt: str
    vocab_size: int | None
    manifest: Manifest | None
    manifest_where: str
    verify_checksums: bool
    max_epochs: int | None
    content: str = "tokens"
    """``"tokens"``, ``"text"`` or ``"auto"`` (per sample: ``.npy`` present -> tokens)."""
    text_key: str = "text"
    encoder: TextEncoder | None = None
    """Tokenises text samples (``None``: text samples are an error)."""
    unchecked_tokens: str | None = None
    """Set (to the reason) when pre-tokenised samples met in ``auto`` mode cannot be accepted:
    without a manifest their tokenizer cannot be checked."""

    def extensions(self) -> tuple[str, ...]:
        """Members decoded for this plan's samples (all others are skipped unread)."""
        if self.content == "tokens":
            return ("npy", "json")
        if self.content == "text":
            return ("txt", "json", "jsonl")
        return ("npy", "txt", "json", "jsonl")

    def lane_shards(self, epoch: int, lane: int) -> list[str]:
        rank = epoch_shards(
            self.urls,
            seed=self.seed + 7919 * self.stream_tag,
            epoch=epoch,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            shuffle=self.shuffle_shards,
        )
        return rank[lane :: self.lanes]

    def entropy(self, epoch: int, lane: int) -> list[int]:
        return [self.seed & (2**64 - 1), self.stream_tag, epoch, self.dp_rank, lane]


class _Bad:
    """Placeholder for an unreadable sample; it keeps its place in the order and is skipped."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Empty:
    """Placeholder for a text sample without text: keeps its place, is no document."""


_EMPTY = _Empty()


class _Counters:
    def __init__(self, shards: int, samples: int) -> None:
        self.shards, self.samples = shards, samples
        # Off while a resume replays data the saved counters already cover.
        self.counting = True


class _Draws:
    """Counter-addressed uniforms for the shuffle buffer of one lane and epoch."""

    def __init__(self, entropy: list[int]) -> None:
        self._entropy = entropy
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def block(self, tag: int, index: int) -> np.ndarray:
        key = (tag, index)
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            seq = np.random.SeedSequence([*self._entropy, tag, index])
            self._cache[key] = np.random.default_rng(seq).random(_DRAW_BLOCK)
        return self._cache[key]

    def slot(self, tag: int, step: int, size: int) -> int:
        u = self.block(tag, step // _DRAW_BLOCK)[step % _DRAW_BLOCK]
        return min(int(u * size), size - 1)

    def steady_slots(self, size: int, steps: int) -> np.ndarray:
        """Buffer content (input ordinals) after ``steps`` steady replacements of a full buffer."""
        buf = np.arange(size, dtype=np.int64)
        for b in range(-(-steps // _DRAW_BLOCK)):
            lo, hi = b * _DRAW_BLOCK, min(steps, (b + 1) * _DRAW_BLOCK)
            u = self.block(_STEADY, b)[: hi - lo]
            slots = np.minimum((u * size).astype(np.int64), size - 1)
            ordinals = size + np.arange(lo, hi, dtype=np.int64)
            # Within a block a slot may be written repeatedly: the last write wins.
            uniq, first_in_reversed = np.unique(slots[::-1], return_index=True)
            buf[uniq] = ordinals[::-1][first_in_reversed]
        return buf

    def replay(self, size: int, pops: int, inputs: int | None) -> tuple[list[int], int, int, int]:
        """``(buffer ordinals, inputs consumed, steady steps, drain steps)`` after ``pops``."""
        if pops == 0:
            return [], 0, 0, 0
        if inputs is None:  # input still flowing: every pop was a steady replacement
            return self.steady_slots(size, pops).tolist(), size + pops, pops, 0
        steady = max(0, inputs - size)
        buf = self.steady_slots(min(size, inputs), steady).tolist()
        for d in range(pops - steady):
            j = self.slot(_DRAIN, d, len(buf))
            buf[j] = buf[-1]
            buf.pop()
        return buf, inputs, steady, pops - steady


class _LaneReader:
    """The concatenated samples of one lane's shards for one epoch, numbered by ordinal."""

    def __init__(
        self, plan: LanePlan, shards: list[str], counters: _Counters, short: dict[int, int]
    ) -> None:
        self.plan, self.shards, self.counters = plan, shards, counters
        # Shards of this lane-epoch that failed part-way: index -> samples they gave. With the
        # manifest's counts for the others, a resume can skip shards without opening them.
        self.short = dict(short)
        self.short_items = tuple(sorted(self.short.items()))

    def records(
        self,
        want: Callable[[int], bool],
        replay: int = 0,
        first_wanted: int = 0,
        keep_quiet: bool = False,
    ) -> Iterator[tuple[int, Any]]:
        """``(ordinal, record)``; record: ``(key, tokens)``, a ``_Bad``, or ``None`` if unwanted.

        Resuming, samples ``< replay`` were consumed before the checkpoint: skip events are not
        counted again until ordinal ``replay - 1`` has been passed (for ever with
        ``keep_quiet``), and shards that end before ``first_wanted`` are fast-forwarded without
        being opened when their sample count is known (the manifest, or ``short``).
        """
        self._ordinal = 0
        self._want = want
        counters = self.counters
        counters.counting = replay == 0
        for index, url in enumerate(self.shards):
            known = self.short.get(index, self._manifest_count(url))
            # Strictly before: a shard ending at the boundary is read, so damage found after its
            # last sample (an event after the checkpoint) is seen and counted again.
            if known is not None and self._ordinal + known < first_wanted:
                self._ordinal += known
                continue
            src, start = None, self._ordinal
            try:
                src = ShardReader(url)
                self._verify(url)
                for raw in src.samples(self._want_next, self.plan.extensions()):
                    rec = None if raw.parts is None else self._decode(raw, url)
                    yield self._ordinal, rec
                    self._ordinal += 1
                    if self._ordinal == replay and not keep_quiet:
                        counters.counting = True
                self._check_count(url, self._ordinal - start)
                src.finish()
            except CorruptShardError as exc:
                self.short[index] = self._ordinal - start
                self.short_items = tuple(sorted(self.short.items()))
                self._shard_failed(exc)
            finally:
                if src is not None:
                    src.close()
        counters.counting = True

    def _entry(self, url: str) -> Any:
        name = url_name(url)
        return self.plan.manifest.shard(name) if self.plan.manifest and name else None

    def _manifest_count(self, url: str) -> int | None:
        entry = self._entry(url)
        return None if entry is None else entry.num_docs

    def _want_next(self) -> bool:
        # Called when a sample's first member is seen: that sample gets the next ordinal.
        return self._want(self._ordinal)

    def _verify(self, url: str) -> None:
        if not self.plan.verify_checksums or not is_local(url):
            return
        entry = self._entry(url)
        if entry is None:
            return
        actual = sha256_file(url)
        if actual != entry.sha256:
            raise CorruptShardError(
                f"shard {url}: sha256 {actual} differs from {self.plan.manifest_where} "
                f"({entry.sha256}); the file changed after the build"
            )

    def _check_count(self, url: str, count: int) -> None:
        entry = self._entry(url)
        if entry is not None and entry.num_docs != count:
            raise CorruptShardError(
                f"shard {url} holds {count} samples but {self.plan.manifest_where} lists "
                f"{entry.num_docs}; the file changed after the build"
            )

    def _shard_failed(self, exc: CorruptShardError) -> None:
        if self.plan.on_corrupt == "error":
            raise CorruptShardError(
                f"{exc}. Rebuild or restore the shard, or set data.on_corrupt=skip to skip "
                "damaged shards with a warning"
            ) from None
        if self.counters.counting:
            self.counters.shards += 1
            log.warning("skipping damaged shard (data.on_corrupt=skip): %s", exc)

    def _decode(self, raw: Any, url: str) -> Any:
        plan = self.plan
        try:
            if raw.error:
                raise ValueError(raw.error)
            if plan.content == "tokens" or (plan.content == "auto" and "npy" in raw.parts):
                tokens = self._tokens(raw.parts)
            else:
                if plan.encoder is None:
                    raise DataError(
                        f"shard {url} holds text samples, which need the run's tokenizer "
                        "(pass tokenizer= to the stream)"
                    )
                text = sample_text(raw.parts, plan.text_key)
                if not is_document(text):
                    return _EMPTY
                tokens = plan.encoder.encode(text)
        except ValueError as exc:
            reason = f"shard {url}, sample {raw.key!r}: {exc}"
            if plan.on_corrupt == "error":
                raise CorruptShardError(
                    f"{reason}. Fix the shard, or set data.on_corrupt=skip to skip bad samples"
                ) from None
            return _Bad(reason)
        return raw.key, tokens

    def _tokens(self, parts: dict[str, bytes]) -> np.ndarray:
        if self.plan.content == "auto" and self.plan.unchecked_tokens:
            raise DataError(self.plan.unchecked_tokens)
        if "npy" not in parts:
            raise ValueError("no .npy member (a sample without tokens)")
        tokens = decode_tokens(parts["npy"], self.plan.vocab_size)
        if "json" in parts:
            length = decode_meta(parts["json"]).get("length")
            if length is not None and length != len(tokens):
                raise ValueError(f"{len(tokens)} tokens but its metadata says {length}")
        return tokens


def _shuffled(
    plan: LanePlan, reader: _LaneReader, draws: _Draws, pops: int, inputs: int | None
) -> Iterator[tuple[Any, int, int | None]]:
    """``(record, pops after it, lane inputs if known)`` for the rest of one lane-epoch."""
    size = plan.shuffle_buffer
    if size == 0:  # no shuffling: emission order is input order
        seen = 0
        for ordinal, rec in reader.records(lambda o: o >= pops, replay=pops, first_wanted=pops):
            seen = ordinal + 1
            if ordinal >= pops:
                yield rec, seen, None
        if seen < pops:
            raise _changed(reader)
        return
    ordinals, consumed, steady, drained = draws.replay(size, pops, inputs)
    slot_of = {o: i for i, o in enumerate(ordinals)}
    buf: list[Any] = [None] * len(ordinals)
    # In the drain phase all input was read before the checkpoint: stay quiet to the end.
    records = reader.records(
        lambda o: o >= consumed or o in slot_of,
        replay=consumed,
        first_wanted=min([consumed, *ordinals]),
        keep_quiet=inputs is not None,
    )
    if consumed:
        seen = 0
        for ordinal, rec in records:
            if ordinal in slot_of:
                buf[slot_of[ordinal]] = rec
            seen = ordinal + 1
            if seen == consumed:
                break
        extra = sum(1 for _ in records) if inputs is not None else 0
        if seen < consumed or extra:
            raise _changed(reader)
    if inputs is None:
        for _, rec in records:
            if len(buf) < size:
                buf.append(rec)
                continue
            j = draws.slot(_STEADY, steady, size)
            out, buf[j] = buf[j], rec
            steady += 1
            yield out, steady, None
        inputs = steady + len(buf)
    while buf:
        j = draws.slot(_DRAIN, drained, len(buf))
        out = buf[j]
        buf[j] = buf[-1]
        buf.pop()
        drained += 1
        yield out, steady + drained, inputs


def _changed(reader: _LaneReader) -> DataError:
    return DataError(
        f"cannot resume: the lane's shards {reader.shards} now hold other documents than when the "
        "data cursor was saved (files changed); restore them, or start the data stream afresh"
    )


def lane_documents(plan: LanePlan, lane: int, start: dict[str, Any]) -> Iterator[tuple]:
    """One lane's documents, epoch after epoch, each with the lane cursor after it."""
    counters = _Counters(start["skipped_shards"], start["skipped_samples"])
    epoch, pops, inputs, docs = start["epoch"], start["pops"], start["inputs"], start["docs"]
    short = {int(i): int(n) for i, n in start["short"]}
    while plan.max_epochs is None or epoch < plan.max_epochs:
        if inputs is not None and pops >= inputs:  # this epoch was fully consumed
            epoch, pops, inputs, short = epoch + 1, 0, None, {}
            continue
        shards = plan.lane_shards(epoch, lane)
        reader = _LaneReader(plan, shards, counters, short)
        good = 0
        for rec, now_pops, now_inputs in _shuffled(
            plan, reader, _Draws(plan.entropy(epoch, lane)), pops, inputs
        ):
            if rec is _EMPTY:
                continue
            if isinstance(rec, _Bad):
                counters.samples += 1
                log.warning("skipping bad sample (data.on_corrupt=skip): %s", rec.reason)
                continue
            good += 1
            docs += 1
            cursor = (
                epoch,
                now_pops,
                now_inputs,
                counters.shards,
                counters.samples,
                reader.short_items,
                docs,
            )
            yield lane, rec[0], rec[1], epoch, cursor
        if pops == 0 and good == 0:
            raise DataError(
                f"no readable documents in epoch {epoch} for dp_rank {plan.dp_rank}, lane {lane} "
                f"(shards {shards}); check the shards or data.shards"
            )
        epoch, pops, inputs, short = epoch + 1, 0, None, {}
