"""End-to-end `rlp train` on CPU: the tiny config, TP=2 == TP=1, RL weight 0 == plain NTP,
and kill -9 -> resume == an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.model_helpers import REPO_ROOT, free_port

pytestmark = pytest.mark.integration

TINY = REPO_ROOT / "rlp" / "configs" / "tiny_cpu.yaml"

# Every metric issue #3 asks for; each must be present and finite in metrics.jsonl.
REQUIRED = [
    "reward/mean",
    "reward/std",
    "reward/frac_positive",
    "reward/s_pred_mean",
    "reward/s_ema_mean",
    "advantage/abs_mean",
    "thought/len_mean",
    "thought/len_max",
    "thought/cap_rate",
    "thought/close_rate",
    "clip/frac",
    "ratio/mean",
    "loss/rl",
    "loss/ntp",
    "loss/total",
    "optim/grad_norm",
    "optim/lr",
    "throughput/sample_tokens_per_s",
    "throughput/score_tokens_per_s",
    "throughput/loss_tokens_per_s",
    "throughput/tokens_per_s",
    "progress/thought_tokens",
    "progress/ntp_tokens",
    "time/sample",
    "time/score",
    "time/loss",
    "time/step",
    "time/ema",
    "rollout/logprob_consistency",
]
# Timings differ between runs; everything else must match exactly where runs are equivalent.
VOLATILE = ("time/", "throughput/")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from rlp.data.demo import ensure_demo_corpus

    return ensure_demo_corpus(tmp_path_factory.mktemp("demo"))


def _overrides(demo: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"run.output_dir={run_dir}",
        f"run.max_steps={steps}",
        f"tokenizer.path={demo / 'tokenizer'}",
        f"data.shards={demo / 'shards' / 'demo-{000000..000003}.tar'}",
        "data.build_demo_if_missing=false",
        f"eval.shards={demo / 'heldout' / 'heldout-000000.tar'}",  # tiny_cpu evaluates
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _train_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        launcher = [sys.executable, "-m", "rlp.cli"]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(free_port()),
            "-m",
            "rlp.cli",
        ]
    return [*launcher, "train", "--config", str(TINY), *overrides]


def _train(overrides: list[str], nproc: int = 1, timeout: float = 400) -> str:
    proc = subprocess.run(
        _train_cmd(overrides, nproc),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"rlp train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def test_tiny_run_end_to_end(demo, tmp_path):
    run_dir = tmp_path / "run"
    heldout = demo / "heldout" / "heldout-000000.tar"
    out = _train(
        _overrides(
            demo,
            run_dir,
            4,
            "checkpoint.save_every=2",
            "log.samples_every=2",
            "eval.every=2",
            f"eval.shards={heldout}",
            "eval.num_documents=4",
        )
    )
    assert "step 4/4" in out and "[rlp] done: 4 steps" in out
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"metrics missing: {missing}"
        bad = [k for k in REQUIRED if not math.isfinite(row[k])]
        assert not bad, f"non-finite metrics at step {row['step']}: {bad}"
    assert rows[-1]["progress/thought_tokens"] > 0 and rows[-1]["progress/ntp_tokens"] > 0
    for row in rows:
        has_eval = row["step"] % 2 == 0
        assert ("eval/info_gain" in row) == has_eval and ("eval/ppl" in row) == has_eval
    assert rows[1]["eval/ppl"] > 1 and math.isfinite(rows[1]["eval/info_gain"])
    # On-policy with one update per rollout: the ratio is exactly 1 and nothing is clipped.
    assert all(r["ratio/mean"] == pytest.approx(1.0, abs=1e-6) for r in rows)
    assert all(r["rollout/logprob_consistency"] < 1.0001 for r in rows)
    assert (run_dir / "config.yaml").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["weights_digest"]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prefix_tail", "thought", "target", "reward"} <= set(samples[0])
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith("step_0000004")


def test_tp2_matches_tp1(demo, tmp_path):
    """Same losses and rewards for 3 steps at TP=2 (two gloo processes) and TP=1 (1e-4)."""
    common = ("checkpoint.save_every=0", "objective.ntp_weight=0.1")
    _train(_overrides(demo, tmp_path / "tp1", 3, *common))
    _train(_overrides(demo, tmp_path / "tp2", 3, *common, "parallel.tp_size=2"), nproc=2)
    tp1, tp2 = _rows(tmp_path / "tp1"), _rows(tmp_path / "tp2")
    assert len(tp1) == len(tp2) == 3
    for a, b in zip(tp1, tp2):
        for key in (
            "loss/total",
            "loss/rl",
            "loss/ntp",
            "reward/mean",
            "reward/s_pred_mean",
            "thought/len_mean",
        ):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)


def test_rl_weight_zero_is_plain_continued_pretraining(demo, tmp_path):
    """`objective.rl_weight=0` gives the loss trajectory of a plain next-token loop."""
    run_dir = tmp_path / "ntp"
    _train(
        _overrides(
            demo,
            run_dir,
            4,
            "objective.rl_weight=0",
            "objective.ntp_weight=1",
            "checkpoint.save_every=0",
        )
    )
    reference = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "integration" / "scripts" / "plain_ntp.py"),
            "--config",
            str(TINY),
            *_overrides(demo, tmp_path / "ref", 4),
        ],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-4000:]
    expected = json.loads(reference.stdout.strip().splitlines()[-1])
    got = [r["loss/ntp"] for r in _rows(run_dir)]
    assert "reward/mean" not in _rows(run_dir)[0]
    assert got == pytest.approx(expected, abs=1e-6)


def test_kill_resume_is_bit_exact(demo, tmp_path):
    """kill -9 at a random moment after the first checkpoint, resume: same weights, EMA, metrics."""
    steps = 6
    extra = ("checkpoint.save_every=2", "checkpoint.keep_last=2")
    _train(_overrides(demo, tmp_path / "straight", steps, *extra))

    run_dir = tmp_path / "killed"
    cmd = _train_cmd(_overrides(demo, run_dir, steps, *extra))
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert latest.exists(), proc.stderr.read().decode()[-4000:] if proc.poll() else "timeout"
    time.sleep(random.Random(os.getpid()).uniform(0.0, 1.5))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = _train(_overrides(demo, run_dir, steps, *extra))
    assert "resumed from" in out

    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert a["weights_digest"] == b["weights_digest"]
    assert a["ema_digest"] == b["ema_digest"]
    assert [_stable(r) for r in _rows(tmp_path / "straight")] == [
        _stable(r) for r in _rows(run_dir)
    ]


def test_non_finite_steps_are_skipped_then_stop_with_a_clear_error(demo, tmp_path):
    """A diverging run skips non-finite steps, logs them, and stops after optim.max_bad_steps."""
    run_dir = tmp_path / "diverge"
    overrides = _overrides(
        demo,
        run_dir,
        8,
        "optim.lr=1e30",
        "optim.clip_grad=0",
        "optim.max_bad_steps=2",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "checkpoint.save_every=0",
    )
    proc = subprocess.run(
        _train_cmd(overrides),
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rlp train: error: 2 consecutive steps had non-finite loss or gradients" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "step skipped (1 in a row)" in proc.stdout
    rows = _rows(run_dir)
    assert rows[0]["optim/skipped"] == 0.0 and rows[-1]["optim/skipped"] == 1.0
    assert not (run_dir / "checkpoints" / "latest").exists()  # nothing broken was saved
