"""A stand-in for ``python -m rlp.cli train`` that honours the trainer's SLURM contract, for testing
the sbatch templates and ``rlp submit`` while the real trainer is not importable (or to test the
launch path in seconds).

    python -m fake_trainer train --config FILE [key=value ...]     (PYTHONPATH=tests/slurm)

Contract (same as ``rlp.trainer``):
* config via ``rlp.config.load_config``; run dir ``run.output_dir``; ``run.max_steps`` steps;
* rank/world from RANK/WORLD_SIZE (torchrun, rlp_cpu.sbatch) or SLURM_PROCID/SLURM_NTASKS;
  world size must be a multiple of ``parallel.tp_size`` and MASTER_ADDR/PORT set when > 1;
* rank 0 appends one JSON object per step to ``RUN_DIR/metrics.jsonl`` (``step``, ``loss/total``,
  ``time/step``) and writes ``RUN_DIR/config.yaml``;
* checkpoints ``checkpoint.dir/step_XXXXXXX/state.json`` (atomic rename, ``latest`` file) every
  ``checkpoint.save_every`` steps and at the end;
* with ``checkpoint.save_on_signal``: SIGUSR1/SIGTERM set a flag; after the current step it
  checkpoints and exits 75, except after the final step, which finishes the run (exit 0);
  ``checkpoint.resume=auto`` resumes from the newest checkpoint;
* ``RUN_DIR/summary.json`` at the end with ``weights_sha256``: a hash chain over the steps, so a
  resumed run equals an uninterrupted one only if it resumed from the right state.

Each rank also writes ``RUN_DIR/ranks/rank<R>.attempt<A>.json`` (the launch environment it saw).
Step time: env ``FAKE_STEP_SECONDS`` (default 0.3). ``FAKE_EXIT_75_AT_STEP=N``: on the first
attempt, checkpoint and exit 75 after step N without any signal (a trainer-initiated requeue).
``FAKE_HOLD_AT_STEP=N``: on the first attempt, wait after step N (and its checkpoint) until a
signal arrives (at most 120 s), so that a test's signal lands at step N whatever the CPU load.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from rlp.config import load_config, save_config

REQUEUE_EXIT_CODE = 75
ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_RESTART_COUNT",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
)


class Flag:
    def __init__(self) -> None:
        self.name: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.name is None:  # idempotent: SLURM and torchrun may both deliver
            self.name = signal.Signals(signum).name
            print(f"[fake] got {self.name}", flush=True)


def _rank_world() -> tuple[int, int]:
    if "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ.get("SLURM_NTASKS", 1))


def _next_hash(prev: str, step: int, seed: int) -> str:
    return hashlib.sha256(f"{prev}|{step}|{seed}".encode()).hexdigest()


def _save(ckpt_dir: Path, step: int, weights: str) -> None:
    final = ckpt_dir / f"step_{step:07d}"
    tmp = ckpt_dir / f".tmp_step_{step:07d}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "state.json").write_text(json.dumps({"step": step, "weights": weights}))
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    tmp.rename(final)
    (ckpt_dir / "latest.tmp").write_text(final.name)
    (ckpt_dir / "latest.tmp").rename(ckpt_dir / "latest")


def _load(ckpt_dir: Path) -> tuple[int, str] | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    state = json.loads((ckpt_dir / latest.read_text().strip() / "state.json").read_text())
    return int(state["step"]), str(state["weights"])


def train(argv: list[str]) -> int:
    if not argv or argv[0] != "train":
        print("usage: python -m fake_trainer train --config FILE [key=value ...]", file=sys.stderr)
        return 2
    args = argv[1:]
    config = None
    if "--config" in args:
        i = args.index("--config")
        config = args[i + 1]
        args = args[:i] + args[i + 2 :]
    cfg = load_config(config, args)
    rank, world = _rank_world()
    if world % cfg.parallel.tp_size:
        print(f"[fake] world {world} not divisible by tp {cfg.parallel.tp_size}", file=sys.stderr)
        return 1
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        print("[fake] MASTER_ADDR/MASTER_PORT not set", file=sys.stderr)
        return 1
    run_dir = Path(cfg.run.output_dir)
    ckpt_dir = Path(cfg.checkpoint.dir)
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    env = {k: os.environ.get(k) for k in ENV_KEYS}
    # What the launcher left for SIGUSR1 before we install a handler (torchrun path: SIG_IGN).
    env["inherited_usr1"] = getattr(signal.getsignal(signal.SIGUSR1), "name", "handler")
    (run_dir / "ranks" / f"rank{rank}.attempt{attempt}.json").write_text(json.dumps(env))
    flag = Flag() if cfg.checkpoint.save_on_signal else None

    step, weights = 0, hashlib.sha256(b"init").hexdigest()
    if cfg.checkpoint.resume == "auto" and (loaded := _load(ckpt_dir)) is not None:
        step, weights = loaded
        print(f"[fake] rank {rank}: resumed from step {step}", flush=True)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    delay = float(os.environ.get("FAKE_STEP_SECONDS", "0.3"))
    exit_at = int(os.environ.get("FAKE_EXIT_75_AT_STEP", "0"))
    hold_at = int(os.environ.get("FAKE_HOLD_AT_STEP", "0"))
    metrics = open(run_dir / "metrics.jsonl", "a", buffering=1) if rank == 0 else None  # noqa: SIM115
    while step < cfg.run.max_steps:
        t0 = time.perf_counter()
        time.sleep(delay)
        step += 1
        weights = _next_hash(weights, step, cfg.run.seed)
        loss = int(weights[:8], 16) / 2**32
        if metrics is not None:
            row = {"step": step, "loss/total": loss, "time/step": time.perf_counter() - t0}
            metrics.write(json.dumps(row) + "\n")
        every = cfg.checkpoint.save_every
        if rank == 0 and ((every and step % every == 0) or step == cfg.run.max_steps):
            _save(ckpt_dir, step, weights)
        if step == exit_at and attempt == 0:  # a trainer-initiated requeue (e.g. a time budget)
            if rank == 0:
                _save(ckpt_dir, step, weights)
            print(f"[fake] rank {rank}: exit {REQUEUE_EXIT_CODE} at step {step}", flush=True)
            return REQUEUE_EXIT_CODE
        if step == hold_at and attempt == 0 and flag is not None:
            deadline = time.monotonic() + 120
            while flag.name is None and time.monotonic() < deadline:
                time.sleep(0.05)
        if flag is not None and flag.name is not None:
            if step == cfg.run.max_steps:  # the run is complete: finish it, no requeue
                print(f"[fake] rank {rank}: {flag.name} on the final step: done", flush=True)
                break
            if rank == 0:
                _save(ckpt_dir, step, weights)
            print(f"[fake] rank {rank}: {flag.name}: checkpointed step {step}", flush=True)
            return REQUEUE_EXIT_CODE
    if rank == 0:
        summary = {"steps": step, "weights_sha256": weights}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[fake] done: {step} steps, weights {weights[:12]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
