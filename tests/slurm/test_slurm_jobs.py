"""Jobs on a real one-node SLURM cluster (``scripts/ci/local_slurm.sh``), submitted with
``rlp submit``:

* the CPU template (2 srun tasks, TP=2 over gloo) runs the tiny config to completion;
* pre-emption: USR1 to the batch shell (what ``--signal=B:USR1@N`` does before the time limit)
  -> checkpoint, exit 75, ``scontrol requeue`` -> the job restarts and resumes from the checkpoint
  it wrote, and ends like the uninterrupted run;
* the multi-node GPU template on two fake GPUs: one srun task per GPU, USR1 reaches each rank
  through its task wrapper, the ranks checkpoint and exit 75, srun exits 75, the job requeues and
  resumes;
* a failing job is not requeued; a cancelled job stays cancelled.

The first two run the real trainer when it imports (see conftest ``trainer``), the others always
the fake trainer: they test the launch and signal plumbing, not training.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rlp.monitor import latest_checkpoint

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
FAKE = {"run.max_steps": 12, "checkpoint.save_every": 4}
WEIGHT_KEYS = ("weights_digest", "weights_sha256")


@dataclass
class Run:
    run_dir: Path
    job_id: str
    job: dict


def _timeout(slurm, fake_s: float = 60, real_s: float = 240) -> float:
    return real_s if slurm.trainer.real else fake_s


def _weights_hash(run_dir: Path) -> str | None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    return next((summary[k] for k in WEIGHT_KEYS if k in summary), None)


def _fake_weights(steps: int, seed: int = 1234) -> str:
    """The fake trainer's hash chain for an uninterrupted run (tests/slurm/fake_trainer.py)."""
    weights = hashlib.sha256(b"init").hexdigest()
    for step in range(1, steps + 1):
        weights = hashlib.sha256(f"{weights}|{step}|{seed}".encode()).hexdigest()
    return weights


def _events(run_dir: Path) -> str:
    return (run_dir / "slurm" / "events.log").read_text()


def _preempt(slurm, run: Run, timeout: float) -> tuple[int, int]:
    """Wait for the first checkpoint, send USR1 to the batch shell, wait for the requeue; returns
    (step of the checkpoint written on the signal, metrics rows before the restart)."""
    ckpt_dir = run.run_dir / "checkpoints"
    job = slurm.wait(
        run.job_id,
        run.run_dir,
        timeout,
        until=lambda j: (
            latest_checkpoint(ckpt_dir) is not None or j["JobState"] not in ("RUNNING", "PENDING")
        ),
    )
    assert job["JobState"] == "RUNNING", (
        f"the run ended ({job['JobState']}) before it could be pre-empted; raise run.max_steps\n"
        + slurm.log(run.run_dir, run.job_id)
    )
    subprocess.run(["scancel", "--signal=USR1", "--batch", run.job_id], check=True, timeout=30)
    return _wait_requeued(slurm, run, timeout)


def _wait_requeued(slurm, run: Run, timeout: float) -> tuple[int, int]:
    """Wait for the requeue and let the job start again at once; returns (last step logged = the
    step of the checkpoint written before the exit, metrics rows before the restart)."""
    job = slurm.wait(
        run.job_id,
        run.run_dir,
        timeout,
        until=lambda j: int(j["Restarts"]) >= 1 or j["JobState"] in ("COMPLETED", "FAILED"),
    )
    assert int(job["Restarts"]) == 1, f"not requeued\n{slurm.log(run.run_dir, run.job_id)}"
    rows = slurm.metrics(run.run_dir)
    signal_step = rows[-1]["step"]
    ckpt = latest_checkpoint(run.run_dir / "checkpoints")
    assert ckpt is not None and ckpt["step"] == signal_step, (ckpt, signal_step)
    # SLURM holds a requeued job ~2 minutes (EligibleTime) so that the old attempt's credential
    # revocation (second resolution) cannot hit the new one. Once the old attempt is gone and the
    # clock has moved on 2 s, making it eligible now also triggers a scheduling pass at once.
    slurm.wait(run.job_id, run.run_dir, 60, until=lambda j: j["JobState"] == "PENDING")
    time.sleep(2)
    subprocess.run(
        ["scontrol", "update", f"jobid={run.job_id}", "StartTime=now"], check=True, timeout=30
    )
    return signal_step, len(rows)


