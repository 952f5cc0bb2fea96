"""`rlp train` on text shards written by webdataset's own ShardWriter (tokenised on the fly):
from local .tar.gz files, and over HTTP with TP=2, where the shard requests must not grow
with the TP size (one reader per TP group)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlp.data.builder import main as build_main
from rlp.data.indexer import main as manifest_main
from tests.data_helpers import ShardServer, generate_texts, make_text_shards, tiny_tokenizer
from tests.model_helpers import REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def _train(overrides: list[str], nproc: int = 1) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    launcher = [sys.executable, "-m", "rlp.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        launcher += ["--master-port", str(free_port()), "-m", "rlp.cli"]
    cmd = [*launcher, "train", "--config", "tiny_cpu", *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"rlp train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _overrides(tok_dir: Path, shards: str, run_dir: Path) -> list[str]:
    return [
        f"run.output_dir={run_dir}",
        "run.max_steps=2",
        f"tokenizer.path={tok_dir}",
        f"data.shards={shards}",
        "data.build_demo_if_missing=false",
        "checkpoint.save_every=0",
        "eval.every=0",  # the tiny config evaluates on the demo corpus: another tokenizer
    ]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_two_steps_on_webdataset_text_shards(tmp_path: Path) -> None:
    """``data.format=text`` for training; the held-out shards are pre-tokenised (built by the
    library's builder with the same tokenizer) and are read as such."""
    tok = tiny_tokenizer(tmp_path)
    texts = make_text_shards(tmp_path, 64, per_shard=8, layout="txt", suffix=".tar.gz")
    raw = tmp_path / "heldout.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in generate_texts(16, seed=7)))
    heldout = tmp_path / "heldout"
    argv = ["--input", str(raw), "--tokenizer", tok.path, "--out", str(heldout)]
    assert build_main([*argv, "--prefix", "heldout", "--workers", "1", "--no-progress"]) == 0
    run_dir = tmp_path / "run"
    overrides = _overrides(Path(tok.path), texts.pattern, run_dir)
    overrides = [o for o in overrides if not o.startswith("eval.every=")]
    overrides += [
        "data.format=text",
        f"eval.shards={heldout / 'heldout-000000.tar'}",
        "eval.every=2",
        "eval.num_documents=4",
    ]
    _train(overrides)
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) and r["loss/ntp"] > 0 for r in rows)
    evals = [json.loads(line) for line in (run_dir / "heldout.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    assert all(math.isfinite(e["eval/nll"]) for e in evals)


@pytest.mark.slow
def test_tp2_over_http_requests_no_more_shards_than_tp1(tmp_path: Path) -> None:
    tok = tiny_tokenizer(tmp_path)
    texts = make_text_shards(tmp_path, 64, per_shard=8, layout="json")
    assert manifest_main(["--shards", texts.pattern]) == 0  # manifest.json beside the shards
    heldout = make_text_shards(tmp_path, 8, per_shard=8, layout="json", seed=3, name="text/eval")
    assert manifest_main(["--shards", heldout.pattern]) == 0
    counts = {}
    with ShardServer(texts.dir) as server:
        remote = f"{server.url}/part-{{0000..0007}}.tar"
        for tp in (1, 2):
            server.reset()
            run_dir = tmp_path / f"tp{tp}"
            overrides = [o for o in _overrides(Path(tok.path), remote, run_dir) if "eval." not in o]
            overrides += [f"eval.shards={server.url}/eval/part-0000.tar", "eval.every=2"]
            overrides += ["eval.num_documents=4", f"parallel.tp_size={tp}"]
            _train(overrides, nproc=tp)
            counts[tp] = {k: n for k, n in server.requests.items() if k.endswith(".tar")}
            assert len(_rows(run_dir)) == 2
    assert counts[1] and counts[2] == counts[1]
    assert any("eval/" in k for k in counts[1])  # held-out shards too: one reader per TP group
