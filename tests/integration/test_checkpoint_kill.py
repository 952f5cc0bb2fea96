"""A save killed with SIGKILL never costs the previous checkpoint; retention keeps the newest k.

The saving "run" is a subprocess (``scripts/ckpt_kill.py``); the checks run in this process on a
world-size-1 model, the way a restarted job would: construct the manager (removes stale
``tmp_*``), find the newest complete checkpoint, load model + optimizer + EMA + train state.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.model_helpers import REPO_ROOT

SCRIPT = Path(__file__).parent / "scripts" / "ckpt_kill.py"


def start_run(root: Path, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(root), *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the kill takes its helpers too
    )


def wait_for(proc: subprocess.Popen[str], token: str, timeout: float = 180) -> list[str]:
    """Read the run's output until a line starting with ``token``; fail on exit or timeout."""
    deadline, lines = time.monotonic() + timeout, []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"run exited ({proc.wait()}) before {token!r}:\n{''.join(lines)}")
        lines.append(line)
        if line.startswith(token):
            return lines
    proc.kill()
    raise AssertionError(f"no {token!r} within {timeout}s:\n{''.join(lines[-40:])}")


def kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the run and its process group (dist-checkpoint writer / manager processes), as
    a node failure or ``scancel`` would."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.stdout is not None
    proc.stdout.close()


def resume(root: Path):  # noqa: ANN201
    """What a restarted run does; returns (manager, loaded checkpoint)."""
    from rlp.checkpoint import CheckpointManager
    from rlp.config import CheckpointConfig, OptimConfig, ParallelConfig
    from rlp.ema import EMA
    from rlp.model import optimizer as mopt
    from tests.model_helpers import build_tiny_model

    model = build_tiny_model(seed=5)
    ddp = mopt.wrap_ddp(model, ParallelConfig())
    opt = mopt.build_optimizer(ddp, OptimConfig(lr=1e-3), ParallelConfig(), torch.float32)
    manager = CheckpointManager(CheckpointConfig(dir=str(root), save_every=1, keep_last=2))
    loaded = manager.load_latest(model=model, optimizer=opt, ema=EMA(decay=0.9))
    return manager, loaded


def complete_steps(root: Path) -> list[int]:
    from rlp.model import sharded

    return [step for step, _ in sharded.list_checkpoints(root)]


@pytest.mark.integration
def test_kill_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    proc = start_run(root, "--hang-at", "4")
    wait_for(proc, "HANG")
    kill(proc)
    tmp = root / "tmp_step_0000004"
    assert (tmp / "dist" / "metadata.json").is_file(), "the kill should land after the shards"
    assert not (root / "step_0000004").exists()
    assert (root / "latest").read_text().strip() == "step_0000003"

    manager, loaded = resume(root)
    assert not tmp.exists(), "stale tmp_* directories are removed on start"
    assert loaded.step == 3 and loaded.path == root / "step_0000003"
    assert loaded.train_state == {"step": 3, "data_cursor": {"offset": 6}}
    assert loaded.same_layout
    # Retention (keep_last=2) removed step 1 once step 3 was complete, and only then.
    assert complete_steps(root) == [2, 3]
    assert manager.latest_path() == root / "step_0000003"


@pytest.mark.integration
def test_kill_at_random_moment(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 3.0)
    proc = start_run(root)
    wait_for(proc, "SAVED 1")
    time.sleep(delay)
    kill(proc)

    steps = complete_steps(root)
    assert steps, f"seed {seed}: the first checkpoint was complete before the kill"
    # A kill between the rename and retention can leave keep_last + 1 complete checkpoints.
    assert len(steps) <= 3, (seed, steps)
    latest = (root / "latest").read_text().strip()
    assert (root / latest / "COMPLETE").is_file(), f"seed {seed}: latest -> incomplete {latest}"
    _, loaded = resume(root)
    assert loaded.step == steps[-1], seed
    assert loaded.train_state["data_cursor"] == {"offset": 2 * steps[-1]}, seed
    assert not [p for p in root.iterdir() if p.name.startswith("tmp_")], seed
