"""End-to-end data: the offline demo corpus (time, determinism, use) and a SIGKILLed build."""

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
from rlp.data.builder import PROGRESS_NAME, BuildOptions, build_shards
from rlp.data.demo import build_demo_corpus, demo_is_built, ensure_demo_corpus
from rlp.data.format import read_manifest, sha256_file
from rlp.data.stream import RLPDataStream
from rlp.tokenizer import load_tokenizer
from tests.data_helpers import generate_texts, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _offline_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO)
    return env


def _build_demo(out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "rlp.data.demo", "--out", str(out), "--quiet"],
        cwd=REPO,
        env=_offline_env(),
        check=True,
        timeout=120,
    )
    return time.perf_counter() - start


def test_demo_corpus_is_fast_deterministic_and_trainable(tmp_path: Path) -> None:
    seconds = [_build_demo(tmp_path / "a"), _build_demo(tmp_path / "b")]
    print(f"demo corpus build (cold process): {seconds[0]:.1f} s, {seconds[1]:.1f} s")
    assert max(seconds) < 60
    a, b = (read_manifest(tmp_path / d / "shards" / "manifest.json") for d in "ab")
    assert [s.name for s in a.shards] == [f"demo-00000{i}.tar" for i in range(4)]
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert [sha256_file(tmp_path / "b" / "shards" / s.name) for s in b.shards] == [
        s.sha256 for s in a.shards
    ]
    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    assert tok.hash == a.tokenizer.hash == load_tokenizer(tmp_path / "b" / "tokenizer").hash
    assert tok.vocab_size == 2048 and tok.num_added == 0
    assert (tok.eos_id, tok.pad_id, tok.think_open_id, tok.think_close_id) == (0, 1, 2, 3)
    assert a.num_docs >= 2000 and a.dtype == "uint16"
    raw = (tmp_path / "a" / "raw" / "demo.jsonl").read_text().splitlines()
    sources = {json.loads(line)["source"] for line in raw}
    assert {"verne_2889", "shopping", "kinematics"} <= sources

    # The default data config, relocated: the trainer's stream reads it with the run tokenizer.
    cfg = DataConfig(shards=str(tmp_path / "a" / "shards" / "demo-{000000..000003}.tar"))
    stream = RLPDataStream(
        cfg.shards, cfg, dp_rank=0, dp_size=1, seed=0, target_tokens=1, tokenizer=tok
    )
    contexts = stream.next_contexts(32)
    assert len(contexts) == 32 and all(len(c.prefix) >= cfg.min_prefix_tokens for c in contexts)
    assert any(" = " in tok.decode(c.prefix) for c in contexts)

    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "a" / "shards").iterdir()]
    start = time.perf_counter()
    assert demo_is_built(tmp_path / "a") and ensure_demo_corpus(tmp_path / "a") == tmp_path / "a"
    assert time.perf_counter() - start < 1.0
    build_demo_corpus(tmp_path / "a", progress=False)  # a re-run rewrites nothing
    assert mtimes == [p.stat().st_mtime_ns for p in (tmp_path / "a" / "shards").iterdir()]


def test_sigkilled_build_resumes_to_identical_shards(tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_texts(10_000)))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "rlp.data.builder",
        "--input",
        str(src),
        "--tokenizer",
        tok.path,
        "--out",
        str(out),
        "--docs-per-shard",
        "200",
        "--chunk-docs",
        "100",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_offline_env())
    deadline = time.time() + 60
    while not (out / PROGRESS_NAME).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()
    record = json.loads((out / PROGRESS_NAME).read_text())
    finished = {s["name"]: s["sha256"] for s in record["shards"]}
    for path in out.glob("*.tar"):  # every complete-looking shard is a finished one
        assert finished.get(path.name) == sha256_file(path)
    resumed = build_shards(
        [src], BuildOptions(tokenizer=tok.path, out=out, docs_per_shard=200, progress=False)
    )
    reference = build_shards(
        [src],
        BuildOptions(tokenizer=tok.path, out=tmp_path / "ref", docs_per_shard=200, progress=False),
    )
    assert resumed.shards == reference.shards and len(resumed.shards) == 50
    assert not list(out.glob("*.tmp"))
