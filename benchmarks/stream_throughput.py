"""Data-stream throughput: documents, tokens, RLP contexts and packed NTP tokens per second.

    python -m benchmarks.stream_throughput                      # demo corpus (built if missing)
    python -m benchmarks.stream_throughput --corpus synthetic --synthetic-docs 40000
    python -m benchmarks.stream_throughput --workers 0 1 2 --out benchmarks/results/stream.json

For each worker count it measures, after a warm-up (worker start-up excluded):

* ``docs/s`` and ``tokens/s`` of :class:`rlp.data.stream.DocumentStream` (read, decode, shuffle);
* ``contexts/s`` of :meth:`RLPDataStream.next_contexts` (batches of 64);
* ``ntp tok/s``: tokens per second of :meth:`RLPDataStream.next_ntp_batch` (8 x 1024);
* ``resume s``: time from ``load_state_dict`` to the first document after consuming half an epoch
  (the replay cost of the cursor).

Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlp.config import DataConfig
from rlp.data.builder import ShardWriter
from rlp.data.demo import ensure_demo_corpus
from rlp.data.format import MANIFEST_NAME, Manifest, TokenizerInfo, read_manifest, write_manifest
from rlp.data.stream import DocumentStream, RLPDataStream


def synthetic_corpus(out: Path, num_docs: int, shards: int, seed: int = 0) -> Path:
    """Random-token documents (lengths 64..2048, vocab 32000) in ``shards`` shards."""
    if (out / MANIFEST_NAME).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-num_docs // shards)
    infos = []
    for s in range(shards):
        writer = ShardWriter(out, "synth", s)
        for i in range(s * per, min(num_docs, (s + 1) * per)):
            tokens = rng.integers(1, 32000, int(rng.integers(64, 2049))).astype(np.uint16)
            writer.add(f"{i:010d}", np.append(tokens, 0), {"length": len(tokens) + 1})
        infos.append(writer.finish())
    tok = TokenizerInfo("synthetic", "synthetic", 32000, 0)
    write_manifest(out / MANIFEST_NAME, Manifest(tok, "uint16", infos, "bench"))
    return out


def _measure(fn, seconds: float) -> tuple[int, int, float]:
    """Call ``fn() -> (items, tokens)`` until ``seconds`` pass; totals and elapsed time."""
    items = tokens = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a, b = fn()
        items, tokens = items + a, tokens + b
    return items, tokens, elapsed


def bench(shard_dir: Path, workers: int, seconds: float) -> dict[str, Any]:
    manifest = read_manifest(shard_dir / MANIFEST_NAME)
    urls = [str(shard_dir / s.name) for s in manifest.shards]
    kw = dict(
        dp_rank=0,
        dp_size=1,
        seed=0,
        num_workers=workers,
        shuffle_buffer=256,
        manifest=manifest,
        vocab_size=manifest.tokenizer.vocab_size,
    )
    docs = DocumentStream(urls, **kw)
    for _ in range(200):  # warm-up: worker start-up and first shard opens
        next(docs)

    def one_doc() -> tuple[int, int]:
        return 1, len(next(docs).tokens)

    n_docs, n_tok, t_docs = _measure(one_doc, seconds)
    docs.close()

    cfg = DataConfig(
        shards=",".join(urls), num_workers=workers, ntp_seq_len=1024, max_prefix_tokens=2048
    )
    rlp = RLPDataStream(urls, cfg, dp_rank=0, dp_size=1, seed=0, target_tokens=1)
    rlp.next_contexts(64)
    rlp.next_ntp_batch(8)
    n_ctx, _, t_ctx = _measure(lambda: (len(rlp.next_contexts(64)), 0), seconds)

    def one_ntp_batch() -> tuple[int, int]:
        inputs, _ = rlp.next_ntp_batch(8)
        return len(inputs), inputs.numel()

    _, n_ntp, t_ntp = _measure(one_ntp_batch, seconds)
    rlp.close()

    half = manifest.num_docs // 2
    stream = DocumentStream(urls, **kw)
    for _ in range(half):
        next(stream)
    state = stream.state_dict()
    stream.close()
    start = time.perf_counter()
    resumed = DocumentStream(urls, **kw)
    resumed.load_state_dict(state)
    next(resumed)
    resume_s = time.perf_counter() - start
    resumed.close()
    return {
        "workers": workers,
        "docs_per_s": n_docs / t_docs,
        "tokens_per_s": n_tok / t_docs,
        "contexts_per_s": n_ctx / t_ctx,
        "ntp_tokens_per_s": n_ntp / t_ntp,
        "resume_s": resume_s,
        "resume_after_docs": half,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", choices=("demo", "synthetic"), default="demo")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where corpora live")
    p.add_argument("--synthetic-docs", type=int, default=20000)
    p.add_argument("--synthetic-shards", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per metric")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: a temp file)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.corpus == "demo":
        shard_dir = ensure_demo_corpus(args.data_dir / "demo") / "shards"
    else:
        shard_dir = synthetic_corpus(
            args.data_dir / "synthetic", args.synthetic_docs, args.synthetic_shards
        )
    manifest = read_manifest(shard_dir / MANIFEST_NAME)
    rows = [bench(shard_dir, w, args.seconds) for w in args.workers]
    header = (
        f"{'workers':>7} {'docs/s':>9} {'tokens/s':>11} {'contexts/s':>11} "
        f"{'ntp tok/s':>11} {'resume s':>9}"
    )
    print(
        f"corpus {shard_dir} ({manifest.num_docs} docs, {manifest.num_tokens} tokens, "
        f"{len(manifest.shards)} shards)"
    )
    print(header)
    for r in rows:
        print(
            f"{r['workers']:>7} {r['docs_per_s']:>9.0f} {r['tokens_per_s']:>11.0f} "
            f"{r['contexts_per_s']:>11.0f} {r['ntp_tokens_per_s']:>11.0f} {r['resume_s']:>9.3f}"
        )
    out = args.out or Path(tempfile.gettempdir()) / f"stream_throughput_{args.corpus}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "corpus": args.corpus,
                "shards": str(shard_dir),
                "num_docs": manifest.num_docs,
                "num_tokens": manifest.num_tokens,
                "host": platform.node(),
                "cpu": platform.processor(),
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
