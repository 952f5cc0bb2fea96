"""Shared data fixtures for tests: a tiny trained tokenizer and small shard sets.

* :func:`generate_texts` - deterministic English-like and arithmetic documents.
* :func:`tiny_tokenizer` - a byte-level BPE (<= 512 ids; specials ``<|endoftext|>``=0,
  ``<|pad|>``=1, ``<think>``=2, ``</think>``=3) trained in well under a second.
* :func:`make_shards` - shards + manifest in the real format: from text through the real builder
  (``tokenizer=...``) or, without a tokenizer, from synthetic token documents (fast, exact lengths).
* :func:`make_text_shards` - text shards written by the ``webdataset`` package's own
  ``ShardWriter`` (``.txt`` members or a ``.json``/``.jsonl`` field; ``.tar`` or ``.tar.gz``).
* :class:`ShardServer` - an HTTP server on 127.0.0.1 (a thread) serving a directory and
  counting the requests per file; ``GET /__requests__`` returns the counts as JSON.
* :func:`data_config` - a :class:`rlp.config.DataConfig` pointing at a shard set.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import http.server
import json
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlp.config import DataConfig
from rlp.data.builder import BuildOptions, ShardWriter, build_shards
from rlp.data.format import MANIFEST_NAME, Manifest, TokenizerInfo, write_manifest
from rlp.tokenizer import Tokenizer, train_bpe_tokenizer

SYNTHETIC_VOCAB = 512
SYNTHETIC_EOS = 0

_WORD_TEXT = (
    "the a of to and in is was for on that with as by at from it an be this which or are "
    "light water energy planet river city engine number sum value ratio equation force mass "
    "time speed distance heat cell atom garden letter signal orbit valley storm tower market"
)
_WORDS = tuple(_WORD_TEXT.split(" "))


def generate_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` documents: sentences of common words mixed with small worked sums."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(2, 8)):
            if rng.random() < 0.3:
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                parts.append(f"We add {a} and {b} to get {a + b}.")
            else:
                words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
                parts.append(" ".join(words).capitalize() + ".")
        docs.append(f"Document {i}. " + " ".join(parts))
    return docs


def tiny_tokenizer(tmp_path: Path, vocab_size: int = 384) -> Tokenizer:
    """Train and load a byte-level BPE tokenizer into ``tmp_path/tokenizer``."""
    return train_bpe_tokenizer(generate_texts(300, seed=123), vocab_size, tmp_path / "tokenizer")


@dataclass
class ShardSet:
    """A built shard set and the documents it holds (key -> token ids incl. EOS)."""

    dir: Path
    pattern: str
    """Brace pattern of all shards, usable as ``data.shards``."""
    paths: list[Path]
    manifest: Manifest
    docs: dict[str, np.ndarray]
    tokenizer: Tokenizer | None = None

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME


def make_shards(
    tmp_path: Path,
    n_docs: int,
    *,
    docs_per_shard: int = 10,
    tokenizer: Tokenizer | None = None,
    seed: int = 0,
    lengths: tuple[int, int] = (20, 120),
    prefix: str = "shard",
    name: str = "shards",
) -> ShardSet:
    """Build ``n_docs`` documents into ``tmp_path/name``.

    With ``tokenizer`` the documents are :func:`generate_texts` run through the real builder;
    without one they are random ids in ``[1, 512)`` of ``lengths`` tokens plus EOS (id 0), with a
    manifest naming the tokenizer ``synthetic``.
    """
    out = tmp_path / name
    if tokenizer is not None:
        raw = tmp_path / f"{name}-raw.jsonl"
        texts = generate_texts(n_docs, seed)
        raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        manifest = build_shards(
            [raw],
            BuildOptions(
                tokenizer=tokenizer.path,
                out=out,
                prefix=prefix,
                docs_per_shard=docs_per_shard,
                progress=False,
            ),
        )
        docs = {
            f"{i:010d}": np.array(
                [*tokenizer.encode(t, parse_special=False), tokenizer.eos_id], dtype=np.int64
            )
            for i, t in enumerate(texts)
        }
    else:
        out.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        docs, shards, writer = {}, [], None
        for i in range(n_docs):
            if writer is None:
                writer = ShardWriter(out, prefix, len(shards))
            n = int(rng.integers(lengths[0], lengths[1] + 1))
            tokens = np.append(rng.integers(1, SYNTHETIC_VOCAB, n), SYNTHETIC_EOS).astype(np.uint16)
            key = f"{i:010d}"
            writer.add(key, tokens, {"source": "synthetic", "doc_id": key, "length": len(tokens)})
            docs[key] = tokens.astype(np.int64)
            if writer.num_docs == docs_per_shard:
                shards.append(writer.finish())
                writer = None
        if writer is not None:
            shards.append(writer.finish())
        manifest = Manifest(
            tokenizer=TokenizerInfo(
                "synthetic", f"synthetic-{seed}", SYNTHETIC_VOCAB, SYNTHETIC_EOS
            ),
            dtype="uint16",
            shards=shards,
            builder_version="test",
        )
        write_manifest(out / MANIFEST_NAME, manifest)
    paths = [out / s.name for s in manifest.shards]
    pattern = str(out / f"{prefix}-{{000000..{len(paths) - 1:06d}}}.tar")
    return ShardSet(out, pattern, paths, manifest, docs, tokenizer)


@dataclass
class TextShards:
    """Text shards written by webdataset's ShardWriter, and the texts they hold by key."""

    dir: Path
    pattern: str
    paths: list[Path]
    texts: dict[str, str]


