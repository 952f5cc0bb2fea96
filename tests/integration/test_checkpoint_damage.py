"""A damaged newest checkpoint: resume falls back to the newest intact one; tools say so in a line.

Two complete checkpoints (steps 1 and 2, model + optimizer + EMA + tokenizer) are written once per
module in this process; each test damages a copy: a truncated ``dist/*.distcp``, a missing rank
state file. ``load_latest`` must warn naming the damaged directory and load step 1 exactly;
``rlp convert`` and ``rlp eval`` on the damaged step must fail with one ``error:`` line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlp.checkpoint import CheckpointManager, DamagedCheckpointError
from rlp.config import CheckpointConfig
from rlp.model import sharded
from tests.model_helpers import REPO_ROOT, build_tiny_model, tiny_model_config

pytestmark = pytest.mark.integration


def make_tokenizer(out: Path) -> int:
    """A byte-level BPE (ids 0..3: <|endoftext|>, <|pad|>, <think>, </think>); its vocab size."""
    from rlp.tokenizer import train_bpe_tokenizer

    texts = ["the cat sat on the mat and the dog ran to the cat"] * 50
    return train_bpe_tokenizer(texts, 300, out).vocab_size


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[torch.Tensor]]]:
    """Checkpoints of steps 1 and 2 under one root, and the weights each holds."""
    import dataclasses

    from rlp.config import OptimConfig, ParallelConfig
    from rlp.model import optimizer as mopt
    from rlp.model.logprobs import token_logprobs

    base = tmp_path_factory.mktemp("damage")
    vocab = make_tokenizer(base / "tok")
    model = build_tiny_model(seed=1, vocab_size=vocab)
    pcfg = ParallelConfig()
    ddp = mopt.wrap_ddp(model, pcfg)
    opt = mopt.build_optimizer(ddp, OptimConfig(lr=1e-3), pcfg, torch.float32)
    manager = CheckpointManager(CheckpointConfig(dir=str(base / "ckpt"), keep_last=5))
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mopt.zero_grad(ddp, opt)
    (-token_logprobs(ddp, ids[:, :-1], ids[:, 1:]).mean()).backward()
    mopt.finalize_grads(ddp)
    mopt.optimizer_step(opt)  # Adam moments exist: the checkpoint holds a resumable optimizer
    weights = {}
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        weights[step] = [p.detach().clone() for p in model.parameters()]
        manager.save(
            step,
            model=model,
            optimizer=opt,
            ema_state=[p.detach().clone() for p in model.parameters()],
            train_state={"step": step},
            config={
                "model": dataclasses.asdict(tiny_model_config()),
                "tokenizer": {"path": str(base / "tok")},
            },
            tokenizer_dir=base / "tok",
            vocab_size=vocab,
        )
    return base / "ckpt", weights


def damaged_copy(saved: Path, tmp_path: Path, how: str) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    step2 = root / sharded.step_dir_name(2)
    if how == "truncated_distcp":
        shard = sorted((step2 / "dist").glob("*.distcp"))[0]
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "missing_rank_state":
        (step2 / "rank_states" / "rank_00000.pt").unlink()
    return root


def resume(root: Path, vocab: int):  # noqa: ANN201
    from rlp.config import OptimConfig, ParallelConfig
    from rlp.ema import EMA
    from rlp.model import optimizer as mopt

    model = build_tiny_model(seed=9, vocab_size=vocab)
    pcfg = ParallelConfig()
    opt = mopt.build_optimizer(
        mopt.wrap_ddp(model, pcfg), OptimConfig(lr=1e-3), pcfg, torch.float32
    )
    manager = CheckpointManager(CheckpointConfig(dir=str(root), keep_last=5))
    return model, manager.load_latest(model=model, optimizer=opt, ema=EMA(decay=0.5))


@pytest.mark.parametrize("how", ["truncated_distcp", "missing_rank_state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(
    saved: tuple[Path, dict], tmp_path: Path, how: str
) -> None:
    root, weights = saved
    vocab = sharded.read_metadata(root / sharded.step_dir_name(1))["vocab_size"]
    damaged = damaged_copy(root, tmp_path, how)
    with pytest.warns(UserWarning, match=f"checkpoint {damaged / 'step_0000002'} is damaged"):
        model, loaded = resume(damaged, vocab)
    assert loaded.step == 1 and loaded.path == damaged / "step_0000001"
    assert len(loaded.skipped) == 1 and "step_0000002 is damaged" in loaded.skipped[0]
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights[1]))
    assert (damaged / "step_0000002").is_dir(), "the damaged directory is left for inspection"


def test_every_checkpoint_damaged_is_one_clear_error(
    saved: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = saved
    damaged = damaged_copy(root, tmp_path, "missing_rank_state")
    (damaged / "step_0000001" / "dist" / ".metadata").write_bytes(b"\x80\x04garbage")
    vocab = sharded.read_metadata(root / sharded.step_dir_name(1))["vocab_size"]
    with pytest.warns(UserWarning), pytest.raises(DamagedCheckpointError) as err:
        resume(damaged, vocab)
    message = str(err.value)
    assert "\n" not in message and "every checkpoint under" in message
    assert "step_0000001" in message and "step_0000002" in message


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.run(
        [sys.executable, "-m", "rlp.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_convert_and_eval_give_one_line_on_a_damaged_checkpoint(
    saved: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = saved
    damaged = damaged_copy(root, tmp_path, "truncated_distcp")
    step2 = damaged / "step_0000002"
    proc = run_cli("convert", "mcore-to-hf", str(step2), str(tmp_path / "hf"))
    one_error_line(proc, f"checkpoint {step2} is damaged", ".distcp has")
    assert not (tmp_path / "hf").exists()

    data = tmp_path / "bench" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text('{"id": "1", "question": "1+0?", "answer": "1"}\n')
    proc = run_cli(
        "eval",
        "--checkpoint",
        str(damaged),  # a checkpoints root: its newest, the damaged step 2
        "--benchmarks",
        "gsm8k",
        "--data-dir",
        str(tmp_path / "bench"),
        "--out",
        str(tmp_path / "eval"),
        "--backend",
        "megatron",
        "--max-new-tokens",
        "16",
    )
    one_error_line(proc, f"checkpoint {step2} is damaged")
