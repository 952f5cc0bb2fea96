"""torchrun --nproc-per-node 2 ddp_steps.py OUT.json

Three AdamW steps of next-token loss on one fixed global batch, in every layout two processes
allow: TP=2; DP=2; DP=2 with the distributed optimizer; TP=2 with the distributed optimizer
(which then shards over a DP group of one). The pytest wrapper runs :func:`run_steps` in a
single process (TP=1, DP=1) as the reference and compares losses and grad norms.

The loop is the trainer's: zero_grad -> forward/backward per micro-batch ->
set_lr(lr_at(step)) -> step (finalize_grads = DP all-reduce, clip, AdamW).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as tdist

from rlp.config import OptimConfig, ParallelConfig
from rlp.dist import DistEnv, init_distributed, shutdown
from rlp.model.build import build_model, resolve_dtype
from rlp.model.logprobs import token_logprobs
from rlp.model.optimizer import build_optimizer, lr_at, set_lr, wrap_ddp, zero_grad
from rlp.model.optimizer import step as optimizer_step
from rlp.model.parallel import initialize_model_parallel
from tests.model_helpers import tiny_model_config

SEED = 97
STEPS = 3
GLOBAL_BATCH, SEQ, VOCAB, MICRO = 8, 33, 256, 2
OPTIM = OptimConfig(
    lr=3e-3, min_lr=3e-4, schedule="cosine", warmup_steps=2, weight_decay=0.1, clip_grad=0.5
)
LAYOUTS = {
    "tp2": ParallelConfig(tp_size=2),
    "dp2": ParallelConfig(tp_size=1),
    "dp2_distopt": ParallelConfig(tp_size=1, use_distributed_optimizer=True),
    "tp2_distopt": ParallelConfig(tp_size=2, use_distributed_optimizer=True),
}


def run_steps(parallel_cfg: ParallelConfig, env: DistEnv) -> dict[str, list[float]]:
    """Train a fresh tiny model for STEPS steps; losses are global token means."""
    state = initialize_model_parallel(parallel_cfg, seed=SEED, env=env)
    model_cfg = tiny_model_config()
    model = build_model(model_cfg, VOCAB, env.device)
    ddp = wrap_ddp(model, parallel_cfg)
    optimizer = build_optimizer(ddp, OPTIM, parallel_cfg, resolve_dtype(model_cfg, env.device))

    batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    rows = GLOBAL_BATCH // state.dp_size
    local = batch[state.dp_rank * rows : (state.dp_rank + 1) * rows]  # this DP rank's share
    n_micro = rows // MICRO

    def global_mean(x: torch.Tensor) -> float:
        x = x.detach().clone()
        tdist.all_reduce(x, group=state.dp_group)
        return x.item() / state.dp_size

    losses, grad_norms, lrs = [], [], []
    for i in range(STEPS):
        zero_grad(ddp, optimizer)
        total = torch.zeros(())
        for m in range(n_micro):
            mb = local[m * MICRO : (m + 1) * MICRO]
            # Per-rank mean over micro-batches; megatron DDP averages over DP ranks.
            loss = -token_logprobs(ddp, mb[:, :-1], mb[:, 1:]).mean() / n_micro
            loss.backward()
            total += loss.detach()
        lr = lr_at(i, OPTIM, max_steps=STEPS)
        set_lr(optimizer, lr)
        applied, grad_norm = optimizer_step(ddp, optimizer)  # finalize_grads + clip + AdamW
        assert applied
        losses.append(global_mean(total))
        grad_norms.append(grad_norm)
        lrs.append(lr)
    with torch.no_grad():
        final = -token_logprobs(ddp, local[:, :-1], local[:, 1:]).mean()
    losses.append(global_mean(final))
    state.destroy()
    return {"losses": losses, "grad_norms": grad_norms, "lrs": lrs}


def main(out_path: str) -> None:
    env = init_distributed(ParallelConfig(tp_size=2))
    torch.set_num_threads(1)
    report = {name: run_steps(cfg, env) for name, cfg in LAYOUTS.items()}
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
