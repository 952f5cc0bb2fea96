"""Crafted checkpoints do not run code through the files rlp unpickles or lets megatron unpickle.

Each payload's ``__reduce__`` would create a marker file when unpickled without an allow-list; the
tests check the load is refused with one line and the marker never appears:

* a rank state file (``rank_states/rank_00000.pt``, read with ``weights_only=True``);
* torch DCP's ``dist/.metadata`` (megatron / torch ``pickle.load`` it; rlp first unpickles it
  with an allow-list), here through ``rlp convert mcore-to-hf``;
* an ``_extra_state`` blob inside ``*.distcp``: a local-spec model never requests these (its
  modules store ``None``), so the blob is never unpickled.

``files.json`` is rewritten after each edit, as an attacker would: sizes catch damage, not intent.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlp.checkpoint import CheckpointManager, UnsafeCheckpointError
from rlp.config import CheckpointConfig
from rlp.model import sharded
from tests.model_helpers import REPO_ROOT, build_tiny_model, tiny_model_config

pytestmark = pytest.mark.integration


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import dataclasses

    root = tmp_path_factory.mktemp("trust")
    model = build_tiny_model(seed=1)
    return CheckpointManager(CheckpointConfig(dir=str(root))).save(
        1,
        model=model,
        train_state={"step": 1},
        config={"model": dataclasses.asdict(tiny_model_config())},
        vocab_size=256,
    )


def copy_of(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt" / saved.name
    shutil.copytree(saved, dst)
    return dst


def test_pickle_payload_in_a_rank_state_file_is_refused(saved: Path, tmp_path: Path) -> None:
    ckpt, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    torch.save({"train_state": Payload(marker)}, ckpt / "rank_states" / "rank_00000.pt")
    sharded.write_file_list(ckpt)
    manager = CheckpointManager(CheckpointConfig(dir=str(ckpt.parent)))
    with pytest.raises(UnsafeCheckpointError) as err:
        manager.load(ckpt, model=build_tiny_model())
    assert "refusing to load" in str(err.value) and "\n" not in str(err.value)
    assert "posix.system" in str(err.value) or "system" in str(err.value)
    assert not marker.exists()


def test_pickle_payload_in_dcp_metadata_is_refused_by_rlp_convert(
    saved: Path, tmp_path: Path
) -> None:
    ckpt, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    (ckpt / "dist" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    sharded.write_file_list(ckpt)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "rlp.cli", "convert", "mcore-to-hf", str(ckpt), str(tmp_path / "o")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "refusing to load" in proc.stderr and "system" in proc.stderr
    assert not marker.exists()
    # The allow-list accepts what torch DCP really writes.
    sharded.check_dcp_metadata(saved)


def test_extra_state_blobs_are_never_unpickled_by_a_local_spec_model(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = build_tiny_model(seed=1)
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    qkv.get_extra_state = lambda: Payload(marker)  # what a crafted checkpoint would hold
    ckpt = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "c"))).save(1, model=model)
    assert not marker.exists()
    fresh = build_tiny_model(seed=2)
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "c"))).load(ckpt, model=fresh)
    assert not marker.exists()
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))
