"""rlp.data.shards + rlp.data.format: URL expansion, DP split, manifest checks, tar reading."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from rlp.data.format import (
    CorruptShardError,
    ManifestError,
    TokenizerMismatchError,
    decode_tokens,
    encode_tokens,
    iter_tar_members,
    token_dtype,
)
from rlp.data.shards import (
    ShardSource,
    epoch_shards,
    expand_shard_urls,
    iter_samples,
    open_shard_set,
    split_top_level,
)
from tests.data_helpers import make_shards


def _touch(tmp_path: Path, names: list[str]) -> list[str]:
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return [str(tmp_path / n) for n in names]


def test_expand_paths_globs_braces_file_urls_pipes_and_lists(tmp_path: Path) -> None:
    paths = _touch(tmp_path, [f"s-{i:06d}.tar" for i in range(4)] + ["x.tar"])
    d = str(tmp_path)
    assert expand_shard_urls(f"{d}/s-{{000000..000003}}.tar") == paths[:4]
    assert expand_shard_urls(f"{d}/s-*.tar") == paths[:4]
    assert expand_shard_urls(f"file://{d}/x.tar, {d}/s-{{000001,000003}}.tar") == [
        paths[4],
        paths[1],
        paths[3],
    ]
    assert expand_shard_urls([f"{d}/x.tar", "pipe:cat a.tar"]) == [paths[4], "pipe:cat a.tar"]
    assert expand_shard_urls("pipe:cat s-{0..1}.tar") == ["pipe:cat s-0.tar", "pipe:cat s-1.tar"]
    assert split_top_level("a{1,2},b, c") == ["a{1,2}", "b", "c"]


def test_expand_rejects_typos_remote_urls_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches no files"):
        expand_shard_urls(f"{tmp_path}/nothing-*.tar")
    with pytest.raises(ValueError, match="pipe:curl"):
        expand_shard_urls("https://example.com/s.tar")
    with pytest.raises(ValueError, match="more than once"):
        expand_shard_urls("a.tar,a.tar")
    with pytest.raises(ValueError, match="names no shards"):
        expand_shard_urls(" , ")


def test_epoch_split_is_disjoint_complete_and_reshuffled() -> None:
    urls = [f"s{i}" for i in range(10)]
    for epoch in range(3):
        parts = [
            epoch_shards(urls, seed=5, epoch=epoch, dp_rank=r, dp_size=4, shuffle=True)
            for r in range(4)
        ]
        assert sorted(sum(parts, [])) == sorted(urls)
        assert [len(p) for p in parts] == [3, 3, 2, 2]
    e0 = epoch_shards(urls, seed=5, epoch=0, dp_rank=0, dp_size=1, shuffle=True)
    assert e0 != epoch_shards(urls, seed=5, epoch=1, dp_rank=0, dp_size=1, shuffle=True)
    assert e0 == epoch_shards(urls, seed=5, epoch=0, dp_rank=0, dp_size=1, shuffle=True)
    assert epoch_shards(urls, seed=5, epoch=3, dp_rank=1, dp_size=2, shuffle=False) == urls[1::2]
    with pytest.raises(ValueError, match="cannot feed 4 data-parallel ranks"):
        epoch_shards(urls[:3], seed=0, epoch=0, dp_rank=0, dp_size=4, shuffle=True)
    with pytest.raises(ValueError, match="dp_rank"):
        epoch_shards(urls, seed=0, epoch=0, dp_rank=4, dp_size=4, shuffle=True)


def test_token_codec() -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    arr = np.array([1, 2, 65535], dtype=np.uint16)
    assert (decode_tokens(encode_tokens(arr), 65536) == arr).all()
    for bad, msg in [
        (encode_tokens(np.zeros(0, np.int32)), "no tokens"),
        (encode_tokens(np.array([1, 70000], np.int32)), ">= vocab_size"),
        (encode_tokens(np.array([[1]], np.int32)), "1-D integer"),
        (encode_tokens(np.array([-1], np.int32)), "negative"),
        (b"\x93NUMPY garbage", "not a valid .npy"),
    ]:
        with pytest.raises(ValueError, match=msg):
            decode_tokens(bad, 65536)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a valid .npy"):  # never unpickled
        decode_tokens(pickled.getvalue())


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _samples(path: Path, want: bool = True) -> list[tuple[str, dict | None]]:
    with ShardSource(str(path)) as src:
        return [(s.key, s.parts) for s in iter_samples(src, lambda: want)]


def test_tar_reader_groups_members_and_reads_long_names(tmp_path: Path) -> None:
    long_dir = "d" * 120
    members = [
        ("a.npy", b"1"),
        ("a.json", b"2"),
        ("a.txt", b"x"),
        ("b.npy", b"3"),
        (f"{long_dir}/c.npy", b"4"),
        ("noext", b"5"),
    ]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        if fmt == tarfile.USTAR_FORMAT:
            path = _tar(tmp_path / "u.tar", members[:4])
            expected = [("a", {"npy": b"1", "json": b"2"}), ("b", {"npy": b"3"})]
        else:
            path = _tar(tmp_path / f"{fmt}.tar", members, fmt)
            expected = [
                ("a", {"npy": b"1", "json": b"2"}),
                ("b", {"npy": b"3"}),
                (f"{long_dir}/c", {"npy": b"4"}),
            ]
        assert _samples(path) == expected
        assert _samples(path, want=False) == [(k, None) for k, _ in expected]


def test_tar_reader_reports_truncation_that_tarfile_misses(tmp_path: Path) -> None:
    path = _tar(tmp_path / "full.tar", [(f"k{i}.npy", b"x" * 700) for i in range(3)])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 2 * 1536])  # exactly after two members: a valid-looking prefix
    with tarfile.open(cut) as tf:  # tarfile happily reads the damaged file
        assert len(tf.getmembers()) == 2
    for want in (True, False):
        with ShardSource(str(cut)) as src:
            it = iter_samples(src, lambda want=want: want)
            assert [s.key for s in (next(it), next(it))] == ["k0", "k1"]
            with pytest.raises(CorruptShardError, match="truncated at byte 3072"):
                next(it)
    mid = tmp_path / "mid.tar"
    mid.write_bytes(data[:2200])  # inside the second member's data
    with ShardSource(str(mid)) as src:
        got = []
        with pytest.raises(CorruptShardError, match="truncated"):
            for s in iter_samples(src, lambda: True):
                got.append((s.key, s.error is not None))
        assert got == [("k0", False), ("k1", True)]


def test_tar_reader_garbage_empty_and_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "garbage.tar").write_bytes(rng.bytes(4096))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(CorruptShardError, match="is not a tar file"):
        _samples(tmp_path / "garbage.tar")
    with pytest.raises(CorruptShardError, match="empty"):
        _samples(tmp_path / "empty.tar")
    with pytest.raises(CorruptShardError, match="cannot be opened"):
        ShardSource(str(tmp_path / "missing.tar"))
    members = list(iter_tar_members(io.BytesIO(b"\0" * 1024), "zeros"))
    assert members == []  # an empty but complete archive


def test_pipe_urls(tmp_path: Path) -> None:
    path = _tar(tmp_path / "p.tar", [("a.npy", b"1"), ("b.npy", b"2")])
    with ShardSource(f"pipe:cat {path}") as src:
        assert [s.key for s in iter_samples(src, lambda: True)] == ["a", "b"]
        src.finish()
    src = ShardSource(f"pipe:cat {tmp_path}/missing.tar")
    with src, pytest.raises(CorruptShardError, match="empty.*No such file"):
        list(iter_samples(src, lambda: True))
    with ShardSource(f"pipe:cat {path}; exit 3") as src:
        list(iter_samples(src, lambda: True))
        with pytest.raises(CorruptShardError, match="status 3"):
            src.finish()


def test_manifest_checks(tmp_path: Path) -> None:
    ss = make_shards(tmp_path, 30, docs_per_shard=10)
    found = open_shard_set(ss.pattern, tokenizer_name="synthetic", tokenizer_hash="synthetic-0")
    assert found.manifest is not None and len(found.urls) == 3
    with pytest.raises(TokenizerMismatchError) as err:
        open_shard_set(ss.pattern, tokenizer_name="data/demo/tokenizer", tokenizer_hash="ab" * 32)
    msg = str(err.value)
    assert "'synthetic'" in msg and "synthetic-0" in msg  # the shards' tokenizer ...
    assert "'data/demo/tokenizer'" in msg and "ab" * 32 in msg  # ... and the run's
    stray = tmp_path / "shards" / "other-000000.tar"
    stray.write_bytes(ss.paths[0].read_bytes())
    with pytest.raises(ManifestError, match="not listed"):
        open_shard_set(f"{ss.pattern},{stray}")
    (tmp_path / "shards" / "manifest.json").unlink()
    assert open_shard_set(ss.pattern).manifest is None
    with pytest.raises(ManifestError, match="data.check_tokenizer=false"):
        open_shard_set(ss.pattern, tokenizer_hash="x")
    with pytest.raises(ManifestError, match="does not exist"):
        open_shard_set(ss.pattern, manifest=tmp_path / "nope.json")
    ss.paths[1].unlink()
    with pytest.raises(CorruptShardError, match="1 of 3 shard file.*do not exist"):
        open_shard_set(ss.pattern)
    assert len(open_shard_set(ss.pattern, on_corrupt="skip").urls) == 3
