"""Text shards written by webdataset's own ShardWriter: tokenised on the fly, exactly like the
builder tokenises, with exact resume, damage handling and no unpickling."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from rlp.data.format import CorruptShardError, DataError, token_dtype
from rlp.data.stream import DocumentStream, RLPDataStream
from rlp.data.text import TextEncoder
from rlp.tokenizer import Tokenizer
from tests.data_helpers import (
    data_config,
    make_shards,
    make_text_shards,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _stream(tok: Tokenizer, urls: list[str], **kw) -> DocumentStream:
    args = dict(
        dp_rank=0,
        dp_size=1,
        seed=3,
        shuffle_buffer=8,
        max_epochs=1,
        content="text",
        encoder=TextEncoder.for_tokenizer(tok, token_dtype(tok.vocab_size)),
        vocab_size=tok.vocab_size,
    )
    args.update(kw)
    return DocumentStream(urls, **args)


def _docs(stream, n: int | None = None) -> list[tuple[str, list[int]]]:
    out = []
    for doc in stream:
        out.append((doc.key, doc.tokens.tolist()))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize(
    ("layout", "suffix"), [("txt", ".tar"), ("json", ".tar.gz"), ("jsonl", ".tar")]
)
def test_text_samples_get_the_builders_token_ids(
    tok: Tokenizer, tmp_path: Path, layout: str, suffix: str
) -> None:
    texts = make_text_shards(tmp_path, 30, per_shard=8, layout=layout, suffix=suffix)
    docs = dict(_docs(_stream(tok, [str(p) for p in texts.paths], shuffle_buffer=0)))
    assert sorted(docs) == sorted(texts.texts)  # every sample once; the .cls members ignored
    for key, text in texts.texts.items():
        assert docs[key] == [*tok.encode(text, parse_special=False), tok.eos_id]
    if layout == "txt":  # the builder, given the same texts, writes the same ids
        built = make_shards(tmp_path, 30, tokenizer=tok, docs_per_shard=8, name="built")
        by_index = [built.docs[f"{i:010d}"].tolist() for i in range(30)]
        assert by_index == [docs[f"doc{i:05d}"] for i in range(30)]


def test_special_token_strings_stay_text_and_blank_samples_are_no_documents(
    tok: Tokenizer, tmp_path: Path
) -> None:
    texts = ["Add 2 and 3 <|endoftext|> then <think> stop.", "   \n  ", "A plain line of text."]
    shards = make_text_shards(tmp_path, 3, per_shard=3, texts=texts)
    docs = dict(_docs(_stream(tok, [str(p) for p in shards.paths], shuffle_buffer=0)))
    assert sorted(docs) == ["doc00000", "doc00002"]  # the blank sample is skipped, silently
    injected = docs["doc00000"]
    assert injected.count(tok.eos_id) == 1 and injected[-1] == tok.eos_id
    assert tok.think_open_id not in injected


@pytest.mark.parametrize(("workers", "buffer"), [(0, 8), (2, 8), (0, 0)])
def test_text_shards_resume_exactly(tok: Tokenizer, tmp_path: Path, workers: int, buffer: int):
    texts = make_text_shards(tmp_path, 48, per_shard=6)  # 8 shards
    urls = [str(p) for p in texts.paths]
    kw = dict(num_workers=workers, shuffle_buffer=buffer, max_epochs=2)
    full = _docs(_stream(tok, urls, **kw))
    assert len(full) == 96
    for n in (1, 13, 50, 95):
        stream = _stream(tok, urls, **kw)
        head = _docs(stream, n)
        state = json.loads(json.dumps(stream.state_dict()))
        stream.close()
        resumed = _stream(tok, urls, **kw)
        resumed.load_state_dict(state)
        assert head + _docs(resumed) == full, f"resume after {n} documents"


def test_rlp_stream_reads_text_shards_with_contexts_and_ntp(tok: Tokenizer, tmp_path: Path):
    texts = make_text_shards(tmp_path, 24, per_shard=6, layout="json", suffix=".tar.gz")
    cfg = data_config(texts, num_workers=2, ntp_seq_len=16)

    def make() -> RLPDataStream:
        return RLPDataStream(
            texts.pattern, cfg, dp_rank=0, dp_size=1, seed=5, target_tokens=1, tokenizer=tok
        )

    def step(stream: RLPDataStream) -> list:
        ctx = [(c.key, c.position, c.prefix, c.target) for c in stream.next_contexts(4)]
        x, y = stream.next_ntp_batch(2)
        return [ctx, x.tolist(), y.tolist()]

    ref_stream = make()
    ref = [step(ref_stream) for _ in range(8)]
    ref_stream.close()
    stream = make()
    got = [step(stream) for _ in range(3)]
    state = json.loads(json.dumps(stream.state_dict()))
    stream.close()
    resumed = make()
    resumed.load_state_dict(state)
    got += [step(resumed) for _ in range(5)]
    resumed.close()
    assert got == ref
    no_tok = RLPDataStream(texts.pattern, cfg, dp_rank=0, dp_size=1, seed=5, target_tokens=1)
    with pytest.raises(DataError, match="need the run's tokenizer"):
        no_tok.next_contexts(1)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class _Payload:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_text_samples_and_pickles_are_never_unpickled(tok: Tokenizer, tmp_path: Path):
    marker = tmp_path / "UNPICKLED"
    evil = pickle.dumps(_Payload(marker))
    npy = io.BytesIO()
    np.save(npy, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    path = _tar(
        tmp_path / "mixed.tar",
        [
            ("a.txt", b"Some good text here."),
            ("a.pickle", evil),
            ("a.pyd", evil),
            ("b.json", json.dumps({"body": "no text field"}).encode()),
            ("c.jsonl", b"{not json\n"),
            ("d.npy", npy.getvalue()),  # an object array: pickle inside a .npy
            ("e.txt", b"More good text."),
        ],
    )
    for content in ("auto", "text"):
        kw = dict(on_corrupt="skip", content=content, shuffle_buffer=0)
        stream = _stream(tok, [str(path)], **kw)
        keys = [k for k, _ in _docs(stream)]
        assert keys == ["a", "e"]
        assert stream.stats()["skipped_samples"] == 3
    with pytest.raises(CorruptShardError, match=r"sample 'b': .json has no field 'text'"):
        _docs(_stream(tok, [str(path)], shuffle_buffer=0))
    assert not marker.exists()


def test_auto_refuses_unchecked_pretokenised_samples(tok: Tokenizer, tmp_path: Path) -> None:
    ss = make_shards(tmp_path, 12, docs_per_shard=6, tokenizer=tok)
    ss.manifest_path.unlink()
    cfg = data_config(ss)
    stream = RLPDataStream(
        ss.pattern, cfg, dp_rank=0, dp_size=1, seed=0, target_tokens=1, tokenizer=tok
    )
    with pytest.raises(DataError, match="no manifest.json was found"):
        stream.next_contexts(1)
    off = data_config(ss, check_tokenizer=False)
    stream = RLPDataStream(
        ss.pattern, off, dp_rank=0, dp_size=1, seed=0, target_tokens=1, tokenizer=tok
    )
    assert len(stream.next_contexts(3)) == 3
