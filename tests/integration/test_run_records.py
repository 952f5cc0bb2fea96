"""`rlp train` and its run directory (issue 15): one writer per directory (item 5), run records
never silently lost (item 7), no writes outside the run and the demo directory (item 3), clear
one-line errors (item 8) and auditable samples (item 11).

Signals are made to land inside a chosen step without timing assumptions: the shards are read
through a ``pipe:`` command that announces itself and then waits for the test's go-ahead, so the
test signals the trainer while it is provably inside that step's data read."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.model_helpers import REPO_ROOT

pytestmark = pytest.mark.integration

TINY = REPO_ROOT / "rlp" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from rlp.data.demo import ensure_demo_corpus

    return ensure_demo_corpus(tmp_path_factory.mktemp("records") / "demo")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _args(demo: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rlp.cli",
        "train",
        "--config",
        str(TINY),
        f"run.output_dir={run_dir}",
        f"run.max_steps={steps}",
        f"tokenizer.path={demo / 'tokenizer'}",
        f"data.shards={demo / 'shards' / 'demo-{000000..000003}.tar'}",
        "data.build_demo_if_missing=false",
        "checkpoint.save_every=0",
        "eval.every=0",
        "benefit.per_step=false",
        *extra,
    ]


def _run(
    args: list[str], cwd: Path = REPO_ROOT, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


class GatedShards:
    """``data.shards`` as ``pipe:`` commands that touch ``ready`` and wait for ``go``."""

    def __init__(self, demo: Path, tmp: Path) -> None:
        self.ready, self.go = tmp / "ready", tmp / "go"
        gate = f"touch {self.ready}; while [ ! -e {self.go} ]; do sleep 0.05; done"
        urls = [
            f"pipe:bash -c {shlex.quote(f'{gate}; cat {demo}/shards/demo-{i:06d}.tar')}"
            for i in range(4)
        ]
        self.overrides = [
            "data.shards=" + ",".join(urls),
            f"data.manifest={demo / 'shards' / 'manifest.json'}",
            "data.shuffle_shards=false",
            "objective.ntp_weight=0",
        ]

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the trainer never read its shards"
            time.sleep(0.05)

    def open(self) -> None:
        self.go.touch()


def _popen(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# ---------------------------------------------------------------------------------- item 5


def test_second_run_on_a_live_run_dir_is_refused(demo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    gate = GatedShards(demo, tmp_path)
    first = _popen(_args(demo, run_dir, 2, *gate.overrides))
    try:
        gate.wait_ready(first)  # the first run holds the directory and is inside step 1
        config_before = (run_dir / "config.yaml").read_bytes()
        second = _run(_args(demo, run_dir, 2, *gate.overrides, "run.seed=7"))
        line = _one_line_error(second)
        assert f"is in use by PID {first.pid} on host {socket.gethostname()}" in line, line
        assert (run_dir / "config.yaml").read_bytes() == config_before
    finally:
        gate.open()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:] + err[-3000:]
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]
    assert "seed: 1234" in (run_dir / "config.yaml").read_text()


# ---------------------------------------------------------------------------------- item 7


def test_records_survive_rerun_never_and_rejected_resume(demo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _ok(_run(_args(demo, run_dir, 2, "log.samples_every=1")))
    summary = (run_dir / "summary.json").read_bytes()
    config = (run_dir / "config.yaml").read_bytes()
    assert json.loads(summary)["final"]["loss/total"] > 0

    # Re-running a finished run keeps its summary (no "loss nan", no empty "final").
    out = _ok(_run(_args(demo, run_dir, 2, "log.samples_every=1")))
    assert "already finished at step 2" in out and "loss nan" not in out
    assert (run_dir / "summary.json").read_bytes() == summary

    # resume=never on a directory with a run: refused, nothing touched.
    line = _one_line_error(_run(_args(demo, run_dir, 2, "checkpoint.resume=never")))
    assert "already holds a run" in line and "run.overwrite=true" in line
    assert [r["step"] for r in _rows(run_dir)] == [1, 2]
    assert (run_dir / "summary.json").read_bytes() == summary

    # A resume rejected by the checkpoint (another architecture) leaves config.yaml alone.
    rejected = _run(_args(demo, run_dir, 4, "model.num_layers=3"))
    assert rejected.returncode == 1 and "Traceback" not in rejected.stderr, rejected.stderr[-3000:]
    assert (run_dir / "config.yaml").read_bytes() == config

    # Told to overwrite: the old run moves aside, the new one starts at step 1.
    out = _ok(_run([*_args(demo, run_dir, 1, "checkpoint.resume=never"), "--overwrite"]))
    moved = [p for p in run_dir.iterdir() if p.name.startswith("replaced_")]
    assert len(moved) == 1 and (moved[0] / "summary.json").read_bytes() == summary
    assert (moved[0] / "checkpoints" / "step_0000002").is_dir()
    assert [r["step"] for r in _rows(run_dir)] == [1]


SIGNALS = [
    (signal.SIGTERM, 1, 0, "signal SIGTERM on the final step: done"),  # the run is complete
    (signal.SIGINT, 3, 75, "signal SIGINT: checkpointed step 1"),  # Ctrl-C: like SIGTERM
]


@pytest.mark.parametrize(("signum", "steps", "code", "said"), SIGNALS, ids=["final", "ctrl-c"])
def test_signal_during_step_1(demo: Path, tmp_path: Path, signum, steps, code, said) -> None:
    run_dir = tmp_path / "run"
    gate = GatedShards(demo, tmp_path)
    proc = _popen(_args(demo, run_dir, steps, *gate.overrides))
    gate.wait_ready(proc)  # inside step 1
    proc.send_signal(signum)
    gate.open()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, out[-2000:] + err[-3000:]
    assert said in out
    assert (run_dir / "checkpoints" / "step_0000001").is_dir()
    if steps == 1:
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1
    else:
        resumed = _ok(_run(_args(demo, run_dir, steps, *gate.overrides)))
        assert "resumed from" in resumed and [r["step"] for r in _rows(run_dir)] == [1, 2, 3]


# ---------------------------------------------------------------------------------- items 3, 8


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


MISSING_SHARDS = [
    (
        "{tmp}/data/demo/shard/demo-{{000000..000003}}.tar",
        "shards do not exist: {tmp}/data/demo/shard/demo-000000.tar (and 3 more of 4)",
    ),
    (
        "{tmp}/data/typo/shards/demo-{{000000..000003}}.tar",
        "shards do not exist: {tmp}/data/typo/shards/demo-000000.tar",
    ),
    ("{tmp}/data/demo/shards/*.tar", "shard glob '{tmp}/data/demo/shards/*.tar' matches no files"),
]


def _train_writing_nothing(tmp_path: Path, shards: str) -> subprocess.CompletedProcess:
    """`rlp train` (the main job's config: data.build_demo_if_missing=true) in an empty working
    directory with ``data.shards``; asserts that nothing but the run directory's lock appeared."""
    (tmp_path / "data").mkdir()
    before = _tree(tmp_path)
    args = [sys.executable, "-m", "rlp.cli", "train", f"data.shards={shards}"]
    args += [f"run.output_dir={tmp_path / 'run'}", f"tokenizer.path={tmp_path / 'data' / 'demo'}"]
    proc = _run(args, cwd=tmp_path)
    assert _tree(tmp_path) - before <= {"run", "run/rlp.lock"}, _tree(tmp_path) - before
    return proc


@pytest.mark.parametrize(("shards", "message"), MISSING_SHARDS)
def test_missing_shards_are_a_plain_error_and_write_nothing(tmp_path: Path, shards, message):
    """A mistyped data.shards builds nothing anywhere: one line saying the shards do not exist."""
    line = _one_line_error(_train_writing_nothing(tmp_path, shards.format(tmp=tmp_path)))
    assert message.format(tmp=tmp_path) in line, line
    assert "manifest" not in line and "check_tokenizer" not in line


def test_pipe_url_never_builds_a_demo(tmp_path: Path) -> None:
    shards = "pipe:cat /nonexistent/shards/demo-{000000..000003}.tar"
    _one_line_error(_train_writing_nothing(tmp_path, shards))


# ---------------------------------------------------------------------------------- item 11


def test_samples_carry_ids_and_scores_for_every_thought(demo: Path, tmp_path: Path) -> None:
    """log.all_samples=true logs all B x G thoughts with token ids, S_pred, S_ema, reward and
    advantage: the reward is S_pred - S_ema exactly (K = 1), the advantage the leave-one-out group
    advantage of the logged rewards, and the ids decode to the logged text."""
    from rlp.tokenizer import load_tokenizer

    run_dir = tmp_path / "run"
    _ok(_run(_args(demo, run_dir, 1, "log.samples_every=1", "log.all_samples=true")))
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    cfg_g = 4  # tiny_cpu: rollout.num_thoughts
    assert len(rows) == 4 * cfg_g  # contexts_per_step x num_thoughts
    tok = load_tokenizer(str(demo / "tokenizer"))
    for row in rows:
        k = len(row["target_ids"])
        assert row["sequence_ids"][-k:] == row["target_ids"] == row["baseline_ids"][-k:]
        reward = torch.tensor(row["s_pred"]).sum() - torch.tensor(row["s_ema"]).sum()
        assert float(reward) == row["reward"]
        assert tok.decode(row["thought_ids"]) == row["thought"]
        seq, thought = row["sequence_ids"], row["thought_ids"]
        assert any(seq[i : i + len(thought)] == thought for i in range(len(seq)))
    for c in range(4):
        group = [r for r in rows if r["context"] == c]
        rewards = torch.tensor([r["reward"] for r in group])
        expected = cfg_g / (cfg_g - 1) * (rewards - rewards.mean())
        got = torch.tensor([r["advantage"] for r in group])
        assert torch.allclose(got, expected, atol=1e-6), (got, expected)
