"""Shard sets: URL expansion, manifest checks, DP split, and reading samples out of a shard.

This module owns *which* shards a rank reads and *how* one shard is read:

* :func:`expand_shard_urls` turns ``data.shards`` into a list: local paths, globs, brace patterns
  (``demo-{000000..000003}.tar``), ``file://`` URLs, ``pipe:CMD`` (CMD's stdout is the tar), and
  comma-separated lists of those (commas inside ``{...}`` belong to the brace pattern).
* :func:`load_manifest` / :func:`check_manifest` find ``manifest.json`` and refuse shards built with
  another tokenizer or not listed in it.
* :func:`epoch_shards` gives one DP rank's shards for an epoch: the whole list is permuted from
  ``(seed, epoch)`` *before* the split, then strided by the **data-parallel** rank passed in. It
  never reads ``RANK``/``WORLD_SIZE`` (webdataset's ``split_by_node`` does, which makes TP peers
  read different data); all TP/PP peers of a DP rank therefore get the same list.
* :class:`ShardSource` opens a shard (file or ``pipe:``); :func:`iter_samples` groups its tar
  members (:func:`rlp.data.format.iter_tar_members`) into samples, reading only wanted ones.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from braceexpand import braceexpand

from rlp.data.format import (
    MANIFEST_NAME,
    CorruptShardError,
    Manifest,
    ManifestError,
    TokenizerMismatchError,
    iter_tar_members,
    read_manifest,
)

log = logging.getLogger("rlp.data")

# ---------------------------------------------------------------------------------- URLs


def split_top_level(spec: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside ``{...}`` (brace alternatives keep their commas)."""
    parts, depth, cur = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand ``data.shards`` into shard URLs (local paths or ``pipe:`` commands), in order.

    Globs are sorted; brace patterns keep their order; a glob or path that matches nothing is an
    error (a typo must not silently train on fewer shards).
    """
    items = split_top_level(spec) if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for item in items:
        for url in braceexpand(item):
            if url.startswith("pipe:"):
                if not url[5:].strip():
                    raise ValueError(f"empty pipe: command in data.shards {spec!r}")
                urls.append(url)
                continue
            if url.startswith("file://"):
                url = url[len("file://") :]
            elif "://" in url:
                raise ValueError(
                    f"shard URL {url!r}: only local paths, file:// and pipe: are supported; for "
                    f"remote storage use e.g. 'pipe:curl -sfL {url}' or 'pipe:aws s3 cp {url} -'"
                )
            path = os.path.expanduser(url)
            if glob.has_magic(path):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise ValueError(f"shard glob {url!r} matches no files (data.shards)")
                urls.extend(matches)
            else:
                urls.append(path)
    if not urls:
        raise ValueError(f"data.shards {spec!r} names no shards")
    if len(set(urls)) != len(urls):
        dup = sorted({u for u in urls if urls.count(u) > 1})
        raise ValueError(f"data.shards lists shards more than once: {dup[:5]}")
    return urls


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def shard_name(url: str) -> str | None:
    """File name used to look a shard up in the manifest (``None`` for ``pipe:`` URLs)."""
    return None if is_pipe(url) else os.path.basename(url)


# ---------------------------------------------------------------------------------- manifest


def default_manifest_path(urls: Sequence[str]) -> Path | None:
    """``manifest.json`` next to the first local shard, or ``None`` for pipe-only sets."""
    local = [u for u in urls if not is_pipe(u)]
    return Path(local[0]).parent / MANIFEST_NAME if local else None


def load_manifest(urls: Sequence[str], manifest: str | Path | None = None) -> Manifest | None:
    """The explicit manifest (must exist) or the one next to the shards (``None`` if absent)."""
    if manifest is not None:
        return read_manifest(manifest)
    path = default_manifest_path(urls)
    return read_manifest(path) if path is not None and path.is_file() else None


def check_manifest(
    manifest: Manifest,
    urls: Sequence[str],
    *,
    where: str,
    tokenizer_name: str | None = None,
    tokenizer_hash: str | None = None,
) -> None:
    """Refuse a tokenizer mismatch and local shards the manifest does not list."""
    if tokenizer_hash is not None and manifest.tokenizer.hash != tokenizer_hash:
        raise TokenizerMismatchError(
            f"the shards in {where} were built with tokenizer {manifest.tokenizer.name!r} "
            f"(hash {manifest.tokenizer.hash}), but this run uses tokenizer "
            f"{tokenizer_name or '?'!r} (hash {tokenizer_hash}). Rebuild the shards with this "
            f"tokenizer (python -m rlp.data.builder --tokenizer {tokenizer_name} ...) "
            f"or set tokenizer.path to {manifest.tokenizer.name!r}; set data.check_tokenizer=false "
            "only if both map text to the same ids"
        )
    unknown = [n for n in (shard_name(u) for u in urls) if n is not None and not manifest.shard(n)]
    if unknown:
        raise ManifestError(
            f"{len(unknown)} shard(s) are not listed in {where} (e.g. {unknown[:3]}): they come "
            "from another build; point data.manifest at their manifest or rebuild"
        )


@dataclass(frozen=True)
class ShardSet:
    """Expanded shard URLs with their (checked) manifest."""

    urls: list[str]
    manifest: Manifest | None
    manifest_where: str


def open_shard_set(
    spec: str | Sequence[str],
    *,
    manifest: str | Path | None = None,
    tokenizer_name: str | None = None,
    tokenizer_hash: str | None = None,
    on_corrupt: str = "error",
) -> ShardSet:
    """Expand ``spec``, load and check the manifest, and check that local shard files exist.

    With ``tokenizer_hash`` the manifest is required and must match it. Missing shard files
    raise with ``on_corrupt="error"`` and are logged (then skipped and counted by the reader)
    with ``"skip"``.
    """
    urls = expand_shard_urls(spec)
    found = load_manifest(urls, manifest)
    where = str(manifest or default_manifest_path(urls) or MANIFEST_NAME)
    if found is not None:
        check_manifest(
            found, urls, where=where, tokenizer_name=tokenizer_name, tokenizer_hash=tokenizer_hash
        )
    elif tokenizer_hash is not None:
        raise ManifestError(
            f"no {where} found, so the shards' tokenizer cannot be checked; set data.manifest "
            "to the build's manifest.json, or data.check_tokenizer=false"
        )
    missing = [u for u in urls if not is_pipe(u) and not os.path.isfile(u)]
    if missing:
        msg = f"{len(missing)} of {len(urls)} shard file(s) do not exist: {missing[:5]}"
        if on_corrupt == "error":
            raise CorruptShardError(
                f"{msg}. Fix data.shards, build the shards (rlp data build / rlp data demo), or "
                "set data.on_corrupt=skip to train on the others"
            )
        log.warning("%s; they are skipped and counted in skipped_shards (on_corrupt=skip)", msg)
    return ShardSet(urls, found, where)


# ---------------------------------------------------------------------------------- split


def epoch_shards(
    urls: Sequence[str], *, seed: int, epoch: int, dp_rank: int, dp_size: int, shuffle: bool
) -> list[str]:
    """This DP rank's shards for ``epoch``: permute all shards by (seed, epoch), then stride.

    Every rank computes the same permutation, so the ranks' lists are disjoint and cover all
    shards each epoch. Rank ``r`` always gets ``len(range(r, n, dp_size))`` shards.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if len(urls) < dp_size:
        raise ValueError(
            f"{len(urls)} shard(s) cannot feed {dp_size} data-parallel ranks: every rank needs at "
            "least one shard. Rebuild with more, smaller shards (build_shards --docs-per-shard) "
            "or use fewer DP ranks"
        )
    order = list(urls)
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([_u64(seed), epoch, 0x5A4D]))
        order = [order[i] for i in rng.permutation(len(order))]
    return order[dp_rank::dp_size]


