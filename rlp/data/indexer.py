"""Write ``manifest.json`` for existing shards (e.g. a text webdataset in object storage).

    rlp data manifest --shards 'https://host/corpus/part-{0000..0511}.tar' --out corpus.json
    rlp data manifest --shards 'data/corpus/*.tar.gz'   # writes data/corpus/manifest.json
    python -m rlp.data.indexer ...                       # the same

Each shard is read once (any URL :func:`rlp.data.urls.open_url` opens, ``pipe:`` included) and
recorded by base name with its sample count, size and sha256. With the manifest next to the
shards (or named by ``data.manifest``), a resumed run skips whole shards before its data cursor
without opening them, and damaged or changed shards are caught by their counts. Text shards get a
``rlp-text-shards`` manifest (no tokenizer: they are tokenised by the run). Pre-tokenised shards
from another pipeline need ``--tokenizer``: the manifest then names it and the run checks it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlp.data.format import (
    FORMAT_NAME,
    MANIFEST_NAME,
    TEXT_FORMAT_NAME,
    DataError,
    Manifest,
    ShardInfo,
    TokenizerInfo,
    decode_tokens,
    write_manifest,
)
from rlp.data.samples import ShardReader
from rlp.data.urls import expand_shard_urls, is_local, url_name
from rlp.options import parse

INDEXER_VERSION = "1"


def index_shard(url: str) -> tuple[ShardInfo, bool]:
    """``(entry, holds token samples)`` of one shard, read as a stream (sha256 on the fly)."""
    name = url_name(url)
    if name is None:
        raise DataError(f"{url}: no shard file name in it (a pipe: command must name a .tar)")
    has_tokens = False
    samples = tokens = 0
    with ShardReader(url, digest=True) as reader:
        for sample in reader.samples(lambda: True, ("npy",)):
            if sample.error:
                raise DataError(f"shard {url}, sample {sample.key!r}: {sample.error}")
            samples += 1
            if sample.parts and "npy" in sample.parts:
                try:
                    tokens += len(decode_tokens(sample.parts["npy"]))
                    has_tokens = True
                except ValueError:
                    pass  # an .npy that is not token ids (e.g. features): not a token sample
        reader.finish()
        assert reader.sha256 is not None and reader.bytes is not None
        info = ShardInfo(name, reader.sha256, samples, tokens if has_tokens else None, reader.bytes)
    return info, has_tokens


def build_index(urls: Sequence[str], *, tokenizer: str | None = None, workers: int = 4) -> Manifest:
    """A manifest of ``urls``: text shards, or pre-tokenised ones when ``tokenizer`` is given."""
    names = [url_name(u) for u in urls]
    dup = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dup:
        raise DataError(f"shards are matched by base name, and {dup[:3]} name several shards")
    with ThreadPoolExecutor(max(1, workers)) as pool:  # I/O bound: downloads or disk reads
        results = list(pool.map(index_shard, urls))
    has_tokens = [t for _, t in results]
    shards = [info for info, _ in results]
    if any(has_tokens) and tokenizer is None:
        raise DataError(
            "these shards hold pre-tokenised .npy samples: pass --tokenizer (the one that made "
            "them) so that runs can check it, or rebuild them with rlp data build"
        )
    tok = None
    if tokenizer is not None:
        from rlp.tokenizer import load_tokenizer

        t = load_tokenizer(tokenizer)
        tok = TokenizerInfo(str(tokenizer), t.hash, t.vocab_size, t.eos_id)
    return Manifest(
        tokenizer=tok,
        dtype=None,
        shards=shards,
        builder_version=INDEXER_VERSION,
        build={"indexed": list(urls)},
        format=FORMAT_NAME if tok is not None else TEXT_FORMAT_NAME,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rlp data manifest",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--shards",
        nargs="+",
        required=True,
        help="shard URLs, globs or brace patterns, as in data.shards",
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"output file (default: {MANIFEST_NAME} beside them)"
    )
    p.add_argument("--tokenizer", default=None, help="for pre-tokenised shards: their tokenizer")
    p.add_argument("--workers", type=int, default=4, help="shards read at the same time")
    args = parse(p, argv)  # flags or key=value (rlp.options)
    try:
        urls = expand_shard_urls(args.shards)
        out = args.out
        if out is None:
            if not is_local(urls[0]):
                raise DataError("the shards are remote: pass --out to say where the manifest goes")
            out = Path(urls[0]).parent / MANIFEST_NAME
        manifest = build_index(urls, tokenizer=args.tokenizer, workers=args.workers)
    except (DataError, ValueError) as exc:
        print(f"rlp data manifest: error: {exc}", file=sys.stderr)
        return 2
    write_manifest(out, manifest)
    print(
        f"[rlp] {out}: {len(manifest.shards)} shards, {manifest.num_docs} samples "
        f"({manifest.content})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
