"""Training data: shards (pre-tokenised or text), the DP-aware resumable stream, RLP contexts.

Submodules: :mod:`~rlp.data.format` (on-disk format, manifest, errors),
:mod:`~rlp.data.urls` (URL expansion and opening: local, HTTP, object stores, ``pipe:``),
:mod:`~rlp.data.samples` (one shard's tar members as samples, strict damage checks),
:mod:`~rlp.data.text` (text to token ids, shared by builder and stream),
:mod:`~rlp.data.shards` (manifest lookup and checks, DP split),
:mod:`~rlp.data.cursor` (one reader lane: shuffle buffer, exact replay), :mod:`~rlp.data.stream`
(the DP-rank stream and its cursor), :mod:`~rlp.data.relay` (one reader per TP group),
:mod:`~rlp.data.contexts` (target positions, prefixes), :mod:`~rlp.data.packing` (packed NTP
windows); offline tools :mod:`~rlp.data.builder` (``rlp data build``), :mod:`~rlp.data.indexer`
(``rlp data manifest``) and :mod:`~rlp.data.demo` (``rlp data demo``). The stream (and torch) is
imported lazily so that ``rlp.data.format`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from rlp.data.contexts import Context, ContextBuilder, document_contexts, target_positions
from rlp.data.format import (
    CorruptShardError,
    DataError,
    Manifest,
    ManifestError,
    TokenizerMismatchError,
    read_manifest,
)
from rlp.data.packing import SequencePacker
from rlp.data.shards import epoch_shards
from rlp.data.urls import expand_shard_urls

_LAZY = {"DocumentStream", "Document", "RLPDataStream"}

__all__ = [
    "Context",
    "ContextBuilder",
    "CorruptShardError",
    "DataError",
    "Document",
    "DocumentStream",
    "Manifest",
    "ManifestError",
    "RLPDataStream",
    "SequencePacker",
    "TokenizerMismatchError",
    "document_contexts",
    "epoch_shards",
    "expand_shard_urls",
    "read_manifest",
    "target_positions",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from rlp.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'rlp.data' has no attribute {name!r}")
