"""On-disk format of shards: sample keys, token dtypes, manifest schema, data errors.

This module is the contract between the shard builder (:mod:`rlp.data.builder`), the manifest
indexer (:mod:`rlp.data.indexer`) and the readers in ``rlp.data``; it imports only the standard
library and numpy.

A shard is a tar file (plain, or gzip-compressed ``.tar.gz``) in webdataset layout: a *sample* is
the run of consecutive members sharing a key (the member name up to the first dot of its base
name). Two sample layouts are read (``docs/data.md``):

* **pre-tokenised** (written by ``rlp data build``): ``{key}.npy`` (1-D token ids, ``uint16`` when
  every id fits, else ``int32``; the document ends with EOS) and ``{key}.json`` (``{"source",
  "doc_id", "length"}``);
* **text** (any webdataset): ``{key}.txt`` (UTF-8), or a string field (``data.text_key``) of
  ``{key}.json`` (one object) or ``{key}.jsonl`` (one object per line, texts joined by newlines).

Readers decode only these extensions (``.npy`` with a strict header parser, never pickle);
anything else in a shard is skipped unread.

``manifest.json`` sits next to the shards (or anywhere, given by path or URL) and is written last,
so a directory with a manifest is a complete build. Its schema is :class:`Manifest`: format
``rlp-token-shards`` (pre-tokenised, names the tokenizer) or ``rlp-text-shards`` (an index of text
shards made by ``rlp data manifest``); both list each shard's base name and sample count, which
lets a resume skip whole shards without opening them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TOKENS_EXT = "npy"
"""Member extension holding a document's token ids."""
META_EXT = "json"
"""Member extension holding a document's metadata (pre-tokenised) or its text (text shards)."""
TEXT_EXTS = ("txt", "json", "jsonl")
"""Member extensions a text sample may carry its text in, in order of preference."""
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMAT_NAME = "rlp-token-shards"
"""Manifest format of pre-tokenised builds."""
TEXT_FORMAT_NAME = "rlp-text-shards"
"""Manifest format of an index of text shards (no tokenizer)."""
SHARD_TEMPLATE = "{prefix}-{index:06d}.tar"
"""Shard file names; ``{prefix}-{000000..000003}.tar`` brace-expands to a build's shards."""
TOKEN_DTYPES = ("uint16", "int32")
"""dtypes the builder writes (readers also accept other integer dtypes that hold the ids)."""


class DataError(RuntimeError):
    """Base class for data problems; messages name the file and the fix."""


class ManifestError(DataError):
    """A manifest is missing, malformed or does not describe the given shards."""


class CorruptShardError(DataError):
    """A shard or sample cannot be read (truncated, garbage, missing, checksum mismatch)."""


class TokenizerMismatchError(DataError):
    """Shards were built with a different tokenizer than the run uses."""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when all ids ``< vocab_size`` fit (vocab <= 65536), else ``int32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def encode_tokens(tokens: np.ndarray) -> bytes:
    """``.npy`` bytes of a 1-D token array (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[iu][1248])', 'fortran_order': False, 'shape': \((\d+),\), \} *\n"
)
"""The header ``np.save`` writes for a 1-D integer array (the only kind a token member holds)."""
_DTYPES: dict[bytes, np.dtype] = {}


def decode_tokens(data: bytes, vocab_size: int | None = None) -> np.ndarray:
    """Token ids from ``.npy`` bytes; raises ``ValueError`` for anything but 1-D valid ids.

    The header ``np.save`` writes for 1-D integer arrays is parsed with one regular expression
    (several times faster than ``np.load``, which evaluates the header as a Python literal);
    anything else goes through ``np.load(allow_pickle=False)``. Object arrays are never unpickled.
    """
    arr = _fast_npy(data)
    if arr is None:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError/OSError/EOFError for garbage
            raise ValueError(f"not a valid .npy array ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"expected a 1-D integer array, got {arr.dtype} with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("the document has no tokens")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"negative token id {int(arr.min())}")
    if vocab_size is not None and int(arr.max()) >= vocab_size:
        raise ValueError(f"token id {int(arr.max())} >= vocab_size {vocab_size}")
    return arr


def _fast_npy(data: bytes) -> np.ndarray | None:
    """The array of a version-1.0 ``.npy`` with the standard 1-D integer header, else ``None``."""
    if len(data) < 10 or data[:6] != _NPY_MAGIC or data[6] != 1:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    m = _NPY_HEADER.fullmatch(data, 10, end)
    if m is None:
        return None
    dtype = _DTYPES.get(m.group(1))
    if dtype is None:
        dtype = _DTYPES.setdefault(m.group(1), np.dtype(m.group(1).decode()))
    count = int(m.group(2))
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(
            f"not a valid .npy array ({len(data) - end} data bytes for {count} x {dtype})"
        )
    return np.frombuffer(data, dtype, count, end)


def encode_meta(meta: dict[str, Any]) -> bytes:
    """Canonical JSON bytes (sorted keys) so identical builds give identical shards."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decode_meta(data: bytes) -> dict[str, Any]:
    """Metadata dict from ``.json`` bytes; raises ``ValueError`` if it is not a JSON object."""
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- manifest


