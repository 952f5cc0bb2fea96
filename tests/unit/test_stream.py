"""rlp.data.stream: DP split, TP-peer identity, exact resume (0 and 2 workers), bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rlp.data.builder import ShardWriter
from rlp.data.format import (
    MANIFEST_NAME,
    CorruptShardError,
    DataError,
    Manifest,
    TokenizerInfo,
    TokenizerMismatchError,
    write_manifest,
)
from rlp.data.stream import DocumentStream, RLPDataStream
from tests.data_helpers import ShardSet, data_config, make_shards, tiny_tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    return make_shards(tmp_path_factory.mktemp("stream"), 48, docs_per_shard=6)  # 8 shards


def _docs(ss: ShardSet, **kw) -> DocumentStream:
    args = dict(
        dp_rank=0,
        dp_size=1,
        seed=3,
        shuffle_buffer=8,
        manifest=ss.manifest,
        vocab_size=512,
        max_epochs=2,
    )
    args.update(kw)
    return DocumentStream([str(p) for p in ss.paths], **args)


def _keys(stream, n: int | None = None) -> list[tuple[int, str]]:
    out = []
    for doc in stream:
        out.append((doc.epoch, doc.key))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_dp_ranks_see_disjoint_parts_covering_each_epoch(shards: ShardSet, workers: int) -> None:
    dp = 4 if workers == 0 else 2
    per_rank = [_keys(_docs(shards, dp_rank=r, dp_size=dp, num_workers=workers)) for r in range(dp)]
    for epoch in (0, 1):
        parts = [{k for e, k in keys if e == epoch} for keys in per_rank]
        assert sum(len(p) for p in parts) == 48 and set().union(*parts) == set(shards.docs)
    first = [k for e, k in per_rank[0] if e == 0]
    second = [k for e, k in per_rank[0] if e == 1]
    assert first != second  # a new shard permutation and shuffle each epoch
    doc = next(iter(_docs(shards)))
    assert (doc.tokens == shards.docs[doc.key]).all()


def test_tp_peers_get_identical_batches(shards: ShardSet) -> None:
    cfg = data_config(shards, num_workers=2, targets_per_document=2)

    def batches(dp_rank: int) -> list:
        stream = RLPDataStream(
            shards.pattern, cfg, dp_rank=dp_rank, dp_size=2, seed=11, target_tokens=2
        )
        out = []
        for _ in range(3):
            out.append([(c.key, c.position, c.prefix, c.target) for c in stream.next_contexts(4)])
            x, y = stream.next_ntp_batch(2)
            out.append((x.tolist(), y.tolist()))
        stream.close()
        return out

    peer_a, peer_b = batches(0), batches(0)
    assert peer_a == peer_b
    assert batches(1) != peer_a


@pytest.mark.parametrize(
    ("workers", "buffer", "chunk", "cuts"),
    [
        (0, 8, 32, [1, 7, 47, 49, 95]),
        (2, 8, 32, [1, 6, 13, 48, 90]),
        (2, 8, 3, [2, 3, 4, 7, 50]),  # many chunk boundaries: the round-robin resumes mid-way
        (0, 0, 32, [5, 60]),
        (2, 64, 32, [3, 51]),
    ],
)
def test_resume_continues_exactly(
    shards: ShardSet, workers: int, buffer: int, chunk: int, cuts: list
) -> None:
    kw = dict(num_workers=workers, shuffle_buffer=buffer, worker_chunk=chunk)
    full = _keys(_docs(shards, **kw))
    assert len(full) == 96 and len(set(full)) == 96
    for n in cuts:
        stream = _docs(shards, **kw)
        head = _keys(stream, n)
        state = json.loads(json.dumps(stream.state_dict()))  # plain data, survives JSON
        stream.close()
        resumed = _docs(shards, **kw)
        resumed.load_state_dict(state)
        assert head + _keys(resumed) == full, f"resume after {n} documents"


@pytest.mark.parametrize("workers", [0, 2])
def test_rlp_stream_resume_with_contexts_and_ntp(shards: ShardSet, workers: int) -> None:
    cfg = data_config(shards, num_workers=workers, targets_per_document=3, ntp_seq_len=16)

    def make() -> RLPDataStream:
        return RLPDataStream(shards.pattern, cfg, dp_rank=1, dp_size=2, seed=5, target_tokens=1)

    def step(stream: RLPDataStream) -> list:
        ctx = [(c.key, c.position, c.prefix, c.target) for c in stream.next_contexts(5)]
        x, y = stream.next_ntp_batch(3)
        assert x.shape == (3, 16) and (x[:, 1:] == y[:, :-1]).all()
        return [ctx, x.tolist(), y.tolist()]

    ref_stream = make()
    ref = [step(ref_stream) for _ in range(20)]  # 34 docs: past the end of this rank's 24
    ref_stream.close()
    stream = make()
    got = [step(stream) for _ in range(5)]
    state = json.loads(json.dumps(stream.state_dict()))
    stream.close()
    resumed = make()
    resumed.load_state_dict(state)
    got += [step(resumed) for _ in range(15)]
    assert got == ref
    stats = resumed.stats()
    assert stats["contexts"] == 100 and stats["documents"] == 34 and stats["skipped_shards"] == 0


def test_resume_refuses_a_changed_layout(shards: ShardSet) -> None:
    state = _docs(shards, num_workers=2).state_dict()
    with pytest.raises(DataError, match="lanes: saved 2, now 1.*data.num_workers"):
        _docs(shards, num_workers=0).load_state_dict(state)
    with pytest.raises(DataError, match="dp_size"):
        _docs(shards, num_workers=2, dp_size=2).load_state_dict(state)
    cfg = data_config(shards)
    stream = RLPDataStream(shards.pattern, cfg, dp_rank=0, dp_size=1, seed=0, target_tokens=1)
    with pytest.raises(DataError, match="empty"):
        stream.load_state_dict({})


def _damage(tmp_path: Path) -> ShardSet:
    """Shards 1-4 of 8 damaged: truncated, garbage, missing, one bad sample."""
    ss = make_shards(tmp_path, 48, docs_per_shard=6, name="damaged")
    data = ss.paths[1].read_bytes()
    ss.paths[1].write_bytes(data[: len(data) // 2])  # truncated mid-way
    ss.paths[2].write_bytes(np.random.default_rng(0).bytes(4096))  # garbage
    ss.paths[3].unlink()  # missing
    raw = bytearray(ss.paths[4].read_bytes())
    at = raw.find(b"\x93NUMPY", 2048)  # the second sample's .npy
    raw[at : at + 6] = b"XXXXXX"
    ss.paths[4].write_bytes(bytes(raw))  # one bad sample, sha256 no longer matches
    return ss


def test_damaged_shards_skip_counts_and_error_names_the_shard(tmp_path: Path) -> None:
    ss = _damage(tmp_path)
    keys = _keys(_docs(ss, on_corrupt="skip", max_epochs=1))
    # Intact: 4 shards x 6 + shard 4 minus one sample + the truncated shard's complete prefix.
    intact = {k for p in (0, 5, 6, 7) for k in list(ss.docs)[6 * p : 6 * p + 6]}
    assert intact <= {k for _, k in keys} and len(keys) >= 24 + 5
    stream = _docs(ss, on_corrupt="skip", max_epochs=1)
    _keys(stream)
    assert stream.stats()["skipped_shards"] == 3 and stream.stats()["skipped_samples"] >= 1
    for workers in (0, 2):
        with pytest.raises(CorruptShardError, match=r"shard .*shard-00000[1-4]\.tar.*on_corrupt"):
            _keys(_docs(ss, on_corrupt="error", num_workers=workers))
    cfg = data_config(ss, on_corrupt="error")
    with pytest.raises(CorruptShardError, match="do not exist.*shard-000003.tar"):
        RLPDataStream(ss.pattern, cfg, dp_rank=0, dp_size=1, seed=0, target_tokens=1)


def test_skip_counters_survive_resume(tmp_path: Path) -> None:
    ss = _damage(tmp_path)
    full_stream = _docs(ss, on_corrupt="skip", num_workers=2)
    full = _keys(full_stream)
    for n in (3, 20, len(full) - 2):
        stream = _docs(ss, on_corrupt="skip", num_workers=2)
        head = _keys(stream, n)
        resumed = _docs(ss, on_corrupt="skip", num_workers=2)
        resumed.load_state_dict(stream.state_dict())
        stream.close()
        assert head + _keys(resumed) == full
        assert resumed.stats() == full_stream.stats()


def test_checksums_catch_silent_changes(tmp_path: Path) -> None:
    ss = make_shards(tmp_path, 12, docs_per_shard=6)
    raw = bytearray(ss.paths[0].read_bytes())
    at = raw.find(b"\x93NUMPY") + 128 + 4  # a token inside the first document
    raw[at] ^= 0x01  # still a valid id: only the checksum can tell
    ss.paths[0].write_bytes(bytes(raw))
    assert len(_keys(_docs(ss, max_epochs=1))) == 12
    with pytest.raises(CorruptShardError, match="sha256 .* differs"):
        _keys(_docs(ss, max_epochs=1, verify_checksums=True))


def test_pipe_urls_read_the_same_documents(shards: ShardSet) -> None:
    pipes = [f"pipe:cat {p}" for p in shards.paths]
    by_pipe = _keys(
        DocumentStream(
            pipes,
            dp_rank=0,
            dp_size=1,
            seed=3,
            shuffle_buffer=8,
            manifest=shards.manifest,
            max_epochs=2,
        )
    )
    assert by_pipe == _keys(_docs(shards))
    cfg = data_config(",".join(pipes), manifest=str(shards.manifest_path))
    stream = RLPDataStream(",".join(pipes), cfg, dp_rank=0, dp_size=1, seed=3, target_tokens=1)
    assert len(stream.next_contexts(10)) == 10


def test_tokenizer_mismatch_names_both_tokenizers(shards: ShardSet, tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path)
    cfg = data_config(shards)
    with pytest.raises(TokenizerMismatchError) as err:
        RLPDataStream(
            shards.pattern, cfg, dp_rank=0, dp_size=1, seed=0, target_tokens=1, tokenizer=tok
        )
    assert "'synthetic'" in str(err.value) and tok.hash in str(err.value)
    assert repr(tok.name) in str(err.value) and "synthetic-0" in str(err.value)
    off = data_config(shards, check_tokenizer=False)
    stream = RLPDataStream(
        shards.pattern, off, dp_rank=0, dp_size=1, seed=0, target_tokens=1, tokenizer=tok
    )
    assert stream.eos_id == tok.eos_id


def test_no_readable_documents_is_an_error(tmp_path: Path) -> None:
    ss = make_shards(tmp_path, 6, docs_per_shard=6)
    ss.paths[0].write_bytes(b"\0" * 1024)  # a valid but empty tar
    with pytest.raises(DataError, match="no readable documents"):
        _keys(_docs(ss, on_corrupt="skip"))


def test_resume_fast_forwards_consumed_shards_unopened(
    shards: ShardSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlp.data.cursor as cursor_module

    opened: list[str] = []

    class SpySource(cursor_module.ShardReader):
        def __init__(self, url: str) -> None:
            opened.append(url)
            super().__init__(url)

    monkeypatch.setattr(cursor_module, "ShardReader", SpySource)
    full = _keys(_docs(shards, max_epochs=1))
    assert len(opened) == 8
    stream = _docs(shards, max_epochs=1)
    head = _keys(stream, 40)
    opened.clear()
    resumed = _docs(shards, max_epochs=1)
    resumed.load_state_dict(stream.state_dict())
    assert head + _keys(resumed) == full
    # Only shards holding documents still in the 8-slot shuffle buffer are read again.
    assert 1 <= len(opened) <= 3, opened


def test_cursor_stays_tiny_and_resumes_exactly_inside_a_huge_document(tmp_path: Path) -> None:
    # One 5M-token document (the kind a 10 MB .txt file becomes), then ordinary ones.
    rng = np.random.default_rng(0)
    out = tmp_path / "huge"
    out.mkdir()
    infos = []
    for index, lengths in enumerate([[5_000_000], [50, 80, 120], [60, 90]]):
        writer = ShardWriter(out, "huge", index)
        for j, n in enumerate(lengths):
            tokens = np.append(rng.integers(1, 512, n), 0).astype(np.uint16)
            writer.add(f"{index}-{j}", tokens, {"length": len(tokens)})
        infos.append(writer.finish())
    tok = TokenizerInfo("synthetic", "synthetic-0", 512, 0)
    write_manifest(out / MANIFEST_NAME, Manifest(tok, "uint16", infos, "test"))
    cfg = data_config(
        str(out / "huge-{000000..000002}.tar"),
        shuffle_shards=False,
        shuffle_buffer=0,
        ntp_seq_len=64,
        max_prefix_tokens=64,
    )

    def make() -> RLPDataStream:
        return RLPDataStream(cfg.shards, cfg, dp_rank=0, dp_size=1, seed=1, target_tokens=1)

    def step(stream: RLPDataStream) -> list:
        x, y = stream.next_ntp_batch(4)
        ctx = [(c.key, c.position, c.prefix) for c in stream.next_contexts(1)]
        return [x.tolist(), y.tolist(), ctx]

    stream = make()
    head = [step(stream) for _ in range(3)]
    state = json.dumps(stream.state_dict())
    assert len(state) < 4096, len(state)  # a position, not the 5M-token tail
    assert json.loads(state)["packer"] == {"seq_len": 64, "skip": 3 * 4 * 64}
    ref = head + [step(stream) for _ in range(3)]
    stream.close()
    resumed = make()
    resumed.load_state_dict(json.loads(state))
    assert head + [step(resumed) for _ in range(3)] == ref
    assert len(json.dumps(resumed.state_dict())) < 4096


def test_relay_payloads_round_trip_without_pickle() -> None:
    from rlp.data.contexts import Context
    from rlp.data.relay import pack, pack_contexts, unpack, unpack_contexts

    contexts = [
        Context([5, 6, 7], [8], "doc-a", 3, 0),
        Context([], [9, 10], "dóc/b", 0, 2),
        Context([1] * 70, [2], "c", 70, 1),
    ]
    header, arrays = unpack(pack(*pack_contexts(contexts)))
    assert unpack_contexts(header, arrays) == contexts
    windows = np.arange(24, dtype=np.int32).reshape(2, 12)
    header, (back,) = unpack(pack({"stats": {"documents": 3}}, [windows]))
    assert header["stats"] == {"documents": 3} and (back == windows).all()
    assert unpack_contexts(*unpack(pack(*pack_contexts([])))) == []
