"""Fixtures for jobs on a real one-node SLURM cluster started by ``scripts/ci/local_slurm.sh``.

* ``slurm_cluster`` (session): starts the cluster with two fake GPUs (so the multi-node GPU
  template can be submitted too); **skips** the SLURM tests when it cannot start (not root, no
  apt-get, install failure) unless ``RLP_REQUIRE_SLURM=1``; stops it at the end if it started it.
* ``trainer`` (session): which trainer the jobs run. ``RLP_SLURM_TRAINER=auto`` (default) uses
  the real ``rlp.cli train`` when ``rlp.trainer`` exists and imports, else ``fake_trainer.py``
  (same contract, seconds per run); ``real`` / ``fake`` force one.
* ``slurm``: helpers to submit with ``rlp submit`` and follow jobs with ``scontrol``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "scripts" / "ci" / "local_slurm.sh"
FAKE_DIR = Path(__file__).resolve().parent
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


@dataclass
class Trainer:
    """The trainer the SLURM jobs run and the run lengths that suit it."""

    real: bool
    reason: str
    entry: str = "rlp.cli"
    env: dict[str, str] = field(default_factory=dict)
    steps: int = 12
    save_every: int = 4


@pytest.fixture(scope="session")
def slurm_cluster() -> Any:
    was_up = (
        subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, timeout=60
        ).returncode
        == 0
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", "--gpus", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        message = (
            f"local SLURM cluster unavailable (local_slurm.sh start rc {proc.returncode}):\n{tail}"
        )
        if os.environ.get("RLP_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    print(f"\n[slurm] cluster ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def trainer() -> Trainer:
    # Both kinds can run the fake trainer: the launcher-only tests use it explicitly.
    # RLP_STOP_POLL: the task wrappers look for the pre-emption stop file every 0.2 s (2 s in
    # production), so a signal reaches the trainer well before its run would end anyway.
    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKE_DIR), str(REPO)]),
        "FAKE_STEP_SECONDS": "0.4",
        "RLP_STOP_POLL": "0.2",
    }
    fake = Trainer(real=False, reason="", entry="fake_trainer", env=env)
    choice = os.environ.get("RLP_SLURM_TRAINER", "auto")
    if choice not in ("auto", "real", "fake"):
        raise ValueError(f"RLP_SLURM_TRAINER must be auto, real or fake, got {choice!r}")
    if choice == "fake":
        fake.reason = "RLP_SLURM_TRAINER=fake"
        return fake
    if importlib.util.find_spec("rlp.trainer") is None:
        fake.reason = "rlp/trainer.py does not exist yet"
        return fake
    # The tiny real trainer takes ~0.35 s per step on an idle machine: the pre-emption tests
    # signal at the first checkpoint (step 4), so 36 steps (~12 s) remain for the signal to
    # arrive, against ~1.5 s of polling latency (test 0.5 s, task wrapper 0.2 s).
    real = Trainer(real=True, reason="", env=env, steps=40, save_every=4)
    if choice == "real":
        real.reason = "RLP_SLURM_TRAINER=real"
        return real
    proc = subprocess.run(
        [sys.executable, "-c", "import rlp.trainer"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        fake.reason = f"rlp.trainer does not import yet ({last})"
        return fake
    real.reason = "rlp.trainer imports"
    return real


class Slurm:
    """Submit through ``rlp submit`` and follow jobs; every wait has a timeout (sbatch --wait can
    block forever when a job can never run)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.env = dict(os.environ)
        self.env.update(
            {
                "WANDB_MODE": "disabled",
                "WANDB_SILENT": "true",
                "OMP_NUM_THREADS": "1",
                **trainer.env,
            }
        )
        self.env.pop("RLP_OVERRIDES", None)

    def overrides(self, run_dir: Path, **extra: Any) -> list[str]:
        t = self.trainer
        values = {
            "run.output_dir": str(run_dir),
            "run.max_steps": t.steps,
            "checkpoint.save_every": t.save_every,
            "parallel.tp_size": 2,
            "log.wandb": "disabled",
            **extra,
        }
        return [f"{k}={v}" for k, v in values.items()]

    def submit(
        self, args: list[str], run_dir: Path, entry: str | None = None, **overrides: Any
    ) -> str:
        cmd = [
            sys.executable,
            "-m",
            "rlp.cli",
            "submit",
            "--config",
            str(REPO / "rlp" / "configs" / "tiny_cpu.yaml"),
            "--time",
            "15",
            "--entry",
            entry or self.trainer.entry,
            *args,
            *self.overrides(run_dir, **overrides),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=REPO, env=self.env, timeout=120
        )
        assert proc.returncode == 0, f"rlp submit failed:\n{proc.stdout}\n{proc.stderr}"
        match = re.search(r"Submitted job (\d+)", proc.stdout)
        assert match, proc.stdout
        assert (run_dir / "slurm" / "job_id").read_text().strip() == match.group(1)
        return match.group(1)

    def job(self, job_id: str) -> dict[str, str]:
        proc = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, job_id: str, run_dir: Path, timeout: float, until: Any = None) -> dict:
        """Poll until ``until(job)`` (default: a terminal state); fail with the job log."""
        until = until or (lambda j: j["JobState"] in TERMINAL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.5)
        queue = subprocess.run(["squeue"], capture_output=True, text=True, timeout=30).stdout
        pytest.fail(
            f"job {job_id} timed out after {timeout:.0f} s in state "
            f"{self.job(job_id).get('JobState')}; queue:\n{queue}\n{self.log(run_dir, job_id)}"
        )

    def log(self, run_dir: Path, job_id: str) -> str:
        path = run_dir / "logs" / f"slurm-{job_id}.out"
        out = path.read_text() if path.exists() else f"(no {path})"
        for rank_log in sorted((run_dir / "logs" / job_id).glob("attempt*/*.log")):
            out += f"\n--- {rank_log}\n" + "\n".join(rank_log.read_text().splitlines()[-15:])
        return out

    @staticmethod
    def metrics(run_dir: Path) -> list[dict]:
        """Complete rows of metrics.jsonl (a line being written is skipped)."""
        path = run_dir / "metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


@pytest.fixture(scope="session")
def slurm(slurm_cluster: Any, trainer: Trainer) -> Slurm:
    print(
        f"[slurm] trainer: {'real rlp.cli train' if trainer.real else 'fake_trainer'} "
        f"({trainer.reason})",
        file=sys.stderr,
    )
    return Slurm(trainer)
