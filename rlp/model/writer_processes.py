"""Helper processes of megatron's checkpoint writer: started immune to job signals, dying with us.

The torch_dist writer (``megatron.core.dist_checkpointing.strategies.filesystem_async``) uses two
kinds of helper processes:

* a ``multiprocessing`` **Manager** (spawn context; with it the spawn context's **resource
  tracker**) that carries write results, started lazily on the first save and kept for the run;
* **forked writer copies** of the training process, one per write bucket during each save.

Two rules, both enforced here:

1. *Signals of the job must not kill the Manager before the save they ask for.* SLURM delivers
   SIGTERM (scancel, pre-emption, time limit) and ``--signal`` to every process of the job; a dead
   Manager makes the checkpoint saved *because of* the signal fail with ``BrokenPipeError``.
   Signals set to SIG_IGN stay ignored across exec, so :func:`start_writer_service` starts it
   while they are ignored (the caller's handlers are put back after).
2. *No helper outlives the training process* (kill -9, OOM killer). Each helper asks the kernel
   for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes, Linux): the
   Manager in its initializer, forked writers in an ``os.register_at_fork`` hook that is armed
   only while :func:`writers_die_with_parent` is active (a save) and only for forks from the main
   thread (the death signal follows the *thread* that forked). The resource tracker exits by
   itself once every holder of its pipe (us, the Manager, the writers) is gone.

On other platforms the parent-death signal is unavailable and helpers behave as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_service: Any = None  # the Manager we started (kept alive for the run)
_fork_state: dict[str, Any] = {"armed": False, "main_thread": False, "parent": None}
_hook_installed = False
_prctl_fn: Any = None


def die_with_parent(parent_pid: int | None = None, signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent (thread) dies.

    ``parent_pid``: the expected parent; if it is already gone (we were re-parented before the
    request took effect) the process exits at once. Returns False where ``prctl`` is unavailable.
    """
    prctl = _prctl()
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    return True


def _prctl() -> Any:
    """libc's ``prctl`` (looked up once, before any fork: no dynamic loading in a child)."""
    global _prctl_fn
    if _prctl_fn is None and sys.platform.startswith("linux"):
        try:
            _prctl_fn = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _prctl_fn = False
    return _prctl_fn or None


def _manager_initializer(parent_pid: int) -> None:
    """Runs first in the Manager's server process (spawned: a fresh interpreter)."""
    die_with_parent(parent_pid)


def _before_fork() -> None:
    _fork_state["main_thread"] = threading.current_thread() is threading.main_thread()
    _fork_state["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if _fork_state["armed"] and _fork_state["main_thread"]:
        die_with_parent(_fork_state["parent"])


def _install_fork_hook() -> None:
    global _hook_installed
    if not _hook_installed:
        _prctl()  # resolve now, in the parent
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _hook_installed = True


@contextlib.contextmanager
def writers_die_with_parent() -> Iterator[None]:
    """Within this block, processes forked from the main thread die when this process dies."""
    _install_fork_hook()
    previous = _fork_state["armed"]
    _fork_state["armed"] = True
    try:
        yield
    finally:
        _fork_state["armed"] = previous


def start_writer_service() -> None:
    """Start the checkpoint writer's Manager now (idempotent): immune to job signals, killed with
    this process. Megatron's writer then uses its queue instead of starting its own Manager."""
    global _service
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _install_fork_hook()
    if _service is not None and filesystem_async._results_queue is not None:
        return
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2]
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_manager_initializer, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
        _service = manager
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
