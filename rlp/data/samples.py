"""Reading one shard: its tar members grouped into samples, with strict damage checks.

This module owns how the bytes of one shard become samples. A :class:`ShardReader` opens a URL
(:func:`rlp.data.urls.open_url`) and reads it with the standard library's ``tarfile``: a local
uncompressed file in random-access mode (members nobody wants are skipped by seeking), anything
else as a stream (``pipe:``, HTTP, object stores, ``.tar.gz``). Members are grouped into samples
by webdataset's key rule (:func:`webdataset.tariterators.base_plus_ext`: the name up to the first
dot of its base name is the key, the rest the extension, lower-cased).

Damage is reported as :class:`~rlp.data.format.CorruptShardError`, never silently read as a short
shard. ``tarfile`` alone treats a missing or damaged header after the first member as the end of
the archive, so a shard cut at a member boundary (an interrupted copy) would read as complete and
valid. Here each header read goes through :class:`_StrictTarInfo`, which records *why* the archive
ended: only the zero-block end-of-archive marker counts as complete; an empty, short or invalid
header means truncation or damage. Data cut inside a member, gzip errors and a ``pipe:`` command's
failing exit status are errors too. (A manifest's per-shard sample count, checked by the lane
reader, additionally catches a shard rewritten with fewer samples.)

Only members with a wanted extension of a wanted sample are read; nothing is decoded here (see
:mod:`rlp.data.cursor`), so nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from webdataset.tariterators import base_plus_ext

from rlp.data.format import CorruptShardError
from rlp.data.urls import close_stream, command_status, is_local, open_url

_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _StrictTarInfo(tarfile.TarInfo):
    """Records on the ``TarFile`` why its archive ended (``tarfile`` only stops quietly)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            tarfile_._rlp_end = "complete"  # type: ignore[attr-defined]
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            tarfile_._rlp_end = "truncated"  # type: ignore[attr-defined]
            raise
        except tarfile.InvalidHeaderError:
            tarfile_._rlp_end = "damaged"  # type: ignore[attr-defined]
            raise


@dataclass
class RawSample:
    """One sample's members as read from a shard.

    ``parts`` maps extension to bytes for wanted samples (``None`` for skipped ones); ``error``
    is set when the shard ended inside the sample.
    """

    key: str
    parts: dict[str, bytes] | None
    error: str | None = None