def _u64(x: int) -> int:
    return x & 0xFFFF_FFFF_FFFF_FFFF


# ---------------------------------------------------------------------------------- reading


class ShardSource:
    """An open shard: a local file or the stdout of a ``pipe:`` command (closed on exit)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._proc: subprocess.Popen | None = None
        self._stderr: BinaryIO | None = None
        if is_pipe(url):
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
            self._proc = subprocess.Popen(
                url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._stderr
            )
            self.fileobj: BinaryIO = self._proc.stdout  # type: ignore[assignment]
        else:
            try:
                self.fileobj = open(url, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise CorruptShardError(f"shard {url} cannot be opened ({exc})") from exc

    def finish(self) -> None:
        """After a complete read: drain the pipe and check the command's exit status."""
        if self._proc is None:
            return
        while self.fileobj.read(1 << 16):  # trailing tar padding; closing early would SIGPIPE
            pass
        code = self._proc.wait()
        if code != 0:
            raise CorruptShardError(f"{self.url}: command exited with status {code}{self.stderr()}")

    def stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read()[-2000:].decode(errors="replace").strip()
        return f" (stderr: {text})" if text else ""

    def close(self) -> None:
        self.fileobj.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        if self._stderr is not None:
            self._stderr.close()

    def __enter__(self) -> ShardSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class RawSample:
    """One sample's members as read from a shard.

    ``parts`` maps extension to bytes for wanted samples (``None`` for skipped ones); ``error``
    is set when the shard ended inside the sample.
    """

    key: str
    parts: dict[str, bytes] | None
    error: str | None = None


def iter_samples(
    src: ShardSource, want: Callable[[], bool], extensions: tuple[str, ...] = ("npy", "json")
) -> Iterator[RawSample]:
    """Samples of one shard, in file order; raises :class:`CorruptShardError` on damage.

    ``want()`` is called once per sample, when its first member is seen, and decides whether its
    members are read (only ``extensions``) or skipped. A sample being read when damage is found
    is yielded first (with ``error`` set) and the error is raised on the next step, so callers
    count samples identically whether or not they read them.
    """
    key: str | None = None
    parts: dict[str, bytes] | None = None
    incomplete: str | None = None
    members = iter_tar_members(src.fileobj, src.url)
    while True:
        try:
            member = next(members, None)
        except CorruptShardError as exc:
            if key is not None:  # its members were read in full before the damage
                yield RawSample(key, parts, incomplete)
            raise CorruptShardError(f"{exc}{src.stderr()}") from None
        name = None if member is None else member.name
        base = None if name is None else os.path.basename(name)
        mkey = None
        if base is not None:
            stem, dot, ext = base.partition(".")
            if not dot:
                continue  # members without an extension carry no sample data
            mkey = name[: len(name) - len(base)] + stem
        if key is not None and mkey != key:
            yield RawSample(key, parts, incomplete)
            key = None
        if member is None:
            return
        if key is None:
            key, parts, incomplete = mkey, ({} if want() else None), None
        if parts is not None and ext in extensions:
            try:
                parts[ext] = member.read()
            except CorruptShardError as exc:
                incomplete = str(exc)
