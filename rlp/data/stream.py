"""The training data stream: DP-split, shuffled, multi-epoch, exactly resumable.

This module owns the order in which one data-parallel rank sees documents and the public
stream API. :class:`DocumentStream` yields documents; :class:`RLPDataStream` turns them into RLP
contexts (:mod:`rlp.data.contexts`) and packed NTP batches (:mod:`rlp.data.packing`). How one
lane reads, shuffles and resumes is in :mod:`rlp.data.cursor`.

**Order.** Per epoch the shard list is permuted from ``(seed, epoch)`` and strided by the DP rank
and size passed in (:func:`rlp.data.shards.epoch_shards`); never from ``RANK``/``WORLD_SIZE``, so TP
peers of a DP rank build identical streams. A rank's shards are dealt to ``W`` *lanes*
(``W = min(data.num_workers, shards per rank)``, or one lane without workers); lane ``w``
reads ``shards[w::W]`` in order through its own shuffle buffer, epoch after epoch on its own. Lanes
run in DataLoader workers, send documents in chunks of ``worker_chunk`` (cut at multiples of the
lane's document count) and are merged strictly round-robin by chunk (the DataLoader's in-order
mode), so the sequence is a function of ``(seed, dp_rank, dp_size, W)`` and never of timing.
``num_workers`` 0 and 1 give the same sequence; other counts give another (equally valid) one.

**Resume.** :meth:`DocumentStream.state_dict` is a plain-data (JSON-serialisable) cursor: each
lane's position after the last *consumed* document and the next lane in the round-robin. On
:meth:`~DocumentStream.load_state_dict` the lanes continue from their positions (cost and rules in
:mod:`rlp.data.cursor`) and the DataLoader's workers are rotated so the round-robin resumes at the
recorded lane. Documents prefetched by workers but not consumed are not in the cursor; they are
produced again after a restart. :class:`RLPDataStream` adds the contexts not yet handed out and
the NTP packer's position (the NTP stream's position before the first document still packing
and how many of its tokens were emitted: :mod:`rlp.data.packing`), so a resume neither drops nor
repeats a context or a token, and the cursor's size does not depend on document length.

**Samples.** Shards hold pre-tokenised samples (the fast path: ids are read as they are) or
text samples, tokenised on the fly in the lanes (the DataLoader workers) with the run's
tokenizer by the builder's rule; both follow the same order, resume and target rules.

**Tensor parallelism.** Given its TP group, :class:`RLPDataStream` reads on the group's first
rank only and relays each batch's token ids to the peers (:mod:`rlp.data.relay`), so shards are
read once per TP group.

Bad data (``data.on_corrupt``), and which members are decoded (``.npy`` without pickle,
``.json``, ``.jsonl``, ``.txt``), are described in :mod:`rlp.data.cursor`; ``stats()`` exposes
the skip counters.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.utils.data as tud

from rlp.data.contexts import Context, ContextBuilder
from rlp.data.cursor import CURSOR_FIELDS, LanePlan, lane_documents
from rlp.data.format import DataError, Manifest, token_dtype
from rlp.data.packing import SequencePacker
from rlp.data.relay import Relay, pack_contexts, unpack_contexts
from rlp.data.shards import epoch_shards, open_shard_set
from rlp.data.text import TextEncoder

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rlp.config import DataConfig
    from rlp.tokenizer import Tokenizer

log = logging.getLogger("rlp.data")

CURSOR_VERSION = 2


@dataclass(frozen=True)
class Document:
    """A document as read from a shard."""

    key: str
    tokens: np.ndarray
    epoch: int


def _identity(item: Any) -> Any:
    return item


# ---------------------------------------------------------------------------------- documents


class DocumentStream:
    """Documents of one DP rank: shuffled, multi-epoch, resumable; see the module docstring.

    ``max_epochs=None`` streams forever (training); a number ends the stream after that many
    epochs of every lane (evaluation, tests). ``stream_tag`` separates independent streams over the
    same shards (other shard and sample order).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_workers: int = 0,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 256,
        on_corrupt: str = "error",
        manifest: Manifest | None = None,
        manifest_where: str = "manifest.json",
        verify_checksums: bool = False,
        vocab_size: int | None = None,
        max_epochs: int | None = None,
        stream_tag: int = 0,
        prefetch_factor: int = 4,
        worker_chunk: int = 32,
        content: str = "tokens",
        text_key: str = "text",
        encoder: TextEncoder | None = None,
        unchecked_tokens: str | None = None,
    ) -> None:
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if num_workers < 0 or shuffle_buffer < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer must be >= 0")
        if verify_checksums and manifest is None:
            raise DataError("verify_checksums needs a manifest.json (set data.manifest)")
        per_rank = len(
            epoch_shards(urls, seed=seed, epoch=0, dp_rank=dp_rank, dp_size=dp_size, shuffle=False)
        )
        self.num_workers = min(num_workers, per_rank)
        if self.num_workers < num_workers:
            log.warning(
                "data.num_workers=%d but dp_rank %d has %d shard(s): using %d worker(s)",
                num_workers,
                dp_rank,
                per_rank,
                self.num_workers,
            )
        self._plan = LanePlan(
            urls=tuple(urls),
            seed=seed,
            stream_tag=stream_tag,
            dp_rank=dp_rank,
            dp_size=dp_size,
            lanes=max(1, self.num_workers),
            shuffle_shards=shuffle_shards,
            shuffle_buffer=shuffle_buffer,
            on_corrupt=on_corrupt,
            vocab_size=vocab_size,
            manifest=manifest,
            manifest_where=manifest_where,
            verify_checksums=verify_checksums,
            max_epochs=max_epochs,
            content=content,
            text_key=text_key,
            encoder=encoder,
            unchecked_tokens=unchecked_tokens,
        )
        self._prefetch = prefetch_factor
        self._chunk = worker_chunk
        zero = dict.fromkeys(CURSOR_FIELDS, 0) | {"inputs": None, "short": ()}
        self._lanes = [dict(zero) for _ in range(self._plan.lanes)]
        self._next_lane = 0
        self._yielded = 0
        self._it: Iterator[list[tuple]] | None = None
        self._ready: deque[tuple] = deque()
        self._config = self._fingerprint()

    # --------------------------------------------------------------------------- iteration

    def __iter__(self) -> DocumentStream:
        return self

    def __next__(self) -> Document:
        if not self._ready:
            if self._it is None:
                self._it = self._start()
            self._ready.extend(next(self._it))
        lane, key, tokens, epoch, cur = self._ready.popleft()
        self._lanes[lane] = dict(zip(CURSOR_FIELDS, cur))
        # Workers send documents in chunks that end where the lane's document count is a
        # multiple of the chunk size; the round-robin moves on only at a chunk's end.
        at_end = self._lanes[lane]["docs"] % self._chunk == 0
        self._next_lane = (lane + 1) % self._plan.lanes if at_end else lane
        self._yielded += 1
        return Document(key=key, tokens=tokens, epoch=epoch)

    def _start(self) -> Iterator[list[tuple]]:
        plan, lanes = self._plan, [dict(c) for c in self._lanes]
        if self.num_workers == 0:
            return ([item] for item in lane_documents(plan, 0, lanes[0]))
        # DataLoader workers always start the round-robin at worker 0: rotate the lane->worker
        # map so worker 0 runs the lane that is next in the saved order.
        dataset = _LaneDataset(plan, lanes, rotation=self._next_lane, chunk=self._chunk)
        loader = tud.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            prefetch_factor=self._prefetch,
        )
        return iter(loader)

    def close(self) -> None:
        """Stop worker processes (the stream restarts from its cursor if iterated again)."""
        self._it = None
        self._ready.clear()

    # --------------------------------------------------------------------------- cursor

    def _fingerprint(self) -> dict[str, Any]:
        p = self._plan
        return {
            "content": p.content,
            "text_key": p.text_key if p.content != "tokens" else None,
            "shards_sha256": hashlib.sha256("\n".join(p.urls).encode()).hexdigest(),
            "num_shards": len(p.urls),
            "seed": p.seed,
            "stream_tag": p.stream_tag,
            "dp_rank": p.dp_rank,
            "dp_size": p.dp_size,
            "lanes": p.lanes,
            "chunk": self._chunk if p.lanes > 1 else 1,
            "shuffle_shards": p.shuffle_shards,
            "shuffle_buffer": p.shuffle_buffer,
        }

    def position(self) -> tuple:
        """The consumed position, cheaply (no copy): pass it to :meth:`state_dict` later."""
        return self._next_lane, self._yielded, tuple(self._lanes)

    def state_dict(self, position: tuple | None = None) -> dict[str, Any]:
        """Plain-data cursor (JSON-serialisable) of the consumed position (or of ``position``)."""
        next_lane, yielded, lanes = self.position() if position is None else position
        return {
            "version": CURSOR_VERSION,
            "config": dict(self._config),
            "next_lane": next_lane,
            "yielded": yielded,
            "lanes": [dict(c, short=[list(x) for x in c["short"]]) for c in lanes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the position in ``state`` (stops any running workers)."""
        if state.get("version") != CURSOR_VERSION:
            raise DataError(f"data cursor version {state.get('version')!r} is not supported")
        saved, now = state["config"], self._config
        diff = [
            f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v
        ]
        if diff:
            raise DataError(
                "cannot resume the data stream exactly, its configuration changed ("
                + "; ".join(diff)
                + "). Use the same data.shards, run.seed, DP size, "
                "data.num_workers (reader lanes = min(workers, shards per rank)) and "
                "data.shuffle_* as the saved run"
            )
        self.close()
        self._lanes = [dict(c) for c in state["lanes"]]
        self._next_lane = int(state["next_lane"])
        self._yielded = int(state["yielded"])

    def stats(self) -> dict[str, int]:
        return {
            "epoch": min(c["epoch"] for c in self._lanes),
            "documents": self._yielded,
            "skipped_shards": sum(c["skipped_shards"] for c in self._lanes),
            "skipped_samples": sum(c["skipped_samples"] for c in self._lanes),
        }


class _LaneDataset(tud.IterableDataset):
    """DataLoader view: worker ``i`` runs lane ``(i + rotation) % lanes``, sending chunks.

    One inter-process message per document costs more than reading it; chunks amortise that.
    A chunk ends where the lane's total document count is a multiple of ``chunk``, so chunk
    boundaries (and with them the merged order) do not depend on where a run was resumed.
    """

    def __init__(
        self, plan: LanePlan, lanes: list[dict[str, Any]], rotation: int, chunk: int
    ) -> None:
        self.plan, self.lanes, self.rotation, self.chunk = plan, lanes, rotation, chunk

    def __iter__(self) -> Iterator[list[tuple]]:
        info = tud.get_worker_info()
        lane = ((0 if info is None else info.id) + self.rotation) % self.plan.lanes
        chunk: list[tuple] = []
        for item in lane_documents(self.plan, lane, self.lanes[lane]):
            chunk.append(item)
            if item[-1][-1] % self.chunk == 0:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


# ---------------------------------------------------------------------------------- RLP + NTP


class RLPDataStream:
    """RLP contexts and packed NTP batches for one DP rank, with one resumable cursor.

    Contexts and NTP sequences come from two *independent* document streams over the same shards
    (stream tags 0 and 1: different shard and sample order). Sharing one stream would make the RLP
    data depend on whether and how often the NTP loss is on; with two, enabling NTP leaves the RLP
    contexts unchanged. The NTP stream (and its workers) starts on the first :meth:`next_ntp_batch`.

    ``tokenizer`` (an :class:`rlp.tokenizer.Tokenizer`) supplies EOS, the id range, the encoder
    for text shards and, with ``data.check_tokenizer``, the hash a pre-tokenised build's manifest
    must match. Without it EOS and vocabulary size come from the manifest, no tokenizer check is
    made and text shards cannot be read.

    ``tp_group``: the tensor-parallel group of this rank (all its members call every method in
    step). Its first rank reads the shards and relays each result to the others
    (:mod:`rlp.data.relay`); the others open no shard. Their :meth:`state_dict` is a marker: the
    reader's cursor is the group's (checkpoint loading takes a DP slot's cursor from its first TP
    rank when the TP size changes).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        data_cfg: DataConfig,
        *,
        dp_rank: int,
        dp_size: int,
        seed: int,
        target_tokens: int,
        tokenizer: Tokenizer | None = None,
        verify_checksums: bool | None = None,
        max_epochs: int | None = None,
        tp_group: Any = None,
        device: torch.device | None = None,
    ) -> None:
        check = tokenizer is not None and data_cfg.check_tokenizer
        content = getattr(data_cfg, "format", "auto")
        shard_set = open_shard_set(
            shards,
            manifest=data_cfg.manifest,
            tokenizer_name=tokenizer.name if check else None,
            tokenizer_hash=tokenizer.hash if check else None,
            on_corrupt=data_cfg.on_corrupt,
            content=content,
        )
        if verify_checksums is None:
            verify_checksums = data_cfg.verify_checksums
        info = shard_set.manifest.tokenizer if shard_set.manifest else None
        self.eos_id = tokenizer.eos_id if tokenizer else (info.eos_id if info else None)
        vocab_size = tokenizer.vocab_size if tokenizer else (info.vocab_size if info else None)
        encoder = None
        if tokenizer is not None and shard_set.content != "tokens":
            encoder = TextEncoder.for_tokenizer(tokenizer, token_dtype(tokenizer.vocab_size))
        unchecked = None
        if shard_set.content == "auto" and check:
            unchecked = (
                f"data.shards {str(shards)[:120]!r} hold pre-tokenised (.npy) samples but no "
                "manifest.json was found, so their tokenizer cannot be checked; set "
                "data.manifest, or data.check_tokenizer=false"
            )
        self._urls = shard_set.urls
        self._stream_args: dict[str, Any] = dict(
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=seed,
            num_workers=data_cfg.num_workers,
            shuffle_shards=data_cfg.shuffle_shards,
            shuffle_buffer=data_cfg.shuffle_buffer,
            on_corrupt=data_cfg.on_corrupt,
            manifest=shard_set.manifest,
            manifest_where=shard_set.manifest_where,
            verify_checksums=verify_checksums,
            vocab_size=vocab_size,
            max_epochs=max_epochs,
            content=shard_set.content,
            text_key=getattr(data_cfg, "text_key", "text"),
            encoder=encoder,
            unchecked_tokens=unchecked,
        )
        self._relay: Relay | None = None
        if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
            self._relay = Relay(tp_group, device)
        self._peer_stats: dict[str, int] = {}
        self._peer_state: dict[str, Any] | None = None
        reader = self._relay is None or self._relay.is_reader
        self._docs = (
            DocumentStream(self._urls, stream_tag=0, **self._stream_args) if reader else None
        )
        self._ntp: DocumentStream | None = None
        self._contexts = ContextBuilder(
            target_tokens=target_tokens,
            targets_per_document=data_cfg.targets_per_document,
            min_prefix_tokens=data_cfg.min_prefix_tokens,
            max_prefix_tokens=data_cfg.max_prefix_tokens,
            seed=seed,
            eos_id=self.eos_id,
        )
        self._packer = SequencePacker(data_cfg.ntp_seq_len, self.eos_id)

    # ----------------------------------------------------------------------------- batches

    def next_contexts(self, n: int) -> list[Context]:
        """The next ``n`` contexts (fewer only when ``max_epochs`` ends the stream)."""
        if self._relay is None:
            return self._read_contexts(n)
        header, arrays = self._relay.share(
            lambda: self._with_stats(pack_contexts(self._read_contexts(n)))
        )
        self._peer_stats = header["stats"]
        return unpack_contexts(header, arrays)

    def next_ntp_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)``, int64 ``[batch_size, data.ntp_seq_len]``."""
        if self._relay is None:
            inputs, labels = self._read_ntp(batch_size)
        else:

            def produce() -> tuple[dict[str, Any], list[np.ndarray]]:
                x, y = self._read_ntp(batch_size)
                windows = np.concatenate([x, y[:, -1:]], axis=1).astype(np.int32)
                return self._with_stats(({}, [windows]))

            header, (windows,) = self._relay.share(produce)
            self._peer_stats = header["stats"]
            windows = windows.astype(np.int64)
            inputs, labels = windows[:, :-1].copy(), windows[:, 1:].copy()
        return torch.from_numpy(inputs), torch.from_numpy(labels)

    def _read_contexts(self, n: int) -> list[Context]:
        assert self._docs is not None
        try:
            return self._contexts.next_contexts(self._docs, n)
        except ValueError as exc:
            raise DataError(str(exc)) from None

    def _read_ntp(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        if self.eos_id is None:
            raise DataError("packing NTP sequences needs an EOS id: pass tokenizer= or a manifest")
        if self._ntp is None:
            self._ntp = DocumentStream(self._urls, stream_tag=1, **self._stream_args)
        return self._packer.next_batch(self._ntp_documents(self._ntp), batch_size)

    @staticmethod
    def _ntp_documents(stream: DocumentStream) -> Iterator[tuple[np.ndarray, tuple]]:
        """``(tokens, origin)``: each document with the stream position before it."""
        while True:
            origin = stream.position()
            yield next(stream).tokens, origin

    def _with_stats(
        self, payload: tuple[dict[str, Any], list[np.ndarray]]
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        header, arrays = payload
        return dict(header, stats=self._local_stats()), arrays

    # ----------------------------------------------------------------------------- cursor

    def state_dict(self) -> dict[str, Any]:
        """Plain-data cursor (JSON-serialisable) for the checkpoint; its size does not depend on
        document length (the NTP part is a position, see :mod:`rlp.data.packing`)."""
        if self._docs is None:  # a TP peer: the group's reader holds the cursor
            return {"version": CURSOR_VERSION, "tp_peer": True}
        ntp = None
        if self._ntp is not None:
            origin = self._packer.origin
            ntp = self._ntp.state_dict(origin)  # origin None: nothing buffered, current position
        return {
            "version": CURSOR_VERSION,
            "rlp": self._docs.state_dict(),
            "contexts": self._contexts.state_dict(),
            "ntp": ntp,
            "packer": self._packer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken."""
        if not state or state.get("version") != CURSOR_VERSION:
            raise DataError(
                f"data cursor {str(state)[:80]!r} is empty or of another version; it must come "
                "from RLPDataStream.state_dict() of this rlp version"
            )
        if self._docs is None:
            return  # a TP peer reads nothing; the reader loads the group's cursor
        if state.get("tp_peer"):
            raise DataError(
                "this data cursor was saved by a tensor-parallel peer that reads no data; load "
                "the cursor of the TP group's first rank"
            )
        self._docs.load_state_dict(state["rlp"])
        self._contexts.load_state_dict(state["contexts"])
        self._packer.load_state_dict(state["packer"])
        if self._ntp is not None:
            self._ntp.close()
        self._ntp = None
        if state["ntp"] is not None:
            self._ntp = DocumentStream(self._urls, stream_tag=1, **self._stream_args)
            self._ntp.load_state_dict(state["ntp"])

    def stats(self) -> dict[str, int]:
        """Counters for logging: epoch, documents, contexts, skips (both streams)."""
        if self._docs is None:
            return dict(self._peer_stats)
        return self._local_stats()

    def _local_stats(self) -> dict[str, int]:
        assert self._docs is not None
        out = self._docs.stats()
        out["contexts"] = self._contexts.contexts
        out["short_documents"] = self._contexts.short_documents
        if self._ntp is not None:
            ntp = self._ntp.stats()
            out["ntp_documents"] = ntp["documents"]
            out["skipped_shards"] += ntp["skipped_shards"]
            out["skipped_samples"] += ntp["skipped_samples"]
        return out

    def close(self) -> None:
        """Stop worker processes."""
        if self._docs is not None:
            self._docs.close()
        if self._ntp is not None:
            self._ntp.close()