@dataclass
class TokenizerInfo:
    """Which tokenizer produced the ids (see ``rlp.tokenizer.Tokenizer.hash``)."""

    name: str
    hash: str
    vocab_size: int
    eos_id: int


@dataclass
class ShardInfo:
    """One shard file of a build or index."""

    name: str
    """Base name of the shard; shards given by path or URL are matched to entries by base name."""
    sha256: str
    num_docs: int
    """Samples in the shard (every key counts, also a text sample without usable text)."""
    num_tokens: int | None
    """Tokens in the shard (pre-tokenised builds); ``None`` for text shards."""
    bytes: int


@dataclass
class Manifest:
    """Description of a complete shard set (``manifest.json``).

    ``format`` ``rlp-token-shards``: a pre-tokenised build (``tokenizer`` and ``dtype`` set).
    ``rlp-text-shards``: an index of text shards (``tokenizer`` and ``dtype`` are ``None``).
    """

    tokenizer: TokenizerInfo | None
    dtype: str | None
    shards: list[ShardInfo]
    builder_version: str
    build: dict[str, Any] = field(default_factory=dict)
    """Builder fingerprint and arguments (informational; not needed to read the shards)."""
    version: int = MANIFEST_VERSION
    format: str = FORMAT_NAME

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.shards}

    @property
    def content(self) -> str:
        """``"tokens"`` (pre-tokenised samples) or ``"text"``."""
        return "tokens" if self.format == FORMAT_NAME else "text"

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def num_tokens(self) -> int | None:
        counts = [s.num_tokens for s in self.shards]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]

    def shard(self, name: str) -> ShardInfo | None:
        """Entry for a shard base name, or ``None``."""
        return self._by_name.get(name)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["tokenizer"] = None if self.tokenizer is None else dataclasses.asdict(self.tokenizer)
        out["shards"] = [dataclasses.asdict(s) for s in self.shards]
        out["num_shards"] = len(self.shards)
        out["num_docs"] = self.num_docs
        out["num_tokens"] = self.num_tokens
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest") -> Manifest:
        """Validate and build; errors name the file and the offending field."""
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        fmt = raw.get("format")
        if fmt not in (FORMAT_NAME, TEXT_FORMAT_NAME):
            raise ManifestError(
                f"{where}: format is {fmt!r}, not {FORMAT_NAME!r} or {TEXT_FORMAT_NAME!r}"
            )
        if raw.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"{where}: manifest version {raw.get('version')!r} is not supported (this rlp "
                f"reads version {MANIFEST_VERSION}); rebuild the shards with this version's "
                "rlp.data.builder (or re-index them with rlp data manifest)"
            )
        try:
            tok = raw.get("tokenizer")
            if fmt == FORMAT_NAME and not isinstance(tok, dict):
                raise KeyError("tokenizer")
            shards = [ShardInfo(**s) for s in raw["shards"]]
            manifest = cls(
                tokenizer=TokenizerInfo(**tok) if isinstance(tok, dict) else None,
                dtype=None if raw.get("dtype") is None else str(raw["dtype"]),
                shards=shards,
                builder_version=str(raw["builder_version"]),
                build=dict(raw.get("build") or {}),
                format=fmt,
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: missing or malformed field ({exc})") from exc
        if len(manifest._by_name) != len(shards):
            raise ManifestError(f"{where}: shard names repeat")
        return manifest

    @classmethod
    def from_json(cls, data: bytes | str, where: str) -> Manifest:
        """Parse ``manifest.json`` content (read from a file or a URL)."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest {where} is not valid JSON ({exc})") from exc
        return cls.from_dict(raw, where=where)


def read_manifest(path: str | Path) -> Manifest:
    """Load and validate a local ``manifest.json`` (URLs: :func:`rlp.data.shards.load_manifest`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest {path} is a directory, not a manifest.json") from None
    return Manifest.from_json(data, str(path))


def write_manifest(path: str | Path, manifest: Manifest) -> Path:
    """Write atomically (tmp + rename) with sorted keys, so equal builds give equal bytes."""
    path = Path(path)
    write_atomic(path, (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + ``os.replace`` (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
