"""Incompatible or broken checkpoints fail early with messages that name what differs.

Runs in this process at world size 1 (one small checkpoint is written per module).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlp.checkpoint import (
    CheckpointError,
    CheckpointManager,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
)
from rlp.config import CheckpointConfig, OptimConfig, ParallelConfig
from tests.model_helpers import build_tiny_model

pytestmark = pytest.mark.integration


def with_optimizer(model: torch.nn.Module, distributed: bool):  # noqa: ANN201
    from rlp.model import optimizer as mopt

    pcfg = ParallelConfig(use_distributed_optimizer=distributed)
    ddp = mopt.wrap_ddp(model, pcfg)
    return mopt.build_optimizer(ddp, OptimConfig(lr=1e-3), pcfg, torch.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete step-1 checkpoint (model + plain optimizer + EMA) with a known tokenizer hash."""
    root = tmp_path_factory.mktemp("ckpt")
    model = build_tiny_model(seed=1)
    opt = with_optimizer(model, distributed=False)
    ema = [p.detach().clone() for p in model.parameters()]
    manager = CheckpointManager(CheckpointConfig(dir=str(root)))
    return manager.save(
        1,
        model=model,
        optimizer=opt,
        ema_state=ema,
        train_state={"step": 1},
        tokenizer_hash="a" * 64,
    )


def copy_of(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / saved.name
    shutil.copytree(saved, dst)
    return dst


def load(path: Path, **kwargs):  # noqa: ANN003, ANN201
    return CheckpointManager(CheckpointConfig(dir=str(path.parent))).load(path, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(num_layers=3), "num_layers: checkpoint 2 vs model 3"),
        (dict(hidden_size=96, ffn_hidden_size=192), "hidden_size: checkpoint 64 vs model 96"),
        (dict(num_attention_heads=8, num_query_groups=4), "num_attention_heads: checkpoint 4"),
        (dict(tie_embeddings=False), "tie_embeddings: checkpoint True vs model False"),
        (dict(family="qwen3"), "qk_layernorm: checkpoint False vs model True"),
    ],
)
def test_architecture_mismatch_is_named(saved: Path, overrides: dict, named: str) -> None:
    with pytest.raises(IncompatibleCheckpointError, match=named):
        load(saved, model=build_tiny_model(**overrides))


def test_vocab_padding_mismatch_explains_the_fix(saved: Path) -> None:
    model = build_tiny_model(make_vocab_size_divisible_by=512)
    with pytest.raises(IncompatibleCheckpointError, match="make_vocab_size_divisible_by"):
        load(saved, model=model)


def test_tokenizer_hash_mismatch(saved: Path) -> None:
    with pytest.raises(IncompatibleCheckpointError, match="tokenizer differs"):
        load(saved, model=build_tiny_model(), tokenizer_hash="b" * 64)
    loaded = load(saved, model=build_tiny_model(), tokenizer_hash="a" * 64)
    assert loaded.step == 1


def test_optimizer_kind_mismatch(saved: Path) -> None:
    model = build_tiny_model()
    with pytest.raises(IncompatibleCheckpointError, match="distributed_optimizer=False"):
        load(saved, model=model, optimizer=with_optimizer(model, distributed=True))


def test_weights_only_checkpoint_has_no_optimizer(saved: Path, tmp_path: Path) -> None:
    from rlp.model.sharded import save_weights_checkpoint

    model = build_tiny_model()
    out = save_weights_checkpoint(
        tmp_path / "weights", model=model, model_config={}, vocab_size=256
    )
    with pytest.raises(IncompatibleCheckpointError, match="no optimizer state"):
        load(out, model=model, optimizer=with_optimizer(model, distributed=False))
    with pytest.raises(IncompatibleCheckpointError, match="no EMA state"):
        load(out, model=model, ema_state=[torch.zeros_like(p) for p in model.parameters()])


def test_newer_megatron_checkpoint_is_refused(saved: Path, tmp_path: Path) -> None:
    ckpt = copy_of(saved, tmp_path)
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["versions"]["megatron_core"] = "0.19.2"
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleCheckpointError, match="megatron-core 0.19.2"):
        load(ckpt, model=build_tiny_model())


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    ckpt = copy_of(saved, tmp_path)
    shutil.rmtree(ckpt / "rank_states")
    with pytest.raises(DamagedCheckpointError, match="rank_states/rank_00000.pt is missing"):
        load(ckpt, model=build_tiny_model())
    (ckpt / "files.json").unlink()  # a checkpoint from before file lists: found on load
    with pytest.raises(CheckpointError, match="missing per-rank state rank_00000.pt"):
        load(ckpt, model=build_tiny_model())
    shutil.rmtree(ckpt / "dist")
    with pytest.raises(CheckpointError, match="lacks its megatron dist checkpoint"):
        load(ckpt, model=build_tiny_model())
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load(ckpt, model=build_tiny_model())


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(CheckpointError, match="not an rlp checkpoint"):
        load(tmp_path / "stuff", model=build_tiny_model())
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope", model=build_tiny_model())


def test_roundtrip_restores_weights_and_ema(saved: Path) -> None:
    """The fixture's checkpoint itself loads: a seed-1 model and its EMA come back exactly."""
    reference = build_tiny_model(seed=1)
    model = build_tiny_model(seed=2)
    ema = [torch.zeros_like(p) for p in model.parameters()]
    loaded = load(saved.parent, model=model, ema_state=ema)  # a root resolves to the newest
    assert loaded.path == saved and loaded.train_state == {"step": 1}
    for (name, p), q, e in zip(model.named_parameters(), reference.parameters(), ema):
        assert torch.equal(p, q) and torch.equal(e, q), name
