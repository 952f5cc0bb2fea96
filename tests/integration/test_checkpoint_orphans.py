"""kill -9 of a run leaves no helper process behind (checkpoint-writer Manager, its resource
tracker, forked writer copies of the run).

``scripts/ckpt_kill.py --hang-in-writer 2`` saves step 1 normally (the writer's Manager and the
resource tracker are up from then on), then blocks in step 2's save while its forked writer
processes sleep. Only the run itself is SIGKILLed (not its process group: an OOM kill or a node
agent hits one process), then the process table is checked for anything left of its session.
Helpers that ignore SIGTERM or sleep forever would survive without the parent-death signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.integration.test_checkpoint_kill import start_run, wait_for

pytestmark = pytest.mark.integration


def session_members(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found[int(entry.name)] = cmdline
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill_9_leaves_no_helper_processes(tmp_path: Path) -> None:
    proc = start_run(tmp_path / "ckpt", "--hang-in-writer", "2")
    lines = wait_for(proc, "WRITER")
    writer_pids = {int(ln.split()[1]) for ln in lines if ln.startswith("WRITER")}
    helpers = {pid: cmd for pid, cmd in session_members(proc.pid).items() if pid != proc.pid}
    assert writer_pids <= set(helpers), (writer_pids, helpers)
    assert any("resource_tracker" in cmd for cmd in helpers.values()), helpers
    assert any("spawn_main" in cmd for cmd in helpers.values()), helpers  # the Manager

    os.kill(proc.pid, signal.SIGKILL)  # the run only, as the OOM killer would
    proc.wait(timeout=60)
    assert proc.stdout is not None
    proc.stdout.close()
    deadline = time.monotonic() + 60
    while (left := session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # never leave strays behind, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the killed run: {left}"
