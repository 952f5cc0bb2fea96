"""A plain next-token-prediction loop built from rlp's parts, without the trainer.

Reference for "objective.rl_weight=0 is plain continued pretraining": same model init, optimizer,
LR schedule and NTP data stream as `rlp train`, no rollouts, no EMA. Prints the per-step mean NLL
as a JSON list on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from rlp import dist
from rlp.config import load_config
from rlp.data.stream import RLPDataStream
from rlp.layout import plan_micro_batches, sequence_groups
from rlp.model import build, optimizer
from rlp.model.logprobs import packed_logprobs
from rlp.model.parallel import initialize_model_parallel
from rlp.state import seed_everything
from rlp.tokenizer import load_tokenizer


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    env = dist.init_distributed(cfg.parallel)
    ps = initialize_model_parallel(cfg.parallel, cfg.run.seed, env)
    seed_everything(cfg.run.seed)
    tok = load_tokenizer(cfg.tokenizer.path)
    model = build.build_model(cfg.model, tok.vocab_size, env.device)
    ddp = optimizer.wrap_ddp(model, cfg.parallel)
    opt = optimizer.build_optimizer(
        ddp, cfg.optim, cfg.parallel, build.resolve_dtype(cfg.model, env.device)
    )
    stream = RLPDataStream(
        cfg.data.shards,
        cfg.data,
        dp_rank=ps.dp_rank,
        dp_size=ps.dp_size,
        seed=cfg.run.seed,
        target_tokens=cfg.reward.target_tokens,
        tokenizer=tok,
    )
    losses = []
    for step in range(cfg.run.max_steps):
        inputs, labels = stream.next_ntp_batch(cfg.data.ntp_batch_size)
        optimizer.zero_grad(ddp, opt)
        total = 0.0
        # The model's log-prob head on causal rows, in token-budget micro-batches.
        sequences = torch.cat([inputs, labels[:, -1:]], dim=1).tolist()
        budget = cfg.objective.max_tokens_per_micro_batch
        for mb in plan_micro_batches(sequence_groups(sequences), budget, share_prefix=False):
            index = mb.labels[0]
            (logp,) = packed_logprobs(
                ddp, mb.input_ids, mb.position_ids, None, [(index.position, index.token, 1.0)]
            )
            loss = -logp.sum() / labels.numel()
            loss.backward()
            total += float(loss)
        optimizer.set_lr(opt, optimizer.lr_at(step, cfg.optim, cfg.run.max_steps))
        applied, _ = optimizer.step(ddp, opt)
        assert applied
        losses.append(total)
    print(json.dumps(losses))
    stream.close()
    dist.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
