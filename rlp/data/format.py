"""On-disk format of token shards: sample keys, token dtypes, manifest schema, data errors.

This module is the contract between the shard builder (``data_pipelines/``) and the readers in
``rlp.data``; it imports only the standard library and numpy.

A shard is a plain (uncompressed) tar file in webdataset layout. Each document is one *sample*:
consecutive members sharing a key, ``{key}.npy`` (1-D token ids, ``uint16`` when every id fits,
else ``int32``; the document ends with EOS) and ``{key}.json`` (``{"source", "doc_id",
"length"}``). Keys contain no dots and are unique within a build. Readers decode only these two
extensions (``.npy`` with ``allow_pickle=False``); anything else in a shard is ignored, never
unpickled.

``manifest.json`` sits next to the shards and is written last by the builder, so a directory
with a manifest is a complete build. Its schema is :class:`Manifest` (``version`` 1).

:func:`iter_tar_members` is the tar reader used for shards, written here rather than taken from
``tarfile``: ``tarfile`` treats a missing header as the end of the archive, so a shard cut at a
member boundary reads as complete. Here an archive must end with the zero-block marker or it is
reported truncated, and members nobody reads are skipped by seeking (cheap fast-forward).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

TOKENS_EXT = "npy"
"""Member extension holding a document's token ids."""
META_EXT = "json"
"""Member extension holding a document's metadata."""
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMAT_NAME = "rlp-token-shards"
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


def decode_tokens(data: bytes, vocab_size: int | None = None) -> np.ndarray:
    """Token ids from ``.npy`` bytes; raises ``ValueError`` for anything but 1-D valid ids."""
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
    """One shard file of a build."""

    name: str
    """File name relative to the manifest's directory."""
    sha256: str
    num_docs: int
    num_tokens: int
    bytes: int


@dataclass
class Manifest:
    """Description of a complete shard build (``manifest.json``)."""

    tokenizer: TokenizerInfo
    dtype: str
    shards: list[ShardInfo]
    builder_version: str
    build: dict[str, Any] = field(default_factory=dict)
    """Builder fingerprint and arguments (informational; not needed to read the shards)."""
    version: int = MANIFEST_VERSION
    format: str = FORMAT_NAME

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def shard(self, name: str) -> ShardInfo | None:
        """Entry for a shard file name, or ``None``."""
        return next((s for s in self.shards if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["num_shards"] = len(self.shards)
        out["num_docs"] = self.num_docs
        out["num_tokens"] = self.num_tokens
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest") -> Manifest:
        """Validate and build; errors name the file and the offending field."""
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: expected a JSON object")
        if raw.get("format") != FORMAT_NAME:
            raise ManifestError(f"{where}: format is {raw.get('format')!r}, not {FORMAT_NAME!r}")
        if raw.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"{where}: manifest version {raw.get('version')!r} is not supported (this rlp "
                f"reads version {MANIFEST_VERSION}); rebuild the shards with this version's "
                "rlp.data.builder"
            )
        try:
            tok = TokenizerInfo(**raw["tokenizer"])
            shards = [ShardInfo(**s) for s in raw["shards"]]
            manifest = cls(
                tokenizer=tok,
                dtype=str(raw["dtype"]),
                shards=shards,
                builder_version=str(raw["builder_version"]),
                build=dict(raw.get("build") or {}),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"{where}: missing or malformed field ({exc})") from exc
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise ManifestError(f"{where}: shard names repeat")
        return manifest


def read_manifest(path: str | Path) -> Manifest:
    """Load and validate ``manifest.json``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {path} is not valid JSON ({exc})") from exc
    return Manifest.from_dict(raw, where=str(path))


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


# ---------------------------------------------------------------------------------- tar

_BLOCK = 512


@dataclass
class TarMember:
    """A regular-file tar member; ``read()`` returns its data (unread members are skipped)."""

    name: str
    read: Callable[[], bytes]


def iter_tar_members(f: BinaryIO, url: str) -> Iterator[TarMember]:
    """Regular-file members of a tar stream (ustar/pax/GNU long names); data read on demand."""
    seekable = _seekable(f)
    long_name: str | None = None
    offset = 0
    while True:
        header = _read(f, _BLOCK)
        if len(header) < _BLOCK:
            if offset == 0 and not header:
                raise CorruptShardError(f"shard {url} is empty (0 bytes)")
            raise CorruptShardError(
                f"shard {url} is truncated at byte {offset + len(header)}: it ends without the "
                "tar end-of-archive marker (an interrupted copy or build?)"
            )
        if header == b"\0" * _BLOCK:
            return  # end-of-archive marker: a complete archive
        if not _checksum_ok(header):
            what = "is not a tar file" if offset == 0 else f"has a damaged header at byte {offset}"
            raise CorruptShardError(f"shard {url} {what}")
        try:
            size = _parse_number(header[124:136])
        except ValueError:
            raise CorruptShardError(f"shard {url} has a damaged header at byte {offset}") from None
        typeflag = header[156:157]
        padded = -(-size // _BLOCK) * _BLOCK
        offset += _BLOCK
        if typeflag in (b"x", b"g", b"L"):
            data = _read(f, padded)
            if len(data) < padded:
                raise CorruptShardError(f"shard {url} is truncated inside a header at {offset}")
            offset += padded
            if typeflag == b"L":
                long_name = data[:size].rstrip(b"\0").decode("utf-8", "replace")
            elif typeflag == b"x":
                long_name = _pax_path(data[:size]) or long_name
            continue
        name = long_name or _tar_name(header)
        long_name = None
        if typeflag not in (b"0", b"\0", b"7"):  # directories, links, devices: no sample data
            _skip(f, padded, seekable)
            offset += padded
            continue
        state = {"read": False}

        def read(
            size: int = size,
            padded: int = padded,
            start: int = offset,
            name: str = name,
            state: dict[str, bool] = state,
        ) -> bytes:
            state["read"] = True
            data = _read(f, padded)
            if len(data) < size:
                raise CorruptShardError(
                    f"shard {url} is truncated at byte {start + len(data)} inside member {name!r}"
                )
            return data[:size]

        yield TarMember(name, read)
        if not state["read"]:
            _skip(f, padded, seekable)
        offset += padded


def _seekable(f: BinaryIO) -> bool:
    try:
        return f.seekable()
    except (AttributeError, OSError):
        return False


def _read(f: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _skip(f: BinaryIO, n: int, seekable: bool) -> None:
    if seekable:
        f.seek(n, os.SEEK_CUR)  # past EOF is fine: the next header read reports truncation
    else:
        while n > 0:
            chunk = f.read(min(n, 1 << 20))
            if not chunk:
                return
            n -= len(chunk)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _parse_number(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)
    return stored in (unsigned, signed)


def _parse_number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError(f"bad octal field {field!r}") from None


def _tar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"<len> path=<value>\\n"`` records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        record = data[space + 1 : pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            return v.decode("utf-8", "replace")
        pos += length
    return None