def _check_resumed(
    slurm, run: Run, signal_step: int, rows_before: int, steps: int, signalled: bool = True
) -> None:
    job = run.job
    log = slurm.log(run.run_dir, run.job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "1", log
    rows = slurm.metrics(run.run_dir)
    assert rows[rows_before]["step"] == signal_step + 1, "did not resume from its checkpoint"
    assert rows[-1]["step"] == steps
    assert {r["step"] for r in rows} == set(range(1, steps + 1))
    events = _events(run.run_dir)
    assert "requeue" in events and "attempt=1" in events, events
    assert ("signal USR1" in events) == signalled, events


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory) -> Run:
    """The uninterrupted CPU run the pre-empted one is compared with."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    job_id = slurm.submit(["--cpu", "--ntasks", "2"], run_dir)
    return Run(run_dir, job_id, slurm.wait(job_id, run_dir, _timeout(slurm)))


def test_cpu_job_runs_to_completion(slurm, reference: Run) -> None:
    run, steps = reference, slurm.trainer.steps
    log = slurm.log(run.run_dir, run.job_id)
    assert run.job["JobState"] == "COMPLETED" and run.job["ExitCode"] == "0:0", log
    assert run.job["Restarts"] == "0"
    rows = slurm.metrics(run.run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), log
    assert all("loss/total" in r and "time/step" in r for r in rows)
    ckpt = latest_checkpoint(run.run_dir / "checkpoints")
    assert ckpt is not None and ckpt["step"] == steps
    attempt = run.run_dir / "logs" / run.job_id / "attempt0"
    assert (attempt / "rank0.log").exists() and (attempt / "rank1.log").exists()
    assert (run.run_dir / "config.yaml").exists()
    assert "step exit rc=0" in _events(run.run_dir)
    if not slurm.trainer.real:
        envs = [
            json.loads((run.run_dir / "ranks" / f"rank{r}.attempt0.json").read_text())
            for r in (0, 1)
        ]
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert {e["MASTER_ADDR"] for e in envs} == {"localhost"}
        assert all(e["MASTER_PORT"].isdigit() for e in envs)


def test_status_reports_finished_run(slurm, reference: Run, capsys) -> None:
    from rlp.monitor import status_main

    assert status_main([str(reference.run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["step"] == slurm.trainer.steps
    assert report["checkpoint"]["step"] == slurm.trainer.steps
    assert report["job"]["id"] == reference.job_id
    assert report["job"]["job_state"] == "COMPLETED"


def test_preempted_cpu_job_requeues_and_resumes(slurm, reference: Run, tmp_path) -> None:
    run_dir = tmp_path / "preempted"
    run = Run(run_dir, slurm.submit(["--cpu", "--ntasks", "2"], run_dir), {})
    signal_step, rows_before = _preempt(slurm, run, _timeout(slurm))
    run.job = slurm.wait(run.job_id, run_dir, _timeout(slurm))
    _check_resumed(slurm, run, signal_step, rows_before, slurm.trainer.steps)
    assert (run_dir / "logs" / run.job_id / "attempt1" / "rank1.log").exists()
    # Exact resume: the steps after the restart match the uninterrupted run's (same seeds,
    # same layout), and so do the final weights when the trainer reports a hash of them.
    ref_loss = {r["step"]: r["loss/total"] for r in slurm.metrics(reference.run_dir)}
    for row in slurm.metrics(run_dir)[rows_before:]:
        assert row["loss/total"] == pytest.approx(ref_loss[row["step"]], rel=1e-6), row["step"]
    want, got = _weights_hash(reference.run_dir), _weights_hash(run_dir)
    if want is not None:
        assert got == want, "resumed run's final weights differ from the uninterrupted run's"


def test_gpu_template_preemption(slurm, tmp_path) -> None:
    """Deterministic under load: the fake trainer holds after its first checkpoint (step 4) until
    the signal arrives, so the signal never lands on the final step."""
    run_dir = tmp_path / "gpu"
    slurm.env["FAKE_HOLD_AT_STEP"] = str(FAKE["checkpoint.save_every"])
    try:
        job_id = slurm.submit(
            ["--nodes", "1", "--gpus-per-node", "2"],
            run_dir,
            entry="fake_trainer",
            **FAKE,
            **{"run.device": "auto"},
        )
    finally:
        del slurm.env["FAKE_HOLD_AT_STEP"]
    run = Run(run_dir, job_id, {})
    signal_step, rows_before = _preempt(slurm, run, 90)
    assert signal_step == FAKE["checkpoint.save_every"]
    run.job = slurm.wait(job_id, run_dir, 90)
    _check_resumed(slurm, run, signal_step, rows_before, FAKE["run.max_steps"])
    # Every rank exited 75 by itself: srun's exit code reaches the batch shell as it is.
    assert "step exit rc=75 after SIGUSR1" in _events(run_dir), _events(run_dir)
    envs = [json.loads((run_dir / "ranks" / f"rank{r}.attempt0.json").read_text()) for r in (0, 1)]
    assert [e["RANK"] for e in envs] == ["0", "1"] and {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert [e["SLURM_PROCID"] for e in envs] == ["0", "1"]
    assert {e["CUDA_DEVICE_MAX_CONNECTIONS"] for e in envs} == {"1"}
    assert {e["inherited_usr1"] for e in envs} == {"SIG_DFL"}, "USR1 must reach the trainer"
    attempt = run_dir / "logs" / job_id / "attempt0"
    assert (attempt / "rank0.log").is_file() and (attempt / "rank1.log").is_file()
    assert _weights_hash(run_dir) == _fake_weights(FAKE["run.max_steps"])


def test_signal_on_the_final_step_finishes_the_run(slurm, tmp_path) -> None:
    """A signal that arrives with the last step completes the run: exit 0, no requeue."""
    run_dir = tmp_path / "final"
    slurm.env["FAKE_HOLD_AT_STEP"] = str(FAKE["run.max_steps"])
    try:
        job_id = slurm.submit(["--cpu", "--ntasks", "2"], run_dir, entry="fake_trainer", **FAKE)
    finally:
        del slurm.env["FAKE_HOLD_AT_STEP"]
    slurm.wait(
        job_id,
        run_dir,
        90,
        until=lambda j: (
            len(slurm.metrics(run_dir)) >= FAKE["run.max_steps"]
            or j["JobState"] not in ("RUNNING", "PENDING")
        ),
    )
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
    job = slurm.wait(job_id, run_dir, 90)
    log = slurm.log(run_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "0", log
    assert "step exit rc=0 after SIGUSR1" in _events(run_dir)
    assert _weights_hash(run_dir) == _fake_weights(FAKE["run.max_steps"])


def test_failing_job_is_not_requeued(slurm, tmp_path) -> None:
    run_dir = tmp_path / "failing"
    job_id = slurm.submit(["--cpu", "--ntasks", "2"], run_dir, entry="rlp_no_such_module", **FAKE)
    job = slurm.wait(job_id, run_dir, 60)
    log = slurm.log(run_dir, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", log
    assert job["Restarts"] == "0"
    assert "training failed with exit code 1" in log and "No module named" in log, log


def test_cancelled_job_stays_cancelled(slurm, tmp_path) -> None:
    run_dir = tmp_path / "cancelled"
    job_id = slurm.submit(
        ["--cpu", "--ntasks", "2"],
        run_dir,
        entry="fake_trainer",
        **{"run.max_steps": 1000, "checkpoint.save_every": 0},
    )
    slurm.wait(job_id, run_dir, 60, until=lambda j: len(slurm.metrics(run_dir)) >= 2)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    job = slurm.wait(job_id, run_dir, 60)
    log = slurm.log(run_dir, job_id)
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", log
    assert "not requeueing" in log, log
    assert latest_checkpoint(run_dir / "checkpoints") is not None, "no checkpoint on SIGTERM"


@pytest.mark.parametrize("separator", ["\n", " "], ids=["newline", "space"])
def test_plain_sbatch_with_environment_parameters(slurm, tmp_path, separator) -> None:
    """The template without ``rlp submit``: parameters from the environment, its own #SBATCH
    defaults; RLP_OVERRIDES one per line (values may hold spaces) or whitespace-separated."""
    run_dir = tmp_path / "plain"
    (run_dir / "logs").mkdir(parents=True)
    overrides = ["run.max_steps=3", "checkpoint.save_every=0", "parallel.tp_size=2"]
    if separator == "\n":
        overrides.append("run.name=plain sbatch")
    env = dict(
        slurm.env,
        RLP_CONFIG=str(REPO / "rlp" / "configs" / "tiny_cpu.yaml"),
        RLP_RUN_DIR=str(run_dir),
        RLP_OVERRIDES=separator.join(overrides),
        RLP_ENTRY="fake_trainer",
        RLP_PYTHON=sys.executable,
    )
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--time=5",
            f"--output={run_dir}/logs/slurm-%j.out",
            str(REPO / "rlp" / "slurm" / "rlp_cpu.sbatch"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=True,
    )
    job_id = proc.stdout.strip().split(";")[0]
    job = slurm.wait(job_id, run_dir, 60)
    assert job["JobState"] == "COMPLETED", slurm.log(run_dir, job_id)
    assert [r["step"] for r in slurm.metrics(run_dir)] == [1, 2, 3]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["run"]["output_dir"] == str(run_dir)
    if separator == "\n":
        assert resolved["run"]["name"] == "plain sbatch"


@pytest.mark.parametrize("template", ["cpu", "gpu"])
def test_trainer_exit_75_requeues_without_a_signal(slurm, tmp_path, template) -> None:
    """The trainer may ask for a requeue on its own (exit 75 after a checkpoint); srun passes the
    ranks' exit code to the batch script."""
    run_dir = tmp_path / template
    shape = ["--cpu", "--ntasks", "2"] if template == "cpu" else ["--gpus-per-node", "2"]
    slurm.env["FAKE_EXIT_75_AT_STEP"] = "5"
    try:
        job_id = slurm.submit(
            shape, run_dir, entry="fake_trainer", **FAKE, **{"run.device": "auto"}
        )
    finally:
        del slurm.env["FAKE_EXIT_75_AT_STEP"]
    run = Run(run_dir, job_id, {})
    step, rows_before = _wait_requeued(slurm, run, 90)
    assert step == 5
    run.job = slurm.wait(job_id, run_dir, 90)
    _check_resumed(slurm, run, step, rows_before, FAKE["run.max_steps"], signalled=False)
    assert _weights_hash(run_dir) == _fake_weights(FAKE["run.max_steps"])
