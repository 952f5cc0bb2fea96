"""The RLP trainer: the only module that composes data, model, sampler, reward, objective and EMA.

One training step (paper Algorithm 1) reads as phases, each timed:

    sample  -> B contexts from the stream, G thoughts each from the behaviour policy (theta_old)
    score   -> S_pred with theta, S_ema with the EMA teacher, behaviour log-probs (no grad)
    loss    -> rewards, group-relative advantages, clipped surrogate on thought tokens
               (+ interleaved next-token loss), backward over micro-batches
    step    -> DP gradient reduction, clipping, AdamW (skipped on non-finite loss/grads)
    ema     -> phi <- tau * phi + (1 - tau) * theta
    log     -> metrics reduced over DP ranks, progress line, JSONL, wandb, sample table

Every part receives its own config section. Megatron is reached only through ``rlp.model``.
"""

from __future__ import annotations

import math
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from rlp import dist
from rlp.checkpoint import CheckpointManager, SignalFlag
from rlp.config import Config, ema_active, save_config
from rlp.data.stream import RLPDataStream
from rlp.ema import EMA
from rlp.heldout import HeldoutEvaluator
from rlp.metrics import MetricsLogger, PhaseTimer, all_ranks_true, reduce_metrics
from rlp.model import build as model_build
from rlp.model import optimizer as model_optim
from rlp.model.logprobs import token_logprobs
from rlp.model.parallel import initialize_model_parallel
from rlp.model.sampler import Sampler
from rlp.objective import combine_losses, ntp_loss, rlp_policy_loss
from rlp.reward import group_advantages, reward_stats, span_reward, span_score
from rlp.rollout import (
    RolloutBatch,
    baseline_sequences,
    generate_rollouts,
    rollout_stats,
    system_prompt_ids,
)
from rlp.scoring import Scores, micro_batches, score_rollouts
from rlp.state import TrainState, capture_rng, restore_rng, seed_everything, tensor_digest
from rlp.tokenizer import Tokenizer, load_tokenizer

REQUEUE_EXIT_CODE = 75
"""Exit code after a signal-triggered checkpoint; ``slurm/*.sbatch`` turns it into a requeue."""


class TrainingError(RuntimeError):
    """A run cannot continue (e.g. too many consecutive non-finite steps)."""


