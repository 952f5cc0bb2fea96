"""Shard sets: manifest lookup and checks, and which shards a data-parallel rank reads.

This module owns *which* shards a rank reads (how one shard is read is :mod:`rlp.data.samples`,
where its bytes come from :mod:`rlp.data.urls`):

* :func:`load_manifest` / :func:`check_manifest` find ``manifest.json`` (given by path or URL, or
  next to the first shard: a local directory, or the same "directory" of an HTTP/object-store URL)
  and refuse pre-tokenised shards built with another tokenizer or shards it does not list. Shards
  are matched to manifest entries by base name (:func:`rlp.data.urls.url_name`), so a manifest
  describes its shards wherever they are copied to, also behind ``pipe:`` commands.
* :func:`epoch_shards` gives one DP rank's shards for an epoch: the whole list is permuted from
  ``(seed, epoch)`` *before* the split, then strided by the **data-parallel** rank passed in. It
  never reads ``RANK``/``WORLD_SIZE`` (webdataset's ``split_by_node`` does, which makes TP peers
  read different data); all TP/PP peers of a DP rank therefore get the same list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlp.data.format import (
    MANIFEST_NAME,
    CorruptShardError,
    Manifest,
    ManifestError,
    TokenizerMismatchError,
    read_manifest,
)
from rlp.data.urls import (
    expand_shard_urls,
    is_local,
    open_url,
    sibling_url,
    split_top_level,
    url_name,
)

__all__ = [
    "ShardSet",
    "check_manifest",
    "epoch_shards",
    "expand_shard_urls",
    "is_local",
    "load_manifest",
    "open_shard_set",
    "split_top_level",
]

log = logging.getLogger("rlp.data")


# ---------------------------------------------------------------------------------- manifest


def default_manifest_url(urls: Sequence[str]) -> str | None:
    """``manifest.json`` next to the first shard, or ``None`` when it is a ``pipe:`` command."""
    return sibling_url(urls[0], MANIFEST_NAME) if urls else None


def read_manifest_url(url: str) -> Manifest:
    """A manifest from a local path or any URL :func:`rlp.data.urls.open_url` opens."""
    if is_local(url):
        return read_manifest(os.path.expanduser(url))
    try:
        stream = open_url(url)
        try:
            data = stream.read()
        finally:
            stream.close()
    except OSError as exc:
        raise ManifestError(f"manifest {url} cannot be read ({exc})") from None
    if not data:
        raise ManifestError(f"manifest {url} cannot be read (no data)")
    return Manifest.from_json(data, url)


def load_manifest(
    urls: Sequence[str], manifest: str | Path | None = None
) -> tuple[Manifest | None, str]:
    """``(manifest, where)``: the explicit manifest (must exist), else the one next to the shards.

    A manifest next to remote shards that cannot be read counts as absent (logged): the shards
    still stream, but a resume has to re-read the shards before its position.
    """
    if manifest is not None:
        return read_manifest_url(str(manifest)), str(manifest)
    where = default_manifest_url(urls)
    if where is None:
        return None, MANIFEST_NAME
    if is_local(where):
        return (read_manifest(where) if os.path.isfile(where) else None), where
    try:
        return read_manifest_url(where), where
    except ManifestError as exc:
        log.warning(
            "no manifest next to the shards (%s): resuming re-reads the shards before the data "
            "cursor; index them with `rlp data manifest` or set data.manifest",
            exc,
        )
        return None, where


def check_manifest(
    manifest: Manifest,
    urls: Sequence[str],
    *,
    where: str,
    tokenizer_name: str | None = None,
    tokenizer_hash: str | None = None,
) -> None:
    """Refuse a tokenizer mismatch (pre-tokenised shards) and shards the manifest does not list."""
    tok = manifest.tokenizer
    if tokenizer_hash is not None and tok is not None and tok.hash != tokenizer_hash:
        raise TokenizerMismatchError(
            f"the shards in {where} were built with tokenizer {tok.name!r} "
            f"(hash {tok.hash}), but this run uses tokenizer "
            f"{tokenizer_name or '?'!r} (hash {tokenizer_hash}). Rebuild the shards with this "
            f"tokenizer (rlp data build --tokenizer {tokenizer_name} ...) "
            f"or set tokenizer.path to {tok.name!r}; set data.check_tokenizer=false "
            "only if both map text to the same ids"
        )
    names = [url_name(u) for u in urls]
    known = [n for n in names if n is not None]
    if len(set(known)) != len(known):
        dup = sorted({n for n in known if known.count(n) > 1})
        raise ManifestError(
            f"shards are matched to {where} by base name, and {dup[:3]} name more than one "
            "shard in data.shards; give each shard a distinct file name"
        )
    unknown = [n for n in known if not manifest.shard(n)]
    if unknown:
        raise ManifestError(
            f"{len(unknown)} shard(s) are not listed in {where} (e.g. {unknown[:3]}): they come "
            "from another build; point data.manifest at their manifest, rebuild, or re-index "
            "them (rlp data manifest)"
        )


CONTENTS = ("auto", "tokens", "text")
"""``data.format``: pre-tokenised samples, text samples, or ``auto`` (the manifest says; without
one each sample by its members: ``.npy`` is pre-tokenised, else text)."""


@dataclass(frozen=True)
class ShardSet:
    """Expanded shard URLs with their (checked) manifest and the sample layout to read."""

    urls: list[str]
    manifest: Manifest | None
    manifest_where: str
    content: str
    """``"tokens"``, ``"text"`` or ``"auto"`` (per sample; only without a manifest)."""


def open_shard_set(
    spec: str | Sequence[str],
    *,
    manifest: str | Path | None = None,
    tokenizer_name: str | None = None,
    tokenizer_hash: str | None = None,
    on_corrupt: str = "error",
    content: str = "auto",
) -> ShardSet:
    """Expand ``spec``, load and check the manifest, and check that local shard files exist.

    With ``tokenizer_hash``, pre-tokenised shards need a manifest naming that tokenizer (text
    shards are tokenised with the run's tokenizer and need no check). Missing local shard files
    raise with ``on_corrupt="error"`` and are logged (then skipped and counted by the reader)
    with ``"skip"``.
    """
    if content not in CONTENTS:
        raise ValueError(f"data.format must be one of {CONTENTS}, got {content!r}")
    urls = expand_shard_urls(spec)
    found, where = load_manifest(urls, manifest)
    if found is not None:
        if content != "auto" and content != found.content:
            raise ManifestError(
                f"data.format={content} but {where} describes {found.content} shards; set "
                f"data.format={found.content} (or auto)"
            )
        content = found.content
        check_manifest(
            found, urls, where=where, tokenizer_name=tokenizer_name, tokenizer_hash=tokenizer_hash
        )
    elif tokenizer_hash is not None and content == "tokens":
        raise ManifestError(
            f"no {where} found, so the shards' tokenizer cannot be checked; set data.manifest "
            "to the build's manifest.json, or data.check_tokenizer=false"
        )
    missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
    if missing:
        msg = f"{len(missing)} of {len(urls)} shard file(s) do not exist: {missing[:5]}"
        if on_corrupt == "error":
            raise CorruptShardError(
                f"{msg}. Fix data.shards, build the shards (rlp data build / rlp data demo), or "
                "set data.on_corrupt=skip to train on the others"
            )
        log.warning("%s; they are skipped and counted in skipped_shards (on_corrupt=skip)", msg)
    return ShardSet(urls, found, where, content)


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
            "least one shard. Rebuild with more, smaller shards (rlp data build --docs-per-shard) "
            "or use fewer DP ranks"
        )
    order = list(urls)
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([_u64(seed), epoch, 0x5A4D]))
        order = [order[i] for i in rng.permutation(len(order))]
    return order[dp_rank::dp_size]


def _u64(x: int) -> int:
    return x & 0xFFFF_FFFF_FFFF_FFFF
