"""Shards over HTTP in separate processes: kill -9 mid-stream, then resume with the exact next
sample while requesting no shard consumed before the cursor; and a TP=2 group that reads each
shard once (one reader relays the token ids to its peer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlp.config import DataConfig
from rlp.data.stream import RLPDataStream
from tests.data_helpers import ShardServer, make_shards
from tests.model_helpers import REPO_ROOT

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).parent / "scripts"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _reference(spec: str, workers: int) -> list[list]:
    cfg = DataConfig(
        shards=spec,
        num_workers=workers,
        shuffle_buffer=0,
        min_prefix_tokens=4,
        max_prefix_tokens=64,
        ntp_seq_len=32,
    )
    stream = RLPDataStream(spec, cfg, dp_rank=0, dp_size=1, seed=7, target_tokens=1, max_epochs=1)
    out = []
    while batch := stream.next_contexts(1):
        out.append([batch[0].key, batch[0].position])
    stream.close()
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_over_http_resumes_with_the_exact_next_sample(tmp_path: Path, workers: int) -> None:
    ss = make_shards(tmp_path, 48, docs_per_shard=6)  # 8 shards + manifest.json beside them
    shard_of = {key: f"shard-{i // 6:06d}.tar" for i, key in enumerate(ss.docs)}
    record = tmp_path / "record.json"
    with ShardServer(ss.dir) as server:
        spec = f"{server.url}/shard-{{000000..000007}}.tar"
        full = _reference(spec, workers)
        assert len(full) == 48
        cmd = [sys.executable, str(SCRIPTS / "stream_http.py"), "--shards", spec]
        cmd += ["--out", str(record), "--workers", str(workers)]
        child = subprocess.Popen([*cmd, "--delay", "0.05"], env=_env(), cwd=tmp_path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if record.is_file() and len(json.loads(record.read_text())["contexts"]) >= 20:
                break
            time.sleep(0.02)
        assert child.poll() is None, "the stream ended before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
        before = json.loads(record.read_text())["contexts"]
        assert 20 <= len(before) < 48
        server.reset()
        subprocess.run([*cmd, "--resume"], env=_env(), cwd=tmp_path, check=True, timeout=120)
        after = json.loads(record.read_text())["contexts"]
    assert after == full  # the exact next sample, and every one after it, once
    rest = after[len(before) :]
    consumed = {shard_of[k] for k, _ in before} - {shard_of[k] for k, _ in rest}
    opened = {name for name in server.requests if name.endswith(".tar")}
    assert consumed and not opened & consumed, (consumed, opened)
    assert opened == {shard_of[k] for k, _ in rest}


def test_tp2_group_reads_each_shard_once_and_peers_get_identical_batches(tmp_path: Path):
    ss = make_shards(tmp_path, 48, docs_per_shard=6)
    with ShardServer(ss.dir) as server:
        spec = f"{server.url}/shard-{{000000..000007}}.tar"
        store = tmp_path / "store"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(SCRIPTS / "data_relay.py"),
                    *("--rank", str(rank), "--store", str(store), "--shards", spec),
                    *("--server", server.url, "--out", str(tmp_path / f"rank{rank}.json")),
                ],
                env=_env(),
                cwd=tmp_path,
            )
            for rank in (0, 1)
        ]
        for proc in procs:
            assert proc.wait(timeout=180) == 0
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0["contexts"]) == 48
    assert rank0["contexts"] == rank1["contexts"] and rank0["ntp"] == rank1["ntp"]
    assert rank0["stats"] == rank1["stats"]
    # One epoch of contexts: every shard requested exactly once for the whole TP group.
    shards = {name: n for name, n in rank0["requests"].items() if name.endswith(".tar")}
    assert shards == {p.name: 1 for p in ss.paths}
    assert rank1["state"] == {"version": 2, "tp_peer": True} and "rlp" in rank0["state"]
