"""One writer per run directory (flock released by the OS on any exit) and run records that are
moved aside, never overwritten (issue 15, items 5 and 7)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlp.rundir import LOCK_FILE, RunDirectoryError, RunLock, existing_records, set_aside

HOLD = (
    "import sys, time; from rlp.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
    "print('held', flush=True); time.sleep(600)"
)


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_pid_and_host(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        with pytest.raises(RunDirectoryError) as err:
            RunLock(run_dir).acquire()
        message = str(err.value)
        assert f"PID {proc.pid} on host {socket.gethostname()}" in message
        assert "run.output_dir" in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()


def test_lock_is_released_by_kill_9(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunLock(run_dir) as lock:
        assert lock.held
        assert f'"pid": {os.getpid()}' in (run_dir / LOCK_FILE).read_text()
    assert not lock.held


def test_lock_in_one_process_excludes_a_second_handle(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirectoryError, match="is in use by PID"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def test_unwritable_run_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirectoryError, match="cannot create the run directory lock"):
        RunLock(blocker / "run").acquire()


def _fake_run(run_dir: Path, ckpt: Path) -> None:
    (ckpt / "step_0000002").mkdir(parents=True)
    (ckpt / "latest").write_text("step_0000002\n")
    for name in ("metrics.jsonl", "samples.jsonl", "summary.json", "config.yaml"):
        (run_dir / name).write_text(f"{name}\n")


def test_existing_records_and_set_aside(tmp_path: Path) -> None:
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run_dir.mkdir()
    assert existing_records(run_dir, ckpt) == []
    (run_dir / "metrics.jsonl").write_text("")  # an empty file is no record
    assert existing_records(run_dir, ckpt) == []
    _fake_run(run_dir, ckpt)
    found = existing_records(run_dir, ckpt)
    assert found == ["metrics.jsonl", "samples.jsonl", "summary.json", str(ckpt)]
    moved = set_aside(run_dir, ckpt)
    assert moved.parent == run_dir and moved.name.startswith("replaced_")
    assert (moved / "metrics.jsonl").read_text() == "metrics.jsonl\n"
    assert (moved / "checkpoints" / "step_0000002").is_dir()
    assert existing_records(run_dir, ckpt) == []
    # A second set-aside within the same second gets a directory of its own.
    _fake_run(run_dir, ckpt)
    assert set_aside(run_dir, ckpt) != moved


def test_set_aside_never_moves_checkpoints_outside_the_run_dir(tmp_path: Path) -> None:
    run_dir, ckpt = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    _fake_run(run_dir, ckpt)
    with pytest.raises(RunDirectoryError, match="outside the run directory"):
        set_aside(run_dir, ckpt)
    assert (run_dir / "metrics.jsonl").is_file() and (ckpt / "latest").is_file()
