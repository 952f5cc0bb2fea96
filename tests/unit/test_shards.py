"""rlp.data.urls, .shards, .samples, .format: URLs, DP split, manifests, reading tar shards."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from rlp.data.format import (
    CorruptShardError,
    ManifestError,
    TokenizerMismatchError,
    decode_tokens,
    encode_tokens,
    token_dtype,
)
from rlp.data.samples import ShardReader
from rlp.data.shards import epoch_shards, open_shard_set
from rlp.data.urls import expand_shard_urls, sibling_url, split_top_level, url_name
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
    remote = "https://h.org/c/s-{0..1}.tar?sig=a*b,s3://bkt/d/t-{00..01}.tar.gz"
    assert expand_shard_urls(remote) == [  # not globbed, not checked (a request each)
        "https://h.org/c/s-0.tar?sig=a*b",
        "https://h.org/c/s-1.tar?sig=a*b",
        "s3://bkt/d/t-00.tar.gz",
        "s3://bkt/d/t-01.tar.gz",
    ]


def test_url_names_and_siblings_match_shards_to_manifests() -> None:
    assert url_name("/data/a/shard-000001.tar") == "shard-000001.tar"
    assert url_name("https://h.org/c/shard%2D1.tar?sig=x") == "shard-1.tar"
    assert url_name("s3://bkt/d/t-01.tar.gz") == "t-01.tar.gz"
    assert url_name("pipe:aws s3 cp s3://bkt/d/shard-000007.tar -") == "shard-000007.tar"
    assert url_name("pipe:curl -sfL 'https://h.org/x/s-3.tar.gz' | cat") == "s-3.tar.gz"
    assert url_name("pipe:produce-some-bytes --n 3") is None
    assert sibling_url("https://h.org/c/s-0.tar?sig=x", "manifest.json") == (
        "https://h.org/c/manifest.json"
    )
    assert sibling_url("/data/a/s.tar", "manifest.json") == "/data/a/manifest.json"
    assert sibling_url("pipe:cat /data/a/s.tar", "manifest.json") is None


def test_expand_rejects_typos_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="matches no files"):
        expand_shard_urls(f"{tmp_path}/nothing-*.tar")
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
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode, format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


EXTS = ("npy", "json", "txt")


def _samples(path: Path | str, want: bool = True) -> list[tuple[str, dict | None]]:
    with ShardReader(str(path)) as src:
        out = [(s.key, s.parts) for s in src.samples(lambda: want, EXTS)]
        src.finish()
        return out


def test_reader_groups_members_by_webdataset_keys_and_reads_long_names(tmp_path: Path) -> None:
    long_dir = "d" * 120
    members = [
        ("a.npy", b"1"),
        ("a.json", b"2"),
        ("a.txt", b"x"),
        ("a.pyd", b"never read"),  # not a wanted extension: skipped unread
        ("b.NPY", b"3"),  # extensions are lower-cased, as webdataset does
        (f"{long_dir}/c.seg.npy", b"4"),  # key = name up to the first dot of the base name
        ("noext", b"5"),
    ]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        if fmt == tarfile.USTAR_FORMAT:
            path = _tar(tmp_path / "u.tar", members[:5])
            expected = [("a", {"npy": b"1", "json": b"2", "txt": b"x"}), ("b", {"npy": b"3"})]
        else:
            path = _tar(tmp_path / f"{fmt}.tar", members, fmt)
            expected = [
                ("a", {"npy": b"1", "json": b"2", "txt": b"x"}),
                ("b", {"npy": b"3"}),
                (f"{long_dir}/c", {}),  # "seg.npy" is not a wanted extension
            ]
        assert _samples(path) == expected
        assert _samples(path, want=False) == [(k, None) for k, _ in expected]
    gz = _tar(tmp_path / "g.tar.gz", members[:5])
    assert _samples(gz) == _samples(tmp_path / "u.tar")
    assert _samples(f"pipe:cat {gz}") == _samples(gz)


def test_reader_reports_truncation_that_tarfile_alone_misses(tmp_path: Path) -> None:
    path = _tar(tmp_path / "full.tar", [(f"k{i}.npy", b"x" * 700) for i in range(3)])
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 2 * 1536])  # exactly after two members: a valid-looking prefix
    with tarfile.open(cut) as tf:  # tarfile happily reads the damaged file
        assert len(tf.getmembers()) == 2
    for url in (str(cut), f"pipe:cat {cut}"):
        for want in (True, False):
            with ShardReader(url) as src:
                it = src.samples(lambda want=want: want, EXTS)
                assert [s.key for s in (next(it), next(it))] == ["k0", "k1"]
                with pytest.raises(CorruptShardError, match="truncated at byte 3072"):
                    next(it)
    mid = tmp_path / "mid.tar"
    mid.write_bytes(data[:2200])  # inside the second member's data
    for url in (str(mid), f"pipe:cat {mid}"):
        with ShardReader(url) as src:
            got = []
            with pytest.raises(CorruptShardError, match="truncated"):
                for s in src.samples(lambda: True, EXTS):
                    got.append((s.key, s.error is not None))
            assert got == [("k0", False), ("k1", True)]
    header = tmp_path / "header.tar"
    header.write_bytes(data[: 1536 + 300])  # inside the second member's header
    with pytest.raises(CorruptShardError, match="truncated at byte 1536"):
        _samples(header)
    damaged = bytearray(data)
    damaged[1536 + 10] ^= 0xFF  # the second header's checksum no longer matches
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    with pytest.raises(CorruptShardError, match="damaged header at byte 1536"):
        _samples(tmp_path / "damaged.tar")
    gz = _tar(tmp_path / "full.tar.gz", [(f"k{i}.npy", b"x" * 700) for i in range(3)])
    (tmp_path / "cut.tar.gz").write_bytes(gz.read_bytes()[:-30])  # lost the gzip trailer etc.
    with pytest.raises(CorruptShardError):
        _samples(tmp_path / "cut.tar.gz")


def test_reader_garbage_empty_missing_and_failing_commands(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "garbage.tar").write_bytes(rng.bytes(4096))
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "zeros.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(CorruptShardError, match="is not a tar file"):
        _samples(tmp_path / "garbage.tar")
    with pytest.raises(CorruptShardError, match="is not a tar file"):
        _samples(f"pipe:cat {tmp_path}/garbage.tar")
    with pytest.raises(CorruptShardError, match="empty"):
        _samples(tmp_path / "empty.tar")
    with pytest.raises(CorruptShardError, match="cannot be opened"):
        ShardReader(str(tmp_path / "missing.tar"))
    assert _samples(tmp_path / "zeros.tar") == []  # an empty but complete archive
    path = _tar(tmp_path / "p.tar", [("a.npy", b"1"), ("b.npy", b"2")])
    with pytest.raises(CorruptShardError, match="status 1"):
        _samples(f"pipe:cat {tmp_path}/missing.tar")
    with pytest.raises(CorruptShardError, match="status 3"):
        _samples(f"pipe:cat {path}; exit 3")
    big = _tar(tmp_path / "big.tar", [(f"k{i:03d}.npy", b"x" * 1000) for i in range(100)])
    stopped = ShardReader(f"pipe:cat {big}; sleep 60")  # closing early stops the command line
    next(stopped.samples(lambda: True, EXTS))
    children = psutil.Process(stopped._raw.proc.pid).children(recursive=True)
    stopped.close()
    assert stopped._raw.proc.returncode is not None
    for child in children:  # the shell's `sleep` too (a zombie until its new parent reaps it)
        assert _ends(child), f"{child} still runs after close()"


def _ends(proc: psutil.Process, timeout: float = 30.0) -> bool:
    """The process exits (gone or a zombie) within ``timeout`` s (killed processes take a moment
    to die on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


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
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / ss.paths[0].name).write_bytes(ss.paths[0].read_bytes())
    with pytest.raises(ManifestError, match="by base name"):  # same name twice: ambiguous
        open_shard_set(f"{ss.pattern},{copy / ss.paths[0].name}", manifest=ss.manifest_path)
    # Matched by base name: the manifest describes its shards wherever they are.
    moved = open_shard_set(str(copy / ss.paths[0].name), manifest=ss.manifest_path)
    assert moved.manifest is not None and moved.content == "tokens"
    with pytest.raises(ManifestError, match="data.format=tokens"):
        open_shard_set(ss.pattern, content="text")
    (tmp_path / "shards" / "manifest.json").unlink()
    assert open_shard_set(ss.pattern).manifest is None
    with pytest.raises(ManifestError, match="data.check_tokenizer=false"):
        open_shard_set(ss.pattern, tokenizer_hash="x", content="tokens")
    with pytest.raises(ManifestError, match="does not exist"):
        open_shard_set(ss.pattern, manifest=tmp_path / "nope.json")
    ss.paths[1].unlink()
    with pytest.raises(CorruptShardError, match="1 of 3 shard file.*do not exist"):
        open_shard_set(ss.pattern)
    assert len(open_shard_set(ss.pattern, on_corrupt="skip").urls) == 3