def make_text_shards(
    tmp_path: Path,
    n_docs: int,
    *,
    per_shard: int = 10,
    layout: str = "txt",
    suffix: str = ".tar",
    seed: int = 0,
    name: str = "text",
    texts: list[str] | None = None,
) -> TextShards:
    """``n_docs`` texts (:func:`generate_texts`) as webdataset samples: ``{key}.txt``
    (``layout="txt"``), ``{key}.json`` with a ``text`` field (``"json"``), or ``{key}.jsonl`` with
    the text split over two lines' ``text`` fields (``"jsonl"``). Each sample also carries a
    ``.cls`` member, as image datasets do, which readers must ignore."""
    import webdataset

    out = tmp_path / name
    out.mkdir(parents=True)
    texts = generate_texts(n_docs, seed) if texts is None else texts
    by_key: dict[str, str] = {}
    pattern = str(out / f"part-%04d{suffix}")
    with webdataset.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, text in enumerate(texts):
            key = f"doc{i:05d}"
            sample: dict[str, Any] = {"__key__": key, "cls": i % 7}
            if layout == "txt":
                sample["txt"] = text
            elif layout == "json":
                sample["json"] = {"text": text, "id": i}
            else:
                head, _, tail = text.partition(". ")
                lines = [{"text": head}, {"text": tail}]
                sample["jsonl"] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                text = f"{head}\n{tail}"
            sink.write(sample)
            by_key[key] = text
    paths = sorted(out.glob(f"part-*{suffix}"))
    brace = str(out / f"part-{{0000..{len(paths) - 1:04d}}}{suffix}")
    return TextShards(out, brace, paths, by_key)


class ShardServer:
    """``with ShardServer(dir) as server:`` serves ``dir`` at ``server.url``; ``server.requests``
    counts GETs per file name (``reset()`` clears them)."""

    def __init__(self, directory: Path) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        counts = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                name = self.path.split("?")[0].lstrip("/")
                if name == "__requests__":
                    with lock:
                        body = json.dumps(dict(counts)).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                with lock:
                    counts[name] += 1
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def reset(self) -> None:
        self.requests.clear()

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def data_config(shards: ShardSet | TextShards | str, **overrides: Any) -> DataConfig:
    """A DataConfig for ``shards`` with small, test-friendly defaults (overridable)."""
    base = DataConfig(
        shards=shards if isinstance(shards, str) else shards.pattern,
        shuffle_buffer=8,
        min_prefix_tokens=4,
        max_prefix_tokens=64,
        ntp_seq_len=32,
    )
    return dataclasses.replace(base, **overrides)
