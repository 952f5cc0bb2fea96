"""Packed fixed-length sequences for the optional next-token (NTP) loss.

This module owns how documents become ``[b, s]`` NTP batches: documents are concatenated, each
ending with EOS (added only when the document does not already end with it; the shard builder
appends one), and the token stream is cut into windows of ``s + 1`` tokens; a window gives
``input_ids = w[:-1]`` and ``labels = w[1:]``. Consecutive windows share their boundary token
(window ``i`` spans stream positions ``[i*s, i*s + s]``), as in Megatron's GPT dataset, so every
token is a label exactly once. Attention is not masked at document boundaries (standard packing).

**State is a position, not tokens.** The not-yet-emitted tail of the stream is never saved: it
can be a whole document long (millions of tokens). Each document is added with an *origin*, an
opaque marker of where it starts in its document stream (the stream's position before it). The
state is the origin of the first document still buffered and how many of its tokens were already
emitted (``skip``), a few bytes whatever the document length. To resume, the caller rewinds its
document stream to that origin and the packer drops ``skip`` tokens of the first document it is
given again (:meth:`SequencePacker.load_state_dict`), which rebuilds the buffer exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np


class SequencePacker:
    """Accumulates documents and emits ``seq_len + 1`` token windows."""

    def __init__(self, seq_len: int, eos_id: int | None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.eos_id = eos_id
        # Buffered documents: (tokens, origin, tokens of it already emitted), oldest first.
        self._docs: deque[list[Any]] = deque()
        self._size = 0
        self._skip_next = 0

    @property
    def available(self) -> int:
        """Complete windows that :meth:`pop` can return now."""
        return max(0, (self._size - 1) // self.seq_len)

    def add(self, tokens: np.ndarray, origin: Any = None) -> None:
        """Append one document (plus EOS unless it already ends with it).

        ``origin`` marks where the document starts in its stream (see the module docstring).
        """
        arr = np.asarray(tokens, dtype=np.int64)
        if self.eos_id is not None and (arr.size == 0 or int(arr[-1]) != self.eos_id):
            arr = np.concatenate([arr, np.array([self.eos_id], dtype=np.int64)])
        skip, self._skip_next = self._skip_next, 0
        if skip > arr.size:
            raise ValueError(
                f"the data cursor skips {skip} tokens of a document of {arr.size}: the shards "
                "changed since it was saved"
            )
        if arr.size > skip:
            self._docs.append([arr, origin, skip])
            self._size += arr.size - skip

    def pop(self) -> np.ndarray:
        """The next ``seq_len + 1`` tokens (int64); the last one also starts the next window."""
        if self.available < 1:
            raise ValueError(f"need {self.seq_len + 1} tokens, have {self._size}; add documents")
        need, parts = self.seq_len + 1, []
        for arr, _, start in self._docs:
            take = arr[start : start + need]
            parts.append(take)
            need -= take.size
            if need == 0:
                break
        window = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        drop = self.seq_len  # the window's last token stays: it starts the next window
        self._size -= drop
        while drop:
            first = self._docs[0]
            left = first[0].size - first[2]
            if left <= drop:
                self._docs.popleft()
                drop -= left
            else:
                first[2] += drop
                drop = 0
        return window

    def next_batch(
        self, documents: Iterator[Any], batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, each ``[batch_size, seq_len]`` int64, pulling documents as
        needed: ``(tokens, origin)`` pairs or objects with ``tokens``."""
        while self.available < batch_size:
            item = next(documents)
            if isinstance(item, tuple):
                self.add(*item)
            else:
                self.add(item.tokens)
        windows = np.stack([self.pop() for _ in range(batch_size)])
        return windows[:, :-1].copy(), windows[:, 1:].copy()

    @property
    def origin(self) -> Any:
        """Origin of the first buffered document (``None`` when nothing is buffered)."""
        return self._docs[0][1] if self._docs else None

    def state_dict(self) -> dict[str, Any]:
        """``seq_len`` and ``skip``: tokens of the document at :attr:`origin` already emitted."""
        skip = int(self._docs[0][2]) if self._docs else self._skip_next
        return {"seq_len": self.seq_len, "skip": skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Empty the buffer; the next document added loses its first ``skip`` tokens.

        The caller feeds documents again from the origin the state was taken at.
        """
        if int(state["seq_len"]) != self.seq_len:
            raise ValueError(
                f"the data cursor packed NTP sequences of length {state['seq_len']}, this run uses "
                f"data.ntp_seq_len={self.seq_len}; resume with the same value"
            )
        self._docs.clear()
        self._size = 0
        self._skip_next = int(state["skip"])
