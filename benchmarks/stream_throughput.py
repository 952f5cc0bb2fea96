"""Data-stream throughput: documents, tokens, RLP contexts and packed NTP tokens per second.

    python -m benchmarks.stream_throughput                      # demo corpus (built if missing)
    python -m benchmarks.stream_throughput --corpus text        # the same documents as text shards
    python -m benchmarks.stream_throughput --corpus synthetic --synthetic-docs 40000
    python -m benchmarks.stream_throughput --workers 0 1 2 --out benchmarks/results/stream.json

    # Before/after: another checkout's pre-tokenised path against this one, interleaved
    git -C . archive 8f3bcd4 | tar -x -C /tmp/rlp_before
    python -m benchmarks.stream_throughput --baseline /tmp/rlp_before --rounds 3 \\
        --data-dir /tmp/stream_bench --out benchmarks/results/stream_throughput_cpu2.json

For each worker count it measures, after a warm-up (worker start-up excluded):

* ``docs/s`` and ``tokens/s`` of :class:`rlp.data.stream.DocumentStream` (read, decode or
  tokenise, shuffle);
* ``contexts/s`` of :meth:`RLPDataStream.next_contexts` (batches of 64);
* ``ntp tok/s``: tokens per second of :meth:`RLPDataStream.next_ntp_batch` (8 x 1024);
* ``resume s``: time from ``load_state_dict`` to the first document after consuming half an epoch
  (the replay cost of the cursor).

Corpora: ``demo`` (the pre-tokenised demo shards), ``text`` (the demo's documents as text
shards written by webdataset's ``ShardWriter``, ``.txt`` members, tokenised on the fly with the
demo tokenizer: the on-the-fly cost), ``synthetic`` (random ids, long documents).

``--baseline TREE`` runs this script's ``demo`` measurement on another source tree's ``rlp``
(e.g. the commit before a change) and on this one, alternately, ``--rounds`` times in one session
(the machine's load hits both alike), then the ``text`` corpus on this tree; the JSON holds every
run and the median ratios (this / baseline), per wall second and per CPU second of the measuring
process (``workers=0``: the load-independent figure). Both read the same shards under
``--data-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlp.config import DataConfig
from rlp.data.builder import ShardWriter
from rlp.data.format import MANIFEST_NAME, Manifest, TokenizerInfo, read_manifest, write_manifest
from rlp.data.stream import DocumentStream, RLPDataStream

REPO = Path(__file__).resolve().parents[1]


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


def demo_shards(data_dir: Path) -> Path:
    """``DATA/demo/shards`` as it is (maybe built by a baseline tree), else built now."""
    shards = data_dir / "demo" / "shards"
    if not (shards / MANIFEST_NAME).is_file():
        from rlp.data.demo import ensure_demo_corpus

        ensure_demo_corpus(data_dir / "demo")
    return shards


def text_corpus(data_dir: Path) -> Path:
    """The demo documents (``DATA/demo/raw/demo.jsonl``) as 4 text shards + index manifest."""
    import webdataset

    from rlp.data.indexer import build_index

    out = data_dir / "demo_text"
    if (out / MANIFEST_NAME).is_file():
        return out
    demo_shards(data_dir)
    rows = [json.loads(line) for line in (data_dir / "demo" / "raw" / "demo.jsonl").open()]
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // 4)
    with webdataset.ShardWriter(str(out / "part-%04d.tar"), maxcount=per, verbose=0) as sink:
        for i, row in enumerate(rows):
            sink.write({"__key__": f"doc{i:06d}", "txt": row["text"]})
    urls = [str(p) for p in sorted(out.glob("part-*.tar"))]
    write_manifest(out / MANIFEST_NAME, build_index(urls))
    return out


def _measure(fn, seconds: float) -> tuple[int, int, float, float]:
    """Call ``fn() -> (items, tokens)`` until ``seconds`` pass: totals, wall and CPU seconds.

    CPU seconds are this process's: with ``workers=0`` all the work is in-process, so rates per
    CPU second hardly depend on what else the machine runs; with workers they are not comparable.
    """
    items = tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - start) < seconds:
        a, b = fn()
        items, tokens = items + a, tokens + b
    return items, tokens, elapsed, time.process_time() - cpu


def bench(shard_dir: Path, workers: int, seconds: float, tokenizer: Any = None) -> dict[str, Any]:
    manifest = read_manifest(shard_dir / MANIFEST_NAME)
    urls = [str(shard_dir / s.name) for s in manifest.shards]
    text = getattr(manifest, "content", "tokens") == "text"  # (a baseline tree may lack it)
    kw: dict[str, Any] = dict(
        dp_rank=0,
        dp_size=1,
        seed=0,
        num_workers=workers,
        shuffle_buffer=256,
        manifest=manifest,
    )
    if text:
        from rlp.data.format import token_dtype
        from rlp.data.text import TextEncoder

        encoder = TextEncoder.for_tokenizer(tokenizer, token_dtype(tokenizer.vocab_size))
        kw.update(content="text", encoder=encoder, vocab_size=tokenizer.vocab_size)
    else:
        kw.update(vocab_size=manifest.tokenizer.vocab_size)
    docs = DocumentStream(urls, **kw)
    for _ in range(200):  # warm-up: worker start-up and first shard opens
        next(docs)

    def one_doc() -> tuple[int, int]:
        return 1, len(next(docs).tokens)

    n_docs, n_tok, t_docs, c_docs = _measure(one_doc, seconds)
    docs.close()

    cfg = DataConfig(
        shards=",".join(urls), num_workers=workers, ntp_seq_len=1024, max_prefix_tokens=2048
    )
    rlp = RLPDataStream(
        urls, cfg, dp_rank=0, dp_size=1, seed=0, target_tokens=1, tokenizer=tokenizer
    )
    rlp.next_contexts(64)
    rlp.next_ntp_batch(8)
    n_ctx, _, t_ctx, c_ctx = _measure(lambda: (len(rlp.next_contexts(64)), 0), seconds)

    def one_ntp_batch() -> tuple[int, int]:
        inputs, _ = rlp.next_ntp_batch(8)
        return len(inputs), inputs.numel()

    _, n_ntp, t_ntp, c_ntp = _measure(one_ntp_batch, seconds)
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
        "tokens_per_cpu_s": n_tok / c_docs,
        "contexts_per_cpu_s": n_ctx / c_ctx,
        "ntp_tokens_per_cpu_s": n_ntp / c_ntp,
        "resume_s": resume_s,
        "resume_after_docs": half,
    }


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    print(
        f"{'workers':>7} {'docs/s':>9} {'tokens/s':>11} {'contexts/s':>11} "
        f"{'ntp tok/s':>11} {'resume s':>9}"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['docs_per_s']:>9.0f} {r['tokens_per_s']:>11.0f} "
            f"{r['contexts_per_s']:>11.0f} {r['ntp_tokens_per_s']:>11.0f} {r['resume_s']:>9.3f}"
        )


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved runs of ``--baseline``'s script and this one (subprocesses), then ``text``."""
    data_dir = args.data_dir.resolve()
    common = ["--data-dir", str(data_dir), "--seconds", str(args.seconds), "--workers"]
    common += [str(w) for w in args.workers]

    def run(tree: Path, corpus: str) -> dict[str, Any]:
        # This script on the tree's rlp package: the same measurement code for both trees.
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--corpus", corpus]
        subprocess.run([*cmd, *common, "--out", str(out)], cwd=tree, env=env, check=True)
        result = json.loads(out.read_text())
        out.unlink()
        return result

    load_before = os.getloadavg()
    rounds = []
    for r in range(args.rounds):
        before = run(args.baseline.resolve(), "demo")  # first: the baseline builds the corpus
        after = run(REPO, "demo")
        rounds.append({"round": r, "baseline": before["results"], "this": after["results"]})
    text = run(REPO, "text")
    ratios: dict[str, dict[str, float]] = {}
    for i, w in enumerate(args.workers):
        ratios[str(w)] = {
            key: statistics.median(rd["this"][i][key] / rd["baseline"][i][key] for rd in rounds)
            for key in (
                "tokens_per_s",
                "contexts_per_s",
                "ntp_tokens_per_s",
                "tokens_per_cpu_s",
                "contexts_per_cpu_s",
                "ntp_tokens_per_cpu_s",
            )
        }
    for rd in rounds:
        _print_rows(f"round {rd['round']}: baseline {args.baseline}", rd["baseline"])
        _print_rows(f"round {rd['round']}: this tree", rd["this"])
    _print_rows("this tree, text shards tokenised on the fly", text["results"])
    print("median ratio this/baseline (pre-tokenised demo shards):", json.dumps(ratios))
    return {
        "benchmark": "stream_throughput",
        "command": " ".join(["python -m benchmarks.stream_throughput", *sys.argv[1:]]),
        "baseline_tree": str(args.baseline),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "note": "wall-clock rates depend on the machine's load; *_per_cpu_s rates (CPU seconds of "
        "the measuring process) are comparable across runs for workers=0 only",
        "demo": {"num_docs": before["num_docs"], "num_tokens": before["num_tokens"]},
        "rounds": rounds,
        "median_ratio_this_over_baseline": ratios,
        "text_shards": text,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", choices=("demo", "text", "synthetic"), default="demo")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where corpora live")
    p.add_argument("--synthetic-docs", type=int, default=20000)
    p.add_argument("--synthetic-shards", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per metric")
    p.add_argument("--baseline", type=Path, default=None, help="source tree to compare against")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --baseline")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: a temp file)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.gettempdir()) / f"stream_throughput_{args.corpus}.json"
    if args.baseline is not None:
        result = compare(args)
    else:
        tokenizer = None
        if args.corpus == "demo":
            shard_dir = demo_shards(args.data_dir)
        elif args.corpus == "text":
            from rlp.tokenizer import load_tokenizer

            shard_dir = text_corpus(args.data_dir)
            tokenizer = load_tokenizer(args.data_dir / "demo" / "tokenizer")
        else:
            shard_dir = synthetic_corpus(
                args.data_dir / "synthetic", args.synthetic_docs, args.synthetic_shards
            )
        manifest = read_manifest(shard_dir / MANIFEST_NAME)
        rows = [bench(shard_dir, w, args.seconds, tokenizer) for w in args.workers]
        _print_rows(
            f"corpus {shard_dir} ({manifest.num_docs} docs, {manifest.num_tokens} tokens, "
            f"{len(manifest.shards)} shards)",
            rows,
        )
        result = {
            "corpus": args.corpus,
            "shards": str(shard_dir),
            "num_docs": manifest.num_docs,
            "num_tokens": manifest.num_tokens,
            "host": platform.node(),
            "cpu": platform.processor(),
            "results": rows,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
