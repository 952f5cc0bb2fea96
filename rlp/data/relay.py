"""Relay: one rank of a tensor-parallel group reads the data and sends each batch to its peers.

TP peers of a data-parallel rank train on the same data. Instead of every peer reading (and
downloading) the same shards, the group's first rank reads them and broadcasts each step's
token ids over the group: the RLP contexts (prefix and target ids, document key, position,
epoch) and packed NTP windows, a few KB per step. Shard traffic then does not grow with TP
(the same pattern as Megatron's ``get_batch_on_this_tp_rank``).

A payload is plain data: a JSON header and raw integer arrays in one ``uint8`` tensor (no
pickle), broadcast after its length. If the reader fails (a :class:`DataError`, or anything
else), it broadcasts the error message first, so the peers raise the same error instead of
waiting forever.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rlp.data.contexts import Context
from rlp.data.format import CorruptShardError, DataError

_ERRORS: dict[str, type[DataError]] = {
    "DataError": DataError,
    "CorruptShardError": CorruptShardError,
}


def pack(header: dict[str, Any], arrays: list[np.ndarray]) -> bytes:
    """One buffer: 8-byte header length, JSON header (with array shapes/dtypes), array bytes."""
    header = dict(header, arrays=[[list(a.shape), a.dtype.str] for a in arrays])
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([len(head).to_bytes(8, "little"), head, *(a.tobytes() for a in arrays)])


def unpack(buf: bytes) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Inverse of :func:`pack`."""
    size = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8 : 8 + size])
    arrays, pos = [], 8 + size
    for shape, dtype in header.pop("arrays"):
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(buf, dt, count, pos).reshape(shape))
        pos += count * dt.itemsize
    return header, arrays


def pack_contexts(contexts: list[Context]) -> tuple[dict[str, Any], list[np.ndarray]]:
    ids = [np.asarray(c.prefix + c.target, dtype=np.int32) for c in contexts]
    header = {
        "keys": [c.key for c in contexts],
        "positions": [c.position for c in contexts],
        "epochs": [c.epoch for c in contexts],
        "prefix": [len(c.prefix) for c in contexts],
        "target": [len(c.target) for c in contexts],
    }
    return header, [np.concatenate(ids) if ids else np.zeros(0, np.int32)]


def unpack_contexts(header: dict[str, Any], arrays: list[np.ndarray]) -> list[Context]:
    out, pos, flat = [], 0, arrays[0].tolist()
    for key, t, epoch, p, k in zip(
        header["keys"], header["positions"], header["epochs"], header["prefix"], header["target"]
    ):
        out.append(Context(flat[pos : pos + p], flat[pos + p : pos + p + k], key, t, epoch))
        pos += p + k
    return out


class Relay:
    """Broadcasts results of the group's first rank (the reader) to the other ranks."""

    def __init__(self, group: Any, device: torch.device | None = None) -> None:
        self.group = group
        self.src = dist.get_global_rank(group, 0)
        self.is_reader = dist.get_rank(group) == 0
        if device is None:
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self.device = device or torch.device("cpu")

    def share(
        self,
        produce: Callable[[], tuple[dict[str, Any], list[np.ndarray]]],
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Reader: run ``produce`` and send its ``(header, arrays)``; peers: receive them."""
        if self.is_reader:
            try:
                header, arrays = produce()
            except BaseException as exc:
                kind = type(exc).__name__ if isinstance(exc, DataError) else "DataError"
                msg = str(exc) if isinstance(exc, DataError) else f"the data reader failed: {exc!r}"
                self._send(pack({"error": msg, "kind": kind}, []))
                raise
            self._send(pack(header, arrays))
            return header, arrays
        header, arrays = unpack(self._receive())
        if "error" in header:
            raise _ERRORS.get(header["kind"], DataError)(header["error"])
        return header, arrays

    def _send(self, buf: bytes) -> None:
        size = torch.tensor([len(buf)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, self.src, group=self.group)
        data = torch.frombuffer(bytearray(buf), dtype=torch.uint8).to(self.device)
        dist.broadcast(data, self.src, group=self.group)

    def _receive(self) -> bytes:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(size, self.src, group=self.group)
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, self.src, group=self.group)
        return data.cpu().numpy().tobytes()