class _Digest:
    """A read-through wrapper counting and hashing the bytes of a stream."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


class ShardReader:
    """An open shard (close it, or use ``with``); :meth:`samples` iterates it once.

    ``digest=True`` reads the shard as a stream and keeps the sha256 and size of its bytes
    (:attr:`sha256`, :attr:`bytes`, complete after :meth:`finish`), for manifests of remote shards.
    """

    def __init__(self, url: str, *, digest: bool = False) -> None:
        self.url = url
        try:
            self._raw = open_url(url)
        except OSError as exc:
            raise CorruptShardError(f"shard {url} cannot be opened ({exc})") from exc
        self._digest = _Digest(self._raw) if digest else None
        self._source: Any = self._digest or self._raw
        self._finished = False

    # ------------------------------------------------------------------------------- samples

    def samples(self, want: Callable[[], bool], extensions: tuple[str, ...]) -> Iterator[RawSample]:
        """Samples in file order; raises :class:`CorruptShardError` on damage.

        ``want()`` is called once per sample, when its first member is seen, and decides whether
        its members are read (only ``extensions``) or skipped. A sample being read when damage is
        found is yielded first (with ``error`` set) and the error raised on the next step, so
        callers count samples identically whether or not they read them.
        """
        tf = self._open_tar()
        key: str | None = None
        parts: dict[str, bytes] | None = None
        incomplete: str | None = None
        members = self._members(tf)
        while True:
            try:
                info = next(members, None)
            except CorruptShardError:
                if key is not None:  # its members were read in full before the damage
                    yield RawSample(key, parts, incomplete)
                raise
            mkey = ext = None
            if info is not None:
                mkey, ext = base_plus_ext(info.name)
                if mkey is None:
                    continue  # members without an extension carry no sample data
            if key is not None and mkey != key:
                yield RawSample(key, parts, incomplete)
                key = None
            if info is None:
                return
            if key is None:
                key, parts, incomplete = mkey, ({} if want() else None), None
            ext = ext.lower()
            if parts is not None and ext in extensions:
                if ext in parts:
                    incomplete = f"member {info.name!r} appears twice in the sample"
                    continue
                try:
                    parts[ext] = tf.extractfile(info).read()  # type: ignore[union-attr]
                except _READ_ERRORS as exc:
                    incomplete = self._damage(f"is truncated inside member {info.name!r}", exc)

    def _open_tar(self) -> tarfile.TarFile:
        mode = "r|*"
        if self._digest is None and is_local(self.url):
            magic = self._raw.read(2)
            self._raw.seek(0)
            if magic == b"":
                raise CorruptShardError(f"shard {self.url} is empty (0 bytes)")
            mode = "r|*" if magic == b"\x1f\x8b" else "r:"  # seek over unread members
        try:
            # Not closed: closing a TarFile only closes the stream it was given, ours (close()).
            tf = tarfile.open(fileobj=self._source, mode=mode, tarinfo=_StrictTarInfo)  # noqa: SIM115
        except _READ_ERRORS as exc:
            what = "is empty (0 bytes)" if "empty file" in str(exc) else "is not a tar file"
            raise CorruptShardError(self._damage(what, exc)) from None
        return tf

    def _members(self, tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        """Regular-file members; the archive must end with the end-of-archive marker."""
        while True:
            offset = tf.offset
            try:
                info = tf.next()
            except _READ_ERRORS as exc:
                what = f"is damaged at byte {offset}"
                if "unexpected end of data" in str(exc):
                    what = f"is truncated at byte {offset} (inside a member's data)"
                raise CorruptShardError(self._damage(what, exc)) from None
            if info is None:
                break
            tf.members = []  # random-access mode would keep every header in memory
            if info.isreg():
                yield info
        end = getattr(tf, "_rlp_end", None)
        if end == "complete":
            return
        if end == "damaged":
            raise CorruptShardError(self._damage(f"has a damaged header at byte {tf.offset}"))
        raise CorruptShardError(
            self._damage(
                f"is truncated at byte {tf.offset}: it ends without the tar end-of-archive "
                "marker (an interrupted copy or build?)"
            )
        )

    def _damage(self, what: str, exc: BaseException | None = None) -> str:
        msg = f"shard {self.url} {what}"
        if exc is not None and not isinstance(exc, tarfile.ReadError):
            msg += f" ({type(exc).__name__}: {exc})"
        status = command_status(self._raw)
        if status not in (None, 0):
            msg += f"; its command exited with status {status}"
        return msg

    # ------------------------------------------------------------------------------- closing

    @property
    def sha256(self) -> str | None:
        return None if self._digest is None else self._digest.sha256.hexdigest()

    @property
    def bytes(self) -> int | None:
        return None if self._digest is None else self._digest.bytes

    def finish(self) -> None:
        """After a complete read: read the rest (tar padding) and check a command's status."""
        try:
            if self._digest is not None or not is_local(self.url):
                while self._source.read(1 << 16):  # a command must not die of SIGPIPE
                    pass
            close_stream(self._raw, early=False)
        except _READ_ERRORS as exc:
            raise CorruptShardError(self._damage("could not be read to its end", exc)) from None
        finally:
            self._finished = True
        status = command_status(self._raw)
        if status not in (None, 0, 141):
            raise CorruptShardError(f"shard {self.url}: its command exited with status {status}")

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            with contextlib.suppress(OSError):  # after an error, which was reported
                close_stream(self._raw, early=True)

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
