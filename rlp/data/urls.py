"""Shard URLs: expanding ``data.shards`` into a list, naming and opening each URL.

This module owns *where shard bytes come from*:

* :func:`expand_shard_urls` turns ``data.shards`` into a list: local paths, globs, brace patterns
  (``demo-{000000..000003}.tar``, expanded with ``braceexpand`` as in webdataset), ``file://``,
  ``http(s)://``, object-store URLs (``s3://``, ``gs://``, ...), ``pipe:CMD`` (CMD's stdout is the
  tar), and comma-separated lists of those (commas inside ``{...}`` belong to the brace pattern).
* :func:`open_url` opens one for reading: local paths directly; ``pipe:``, ``http(s)://`` (curl),
  ``gs://`` (gsutil) and the other schemes webdataset knows through ``webdataset.gopen``; schemes
  it does not know (``s3://``, ``az://``, ...) through ``fsspec`` when its backend is installed
  (``s3fs``, ``adlfs``, ...).
* :func:`url_name` gives the base name that matches a shard to its manifest entry, also for
  ``pipe:`` commands (the last word that names a tar file); :func:`sibling_url` the URL of a file
  next to a shard (where a manifest is looked for).
"""

from __future__ import annotations

import contextlib
import glob
import os
import posixpath
import re
from collections.abc import Sequence
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from braceexpand import braceexpand

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TAR_WORD = re.compile(r"[^\s'\"]+\.(?:tar|tar\.gz|tgz)(?=$|[\s'\"?#])")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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


def scheme(url: str) -> str:
    """``"pipe"``, the URL scheme (``"http"``, ``"s3"``, ...) or ``""`` for a local path."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def is_local(url: str) -> bool:
    return scheme(url) == ""


def expand_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand ``data.shards`` into shard URLs (local paths, remote URLs, ``pipe:`` commands).

    Globs are sorted; brace patterns keep their order; a local glob or path that matches nothing
    is an error (a typo must not silently train on fewer shards). Remote URLs are not listed or
    checked here (that would cost a request per shard): give them as brace patterns.
    """
    items = split_top_level(spec) if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for item in items:
        for url in braceexpand(item):
            kind = scheme(url)
            if kind == "pipe":
                if not url[5:].strip():
                    raise ValueError(f"empty pipe: command in data.shards {spec!r}")
                urls.append(url)
                continue
            if kind == "file":
                url = unquote(urlsplit(url).path)
            elif kind:
                urls.append(url)
                continue
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


def url_name(url: str) -> str | None:
    """Base name of a shard URL, its manifest key (``.../shard-000001.tar``: ``shard-000001.tar``).

    For ``pipe:`` commands it is the base name of the last word naming a tar file
    (``pipe:aws s3 cp s3://b/shard-000001.tar -``), or ``None`` when there is none.
    """
    kind = scheme(url)
    if kind == "pipe":
        words = _TAR_WORD.findall(url[5:])
        return url_name(words[-1]) if words else None
    if kind:
        name = posixpath.basename(unquote(urlsplit(url).path))
        return name or None
    return os.path.basename(url) or None


def sibling_url(url: str, name: str) -> str | None:
    """The URL of file ``name`` in the same directory as ``url`` (``None`` for ``pipe:``)."""
    kind = scheme(url)
    if kind == "pipe":
        return None
    if kind:
        parts = urlsplit(url)
        path = posixpath.join(posixpath.dirname(parts.path), name)
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return os.path.join(os.path.dirname(url), name)


def open_url(url: str) -> IO[bytes]:
    """A binary stream of ``url`` (see the module docstring); raises ``OSError`` if it cannot.

    ``pipe:`` and curl-backed URLs return webdataset's ``Pipe``: reading raises ``OSError`` when
    the command exits with an error status, and :func:`close_stream` stops it.
    """
    kind = scheme(url)
    if kind == "":
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    from webdataset.gopen import Pipe, gopen, gopen_schemes

    if kind == "pipe":
        return Pipe(url[5:], mode="rb", shell=True, ignore_status=[141])  # = gopen's pipe handler
    if kind == "file" or kind in gopen_schemes:
        return gopen(url, "rb")
    return _fsspec_open(url, kind)


def _fsspec_open(url: str, kind: str) -> IO[bytes]:
    try:
        import fsspec
        from fsspec.registry import get_filesystem_class
    except ImportError:  # pragma: no cover - fsspec comes with torch
        raise OSError(
            f"{url}: {kind}:// URLs need fsspec (pip install fsspec); or use "
            f"'pipe:<command that prints the shard>'"
        ) from None
    try:
        get_filesystem_class(kind)
    except (ValueError, ImportError) as exc:
        hint = {"s3": "pip install s3fs, or use 'pipe:aws s3 cp URL -'"}.get(
            kind, "install the fsspec backend for it, or use 'pipe:<command that prints it>'"
        )
        raise OSError(f"{url}: cannot open {kind}:// URLs ({exc}); {hint}") from None
    return fsspec.open(url, "rb").open()


def close_stream(stream: Any, *, early: bool) -> None:
    """Close a stream from :func:`open_url`; ``early``: stop a ``pipe:``/curl command first."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        stream.close()
        return
    if early and proc.poll() is None:
        _kill_tree(proc.pid)
    try:
        stream.stream.close()
    finally:
        proc.wait()


def _kill_tree(pid: int) -> None:
    """SIGKILL a command and everything it started (``sh -c 'cat a | zcat'``: the shell and both).

    The command stays in our process group (a Ctrl-C or a group kill reaches it as before); its
    descendants are found through psutil.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def command_status(stream: Any) -> int | None:
    """Exit status of a ``pipe:``/curl command once it ended (``None``: no command or running)."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=2)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: still running
        return None
