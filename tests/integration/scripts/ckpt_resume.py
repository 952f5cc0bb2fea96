"""torchrun --nproc-per-node N ckpt_resume.py REPORT.json ACTION [ACTION ...]

Checkpoint round trips and resharding with model + optimizer + EMA + per-rank state. Actions
run in order in one job (megatron's parallel state is rebuilt for each):

* ``save:DIR:TP:OPT`` (OPT = ``plain`` | ``distopt``): train 2 steps on a tiny model, save with
  :class:`rlp.checkpoint.CheckpointManager` under DIR, record the reference (full weights and EMA
  gathered over TP, eval log-probs, step 3's outcome) in DIR/ref.pt; then, in the same layout,
  load into freshly initialised objects and redo step 3 (must be bit-exact).
* ``resume:DIR:TP:OPT``: load DIR's newest checkpoint at this layout and compare with DIR/ref.pt:
  weights and EMA bit-exact, log-probs and step 3 within float tolerance (TP/DP change the
  reduction order).

The global batch of every step is drawn from the global torch RNG (restored from the checkpoint)
and split over DP ranks, so step 3 is the same update at any layout. Rank 0 appends one report
entry per action to REPORT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlp.checkpoint import CheckpointManager
from rlp.config import CheckpointConfig, OptimConfig, ParallelConfig
from rlp.dist import init_distributed, shutdown
from rlp.ema import EMA
from rlp.model import optimizer as mopt
from rlp.model.build import build_model
from rlp.model.hf_bridge import gather_tp_shards, model_arch
from rlp.model.hf_mapping import mcore_shards_to_hf
from rlp.model.logprobs import token_logprobs
from rlp.model.parallel import destroy_model_parallel, initialize_model_parallel
from rlp.state import restore_rng
from tests.model_helpers import tiny_model_config

VOCAB = 250  # padded to 256 at TP 1 and 2: padding rows are part of the checkpoint
GLOBAL_BATCH = 4


class Job:
    """Model, DDP, optimizer and EMA at one layout."""

    def __init__(self, tp: int, opt: str, seed: int, env) -> None:
        destroy_model_parallel()
        self.pcfg = ParallelConfig(tp_size=tp, use_distributed_optimizer=opt == "distopt")
        self.ps = initialize_model_parallel(self.pcfg, seed=seed, env=env)
        self.model_cfg = tiny_model_config(qk_layernorm=True)
        self.model = build_model(self.model_cfg, VOCAB, env.device)
        self.ddp = mopt.wrap_ddp(self.model, self.pcfg)
        self.opt = mopt.build_optimizer(self.ddp, OptimConfig(lr=1e-2), self.pcfg, torch.float32)
        self.ema = EMA(decay=0.5)
        self.eval_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))

    def step(self) -> None:
        ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, 17))  # global RNG: restored on resume
        per = GLOBAL_BATCH // self.ps.dp_size
        local = ids[self.ps.dp_rank * per : (self.ps.dp_rank + 1) * per]
        mopt.zero_grad(self.ddp, self.opt)
        loss = -token_logprobs(self.ddp, local[:, :-1], local[:, 1:]).mean()
        loss.backward()
        mopt.finalize_grads(self.ddp)
        assert mopt.optimizer_step(self.opt).applied
        self.ema.update(list(self.model.parameters()))

    def eval_logprobs(self) -> torch.Tensor:
        with torch.no_grad():
            return token_logprobs(self.model, self.eval_ids[:, :-1], self.eval_ids[:, 1:])

    def full_weights(self, ema: bool = False) -> dict[str, torch.Tensor] | None:
        """TP-gathered HF-form weights (layout-independent) on rank 0."""
        if ema:
            with self.ema.swap_into(list(self.model.parameters())):
                shards = gather_tp_shards(self.model)
        else:
            shards = gather_tp_shards(self.model)
        if shards is None:
            return None
        return mcore_shards_to_hf(shards, model_arch(self.model), VOCAB)

    def manager(self, root: Path) -> CheckpointManager:
        return CheckpointManager(CheckpointConfig(dir=str(root), save_every=1, keep_last=2))

    def load(self, root: Path):
        loaded = self.manager(root).load_latest(model=self.model, optimizer=self.opt, ema=self.ema)
        restore_rng(loaded.rng_state)
        return loaded


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def save_action(root: Path, tp: int, opt: str, env) -> dict:
    job = Job(tp, opt, seed=11, env=env)
    for _ in range(2):
        job.step()
    cursor = {"dp_rank": job.ps.dp_rank, "offset": 100 + job.ps.dp_rank}
    job.manager(root).save(
        2,
        model=job.model,
        optimizer=job.opt,
        ema=job.ema,
        train_state={"step": 2, "data_cursor": cursor},
        config={"model": vars(job.model_cfg)},
    )
    ref = {
        "weights": job.full_weights(),
        "ema": job.full_weights(ema=True),
        "lp_save": job.eval_logprobs(),
    }
    job.step()
    ref.update(
        lp_after=job.eval_logprobs(),
        weights_after=job.full_weights(),
        ema_after=job.full_weights(ema=True),
    )
    if env.rank == 0:
        torch.save(ref, root / "ref.pt")

    # Same layout, fresh objects with other initial weights: everything must be bit-exact.
    fresh = Job(tp, opt, seed=99, env=env)
    loaded = fresh.load(root)
    report = {
        "same_layout": loaded.same_layout,
        "step": loaded.step,
        "cursor_ok": loaded.train_state["data_cursor"] == cursor,
        "lp_save_exact": torch.equal(fresh.eval_logprobs(), ref["lp_save"]),
    }
    fresh.step()
    report["lp_after_exact"] = torch.equal(fresh.eval_logprobs(), ref["lp_after"])
    w, e = fresh.full_weights(), fresh.full_weights(ema=True)
    if env.rank == 0:
        report["weights_after_exact"] = max_diff(w, ref["weights_after"]) == 0.0
        report["ema_after_exact"] = max_diff(e, ref["ema_after"]) == 0.0
    return report


def resume_action(root: Path, tp: int, opt: str, env) -> dict:
    ref = torch.load(root / "ref.pt", weights_only=True)
    job = Job(tp, opt, seed=77, env=env)
    before = job.eval_logprobs()
    loaded = job.load(root)
    report = {
        "same_layout": loaded.same_layout,
        "step": loaded.step,
        "saved_layout": loaded.metadata["layout"],
        "lp_changed_by_load": (before - ref["lp_save"]).abs().max().item(),
        "lp_save_diff": (job.eval_logprobs() - ref["lp_save"]).abs().max().item(),
    }
    w, e = job.full_weights(), job.full_weights(ema=True)
    job.step()
    report["lp_after_diff"] = (job.eval_logprobs() - ref["lp_after"]).abs().max().item()
    wa = job.full_weights()
    if env.rank == 0:
        report["weights_exact"] = max_diff(w, ref["weights"]) == 0.0
        report["ema_exact"] = max_diff(e, ref["ema"]) == 0.0
        report["weights_after_diff"] = max_diff(wa, ref["weights_after"])
    return report


def main() -> None:
    out = Path(sys.argv[1])
    env = init_distributed(ParallelConfig())
    report = json.loads(out.read_text()) if out.exists() else {}
    for action in sys.argv[2:]:
        kind, root, tp, opt = action.split(":")
        fn = save_action if kind == "save" else resume_action
        entry = fn(Path(root), int(tp), opt, env)
        if env.rank == 0:
            report[f"{kind}:{Path(root).name}:w{env.world_size}:tp{tp}:{opt}"] = entry
    if env.rank == 0:
        out.write_text(json.dumps(report, indent=2))
    destroy_model_parallel()
    shutdown()


if __name__ == "__main__":
    main()
