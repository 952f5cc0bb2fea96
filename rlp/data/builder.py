"""Build pre-tokenised webdataset shards (+ manifest.json) from text files or an HF dataset.

    python -m rlp.data.builder --input corpus/ more.jsonl \\
        --tokenizer data/demo/tokenizer --out data/mycorpus [--prefix shard] \\
        [--docs-per-shard N | --shard-size-mb 256] [--workers 4]
    rlp data build ...                      # the same command through the rlp CLI

Inputs: files or directories (searched recursively, sorted) of ``.txt`` (one document per file,
or per blank-line-separated block with ``--txt-blocks``), ``.jsonl`` (``--text-field``, default
``text``) and ``.parquet`` (needs ``pyarrow``: ``pip install 'rlp[data]'``); or ``--hf-dataset NAME
[--hf-split train]`` (needs ``datasets`` and network). Documents are tokenised in worker processes
(chunks, results kept in input order) by the rule of :mod:`rlp.data.text` (special-token strings
inside the text are encoded as plain text, EOS is appended, whitespace-only documents are
dropped), the same rule the stream applies to text shards. The output format is described in
:mod:`rlp.data.format`; shards are written with webdataset's ``TarWriter``.

Huge documents: a document of more than ``--warn-doc-tokens`` tokens (default 1M) is reported (a
300 MB ``.txt`` file is one document unless split). ``--max-doc-tokens N`` splits documents into
consecutive pieces of at most ``N`` tokens, each its own document ending with EOS.

Same inputs give byte-identical shards (fixed tar headers, no timestamps). A shard is written to
``NAME.tar.tmp`` and renamed when complete; ``manifest.json`` is written last, so an interrupted
build never looks complete. A progress record (``.build_progress.json``) lists finished shards: a
re-run with the same inputs keeps those whose sha256 still matches and continues after them; a
re-run of a finished build with the same inputs does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rlp.data.format import (
    MANIFEST_NAME,
    SHARD_TEMPLATE,
    Manifest,
    ManifestError,
    ShardInfo,
    TokenizerInfo,
    encode_meta,
    encode_tokens,
    read_manifest,
    sha256_file,
    token_dtype,
    write_atomic,
    write_manifest,
)
from rlp.data.text import TextEncoder, is_document
from rlp.options import build, parse

BUILDER_VERSION = "1"
PROGRESS_NAME = ".build_progress.json"
DEFAULT_SHARD_SIZE_MB = 256.0
WARN_DOC_TOKENS = 1_000_000
"""Documents longer than this are reported (``--warn-doc-tokens``)."""
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")


class BuildError(RuntimeError):
    """Bad inputs or options; the message names the file and what to change."""


@dataclass
class BuildOptions:
    """Options of one build (the CLI flags)."""

    tokenizer: str
    out: Path
    prefix: str = "shard"
    text_field: str = "text"
    txt_blocks: bool = False
    shard_size_mb: float | None = None
    docs_per_shard: int | None = None
    workers: int = 1
    chunk_docs: int = 256
    hf_dataset: str | None = None
    hf_split: str = "train"
    progress: bool = True
    max_doc_tokens: int | None = None
    """Split documents into pieces of at most this many tokens (each ends with EOS)."""
    warn_doc_tokens: int = WARN_DOC_TOKENS


@dataclass
class RawDoc:
    source: str
    doc_id: str
    text: str


# ---------------------------------------------------------------------------------- inputs


def list_input_files(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(path, source name)`` of every input file; source names do not depend on the cwd."""
    files: list[tuple[Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
            if not found:
                raise BuildError(f"directory {path} holds no {'/'.join(INPUT_SUFFIXES)} files")
            files += [(p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in found]
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                raise BuildError(
                    f"{path}: unsupported input type (use {', '.join(INPUT_SUFFIXES)})"
                )
            files.append((path, path.name))
        else:
            raise BuildError(f"input {path} does not exist")
    return files


def iter_documents(files: list[tuple[Path, str]], opts: BuildOptions) -> Iterator[RawDoc]:
    """Raw documents in a fixed order: files in list order, then the HF dataset."""
    for path, source in files:
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            blocks = re.split(r"\n\s*\n", text) if opts.txt_blocks else [text]
            for i, block in enumerate(blocks):
                yield RawDoc(source, f"{source}#{i}", block)
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        text = _json_text(line, opts.text_field, f"{path}:{line_no}")
                        yield RawDoc(source, f"{source}:{line_no}", text)
        else:
            yield from _parquet_documents(path, source, opts.text_field)
    if opts.hf_dataset:
        yield from _hf_documents(opts)


def _json_text(line: str, field: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BuildError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise BuildError(f"{where}: no field {field!r} (has {keys}); pass --text-field")
    if not isinstance(row[field], str):
        raise BuildError(f"{where}: field {field!r} is {type(row[field]).__name__}, not text")
    return row[field]


def _parquet_documents(path: Path, source: str, field: str) -> Iterator[RawDoc]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BuildError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise BuildError(f"{path}: no column {field!r} (has {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            yield RawDoc(source, f"{source}:{row}", text or "")
            row += 1


def _hf_documents(opts: BuildOptions) -> Iterator[RawDoc]:
    try:
        import datasets
    except ImportError:
        raise BuildError(
            "--hf-dataset needs the `datasets` package (pip install datasets)"
        ) from None
    ds = datasets.load_dataset(opts.hf_dataset, split=opts.hf_split, streaming=True)
    source = f"hf:{opts.hf_dataset}:{opts.hf_split}"
    for i, row in enumerate(ds):
        if opts.text_field not in row:
            raise BuildError(f"{source}: rows have no field {opts.text_field!r} ({sorted(row)})")
        yield RawDoc(source, f"{source}:{i}", row[opts.text_field] or "")


# ---------------------------------------------------------------------------------- tokenising


_WORKER_ENCODER: TextEncoder | None = None


def _init_worker(encoder: TextEncoder) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker process
    _WORKER_ENCODER = encoder


def _tokenize_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER.encode_batch(texts)


def _tokenized(
    chunks: Iterator[list[RawDoc]], tokenizer: Any, dtype: np.dtype, workers: int
) -> Iterator[tuple[list[RawDoc], list[np.ndarray]]]:
    """``(docs, token arrays)`` per chunk, in input order, at most ``2 * workers`` in flight."""
    encoder = TextEncoder.for_tokenizer(tokenizer, dtype)
    if workers <= 1:
        for chunk in chunks:
            yield chunk, encoder.encode_batch([d.text for d in chunk])
        return
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, _init_worker, (encoder,)) as pool:
        # apply_async with a bounded window instead of imap: imap's feeder thread would read the
        # whole corpus into memory ahead of the workers.
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_tokenize_chunk, ([d.text for d in chunk],))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _chunks(docs: Iterable[RawDoc], size: int, skip: int, counts: dict[str, int]):
    """Non-empty documents in chunks of ``size``, after skipping the first ``skip`` of them."""
    chunk: list[RawDoc] = []
    for doc in docs:
        if not is_document(doc.text):
            counts["dropped_empty"] += 1
            continue
        if skip:
            skip -= 1
            continue
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def split_document(tokens: np.ndarray, max_tokens: int | None) -> list[np.ndarray]:
    """``tokens`` (ending with EOS) in pieces of at most ``max_tokens``, each ending with EOS."""
    if max_tokens is None or len(tokens) <= max_tokens:
        return [tokens]
    body, eos, step = tokens[:-1], tokens[-1:], max_tokens - 1
    return [np.concatenate([body[i : i + step], eos]) for i in range(0, len(body), step)]


# ---------------------------------------------------------------------------------- writing


def sample_members(key: str, tokens: np.ndarray, meta: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The tar members of one document."""
    return [(f"{key}.npy", encode_tokens(tokens)), (f"{key}.json", encode_meta(meta))]


def members_size(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members take in a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for _, data in members)


class ShardWriter:
    """Writes one shard to ``NAME.tar.tmp`` (webdataset ``TarWriter``, fixed headers: same input,
    same bytes); :meth:`finish` renames it."""

    def __init__(self, out: Path, prefix: str, index: int) -> None:
        import webdataset

        self.path = out / SHARD_TEMPLATE.format(prefix=prefix, index=index)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish() or abort()
        self._tar = webdataset.TarWriter(
            self._file, user="", group="", mode=0o644, mtime=0, encoder=False, compress=False
        )
        self.num_docs = self.num_tokens = self.bytes = 0

    def add(self, key: str, tokens: np.ndarray, meta: dict[str, Any]) -> None:
        """Append one document (``.npy`` + ``.json`` members)."""
        self.add_members(sample_members(key, tokens, meta), len(tokens))

    def add_members(self, members: list[tuple[str, bytes]], num_tokens: int) -> None:
        key = members[0][0].split(".", 1)[0]
        self._tar.write({"__key__": key, **{n.split(".", 1)[1]: d for n, d in members}})
        self.bytes += members_size(members)
        self.num_docs += 1
        self.num_tokens += num_tokens

    def size_with(self, members: list[tuple[str, bytes]]) -> int:
        """File size after adding ``members`` and closing (end marker, 10 KiB tar records)."""
        end = self.bytes + members_size(members) + 2 * 512
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def finish(self) -> ShardInfo:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return ShardInfo(
            name=self.path.name,
            sha256=sha256_file(self.path),
            num_docs=self.num_docs,
            num_tokens=self.num_tokens,
            bytes=self.path.stat().st_size,
        )

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def _fingerprint(files: list[tuple[Path, str]], opts: BuildOptions, tok_hash: str) -> str:
    stats = [(src, p.stat().st_size, p.stat().st_mtime_ns) for p, src in files]
    spec = {
        "builder": BUILDER_VERSION,
        "tokenizer": tok_hash,
        "inputs": stats,
        "hf": [opts.hf_dataset, opts.hf_split],
        "text_field": opts.text_field,
        "txt_blocks": opts.txt_blocks,
        "prefix": opts.prefix,
        "split": [opts.docs_per_shard, opts.shard_size_mb],
        "max_doc_tokens": opts.max_doc_tokens,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _verified(out: Path, shards: list[ShardInfo]) -> list[ShardInfo]:
    """The longest prefix of ``shards`` whose files exist with the recorded sha256."""
    good = []
    for info in shards:
        path = out / info.name
        if not path.is_file() or sha256_file(path) != info.sha256:
            break
        good.append(info)
    return good


def _clean(out: Path, prefix: str, keep: int) -> None:
    """Remove leftovers: temp files and this prefix's shards beyond the first ``keep``."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar(\.tmp)?$")
    for path in out.iterdir():
        m = pattern.match(path.name)
        if m and (m.group(2) or int(m.group(1)) >= keep):
            path.unlink()


# ---------------------------------------------------------------------------------- build


def build_shards(
    inputs: Sequence[str | Path],
    opts: BuildOptions,
    *,
    on_shard: Callable[[ShardInfo], None] | None = None,
) -> Manifest:
    """Build (or resume, or confirm up to date) the shards of ``inputs`` into ``opts.out``."""
    from rlp.tokenizer import load_tokenizer

    if opts.docs_per_shard is not None and opts.shard_size_mb is not None:
        raise BuildError("pass only one of --docs-per-shard and --shard-size-mb")
    if (opts.docs_per_shard or 1) < 1 or (opts.shard_size_mb or 1) <= 0 or opts.chunk_docs < 1:
        raise BuildError("--docs-per-shard, --shard-size-mb and --chunk-docs must be positive")
    if opts.max_doc_tokens is not None and opts.max_doc_tokens < 2:
        raise BuildError("--max-doc-tokens must be >= 2 (a piece holds tokens and its EOS)")
    if not inputs and not opts.hf_dataset:
        raise BuildError("nothing to build: pass --input PATH... and/or --hf-dataset NAME")
    start = time.perf_counter()
    tokenizer = load_tokenizer(opts.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    files = list_input_files(inputs)
    fingerprint = _fingerprint(files, opts, tokenizer.hash)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path, progress_path = out / MANIFEST_NAME, out / PROGRESS_NAME

    if manifest_path.is_file():
        try:
            old = read_manifest(manifest_path)
        except ManifestError:
            old = None
        fresh = old is not None and old.build.get("fingerprint") == fingerprint
        if fresh and len(_verified(out, old.shards)) == len(old.shards):
            _log(opts, f"{out}: up to date ({len(old.shards)} shards, {old.num_docs} docs)")
            return old
        manifest_path.unlink()  # from here on the directory must not look complete
    done: list[ShardInfo] = []
    # Per finished shard: (input documents written in full, pieces written of the next one).
    positions: list[list[int]] = []
    if progress_path.is_file():
        try:
            record = json.loads(progress_path.read_text())
        except json.JSONDecodeError:  # written atomically, so only a foreign edit gets here
            record = {}
        if record.get("fingerprint") == fingerprint:
            done = _verified(out, [ShardInfo(**s) for s in record["shards"]])
            positions = record.get("positions", [])[: len(done)]
            if len(positions) != len(done):  # a record without positions: start afresh
                done, positions = [], []
            _log(opts, f"{out}: resuming after {len(done)} finished shard(s)")
    _clean(out, opts.prefix, keep=len(done))

    counts = {"dropped_empty": 0}
    limit_docs = opts.docs_per_shard
    limit_bytes = None if limit_docs else (opts.shard_size_mb or DEFAULT_SHARD_SIZE_MB) * 2**20
    doc_index = sum(s.num_docs for s in done)
    raw_index, piece_skip = positions[-1] if positions else (0, 0)
    chunks = _chunks(iter_documents(files, opts), opts.chunk_docs, raw_index, counts)
    writer: ShardWriter | None = None
    huge: list[tuple[str, int]] = []
    bar = tqdm(
        desc="tokenizing", unit="doc", initial=doc_index, disable=None if opts.progress else True
    )

    def close_shard(w: ShardWriter, position: tuple[int, int]) -> None:
        info = w.finish()
        done.append(info)
        positions.append(list(position))
        record = {
            "fingerprint": fingerprint,
            "shards": [asdict(s) for s in done],
            "positions": positions,
        }
        write_atomic(progress_path, json.dumps(record, indent=1).encode())
        if on_shard is not None:
            on_shard(info)

    try:
        for docs, arrays in _tokenized(chunks, tokenizer, dtype, opts.workers):
            for doc, tokens in zip(docs, arrays):
                if len(tokens) > opts.warn_doc_tokens:
                    huge.append((doc.doc_id, len(tokens)))
                pieces = split_document(tokens, opts.max_doc_tokens)
                for p, piece in enumerate(pieces):
                    if piece_skip:  # written before an interruption
                        piece_skip -= 1
                        continue
                    doc_id = doc.doc_id if len(pieces) == 1 else f"{doc.doc_id}@{p}"
                    meta = {"source": doc.source, "doc_id": doc_id, "length": len(piece)}
                    members = sample_members(f"{doc_index:010d}", piece, meta)
                    if writer is not None and (
                        (limit_docs and writer.num_docs >= limit_docs)
                        or (limit_bytes and writer.size_with(members) > limit_bytes)
                    ):
                        close_shard(writer, (raw_index, p))
                        writer = None
                    if writer is None:
                        writer = ShardWriter(out, opts.prefix, len(done))
                    writer.add_members(members, len(piece))
                    doc_index += 1
                raw_index += 1
            bar.update(len(docs))
        if writer is not None:
            close_shard(writer, (raw_index, 0))
            writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    if not done:
        raise BuildError(f"no non-empty documents in {list(map(str, inputs))}")
    manifest = Manifest(
        tokenizer=TokenizerInfo(
            name=str(opts.tokenizer),
            hash=tokenizer.hash,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
        ),
        dtype=dtype.name,
        shards=done,
        builder_version=BUILDER_VERSION,
        build={
            "fingerprint": fingerprint,
            "inputs": [src for _, src in files]
            + ([f"hf:{opts.hf_dataset}"] if opts.hf_dataset else []),
            "options": {
                k: v for k, v in asdict(opts).items() if k not in ("out", "progress", "workers")
            },
        },
    )
    write_manifest(manifest_path, manifest)
    progress_path.unlink(missing_ok=True)
    if huge:
        longest = max(huge, key=lambda h: h[1])
        split = (
            f"they were split into pieces of <= {opts.max_doc_tokens} tokens"
            if opts.max_doc_tokens
            else "pass --max-doc-tokens N to split them (or --txt-blocks for .txt files)"
        )
        print(
            f"[build_shards] warning: {len(huge)} document(s) have more than "
            f"{opts.warn_doc_tokens} tokens (longest: {longest[0]}, {longest[1]} tokens); {split}",
            file=sys.stderr,
            flush=True,
        )
    _log(
        opts,
        f"{out}: {len(done)} shards, {manifest.num_docs} docs, {manifest.num_tokens} tokens "
        f"({dtype.name}; dropped {counts['dropped_empty']} empty) "
        f"in {time.perf_counter() - start:.1f} s",
    )
    return manifest


def _log(opts: BuildOptions, msg: str) -> None:
    if opts.progress:
        print(f"[build_shards] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="build_shards",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", default=[], metavar="PATH", help="files or directories")
    p.add_argument(
        "--tokenizer", required=True, help="tokenizer dir, tokenizer.json, .gguf or hub name"
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output directory (the builder's: stale PREFIX-NNNNNN.tar files there are removed)",
    )
    p.add_argument("--prefix", default="shard", help="shard file prefix (PREFIX-000000.tar)")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/HF rows")
    p.add_argument("--txt-blocks", action="store_true", help="split .txt files at blank lines")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--shard-size-mb", type=float, help=f"target shard size (default {DEFAULT_SHARD_SIZE_MB:g})"
    )
    size.add_argument("--docs-per-shard", type=int, help="documents per shard")
    p.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes"
    )
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per worker task")
    p.add_argument(
        "--max-doc-tokens",
        type=int,
        default=None,
        help="split longer documents into pieces of at most N tokens (each ends with EOS)",
    )
    p.add_argument(
        "--warn-doc-tokens",
        type=int,
        default=WARN_DOC_TOKENS,
        help=f"report documents longer than N tokens (default {WARN_DOC_TOKENS})",
    )
    p.add_argument("--hf-dataset", help="Hugging Face dataset name (needs `datasets` + network)")
    p.add_argument("--hf-split", default="train", help="split of --hf-dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    return parse(p, argv)  # flags or key=value (rlp.options)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    opts = build(BuildOptions, args, progress=not args.no_progress)
    from rlp.tokenizer import TokenizerError

    try:
        build_shards(args.input, opts)
    except (BuildError, TokenizerError) as exc:
        print(f"rlp data build: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
