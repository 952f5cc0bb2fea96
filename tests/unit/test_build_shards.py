"""rlp.data.builder: read-back exactness, determinism, idempotency, interruption."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from rlp.data.builder import (
    PROGRESS_NAME,
    BuildError,
    BuildOptions,
    build_shards,
    main,
)
from rlp.data.format import read_manifest, sha256_file
from rlp.data.stream import DocumentStream
from rlp.tokenizer import Tokenizer
from tests.data_helpers import generate_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A directory of mixed inputs and the documents it holds, in builder order."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    texts = generate_texts(60, seed=4)
    # Sorted order: a.jsonl, b.txt, sub/c.txt (blocks), sub/d.jsonl
    rows = [{"text": t, "id": i} for i, t in enumerate(texts[:20])]
    rows.insert(3, {"text": "   \n", "id": -1})  # whitespace only: dropped
    rows.insert(5, {"text": "literal <|endoftext|> and <think> stay text", "id": -2})
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (root / "b.txt").write_text(texts[20])
    (root / "sub" / "c.txt").write_text("\n\n \n\n".join(texts[21:30]))
    (root / "sub" / "d.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[30:])
    )
    (root / "ignored.md").write_text("not an input")
    expected = [r["text"] for r in rows if r["text"].strip()] + texts[20:]
    return root, expected


def _opts(tok: Tokenizer, out: Path, **kw) -> BuildOptions:
    return BuildOptions(tokenizer=tok.path, out=out, progress=False, **kw)


def _read_back(out: Path) -> list[tuple[str, np.ndarray]]:
    manifest = read_manifest(out / "manifest.json")
    stream = DocumentStream(
        [str(out / s.name) for s in manifest.shards],
        dp_rank=0,
        dp_size=1,
        seed=0,
        shuffle_shards=False,
        shuffle_buffer=0,
        manifest=manifest,
        max_epochs=1,
    )
    return [(d.key, d.tokens) for d in stream]


def test_mixed_inputs_read_back_token_for_token(tok: Tokenizer, corpus, tmp_path: Path) -> None:
    root, texts = corpus
    manifest = build_shards(
        [root], _opts(tok, tmp_path / "out", docs_per_shard=16, txt_blocks=True)
    )
    docs = _read_back(tmp_path / "out")
    assert len(docs) == len(texts) == manifest.num_docs == 60 + 1
    for (key, tokens), text in zip(docs, texts):
        expected = [*tok.encode(text, parse_special=False), tok.eos_id]
        assert tokens.tolist() == expected, key
    assert tok.think_open_id not in docs[4][1].tolist()  # literal tags did not become tokens
    assert manifest.dtype == "uint16" and manifest.tokenizer.hash == tok.hash
    assert [s.num_docs for s in manifest.shards] == [16, 16, 16, 13]
    assert manifest.num_tokens == sum(len(t) for _, t in docs)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        meta = json.loads(tf.extractfile("0000000000.json").read())
    assert meta == {
        "source": "corpus/a.jsonl",
        "doc_id": "corpus/a.jsonl:1",
        "length": len(docs[0][1]),
    }


def test_same_inputs_give_same_bytes_and_rerun_is_a_no_op(tok: Tokenizer, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_texts(80)))
    first = build_shards([src], _opts(tok, tmp_path / "a", shard_size_mb=0.02))
    assert len(first.shards) > 2 and all(s.bytes <= 0.02 * 2**20 for s in first.shards)
    mtimes = [(tmp_path / "a" / s.name).stat().st_mtime_ns for s in first.shards]
    again = build_shards([src], _opts(tok, tmp_path / "a", shard_size_mb=0.02))
    assert again.shards == first.shards
    assert mtimes == [(tmp_path / "a" / s.name).stat().st_mtime_ns for s in first.shards]
    parallel = build_shards(
        [src], _opts(tok, tmp_path / "b", shard_size_mb=0.02, workers=2, chunk_docs=7)
    )
    assert [s.sha256 for s in parallel.shards] == [s.sha256 for s in first.shards]
    # A changed shard file is detected and the build redone.
    (tmp_path / "a" / first.shards[0].name).write_bytes(b"junk")
    redone = build_shards([src], _opts(tok, tmp_path / "a", shard_size_mb=0.02))
    assert sha256_file(tmp_path / "a" / first.shards[0].name) == first.shards[0].sha256
    assert redone.shards == first.shards


def test_interrupted_build_never_looks_complete_and_resumes(tok: Tokenizer, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_texts(50)))
    reference = build_shards([src], _opts(tok, tmp_path / "ref", docs_per_shard=10))
    out = tmp_path / "out"
    written: list[str] = []

    def crash_after_two(info) -> None:
        written.append(info.name)
        if len(written) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C between shards

    with pytest.raises(KeyboardInterrupt):
        build_shards([src], _opts(tok, out, docs_per_shard=10), on_shard=crash_after_two)
    assert not (out / "manifest.json").exists() and (out / PROGRESS_NAME).exists()
    assert sorted(p.name for p in out.glob("*.tar*")) == ["shard-000000.tar", "shard-000001.tar"]
    (out / "shard-000002.tar.tmp").write_bytes(b"partial")  # as left by a SIGKILL mid-shard
    resumed: list[str] = []
    manifest = build_shards(
        [src], _opts(tok, out, docs_per_shard=10), on_shard=lambda i: resumed.append(i.name)
    )
    assert resumed == [f"shard-00000{i}.tar" for i in range(2, 5)]  # finished shards kept
    assert manifest.shards == reference.shards
    assert not (out / PROGRESS_NAME).exists() and not list(out.glob("*.tmp"))


def test_failure_mid_shard_leaves_no_partial_shard(tok: Tokenizer, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in generate_texts(30)]
    lines.insert(25, "{not json")
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=r"in.jsonl:26: invalid JSON"):
        build_shards([src], _opts(tok, out, docs_per_shard=10, chunk_docs=4))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    del lines[25]
    src.write_text("\n".join(lines) + "\n")
    assert build_shards([src], _opts(tok, out, docs_per_shard=10)).num_docs == 30


def test_cli_and_input_errors(tok: Tokenizer, tmp_path: Path, capsys) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"body": "x"}) + "\n")
    args = ["--tokenizer", tok.path, "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(["--input", str(src), *args]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:1: no field 'text'" in err and "--text-field" in err
    assert main(["--input", str(src), "--text-field", "body", *args]) == 0
    assert read_manifest(tmp_path / "o" / "manifest.json").num_docs == 1
    assert main(["--input", str(tmp_path / "missing"), *args]) == 2
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert main(["--input", str(tmp_path / "t.parquet"), *args]) == 2
        assert "pyarrow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", str(src), "--docs-per-shard", "2", "--shard-size-mb", "1", *args])


def test_huge_documents_are_reported_or_split(tok: Tokenizer, tmp_path: Path, capsys) -> None:
    long_text = " ".join(generate_texts(40, seed=9))  # one long document
    src = tmp_path / "in.jsonl"
    texts = [*generate_texts(5), long_text, *generate_texts(3, seed=1)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    whole = [*tok.encode(long_text, parse_special=False), tok.eos_id]
    assert len(whole) > 1500
    args = ["--input", str(src), "--tokenizer", tok.path, "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--warn-doc-tokens", "1000"]) == 0
    err = capsys.readouterr().err
    assert "1 document(s) have more than 1000 tokens" in err and "--max-doc-tokens" in err
    assert read_manifest(tmp_path / "a" / "manifest.json").num_docs == 9

    out = tmp_path / "b"
    assert main([*args, "--out", str(out), "--max-doc-tokens", "500", "--docs-per-shard", "3"]) == 0
    docs = [t.tolist() for _, t in _read_back(out)]
    pieces = docs[5 : 5 + -(-(len(whole) - 1) // 499)]
    assert all(len(p) <= 500 and p[-1] == tok.eos_id for p in pieces)
    assert sum((p[:-1] for p in pieces), []) + [tok.eos_id] == whole  # nothing lost or added
    assert len(docs) == 8 + len(pieces)

    # Interrupted between two shards that split the long document: resumes to the same bytes.
    written: list[str] = []

    def crash(info) -> None:
        written.append(info.name)
        if len(written) == 3:  # shard 2 ends inside the long document's pieces
            raise KeyboardInterrupt

    opts = _opts(tok, tmp_path / "c", docs_per_shard=3, max_doc_tokens=500)
    with pytest.raises(KeyboardInterrupt):
        build_shards([src], opts, on_shard=crash)
    progress = json.loads((tmp_path / "c" / PROGRESS_NAME).read_text())
    assert progress["positions"][-1] == [5, 4]  # 5 inputs done, 4 pieces of the 6th written
    again = build_shards([src], opts)
    reference = read_manifest(out / "manifest.json")
    assert [(s.name, s.sha256) for s in again.shards] == [
        (s.name, s.sha256) for s in reference.shards
    ]
