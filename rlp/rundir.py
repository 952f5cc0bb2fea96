"""One writer per run directory, and run records that are never silently lost.

* :class:`RunLock` takes an exclusive ``fcntl.flock`` on ``RUN_DIR/rlp.lock`` before a run touches
  anything else in the directory. The operating system drops the lock when the holder exits,
  however it exits (kill -9, OOM), so there is no stale lock to clean up; the file keeps the
  holder's PID, host and start time so that a refused second run can name it.
* :func:`existing_records` says whether a directory already holds a run (metrics, samples,
  summary, checkpoints), and :func:`set_aside` moves such a run into ``RUN_DIR/replaced_<time>/``
  when a fresh start was asked for explicitly (``checkpoint.resume=never`` with
  ``run.overwrite=true``).

Standard library only (no torch): usable from login-node tools and tests.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = "rlp.lock"
RECORD_FILES = ("metrics.jsonl", "samples.jsonl", "summary.json")
"""Files in the run directory that describe a run (the trainer appends to or rewrites them)."""
REPLACED_PREFIX = "replaced_"


class RunDirectoryError(RuntimeError):
    """The run directory cannot be used as asked; the message says what to change."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        pid, host, since = info["pid"], info["host"], info.get("since", "?")
    except (ValueError, KeyError, TypeError):
        return "another process (holder unknown)"
    here = host == socket.gethostname()
    gone = ""
    if here and not _pid_alive(int(pid)):
        gone = ", which has exited: a helper process it started still holds the lock"
    return f"PID {pid} on host {host} (since {since}{gone})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory (``with RunLock(d):`` or :meth:`acquire`/:meth:`release`).

    Two processes on one host, or on two hosts of a file system with working ``flock`` (local
    disks, NFSv4, Lustre and GPFS with locking enabled), cannot both hold it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirectoryError` naming the holder's PID and host."""
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot create the run directory lock {self.path}: {exc.strerror}; choose a "
                "writable run.output_dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryError(
                    f"cannot lock {self.path}: {exc.strerror} (the file system may not support "
                    "flock); choose a run.output_dir on a local or lock-capable file system"
                ) from None
            raise RunDirectoryError(
                f"run directory {self.run_dir} is in use by {_holder(text)}; wait for that run "
                "to finish or stop it, or choose another run.output_dir"
            ) from None
        since = _dt.datetime.now().isoformat(timespec="seconds")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent); process exit does the same."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _has_checkpoints(ckpt_dir: Path) -> bool:
    """True when ``ckpt_dir`` holds checkpoint entries (``step_*`` directories, ``latest``)."""
    return ckpt_dir.is_dir() and any(
        p.name.startswith("step_") or p.name == "latest" for p in ckpt_dir.iterdir()
    )


def existing_records(run_dir: str | Path, ckpt_dir: str | Path) -> list[str]:
    """Names of what a previous run left in ``run_dir`` (non-empty records, checkpoints)."""
    run, ckpt = Path(run_dir), Path(ckpt_dir)
    found = [
        name for name in RECORD_FILES if (run / name).is_file() and (run / name).stat().st_size
    ]
    if _has_checkpoints(ckpt):
        found.append(str(ckpt))
    return found


def set_aside(run_dir: str | Path, ckpt_dir: str | Path) -> Path:
    """Move the previous run's records (and checkpoints, when they live inside ``run_dir``) into
    ``RUN_DIR/replaced_<time>/``; returns that directory. Checkpoints outside the run directory
    are not moved: :class:`RunDirectoryError` asks the user to move them (nothing is written
    outside the run directory)."""
    run, ckpt = Path(run_dir), Path(ckpt_dir)
    if _has_checkpoints(ckpt) and not _inside(ckpt, run):
        raise RunDirectoryError(
            f"checkpoint.dir {ckpt} holds checkpoints of an earlier run and is outside the run "
            "directory; move or delete them yourself, or choose another checkpoint.dir"
        )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run / f"{REPLACED_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = run / f"{REPLACED_PREFIX}{stamp}-{n}"
    target.mkdir(parents=True)
    for name in (*RECORD_FILES, "config.yaml", "wandb_id.txt"):
        if (run / name).is_file():
            (run / name).replace(target / name)
    if _has_checkpoints(ckpt):
        (target / "checkpoints").mkdir()
        for entry in ckpt.iterdir():
            if entry.name.startswith(("step_", "tmp_")) or entry.name == "latest":
                entry.replace(target / "checkpoints" / entry.name)
    return target
