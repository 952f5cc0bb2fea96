"""A full disk during a save: one line "no space left on <dir>", the previous checkpoint intact.

Two ways to fill the disk:

* fault injection at megatron's shard write (the forked writer processes raise ``ENOSPC``, as
  ``write()`` does on a full filesystem; the error travels back through megatron's result
  queue) - always runs;
* a real 1.3 MiB tmpfs that holds one checkpoint of the tiny model but not two (needs permission
  to mount; skipped otherwise), where the failing write is whichever comes first.

After the failure the partial ``tmp_step_*`` is gone (its space given back), ``latest`` and the
previous checkpoint are untouched and it loads.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rlp.checkpoint import CheckpointError, CheckpointManager
from rlp.config import CheckpointConfig
from tests.model_helpers import build_tiny_model

pytestmark = pytest.mark.integration


def save_two(root: Path) -> tuple[CheckpointManager, Path, torch.nn.Module, CheckpointError]:
    """Save step 1, then step 2, which must fail for lack of space."""
    model = build_tiny_model(seed=1)
    ema = [p.detach().clone() for p in model.parameters()]
    manager = CheckpointManager(CheckpointConfig(dir=str(root), keep_last=3))
    first = manager.save(1, model=model, ema_state=ema, train_state={"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(CheckpointError) as err:
        manager.save(2, model=model, ema_state=ema, train_state={"step": 2})
    return manager, first, model, err.value


def check_previous_intact(manager: CheckpointManager, root: Path, first: Path) -> None:
    assert [p.name for p in root.iterdir() if p.name.startswith("tmp_")] == []
    assert (root / "latest").read_text().strip() == first.name
    assert manager.latest_path() == first
    fresh = build_tiny_model(seed=2)
    loaded = manager.load_latest(model=fresh)
    assert loaded is not None and loaded.step == 1
    reference = build_tiny_model(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), reference.parameters()))


class _FullFile:
    """A file opened for writing on a filesystem that just filled up: ``write`` fails like the
    kernel's (``ENOSPC``); everything else is the real file's."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self._f = f

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def test_enospc_in_the_shard_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real_open = open

    def open_on_full_disk(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = real_open(file, mode, *args, **kwargs)
        return _FullFile(f) if "tmp_step_0000002" in str(file) and "w" in mode else f

    # The forked writer processes of the save open their shard files through this name.
    monkeypatch.setattr(filesystem_async, "open", open_on_full_disk, raising=False)
    root = tmp_path / "ckpt"
    manager, first, _, err = save_two(root)
    message = str(err)
    assert message.startswith(f"no space left on {root}:") and "\n" not in message, message
    assert f"{first} is intact" in message
    monkeypatch.undo()
    check_previous_intact(manager, root, first)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def test_real_full_filesystem(tmp_path: Path) -> None:
    disk = tmp_path / "small_disk"
    if not _mount_tmpfs(disk, "1300k"):  # one checkpoint of the tiny model is ~860 KiB
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        root = disk / "ckpt"
        manager, first, _, err = save_two(root)
        message = str(err)
        assert message.startswith(f"no space left on {root}:") and "\n" not in message, message
        check_previous_intact(manager, root, first)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
