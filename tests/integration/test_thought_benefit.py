"""The main job reports what the thoughts do: held-out thought benefit with a filler control
before the first step and at the end (summary lines, heldout.jsonl, summary.json), per-step
``thought/*`` keys in metrics.jsonl, and a resume that does not evaluate the start again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_helpers import REPO_ROOT

pytestmark = pytest.mark.integration

PER_STEP = (
    "thought/benefit",
    "thought/benefit_best",
    "thought/frac_some_helps",
    "thought/filler_benefit",
    "thought/benefit_over_filler",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from rlp.data.demo import ensure_demo_corpus

    return ensure_demo_corpus(tmp_path_factory.mktemp("demo"))


def _train(demo: Path, run_dir: Path, steps: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [
        sys.executable,
        "-m",
        "rlp.cli",
        "train",
        "--config",
        "tiny_cpu",
        f"run.output_dir={run_dir}",
        f"run.max_steps={steps}",
        f"tokenizer.path={demo / 'tokenizer'}",
        f"data.shards={demo / 'shards' / 'demo-{000000..000003}.tar'}",
        "data.build_demo_if_missing=false",
        f"eval.shards={demo / 'heldout' / 'heldout-000000.tar'}",
        "eval.every=2",
        "eval.num_documents=8",
        "checkpoint.save_every=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_main_job_reports_heldout_thought_benefit_and_resumes(demo, tmp_path):
    run_dir = tmp_path / "run"
    out = _train(demo, run_dir, 4)
    assert "[rlp] held-out step 0: thought benefit" in out
    assert "[rlp] held-out step 4: thought benefit" in out and "[rlp] reading: " in out

    rows = _jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert all(math.isfinite(row[k]) for k in PER_STEP), row["step"]
        assert 0.0 <= row["thought/frac_some_helps"] <= 1.0
        # benefit - filler, both against the same no-thought score
        over = row["thought/benefit"] - row["thought/filler_benefit"]
        assert row["thought/benefit_over_filler"] == pytest.approx(over, abs=1e-9)
    held = _jsonl(run_dir / "heldout.jsonl")
    assert [r["step"] for r in held] == [0, 2, 4]
    for row in held:
        for key in ("benefit", "filler_benefit", "benefit_over_filler", "prompt_effect"):
            assert math.isfinite(row[f"eval/thought/{key}"]), (row["step"], key)
        assert row["eval/nll"] > 0
    # Evaluations inside training steps are in metrics.jsonl too, with the same values.
    assert rows[1]["eval/thought/benefit"] == pytest.approx(held[1]["eval/thought/benefit"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout"]["start"]["step"] == 0 and summary["heldout"]["end"]["step"] == 4
    assert summary["heldout"]["reading"][-1].startswith("reading: ")

    # Resume to step 6: step 0 is not evaluated again, step 6 is added.
    out = _train(demo, run_dir, 6)
    assert [r["step"] for r in _jsonl(run_dir / "heldout.jsonl")] == [0, 2, 4, 6]
    assert "[rlp] held-out step 0:" in out and "[rlp] held-out step 6:" in out
