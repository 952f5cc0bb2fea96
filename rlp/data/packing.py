"""Packed fixed-length sequences for the optional next-token (NTP) loss.

This module owns how documents become ``[b, s]`` NTP batches: documents are concatenated, each
ending with EOS (added only when the document does not already end with it; the shard builder
appends one), and the token stream is cut into windows of ``s + 1`` tokens; a window gives
``input_ids = w[:-1]`` and ``labels = w[1:]``. Consecutive windows share their boundary token
(window ``i`` spans stream positions ``[i*s, i*s + s]``), as in Megatron's GPT dataset, so every
token is a label exactly once. Attention is not masked at document boundaries (standard packing).

The packer's only state is the not-yet-emitted tail of the stream; it goes into the data cursor
as a list of ints (at most one document plus one window long).
"""

from __future__ import annotations

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
        self._chunks: list[np.ndarray] = []
        self._size = 0

    @property
    def available(self) -> int:
        """Complete windows that :meth:`pop` can return now."""
        return max(0, (self._size - 1) // self.seq_len)

    def add(self, tokens: np.ndarray) -> None:
        """Append one document (plus EOS unless it already ends with it)."""
        arr = np.asarray(tokens, dtype=np.int64)
        if self.eos_id is not None and (arr.size == 0 or int(arr[-1]) != self.eos_id):
            arr = np.concatenate([arr, np.array([self.eos_id], dtype=np.int64)])
        if arr.size:
            self._chunks.append(arr)
            self._size += arr.size

    def pop(self) -> np.ndarray:
        """The next ``seq_len + 1`` tokens (int64); the last one also starts the next window."""
        if self.available < 1:
            raise ValueError(f"need {self.seq_len + 1} tokens, have {self._size}; add documents")
        buf = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        window = buf[: self.seq_len + 1].copy()
        rest = buf[self.seq_len :]
        self._chunks = [rest]
        self._size = rest.size
        return window

    def next_batch(
        self, documents: Iterator[Any], batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)``, each ``[batch_size, seq_len]`` int64, pulling documents
        (objects with ``tokens``) as needed."""
        while self.available < batch_size:
            self.add(next(documents).tokens)
        windows = np.stack([self.pop() for _ in range(batch_size)])
        return windows[:, :-1].copy(), windows[:, 1:].copy()

    def state_dict(self) -> dict[str, Any]:
        buf = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int64)
        return {"seq_len": self.seq_len, "buffer": buf.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seq_len"]) != self.seq_len:
            raise ValueError(
                f"the data cursor packed NTP sequences of length {state['seq_len']}, this run uses "
                f"data.ntp_seq_len={self.seq_len}; resume with the same value"
            )
        buf = np.asarray(state["buffer"], dtype=np.int64)
        self._chunks = [buf] if buf.size else []
        self._size = int(buf.size)
