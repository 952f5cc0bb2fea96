"""Shards over HTTP (a server on 127.0.0.1): streaming, manifests beside remote shards or given
by URL, resume that opens no shard before the cursor's, and `rlp data manifest` indexes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlp.data.format import MANIFEST_NAME, CorruptShardError, read_manifest
from rlp.data.indexer import main as manifest_main
from rlp.data.shards import open_shard_set
from rlp.data.stream import DocumentStream, RLPDataStream
from rlp.tokenizer import Tokenizer
from tests.data_helpers import (
    ShardServer,
    data_config,
    make_shards,
    make_text_shards,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _stream(spec: str, **kw) -> DocumentStream:
    found = open_shard_set(spec, manifest=kw.pop("manifest", None))
    args = dict(
        dp_rank=0,
        dp_size=1,
        seed=3,
        shuffle_buffer=0,
        max_epochs=1,
        manifest=found.manifest,
        content=found.content,
    )
    args.update(kw)
    return DocumentStream(found.urls, **args)


def _keys(stream, n: int | None = None) -> list[str]:
    out = []
    for doc in stream:
        out.append(doc.key)
        if n is not None and len(out) == n:
            break
    return out


def test_http_shards_stream_and_resume_opens_no_consumed_shard(tmp_path: Path) -> None:
    ss = make_shards(tmp_path, 48, docs_per_shard=6)  # 8 shards, manifest beside them
    shard_of = {key: f"shard-{i // 6:06d}.tar" for i, key in enumerate(ss.docs)}
    with ShardServer(ss.dir) as server:
        spec = f"{server.url}/shard-{{000000..000007}}.tar"
        full = _keys(_stream(spec))
        assert full == _keys(_stream(ss.pattern))  # the same order as from local files
        assert server.requests[MANIFEST_NAME] >= 1  # found beside the shards
        for n in (9, 25, 40):
            stream = _stream(spec)
            head = _keys(stream, n)
            state = json.loads(json.dumps(stream.state_dict()))
            stream.close()
            server.reset()
            resumed = _stream(spec)
            resumed.load_state_dict(state)
            rest = _keys(resumed)
            assert head + rest == full
            consumed = {shard_of[k] for k in head} - {shard_of[k] for k in rest}
            opened = {name for name in server.requests if name.endswith(".tar")}
            assert opened == {shard_of[k] for k in rest}, (n, opened)
            assert not opened & consumed
            assert all(server.requests[name] == 1 for name in opened)


def test_text_shards_over_http_with_an_index_manifest(tok: Tokenizer, tmp_path: Path) -> None:
    texts = make_text_shards(tmp_path, 40, per_shard=8, layout="json", suffix=".tar.gz")
    with ShardServer(texts.dir) as server:
        remote = f"{server.url}/part-{{0000..0004}}.tar.gz"
        index = tmp_path / "remote-manifest.json"
        assert manifest_main(["--shards", remote, "--out", str(index)]) == 0
        assert manifest_main([f"shards={texts.pattern}"]) == 0  # local: beside the shards
        local = read_manifest(texts.dir / MANIFEST_NAME)
        assert read_manifest(index).to_dict()["shards"] == local.to_dict()["shards"]
        assert local.content == "text" and local.num_docs == 40 and local.tokenizer is None
        assert [s.num_docs for s in local.shards] == [8] * 5
        cfg = data_config(remote, shuffle_buffer=4, ntp_seq_len=16)

        def make() -> RLPDataStream:
            return RLPDataStream(
                remote, cfg, dp_rank=0, dp_size=1, seed=2, target_tokens=1, tokenizer=tok
            )

        ref_stream = make()
        ref = [[(c.key, c.prefix) for c in ref_stream.next_contexts(5)] for _ in range(7)]
        stream = make()
        got = [[(c.key, c.prefix) for c in stream.next_contexts(5)] for _ in range(5)]
        state = stream.state_dict()
        server.reset()
        resumed = make()
        resumed.load_state_dict(state)
        got += [[(c.key, c.prefix) for c in resumed.next_contexts(5)] for _ in range(2)]
        assert got == ref
        # 25 of 40 documents consumed: at most the last two shards (buffer reach) are read again.
        assert sum(n for name, n in server.requests.items() if name.endswith(".tar.gz")) <= 3


def test_remote_shards_without_manifest_still_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ss = make_shards(tmp_path, 12, docs_per_shard=6)
    ss.manifest_path.rename(tmp_path / "elsewhere.json")
    with ShardServer(tmp_path) as server:
        spec = f"{server.url}/shards/shard-{{000000..000001}}.tar"
        with caplog.at_level(logging.WARNING, logger="rlp.data"):
            found = open_shard_set(spec)
        assert found.manifest is None and "no manifest next to the shards" in caplog.text
        assert len(_keys(_stream(spec))) == 12
        given = open_shard_set(spec, manifest=f"{server.url}/elsewhere.json")  # by URL
        assert given.manifest is not None and given.content == "tokens"
        missing = f"{server.url}/shards/shard-000009.tar"
        with pytest.raises(CorruptShardError, match="shard-000009.tar.*status 22"):
            _keys(_stream(missing))