class Trainer:
    """Builds every component from a :class:`Config` and runs the RLP loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.env = dist.init_distributed(cfg.parallel)
        self.ps = initialize_model_parallel(cfg.parallel, cfg.run.seed, self.env)
        self.device = self.env.device
        self.run_dir = Path(cfg.run.output_dir)
        if dist.is_rank0():
            save_config(cfg, self.run_dir / "config.yaml")
        seed_everything(cfg.run.seed + 100 * self.ps.pp_rank)
        self.tokenizer = self._load_tokenizer()
        self.model = model_build.build_model(
            cfg.model,
            self.tokenizer.vocab_size,
            self.device,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
        self.ddp = model_optim.wrap_ddp(self.model, cfg.parallel)
        self.optimizer = model_optim.build_optimizer(
            self.ddp, cfg.optim, cfg.parallel, model_build.resolve_dtype(cfg.model, self.device)
        )
        self.ema = EMA() if ema_active(cfg) else None
        self.sampler = Sampler(max_batch_rows=cfg.rollout.sample_batch_size)
        self.stream = RLPDataStream(
            cfg.data.shards,
            cfg.data,
            dp_rank=self.ps.dp_rank,
            dp_size=self.ps.dp_size,
            seed=cfg.run.seed,
            target_tokens=cfg.reward.target_tokens,
            tokenizer=self.tokenizer,
        )
        self.system_ids = system_prompt_ids(self.tokenizer, cfg.rollout)
        if cfg.objective.rl_weight > 0 and cfg.rollout.max_thought_tokens < 1024:
            dist.print0(
                f"[rlp] warning: rollout.max_thought_tokens={cfg.rollout.max_thought_tokens} < "
                "1024; the paper's Table S.1 shows accuracy collapsing with caps <= 512"
            )
        self.evaluator = None
        if cfg.eval.every:
            self.evaluator = HeldoutEvaluator(
                cfg.eval,
                cfg.data,
                cfg.rollout,
                cfg.reward,
                tokenizer=self.tokenizer,
                dp_rank=self.ps.dp_rank,
                dp_size=self.ps.dp_size,
                micro_batch=cfg.objective.thought_micro_batch,
                device=self.device,
            )
        self.state = TrainState()
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir)
        self._restore_or_init()
        self.signals = None
        if cfg.checkpoint.save_on_signal:
            self.checkpoints.prepare_for_signals()
            self.signals = SignalFlag()
        self._rewards: torch.Tensor | None = None  # last step's rewards, for the sample table
        self.timer = PhaseTimer(torch.cuda.synchronize if self.device.type == "cuda" else None)
        self.logger = MetricsLogger(
            cfg.log,
            self.run_dir,
            enabled=dist.is_rank0(),
            total_steps=cfg.run.max_steps,
            start_step=self.state.step,
            run_name=cfg.run.name,
            config=cfg.to_dict(),
        )
        self.logger.truncate_after(self.state.step)

    # ---------------------------------------------------------------------------------- setup

    def _load_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        if cfg.data.build_demo_if_missing:
            self._ensure_demo_corpus()
        return load_tokenizer(
            cfg.tokenizer.path,
            think_open=cfg.tokenizer.think_open,
            think_close=cfg.tokenizer.think_close,
            eos_token=cfg.tokenizer.eos_token,
        )

    def _ensure_demo_corpus(self) -> None:
        """Build the bundled demo corpus where ``data.shards`` expects it (rank 0, once).

        The corpus directory is the parent of the shards' directory. When ``tokenizer.path`` is
        not that corpus's own ``tokenizer/``, the documents are tokenized with it (e.g. a real
        model's tokenizer) instead of training the small demo BPE.
        """
        from rlp.data.demo import demo_is_built, ensure_demo_corpus

        first = self.cfg.data.shards.split(",")[0]
        demo_dir = Path(first).parent.parent
        if dist.is_rank0() and not demo_is_built(demo_dir):
            own = Path(self.cfg.tokenizer.path).resolve() == (demo_dir / "tokenizer").resolve()
            print(f"[rlp] building the bundled demo corpus into {demo_dir}", flush=True)
            ensure_demo_corpus(demo_dir, tokenizer=None if own else self.cfg.tokenizer.path)
        dist.barrier()

    def _restore_or_init(self) -> None:
        loaded = None
        if self.cfg.checkpoint.resume == "auto":
            loaded = self.checkpoints.load_latest(
                model=self.model, optimizer=self.optimizer, ema=self.ema, config=self.cfg
            )
        if loaded is not None:
            self.state = TrainState.from_dict(loaded.train_state)
            if loaded.same_data_layout:
                self.stream.load_state_dict(self.state.data_cursor)
            else:
                dist.print0(
                    "[rlp] warning: the data-parallel size changed since the checkpoint; the "
                    "data stream restarts from the beginning of its order"
                )
            if loaded.rng_state is not None:
                restore_rng(loaded.rng_state)
            dist.print0(f"[rlp] resumed from {loaded.path} at step {self.state.step}")
        elif self.cfg.checkpoint.init_from:
            self.checkpoints.load_weights(self.cfg.checkpoint.init_from, self.model, self.cfg)
            dist.print0(f"[rlp] initial weights from {self.cfg.checkpoint.init_from}")

    # ---------------------------------------------------------------------------------- loop

    def train(self) -> dict[str, Any]:
        """Run until ``run.max_steps``; returns the end-of-run summary."""
        cfg = self.cfg
        start_step, t_start = self.state.step, time.perf_counter()
        last: dict[str, Any] = {}
        try:
            while self.state.step < cfg.run.max_steps:
                last = self.train_step()
                step = self.state.step
                saved = self.checkpoints.should_save(step) or step == cfg.run.max_steps
                if saved:
                    self.save()
                if self.signals is not None and self.signals.raised_anywhere():
                    if not saved:
                        self.save()
                    dist.print0(f"[rlp] signal {self.signals.name}: checkpointed step {step}")
                    raise SystemExit(REQUEUE_EXIT_CODE)
        finally:
            self.logger.close()
            if self.signals is not None:
                self.signals.restore()
        elapsed = time.perf_counter() - t_start
        summary = self._summary(last, start_step, elapsed)
        self.logger.write_summary(summary)
        return summary

    def train_step(self) -> dict[str, Any]:
        """One RLP step: sample -> score -> loss -> optimizer step -> EMA -> log."""
        cfg, step = self.cfg, self.state.step
        t0 = time.perf_counter()
        rl_on = cfg.objective.rl_weight > 0
        ntp_on = cfg.objective.ntp_weight > 0 and step % cfg.objective.ntp_every == 0
        metrics: dict[str, Any] = {}
        rollout = scores = None
        if rl_on:
            with self.timer("sample"):
                contexts, rollout = self._sample(step)
            with self.timer("score"):
                scores = self._score(contexts, rollout)
        ntp_batch = self.stream.next_ntp_batch(cfg.data.ntp_batch_size) if ntp_on else None
        for _epoch in range(cfg.objective.ppo_epochs):
            with self.timer("loss"):
                metrics.update(self._loss_and_backward(rollout, scores, ntp_batch))
            with self.timer("optim"):
                metrics.update(self._optimizer_step(metrics))
            with self.timer("ema"):
                self._ema_update()
        self.state.step += 1
        self._count_tokens(rollout, ntp_batch)
        if self.evaluator is not None and self.state.step % cfg.eval.every == 0:
            with self.timer("eval"):
                metrics.update(self.evaluator.run(self.model, self.sampler, self._teacher))
        metrics["time/step"] = time.perf_counter() - t0
        with self.timer("log"):
            metrics = self._log(step + 1, metrics, rollout, scores)
        return metrics

    # ---------------------------------------------------------------------------------- phases

    def _sample(self, step: int) -> tuple[list, RolloutBatch]:
        cfg = self.cfg
        contexts = self.stream.next_contexts(cfg.rollout.contexts_per_step)
        # Seed from (run seed, step): reproducible, identical on TP peers, unaffected by resume.
        seed = cfg.run.seed * 1_000_003 + step * 7919
        rollout = generate_rollouts(
            self.model, self.sampler, contexts, self.tokenizer, cfg.rollout, seed
        )
        return contexts, rollout

    def _score(self, contexts: list, rollout: RolloutBatch) -> Scores:
        cfg = self.cfg
        if self.ema is not None and not self.ema.initialized:
            self.ema.initialize(self._params())  # lazy init on the first batch (Alg. 1, line 4)
        scores = score_rollouts(
            self.model,
            rollout,
            baseline_sequences(contexts, self.system_ids, cfg.reward.ema_context),
            self._teacher,
            micro_batch=cfg.objective.thought_micro_batch,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
            with_reference=cfg.objective.kl_coef > 0,
        )
        if scores.consistency > cfg.rollout.logprob_consistency_alert:
            dist.print0(
                f"[rlp] warning: thought log-prob consistency {scores.consistency:.4f} (sampler "
                "vs teacher-forced recompute) is above rollout.logprob_consistency_alert"
            )
        return scores

    def _loss_and_backward(
        self, rollout: RolloutBatch | None, scores: Scores | None, ntp_batch
    ) -> dict[str, Any]:
        cfg = self.cfg
        model_optim.zero_grad(self.ddp, self.optimizer)
        metrics: dict[str, Any] = {}
        rl_loss = torch.zeros(())
        if rollout is not None and scores is not None:
            rewards = span_reward(scores.s_pred, scores.s_ema, cfg.reward)
            groups = rewards.view(rollout.num_contexts, rollout.num_thoughts)
            advantages = group_advantages(groups, cfg.reward).flatten()
            metrics.update(
                reward_stats(
                    groups,
                    advantages.view_as(groups),
                    s_pred=span_score(scores.s_pred, cfg.reward).view_as(groups),
                    s_ema=span_score(scores.s_ema, cfg.reward).view_as(groups),
                )
            )
            metrics["rollout/logprob_consistency"] = scores.consistency
            metrics.update(rollout_stats(rollout, cfg.rollout.max_thought_tokens))
            rl_loss, rl_metrics = self._rl_backward(rollout, scores, advantages)
            metrics.update(rl_metrics)
            self._rewards = rewards
        ntp_value = torch.zeros(())
        if ntp_batch is not None:
            ntp_value = self._ntp_backward(ntp_batch)
            metrics["loss/ntp"] = float(ntp_value)
            metrics["ntp/tokens"] = float(ntp_batch[1].numel())
        total = combine_losses(rl_loss, ntp_value, cfg.objective, self.state.step)
        metrics["loss/rl"] = float(rl_loss)
        metrics["loss/total"] = float(total)
        return metrics

    def _rl_backward(
        self, rollout: RolloutBatch, scores: Scores, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.cfg.objective
        num_rows = rollout.num_rows
        loss_sum = torch.zeros(())
        parts: list[tuple[int, dict[str, float]]] = []
        for i, (rows, inputs, labels) in enumerate(self._micro_batches(rollout.sequences)):
            logp_new = token_logprobs(self.ddp, inputs, labels)
            thought_mask, _ = self._masks(rollout, rows, logp_new.shape[1])
            out = rlp_policy_loss(
                logp_new,
                scores.logp_old[i],
                advantages[rows].to(logp_new.device),
                thought_mask,
                cfg,
                logp_ref=None if scores.logp_ref is None else scores.logp_ref[i],
                reduction="sum",
            )
            # Each DP rank holds the same number of thoughts and Megatron DDP averages gradients
            # over DP, so dividing by the local count gives the global per-thought mean (Eq. 8).
            (cfg.rl_weight * out.loss / num_rows).backward()
            loss_sum += out.loss.detach().cpu()
            parts.append((len(inputs), {k: float(v) for k, v in out.metrics.items()}))
        return loss_sum / num_rows, _merge_micro_batch_metrics(parts)

    def _ntp_backward(self, ntp_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, labels = ntp_batch
        mb = self.cfg.objective.thought_micro_batch
        num_tokens = labels.numel()
        total = torch.zeros(())
        for first in range(0, len(inputs), mb):
            logp = token_logprobs(self.ddp, inputs[first : first + mb], labels[first : first + mb])
            loss_sum, _ = ntp_loss(logp, torch.ones_like(logp, dtype=torch.bool))
            (self.cfg.objective.ntp_weight * loss_sum / num_tokens).backward()
            total += loss_sum.detach()
        return total / num_tokens

    def _optimizer_step(self, metrics: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg.optim
        lr = model_optim.lr_at(self.state.step, cfg, self.cfg.run.max_steps)
        model_optim.set_lr(self.optimizer, lr)
        finite = all_ranks_true(math.isfinite(metrics.get("loss/total", 0.0)))
        ok, grad_norm = False, float("nan")
        if finite:
            ok, grad_norm = model_optim.step(self.ddp, self.optimizer)
        if ok:
            self.state.bad_steps_in_a_row = 0
        else:
            self.state.skipped_steps += 1
            self.state.bad_steps_in_a_row += 1
            dist.print0(
                f"[rlp] step {self.state.step + 1}: non-finite loss or gradients; step skipped "
                f"({self.state.bad_steps_in_a_row} in a row)"
            )
            if self.state.bad_steps_in_a_row >= cfg.max_bad_steps:
                raise TrainingError(
                    f"{cfg.max_bad_steps} consecutive steps had non-finite loss or gradients; "
                    "lower optim.lr, check the data, or raise optim.max_bad_steps"
                )
        return {"optim/lr": lr, "optim/grad_norm": grad_norm, "optim/skipped": float(not ok)}

    def _ema_update(self) -> None:
        if self.ema is not None and self.ema.initialized:
            self.ema.update(self._params(), self.cfg.ema.decay)

    def _log(self, step: int, metrics: dict[str, Any], rollout, scores) -> dict[str, Any]:
        phases = self.timer.reset()
        metrics.update({f"time/{name}": seconds for name, seconds in phases.items()})
        metrics = reduce_metrics(metrics, group=self.ps.dp_group)
        metrics.update(self._throughput(metrics, phases))
        self.logger.log(step, metrics)
        every = self.cfg.log.samples_every
        if rollout is not None and every and step % every == 0:
            self.logger.log_samples(step, self._sample_rows(rollout))
        return metrics

    # ---------------------------------------------------------------------------------- helpers

    def _params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def _teacher(self):
        """Context in which the model computes with the EMA weights (or the policy if none)."""
        if self.ema is None:
            return nullcontext()
        return self.ema.swap_into(self._params())

    def _micro_batches(self, sequences: list[list[int]]):
        return micro_batches(
            sequences, self.cfg.objective.thought_micro_batch, self.tokenizer.pad_id, self.device
        )

    def _masks(self, rollout: RolloutBatch, rows: slice, width: int):
        thought_mask, target_mask = rollout.label_masks(rows, width)
        return thought_mask.to(self.device), target_mask.to(self.device)

    def _count_tokens(self, rollout, ntp_batch) -> None:
        """Add this step's tokens (summed over DP ranks) to the train state."""
        dp = self.ps.dp_size
        if rollout is not None:
            thought = int(rollout.thought_len.sum())
            self.state.contexts_seen += rollout.num_contexts * dp
            self.state.thought_tokens += thought * dp
            self.state.input_tokens += int(rollout.prompt_len.sum()) * dp
        if ntp_batch is not None:
            self.state.ntp_tokens += ntp_batch[1].numel() * dp

    def _throughput(self, metrics: dict[str, Any], phases: dict[str, float]) -> dict[str, Any]:
        """Tokens/s per phase, summed over DP ranks (metrics are DP means at this point)."""
        dp = self.ps.dp_size
        out = {
            "progress/thought_tokens": self.state.thought_tokens,
            "progress/ntp_tokens": self.state.ntp_tokens,
            "progress/input_tokens": self.state.input_tokens,
            "progress/contexts": self.state.contexts_seen,
            "progress/skipped_steps": self.state.skipped_steps,
        }
        thought = metrics.get("thought/tokens", 0.0) * dp
        scored = metrics.get("rollout/sequence_tokens", 0.0) * dp
        ntp = metrics.get("ntp/tokens", 0.0) * dp
        for name, tokens in (("sample", thought), ("score", scored), ("loss", scored + ntp)):
            if phases.get(name):
                out[f"throughput/{name}_tokens_per_s"] = tokens / phases[name]
        out["throughput/tokens_per_s"] = (thought + ntp) / metrics["time/step"]
        return out

    def _sample_rows(self, rollout: RolloutBatch) -> list[dict[str, Any]]:
        decode = self.tokenizer.decode
        rows = []
        for row in range(min(self.cfg.log.num_samples, rollout.num_rows)):
            seq = rollout.sequences[row]
            start = int(rollout.thought_start[row]) + 1
            rows.append(
                {
                    "prefix_tail": decode(seq[max(0, start - 40) : start]),
                    "thought": decode(rollout.thoughts[row]),
                    "target": decode(seq[-rollout.target_len :]),
                    "reward": float(self._rewards[row]),
                }
            )
        return rows

    def save(self) -> None:
        self.state.data_cursor = self.stream.state_dict()
        self.checkpoints.save(
            self.state.step,
            model=self.model,
            optimizer=self.optimizer,
            ema=self.ema,
            train_state=self.state.to_dict(),
            rng_state=capture_rng(),
            config=self.cfg,
            tokenizer_dir=self.tokenizer.path,
        )

    def _summary(self, last: dict[str, Any], start_step: int, elapsed: float) -> dict[str, Any]:
        steps = self.state.step - start_step
        return {
            "steps": self.state.step,
            "steps_this_run": steps,
            "seconds": elapsed,
            "seconds_per_step": elapsed / max(1, steps),
            "thought_tokens": self.state.thought_tokens,
            "ntp_tokens": self.state.ntp_tokens,
            "skipped_steps": self.state.skipped_steps,
            "final": {k: v for k, v in last.items() if isinstance(v, (int, float))},
            "hardware": {
                "device": str(self.device),
                "world_size": self.env.world_size,
                "tp_size": self.ps.tp_size,
                "dp_size": self.ps.dp_size,
                "platform": platform.platform(),
                "torch": torch.__version__,
            },
            "parameters": model_build.num_parameters(self.model),
            "weights_digest": self._digest(self._params()),
            "ema_digest": None if self.ema is None else self._digest(self.ema.params),
        }

    def _digest(self, tensors: list[torch.Tensor]) -> str:
        """One digest over every rank's shards (equal digests = bit-identical weights)."""
        import hashlib

        import torch.distributed as tdist

        local = tensor_digest(tensors)
        parts = [local]
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            parts = [None] * tdist.get_world_size()
            tdist.all_gather_object(parts, local)
        return hashlib.sha256("".join(parts).encode()).hexdigest()


def _merge_micro_batch_metrics(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Combine per-micro-batch loss metrics: counts add, extremes take max/min, rates average
    weighted by rows. The objective's own ``loss/*`` values are replaced by the trainer's."""
    rows = sum(n for n, _ in parts)
    out: dict[str, float] = {}
    for key in parts[0][1]:
        values = [(n, m[key]) for n, m in parts]
        if key.startswith("loss/num_"):
            out[key.replace("loss/", "rl/")] = sum(v for _, v in values)
        elif key in ("loss/rl", "loss/total"):
            continue
        elif key.endswith("max"):
            out[key] = max(v for _, v in values)
        elif key.endswith("min"):
            out[key] = min(v for _, v in values)
        else:
            out[key] = sum(n * v for n, v in values) / rows
    return out
