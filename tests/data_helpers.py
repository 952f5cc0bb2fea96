"""Shared data fixtures for tests: a tiny trained tokenizer and small shard sets.

* :func:`generate_texts` - deterministic English-like and arithmetic documents.
* :func:`tiny_tokenizer` - a byte-level BPE (<= 512 ids; specials ``<|endoftext|>``=0,
  ``<|pad|>``=1, ``<think>``=2, ``</think>``=3) trained in well under a second.
* :func:`make_shards` - shards + manifest in the real format: from text through the real builder
  (``tokenizer=...``) or, without a tokenizer, from synthetic token documents (fast, exact lengths).
* :func:`data_config` - a :class:`rlp.config.DataConfig` pointing at a shard set.
"""

from __future__ import annotations

import dataclasses
import json
import random
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


def data_config(shards: ShardSet | str, **overrides: Any) -> DataConfig:
    """A DataConfig for ``shards`` with small, test-friendly defaults (overridable)."""
    base = DataConfig(
        shards=shards.pattern if isinstance(shards, ShardSet) else shards,
        shuffle_buffer=8,
        min_prefix_tokens=4,
        max_prefix_tokens=64,
        ntp_seq_len=32,
    )
    return dataclasses.replace(base, **overrides)
