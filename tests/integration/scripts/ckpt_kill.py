"""python ckpt_kill.py ROOT [--hang-at STEP | --hang-in-writer STEP]

A single-process "training run" that saves a checkpoint after every step (keep_last=2) and prints
``SAVED <step>`` after each, for the kill-during-save tests. With ``--hang-at N`` the save of step
N stops after every rank has written its shards and per-rank state but before ``metadata.json`` and
the ``COMPLETE`` marker (it prints ``HANG`` and sleeps), so the test can SIGKILL it mid-save.
With ``--hang-in-writer N`` the forked dist-checkpoint writer processes of step N's save print
``WRITER <pid>`` and sleep instead of writing (the run waits for them), so the test can SIGKILL the
run while its helper processes are alive. Without either the loop runs until killed at a random
moment.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rlp.checkpoint import CheckpointManager
from rlp.config import CheckpointConfig, OptimConfig, ParallelConfig
from rlp.dist import init_distributed
from rlp.ema import EMA
from rlp.model import optimizer as mopt
from rlp.model import sharded
from rlp.model.build import build_model
from rlp.model.logprobs import token_logprobs
from rlp.model.parallel import initialize_model_parallel
from tests.model_helpers import TINY_VOCAB, tiny_model_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--hang-in-writer", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=10_000)
    args = parser.parse_args()

    pcfg = ParallelConfig()
    env = init_distributed(pcfg)
    initialize_model_parallel(pcfg, seed=3, env=env)
    model = build_model(tiny_model_config(), TINY_VOCAB, env.device)
    ddp = mopt.wrap_ddp(model, pcfg)
    opt = mopt.build_optimizer(ddp, OptimConfig(lr=1e-3), pcfg, torch.float32)
    ema = EMA(decay=0.9)
    manager = CheckpointManager(CheckpointConfig(dir=args.root, save_every=1, keep_last=2))

    original_finalize = sharded.finalize_checkpoint

    def finalize(tmp, final, metadata):  # noqa: ANN001, ANN202
        if metadata["step"] == args.hang_at:
            print("HANG", flush=True)
            time.sleep(3600)  # killed here: shards and rank files written, no marker yet
        return original_finalize(tmp, final, metadata)

    sharded.finalize_checkpoint = finalize

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data
    hang_writers = {"now": False}

    def writer(*a, **kw):  # noqa: ANN002, ANN003, ANN202 - runs in a forked writer process
        if hang_writers["now"]:
            print(f"WRITER {os.getpid()}", flush=True)
            time.sleep(3600)
        return write(*a, **kw)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(writer)
    for step in range(1, args.max_steps + 1):
        hang_writers["now"] = step == args.hang_in_writer
        ids = torch.randint(0, TINY_VOCAB, (2, 17))
        mopt.zero_grad(ddp, opt)
        (-token_logprobs(ddp, ids[:, :-1], ids[:, 1:]).mean()).backward()
        mopt.finalize_grads(ddp)
        mopt.optimizer_step(opt)
        ema.update(list(model.parameters()))
        manager.save(
            step,
            model=model,
            optimizer=opt,
            ema=ema,
            train_state={"step": step, "data_cursor": {"offset": step * 2}},
        )
        print(f"SAVED {step}", flush=True)


if __name__ == "__main__":
    main()
