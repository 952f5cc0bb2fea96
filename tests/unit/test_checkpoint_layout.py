"""Checkpoint directory layout, discovery, retention, atomic finalisation and SignalFlag.

No megatron: checkpoints here are fake directories with the files the layout requires.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from rlp.checkpoint import (
    CheckpointError,
    CheckpointManager,
    SignalFlag,
    _decode,
    _encode,
)
from rlp.config import CheckpointConfig
from rlp.model import layer_keys, sharded
from rlp.state import capture_rng, restore_rng


def fake_checkpoint(root: Path, step: int, complete: bool = True, name: str | None = None) -> Path:
    path = root / (name or sharded.step_dir_name(step))
    (path / "dist").mkdir(parents=True)
    (path / "dist" / "metadata.json").write_text("{}")
    if complete:
        meta = {"format": sharded.FORMAT, "format_version": sharded.FORMAT_VERSION, "step": step}
        (path / sharded.METADATA_FILE).write_text(json.dumps(meta))
        (path / sharded.COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def manager(root: Path, keep_last: int = 2, save_every: int = 5) -> CheckpointManager:
    return CheckpointManager(
        CheckpointConfig(dir=str(root), keep_last=keep_last, save_every=save_every)
    )


def test_should_save() -> None:
    m = manager(Path("unused"), save_every=5)
    assert [s for s in range(0, 16) if m.should_save(s)] == [5, 10, 15]
    assert not any(manager(Path("unused"), save_every=0).should_save(s) for s in range(20))


def test_step_dir_names_sort_numerically() -> None:
    assert sharded.step_dir_name(10) == "step_0000010"
    names = [sharded.step_dir_name(s) for s in (9, 10, 100)]
    assert sorted(names) == names


def test_newest_complete_wins_and_incomplete_is_ignored(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # named step_* but the save never finished
    fake_checkpoint(tmp_path, 40, name="tmp_step_0000040")
    (tmp_path / "latest").write_text("step_0000005\n")  # stale pointer: the scan decides
    m = manager(tmp_path)
    assert m.latest_path() == tmp_path / "step_0000020"
    assert [s for s, _ in m.checkpoints()] == [5, 20]
    assert sharded.resolve_checkpoint(tmp_path) == tmp_path / "step_0000020"
    assert sharded.resolve_checkpoint(tmp_path / "step_0000005") == tmp_path / "step_0000005"


def test_no_checkpoints(tmp_path: Path) -> None:
    assert manager(tmp_path / "missing").latest_path() is None
    assert manager(tmp_path).latest_path() is None


def test_stale_tmp_dirs_removed_on_start(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 1)
    stale = fake_checkpoint(tmp_path, 2, name="tmp_step_0000002")
    (tmp_path / "tmp_latest").write_text("step_0000002\n")
    manager(tmp_path)
    assert not stale.exists() and not (tmp_path / "tmp_latest").exists()
    assert (tmp_path / "step_0000001").is_dir()


def test_retention_keeps_newest_k_and_leaves_incomplete_dirs(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    odd = fake_checkpoint(tmp_path, 0, complete=False)
    m = manager(tmp_path, keep_last=2)
    removed = m._apply_retention()
    assert [p.name for p in removed] == ["step_0000001", "step_0000002"]
    assert [s for s, _ in m.checkpoints()] == [3, 4]
    assert odd.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp_")]
    manager(tmp_path, keep_last=1)._apply_retention()
    assert [s for s, _ in m.checkpoints()] == [4]  # never the newest


def test_finalize_is_a_rename_and_replaces_same_step(tmp_path: Path) -> None:
    old = fake_checkpoint(tmp_path, 7)
    (old / "old_file").write_text("x")
    tmp = fake_checkpoint(tmp_path, 7, complete=False, name="tmp_step_0000007")
    meta = {"format": sharded.FORMAT, "format_version": 1, "step": 7}
    final = sharded.finalize_checkpoint(tmp, tmp_path / "step_0000007", meta)
    assert final == tmp_path / "step_0000007" and not tmp.exists()
    assert sharded.is_complete(final) and not (final / "old_file").exists()
    assert sharded.read_metadata(final)["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000007"]


def test_read_metadata_errors(tmp_path: Path) -> None:
    partial = fake_checkpoint(tmp_path, 1, complete=False)
    with pytest.raises(CheckpointError, match="not a complete rlp checkpoint"):
        sharded.read_metadata(partial)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        sharded.resolve_checkpoint(partial)
    alien = fake_checkpoint(tmp_path, 2)
    (alien / sharded.METADATA_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="format 'other'"):
        sharded.read_metadata(alien)
    good = fake_checkpoint(tmp_path, 3)
    (good / "dist" / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="lacks its megatron dist checkpoint"):
        sharded.read_metadata(good)
    with pytest.raises(CheckpointError, match="not found"):
        sharded.read_metadata(tmp_path / "nope")


def test_rng_state_survives_weights_only_serialisation(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng()
    torch.save(_encode(state), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(_decode(torch.load(tmp_path / "rng.pt", weights_only=True)))
    assert (random.random(), np.random.rand(3).tolist()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_train_state_with_numpy_values_survives_weights_only_load(tmp_path: Path) -> None:
    state = {"step": np.int64(7), "cursor": {"lanes": [np.arange(3)], "frac": np.float32(0.5)}}
    torch.save(_encode(state), tmp_path / "state.pt")
    back = _decode(torch.load(tmp_path / "state.pt", weights_only=True))
    assert back["step"] == 7 and type(back["step"]) is int
    assert back["cursor"]["frac"] == 0.5
    np.testing.assert_array_equal(back["cursor"]["lanes"][0], np.arange(3))


def test_signal_flag_sets_flag_and_restores_handlers() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with SignalFlag() as flag:
            assert not flag.raised and flag.name is None
            os.kill(os.getpid(), signal.SIGUSR1)
            assert flag.raised and flag.name == "SIGUSR1"
            assert flag.raised_anywhere()  # no process group: this rank decides
            assert seen == []  # the flag's handler replaced ours while installed
            flag.clear()
            assert not flag.raised
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # our handler is back
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_publish_updates_latest_and_warns_about_newer_steps(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 10)  # e.g. left by an earlier run in the same directory
    fake_checkpoint(tmp_path, 3)
    m = manager(tmp_path, keep_last=1)  # before the tmp dir: construction removes stale ones
    tmp = fake_checkpoint(tmp_path, 5, complete=False, name="tmp_step_0000005")
    meta = {"format": sharded.FORMAT, "format_version": 1, "step": 5}
    with pytest.warns(UserWarning, match="newer than step 5 \\(step_0000010\\)"):
        m._publish(tmp, tmp_path / "step_0000005", meta)
    assert (tmp_path / "latest").read_text() == "step_0000005\n"
    # keep_last=1 keeps the newest (10) and never deletes the checkpoint just written (5).
    assert [s for s, _ in m.checkpoints()] == [5, 10]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp_")]


# ------------------------------------------------------------------ layer-spec key mapping


def test_layer_key_names_map_both_ways() -> None:
    pairs = {
        "decoder.layers.3.input_layernorm.weight": (
            "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
        ),
        "decoder.layers.0.pre_mlp_layernorm.weight": (
            "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
        ),
    }
    for local, te in pairs.items():
        assert layer_keys.te_name(local) == te and layer_keys.local_name(te) == local
    for same in (
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.self_attention.q_layernorm.weight",
        "decoder.final_layernorm.weight",
        "embedding.word_embeddings.weight",
    ):
        assert layer_keys.te_name(same) == same == layer_keys.local_name(same)
    # Sharded keys (layer index folded into the tensor) and optimizer-prefixed keys.
    assert layer_keys.checkpoint_key("decoder.layers.input_layernorm.weight") == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    )
    assert layer_keys.checkpoint_key(
        "optimizer.state.exp_avg.decoder.layers.pre_mlp_layernorm.weight"
    ) == ("optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.layer_norm_weight")


class _Sharded:
    def __init__(self, key: str, data: object = None) -> None:
        self.key, self.data = key, data


def test_canonicalise_and_extra_state_rules() -> None:
    request = {
        "model": {
            "decoder.layers.0.input_layernorm.weight": _Sharded(
                "decoder.layers.input_layernorm.weight"
            ),
            "decoder.layers.0.self_attention.linear_qkv._extra_state": _Sharded("a._extra_state"),
            "decoder.layers.0.self_attention.core_attention._extra_state": _Sharded("b", data=1),
        },
        "optimizer": [_Sharded("optimizer.state.exp_avg.decoder.layers.pre_mlp_layernorm.weight")],
    }
    assert layer_keys.canonicalise_keys(request) == 2
    assert request["optimizer"][0].key.endswith("mlp.linear_fc1.layer_norm_weight")
    model = dict(request["model"])
    assert layer_keys.drop_unneeded_extra_state(model, same_spec=True) == 1  # the None one
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in model
    assert layer_keys.drop_unneeded_extra_state(model, same_spec=False) == 1
    assert list(model) == ["decoder.layers.0.input_layernorm.weight"]


def test_only_extra_state_keys_may_be_missing_or_extra() -> None:
    extra = ["decoder.layers.self_attention.core_attention._extra_state"]
    layer_keys.check_key_mismatch(extra, extra + ["optimizer.state.x", "ema.decoder.w"], where="c")
    with pytest.raises(layer_keys.LayerKeyError, match=r"c: the checkpoint lacks \['decoder.w'\]"):
        layer_keys.check_key_mismatch(["decoder.w"], [], where="c")
    with pytest.raises(layer_keys.LayerKeyError, match=r"no place for checkpoint tensors"):
        layer_keys.check_key_mismatch([], ["output_layer.weight"], where="c")
    module = torch.nn.Linear(2, 2)
    state = {k: v.clone() for k, v in module.state_dict().items()} | {"x._extra_state": None}
    layer_keys.load_model_state(module, state)
    with pytest.raises(layer_keys.LayerKeyError, match="missing \\['bias'\\]"):
        layer_keys.load_model_state(module, {"weight": state["weight"]})
