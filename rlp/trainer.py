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

import json
import math
import os
import platform
import re
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from rlp import dist
from rlp.benefit import benefit_metrics
from rlp.checkpoint import CheckpointManager, SignalFlag
from rlp.config import Config, ema_active, save_config
from rlp.data.stream import RLPDataStream
from rlp.ema import EMA
from rlp.heldout import (
    HeldoutEvaluator,
    HeldoutLog,
    filler_token_ids,
    heldout_reading,
    score_controls,
)
from rlp.layout import plan_micro_batches, plan_tokens, sequence_groups
from rlp.metrics import MetricsLogger, PhaseTimer, all_ranks_true, reduce_metrics
from rlp.model import build as model_build
from rlp.model import optimizer as model_optim
from rlp.model.engine import engine_from_config
from rlp.model.forward import tree_attention_supported
from rlp.model.parallel import initialize_model_parallel
from rlp.objective import combine_losses, ntp_active, ntp_loss, rl_active, rlp_policy_loss
from rlp.reward import group_advantages, reward_stats, span_reward, span_score
from rlp.rollout import (
    THOUGHT_LABELS,
    RolloutBatch,
    baseline_sequences,
    check_sequence_budget_with,
    generate_rollouts,
    policy_temperature,
    rollout_stats,
    system_prompt_ids,
)
from rlp.rundir import RunDirectoryError, RunLock, existing_records, set_aside
from rlp.scoring import Scores, micro_batch_logprobs, score_rollouts
from rlp.state import TrainState, capture_rng, restore_rng, seed_everything, tensor_digest
from rlp.tokenizer import Tokenizer, load_tokenizer

REQUEUE_EXIT_CODE = 75
"""Exit code after a signal-triggered checkpoint; ``slurm/*.sbatch`` turns it into a requeue."""


class TrainingError(RuntimeError):
    """A run cannot continue (e.g. too many consecutive non-finite steps)."""


class StopSignals(SignalFlag):
    """SIGTERM/SIGUSR1 (SLURM pre-emption) and SIGINT (Ctrl-C): checkpoint after the current step
    and stop; a second Ctrl-C interrupts at once (``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        super().__init__((signal.SIGTERM, signal.SIGUSR1, signal.SIGINT))

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            # os.write, not print: a handler may run while the main thread is inside print.
            os.write(2, b"\n[rlp] Ctrl-C: checkpointing after this step (again: stop at once)\n")
        super()._handler(signum, frame)


def demo_location(shards: str) -> Path | None:
    """The demo corpus directory DIR when ``data.shards`` is the bundled demo's own pattern
    ``DIR/shards/demo-{000000..000003}.tar`` and DIR's name starts with ``demo`` (``data/demo``,
    ``data/demo_smollm2``); None for anything else (the demo is never built elsewhere)."""
    from rlp.data.demo import NUM_SHARDS, SHARD_PREFIX

    pattern = f"/shards/{SHARD_PREFIX}-{{000000..{NUM_SHARDS - 1:06d}}}.tar"
    if not shards.endswith(pattern):
        return None
    root = shards[: -len(pattern)]
    if not root or re.search(r"[,{}*?\[\]]|^pipe:|://", root):
        return None
    path = Path(os.path.expanduser(root))
    return path if path.name.startswith("demo") else None


def _agree(error: str | None) -> None:
    """Collective: raise :class:`TrainingError` on every rank when rank 0 found ``error``."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        box = [error]
        tdist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainingError(error)


class Trainer:
    """Builds every component from a :class:`Config` and runs the RLP loop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if cfg.run.threads is not None:
            torch.set_num_threads(cfg.run.threads)
        self.env = dist.init_distributed(cfg.parallel)
        self.ps = initialize_model_parallel(cfg.parallel, cfg.run.seed, self.env)
        self.device = self.env.device
        self.run_dir = Path(cfg.run.output_dir)
        self.lock = RunLock(self.run_dir)
        self._claim_run_dir()  # before anything is written: one writer per run directory
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
        self.ema = EMA.from_config(cfg.ema) if ema_active(cfg) else None  # fp32 whatever the model
        self.engine = engine_from_config(
            self.model, cfg.rollout, ddp=self.ddp, optimizer=self.optimizer
        )
        self.stream = RLPDataStream(
            cfg.data.shards,
            cfg.data,
            dp_rank=self.ps.dp_rank,
            dp_size=self.ps.dp_size,
            seed=cfg.run.seed,
            target_tokens=cfg.reward.target_tokens,
            tokenizer=self.tokenizer,
            # One reader per TP group; the peers get each step's token ids from it.
            tp_group=self.ps.tp_group if self.ps.tp_size > 1 else None,
            device=self.device,
        )
        self.system_ids = system_prompt_ids(self.tokenizer, cfg.rollout)
        check_sequence_budget_with(self.tokenizer, cfg)  # with the real system prompt length
        self._packed = tree_attention_supported(self.model)  # else one causal row per thought
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
                max_tokens=cfg.objective.max_tokens_per_micro_batch,
                device=self.device,
                benefit_cfg=cfg.benefit,
                tp_group=self.ps.tp_group if self.ps.tp_size > 1 else None,
            )
        self.state = TrainState()
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir)
        self._restore_or_init()
        self.heldout_log = HeldoutLog(self.run_dir / "heldout.jsonl", enabled=dist.is_rank0())
        self.heldout_log.truncate_after(self.state.step)  # a resume replays later steps
        self.filler_ids = (
            filler_token_ids(self.tokenizer, cfg.benefit.filler) if cfg.benefit.per_step else None
        )
        if dist.is_rank0():  # only once a resume was accepted: a refused one keeps the old file
            save_config(cfg, self.run_dir / "config.yaml")
        self.signals = None
        if cfg.checkpoint.save_on_signal:
            self.checkpoints.prepare_for_signals()
            self.signals = StopSignals()
        self._rewards: torch.Tensor | None = None  # last step's rewards, for the sample table
        self._advantages: torch.Tensor | None = None  # and advantages
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

    def _claim_run_dir(self) -> None:
        """Rank 0 locks the run directory and applies ``checkpoint.resume=never``: a directory
        that holds a run is refused unless ``run.overwrite`` (then the old run is moved aside).
        Every rank raises the same :class:`TrainingError` when rank 0 cannot go on."""
        cfg, error = self.cfg, None
        if dist.is_rank0():
            try:
                self.lock.acquire()
                found = existing_records(self.run_dir, cfg.checkpoint.dir)
                if cfg.checkpoint.resume == "never" and found:
                    if not cfg.run.overwrite:
                        raise RunDirectoryError(
                            f"{self.run_dir} already holds a run ({', '.join(found)}) that "
                            "checkpoint.resume=never would overwrite; continue it with "
                            "checkpoint.resume=auto, start again with run.overwrite=true (rlp "
                            "train --overwrite; the old run moves to replaced_<time>/ inside it), "
                            "or choose another run.output_dir"
                        )
                    moved = set_aside(self.run_dir, cfg.checkpoint.dir)
                    print(f"[rlp] run.overwrite: the previous run was moved to {moved}", flush=True)
            except RunDirectoryError as exc:
                error = str(exc)
        _agree(error)

    def _load_tokenizer(self) -> Tokenizer:
        cfg = self.cfg
        self._ensure_demo_corpus()
        return load_tokenizer(
            cfg.tokenizer.path,
            think_open=cfg.tokenizer.think_open,
            think_close=cfg.tokenizer.think_close,
            eos_token=cfg.tokenizer.eos_token,
        )

    def _ensure_demo_corpus(self) -> None:
        """Check that the local shards of ``data.shards`` exist; build the bundled demo corpus
        (rank 0, once) only when ``data.build_demo_if_missing`` is set and ``data.shards`` is the
        demo's own pattern (:func:`demo_location`). Anything else missing is the one-line error
        "shards do not exist: URL" (nothing is written anywhere else).

        When ``tokenizer.path`` is not the demo corpus's own ``tokenizer/``, the documents are
        tokenized with it (e.g. a real model's tokenizer) instead of training the small demo BPE.
        """
        from rlp.data.demo import demo_is_built, ensure_demo_corpus
        from rlp.data.shards import expand_shard_urls, is_local

        data = self.cfg.data
        demo_dir = demo_location(data.shards) if data.build_demo_if_missing else None
        if demo_dir is not None:
            if dist.is_rank0() and not demo_is_built(demo_dir):
                own = Path(self.cfg.tokenizer.path).resolve() == (demo_dir / "tokenizer").resolve()
                print(f"[rlp] building the bundled demo corpus into {demo_dir}", flush=True)
                ensure_demo_corpus(demo_dir, tokenizer=None if own else self.cfg.tokenizer.path)
            dist.barrier()
        try:
            urls = expand_shard_urls(data.shards)
        except ValueError as exc:
            raise TrainingError(str(exc)) from None
        missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
        if missing and (data.on_corrupt == "error" or len(missing) == len(urls)):
            more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
            raise TrainingError(
                f"shards do not exist: {missing[0]}{more}; fix data.shards, or build them (rlp "
                "data build / rlp data demo)"
            )

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
            for problem in loaded.skipped:  # newer checkpoints whose files are damaged
                dist.print0(f"[rlp] warning: {problem}; skipped it")
            dist.print0(f"[rlp] resumed from {loaded.path} at step {self.state.step}")
        elif self.cfg.checkpoint.init_from:
            self.checkpoints.load_weights(self.cfg.checkpoint.init_from, self.model, self.cfg)
            dist.print0(f"[rlp] initial weights from {self.cfg.checkpoint.init_from}")

    # ---------------------------------------------------------------------------------- loop

    def train(self) -> dict[str, Any]:
        """Run until ``run.max_steps``; returns the end-of-run summary.

        A signal (SIGTERM/SIGUSR1/SIGINT) checkpoints after the current step and exits with
        :data:`REQUEUE_EXIT_CODE`, except on the final step, which finishes the run. A run that
        had already finished keeps its ``summary.json``.
        """
        cfg = self.cfg
        start_step, t_start = self.state.step, time.perf_counter()
        last: dict[str, Any] = {}
        try:
            if start_step >= cfg.run.max_steps:
                return self._already_finished()
            self._heldout_at(0)  # before the first update (no-op when resumed or eval off)
            while self.state.step < cfg.run.max_steps:
                last = self.train_step()
                step = self.state.step
                final = step == cfg.run.max_steps
                saved = self.checkpoints.should_save(step) or final
                if saved:
                    self.save()
                if self.signals is not None and self.signals.raised_anywhere():
                    if final:
                        dist.print0(f"[rlp] signal {self.signals.name} on the final step: done")
                        break
                    if not saved:
                        self.save()
                    dist.print0(
                        f"[rlp] signal {self.signals.name}: checkpointed step {step}; the same "
                        "command resumes from it"
                    )
                    raise SystemExit(REQUEUE_EXIT_CODE)
            elapsed = time.perf_counter() - t_start
            self._heldout_at(self.state.step)  # after the last step, unless evaluated there
            summary = self._summary(last, start_step, elapsed)
            self.logger.write_summary(summary)
            for line in summary["heldout"]["reading"]:
                dist.print0(f"[rlp] {line}")
            return summary
        finally:
            self.logger.close()
            if self.signals is not None:
                self.signals.restore()
            self.lock.release()

    def _already_finished(self) -> dict[str, Any]:
        """Called when the resumed state is at ``run.max_steps``: the run's ``summary.json`` is
        kept (written again only if missing, e.g. after a crash right after the last save)."""
        path = self.run_dir / "summary.json"
        fresh = self._summary(self._last_logged(), self.state.step, 0.0)  # collective (digest)
        try:
            kept = json.loads(path.read_text())
        except (OSError, ValueError):
            kept = None
        if kept is None:
            self.logger.write_summary(fresh)
        dist.print0(
            f"[rlp] {self.run_dir} already finished at step {self.state.step} (run.max_steps); "
            "nothing to train, its records are kept (raise run.max_steps to train on)"
        )
        return kept if kept is not None else fresh

    def _last_logged(self) -> dict[str, Any]:
        """The last ``metrics.jsonl`` row of the current step (for a summary without a step)."""
        from rlp.monitor import last_json_line

        row, _ = last_json_line(self.run_dir / "metrics.jsonl")
        if row is None or row.get("step") != self.state.step:
            return {}
        return {k: v for k, v in row.items() if k != "step"}

    def train_step(self) -> dict[str, Any]:
        """One RLP step: sample -> score -> loss -> optimizer step -> EMA -> log."""
        cfg, step = self.cfg, self.state.step
        t0 = time.perf_counter()
        rl_on = rl_active(cfg.objective)
        ntp_on = ntp_active(cfg.objective, step)
        metrics: dict[str, Any] = {}
        rollout = scores = None
        if rl_on:
            with self.timer("sample"):
                contexts, rollout = self._sample(step)
            with self.timer("score"):
                scores = self._score(contexts, rollout)
            if self.filler_ids is not None:
                with self.timer("benefit"):
                    metrics.update(self._thought_benefit(rollout, scores))
        ntp_batch = self.stream.next_ntp_batch(cfg.data.ntp_batch_size) if ntp_on else None
        for epoch in range(cfg.objective.ppo_epochs):
            with self.timer("loss"):
                epoch_metrics = self._loss_and_backward(rollout, scores, ntp_batch)
            with self.timer("optim"):
                epoch_metrics.update(self._optimizer_step(epoch_metrics))
            with self.timer("ema"):
                self._ema_update(applied=epoch_metrics["optim/skipped"] == 0.0)
            metrics.update(epoch_metrics)  # unsuffixed: the last epoch
            if cfg.objective.ppo_epochs > 1:
                metrics.update(_epoch_metrics(epoch_metrics, epoch))
        self.state.step += 1
        self._count_tokens(rollout, ntp_batch)
        if self.evaluator is not None and self.state.step % cfg.eval.every == 0:
            with self.timer("eval"):
                metrics.update(self._heldout(self.state.step))
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
        rollout = generate_rollouts(self.engine, contexts, self.tokenizer, cfg.rollout, seed)
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
            max_tokens=cfg.objective.max_tokens_per_micro_batch,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
            temperature=policy_temperature(cfg.rollout),
            packed=self._packed,
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
        """Backpropagate :func:`rlp.objective.combine_losses` of the step, micro-batch by
        micro-batch (each its ``partial`` share with the step's global normalisers)."""
        cfg = self.cfg
        model_optim.zero_grad(self.ddp, self.optimizer)
        metrics: dict[str, Any] = {}
        rl_loss = ntp_value = None
        if rollout is not None and scores is not None:
            rewards = span_reward(scores.s_pred, scores.s_ema, cfg.reward)
            groups = rewards.view(rollout.num_contexts, rollout.num_thoughts)
            valid = rollout.valid.view_as(groups)
            advantages = group_advantages(groups, cfg.reward, valid).flatten()
            metrics.update(
                reward_stats(
                    groups,
                    advantages.view_as(groups),
                    s_pred=span_score(scores.s_pred, cfg.reward).view_as(groups),
                    s_ema=span_score(scores.s_ema, cfg.reward).view_as(groups),
                    valid_mask=valid,
                )
            )
            metrics["rollout/logprob_consistency"] = scores.consistency
            metrics["rollout/forward_tokens"] = float(plan_tokens(scores.plan))  # trees, shared
            metrics.update(rollout_stats(rollout, cfg.rollout.max_thought_tokens))
            rl_loss, rl_metrics = self._rl_backward(rollout, scores, advantages)
            metrics.update(rl_metrics)
            metrics["loss/rl"] = float(rl_loss)
            self._rewards = rewards
            self._advantages = advantages
        if ntp_batch is not None:
            ntp_value = self._ntp_backward(ntp_batch)
            metrics["loss/ntp"] = float(ntp_value)
            metrics["ntp/tokens"] = float(ntp_batch[1].numel())
        total = combine_losses(rl_loss, ntp_value, cfg.objective, self.state.step)
        metrics["loss/total"] = float(total)
        return metrics

    def _rl_backward(
        self, rollout: RolloutBatch, scores: Scores, advantages: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The clipped surrogate on the scoring plan: sum_i L_i / N per micro-batch, N = thoughts
        with a gradient token over all DP ranks divided by the DP size (megatron DDP averages
        gradients over DP), so the accumulated gradient is that of the global per-thought mean
        (Eq. 8). Returns the rank-local mean loss and merged metrics."""
        cfg, step = self.cfg.objective, self.state.step
        counts = [count_thoughts_in(mb) for mb in scores.plan]
        local = sum(counts)
        normaliser = self._dp_mean(float(local))
        loss_sum = torch.zeros(())
        parts: list[dict[str, float]] = []
        for i, mb in enumerate(scores.plan):
            if not counts[i]:
                continue  # no gradient token in this micro-batch (invalid thoughts only)
            (logp,) = micro_batch_logprobs(
                self.ddp, mb, self.device, [(THOUGHT_LABELS, scores.temperature)]
            )
            on = mb.to(self.device)
            logp_new, mask = on.padded(logp, THOUGHT_LABELS)
            logp_old, _ = on.padded(scores.logp_old[i].to(self.device), THOUGHT_LABELS)
            logp_ref = None
            if scores.logp_ref is not None:
                logp_ref, _ = on.padded(scores.logp_ref[i].to(self.device), THOUGHT_LABELS)
            out = rlp_policy_loss(
                logp_new,
                logp_old,
                advantages[mb.branches].to(self.device),
                mask,
                cfg,
                logp_ref=logp_ref,
                reduction="sum",
            )
            combine_losses(out.loss / normaliser, None, cfg, step, partial=True).backward()
            loss_sum += out.loss.detach().cpu()
            parts.append({k: float(v) for k, v in out.metrics.items()})
        return loss_sum / max(1, local), _merge_micro_batch_metrics(parts)

    def _ntp_backward(self, ntp_batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Next-token loss over causal rows in token-budget micro-batches; returns the mean NLL."""
        cfg, step = self.cfg.objective, self.state.step
        num_tokens = ntp_batch[1].numel()
        total = torch.zeros(())
        for mb in self._micro_batches(ntp_batch):
            (logp,) = micro_batch_logprobs(self.ddp, mb, self.device, [(0, 1.0)])
            loss_sum, _ = ntp_loss(logp.view(1, -1), torch.ones(1, logp.numel(), dtype=torch.bool))
            combine_losses(None, loss_sum / num_tokens, cfg, step, partial=True).backward()
            total += loss_sum.detach().cpu()
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

    def _ema_update(self, applied: bool) -> None:
        """phi <- tau phi + (1 - tau) theta after an applied optimizer step; a skipped
        (non-finite) step leaves phi as it is (theta did not change)."""
        if applied and self.ema is not None and self.ema.initialized:
            self.ema.update(self._params(), self.cfg.ema.decay)

    def _log(self, step: int, metrics: dict[str, Any], rollout, scores) -> dict[str, Any]:
        phases = self.timer.reset()
        metrics.update({f"time/{name}": seconds for name, seconds in phases.items()})
        metrics = reduce_metrics(metrics, group=self.ps.dp_group)
        metrics.update(self._throughput(metrics, phases))
        self.logger.log(step, metrics)
        every = self.cfg.log.samples_every
        if rollout is not None and scores is not None and every and step % every == 0:
            self.logger.log_samples(step, self._sample_rows(rollout, scores))
        return metrics

    # ------------------------------------------------- thought benefit and held-out evaluation
    # Diagnostics only (nothing here changes the update); formulas in rlp/benefit.py and
    # docs/method.md "Thought benefit".

    def _thought_benefit(self, rollout: RolloutBatch, scores: Scores) -> dict[str, float]:
        """``thought/benefit``, ``thought/filler_benefit``, ... for this step's contexts, with the
        scoring weights theta: S_pred against a no-thought and a same-length filler sequence."""
        cfg = self.cfg
        s_none, s_filler = score_controls(
            self.model,
            rollout,
            self.filler_ids,
            cfg.reward,
            max_tokens=cfg.objective.max_tokens_per_micro_batch,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
        )
        s_pred = span_score(scores.s_pred, cfg.reward).view(rollout.num_contexts, -1)
        metrics = benefit_metrics(s_pred, s_none, s_filler)
        return {f"thought/{key}": value for key, value in metrics.items()}

    def _heldout(self, step: int) -> dict[str, Any]:
        """Run the held-out evaluation on the current weights and record it in heldout.jsonl."""
        # Before the EMA's lazy init (step 0) phi would be a copy of theta: score with theta.
        # A run whose EMA is never initialised (RL off) has no teacher to report.
        ema_ready = self.ema is None or self.ema.initialized
        teacher = self._teacher if ema_ready else (nullcontext if step == 0 else None)
        metrics = reduce_metrics(
            self.evaluator.run(self.model, self.engine, teacher), group=self.ps.dp_group
        )
        se = "eval/thought/benefit_over_filler_se"  # DP ranks hold equal shares of the contexts
        if metrics.get(se) is not None:
            metrics[se] /= math.sqrt(self.ps.dp_size)
        self.heldout_log.append(step, metrics, _gather_lists(self.evaluator.per_context, self.ps))
        return metrics

    def _heldout_at(self, step: int) -> None:
        """Evaluate at ``step`` unless there is no evaluator, the current step is another one, or
        heldout.jsonl already has that step (a resumed or already evaluated run)."""
        if self.evaluator is None or self.state.step != step:
            return
        done = self.heldout_log.has(step) if dist.is_rank0() else False
        if not _broadcast_flag(done):
            self._heldout(step)

    def _heldout_summary(self) -> dict[str, Any]:
        """First and last held-out evaluation of the run, and the summary lines reading them."""
        rows = self.heldout_log.rows() if self.evaluator is not None and dist.is_rank0() else []
        if not rows:
            return {"start": None, "end": None, "reading": []}
        first, last = (
            {k: v for k, v in r.items() if k != "per_context"} for r in (rows[0], rows[-1])
        )
        return {"start": first, "end": last, "reading": heldout_reading(rows[0], rows[-1])}

    # ---------------------------------------------------------------------------------- helpers

    def _params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def _teacher(self):
        """Context in which the model computes with the EMA weights (or the policy if none)."""
        if self.ema is None:
            return nullcontext()
        return self.ema.swap_into(self._params())

    def _micro_batches(self, ntp_batch: tuple[torch.Tensor, torch.Tensor]):
        """Token-budget micro-batches of causal NTP rows (label set 0 = every next token)."""
        inputs, labels = ntp_batch
        sequences = torch.cat([inputs, labels[:, -1:]], dim=1).tolist()
        return plan_micro_batches(
            sequence_groups(sequences),
            self.cfg.objective.max_tokens_per_micro_batch,
            share_prefix=False,
            pad_id=self.tokenizer.pad_id,
        )

    def _dp_mean(self, value: float) -> float:
        """``value`` summed over the data-parallel ranks, divided by their number."""
        import torch.distributed as tdist

        if self.ps.dp_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, group=self.ps.dp_group)
        return float(t.item()) / self.ps.dp_size

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

    def _sample_rows(self, rollout: RolloutBatch, scores: Scores) -> list[dict[str, Any]]:
        """Rows of ``samples.jsonl``: decoded text for reading, token ids and scores for audit.

        ``sequence_ids`` is the scored sequence (prompt + thought [+ </think>] + separator +
        target; its last ``len(target_ids)`` tokens are the target) and ``baseline_ids`` the EMA's
        no-thought sequence, so S_pred / S_ema (per target token, before the span reduction),
        the reward and the advantage can be recomputed from a checkpoint. Rank 0's rows.
        """
        cfg, decode = self.cfg, self.tokenizer.decode
        head = self.system_ids if cfg.reward.ema_context == "prompt" else []
        k, count = rollout.target_len, rollout.num_rows
        if not cfg.log.all_samples:
            count = min(count, cfg.log.num_samples)
        rows = []
        for row in range(count):
            seq = list(rollout.sequences[row])
            start = int(rollout.thought_start[row]) + 1  # index of the first thought token
            prefix = seq[len(self.system_ids) : start - 1]  # without system prompt and <think>
            rows.append(
                {
                    "context": row // rollout.num_thoughts,
                    "thought_index": row % rollout.num_thoughts,
                    "prefix_tail": decode(seq[max(0, start - 40) : start]),
                    "thought": decode(rollout.thoughts[row]),
                    "target": decode(seq[-k:]),
                    "reward": float(self._rewards[row]),
                    "advantage": float(self._advantages[row]),
                    "s_pred": [float(x) for x in scores.s_pred[row]],
                    "s_ema": [float(x) for x in scores.s_ema[row]],
                    "thought_ids": list(rollout.thoughts[row]),
                    "target_ids": seq[-k:],
                    "sequence_ids": seq,
                    "baseline_ids": [*head, *prefix, *seq[-k:]],
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
            "files": self._files(),
            "heldout": self._heldout_summary(),
        }

    def _files(self) -> dict[str, str | None]:
        """Absolute paths of what the run wrote (None: not written)."""
        run = self.run_dir.resolve()
        latest = self.checkpoints.latest_path()

        def present(name: str) -> str | None:
            return str(run / name) if (run / name).is_file() else None

        return {
            "run_dir": str(run),
            "config": present("config.yaml"),
            "metrics": present("metrics.jsonl"),
            "samples": present("samples.jsonl"),
            "summary": str(run / "summary.json"),
            "checkpoint": str(latest.resolve()) if latest is not None else None,
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


def count_thoughts_in(mb: Any) -> int:
    """Thoughts of a scoring micro-batch with at least one gradient token."""
    return sum(1 for n in mb.labels[THOUGHT_LABELS].counts if n)


_THOUGHT_MEANS = ("loss/rl", "loss/kl", "loss/total")
"""Per-thought means among the objective's metrics (the others are per-token)."""


def _merge_micro_batch_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-micro-batch loss metrics: counts add, extremes take max/min, means average
    weighted by their own denominators (thoughts or tokens). The objective's ``loss/rl`` and
    ``loss/total`` are replaced by the trainer's."""
    if not parts:
        return {}
    thoughts = sum(m["loss/num_thoughts"] for m in parts) or 1.0
    tokens = sum(m["loss/num_tokens"] for m in parts) or 1.0
    out: dict[str, float] = {}
    for key in parts[0]:
        values = [m[key] for m in parts]
        if key.startswith("loss/num_"):
            out[key.replace("loss/", "rl/")] = sum(values)
        elif key in ("loss/rl", "loss/total"):
            continue
        elif key.endswith("max"):
            out[key] = max(values)
        elif key.endswith("min"):
            out[key] = min(values)
        elif key in _THOUGHT_MEANS:
            out[key] = sum(m["loss/num_thoughts"] * m[key] for m in parts) / thoughts
        else:
            out[key] = sum(m["loss/num_tokens"] * m[key] for m in parts) / tokens
    return out


_EPOCH_PREFIXES = ("loss/", "clip/", "ratio/", "kl/", "rl/", "optim/")


def _epoch_metrics(metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
    """Loss, clip, ratio, KL and optimizer metrics of PPO epoch ``epoch`` under
    ``{key}/epoch{epoch}`` (with ``objective.ppo_epochs > 1``)."""
    return {f"{k}/epoch{epoch}": v for k, v in metrics.items() if k.startswith(_EPOCH_PREFIXES)}


def _broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (all ranks must take the same evaluation branch)."""
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        box = [flag]
        tdist.broadcast_object_list(box, src=0)
        return bool(box[0])
    return flag


def _gather_lists(values: dict[str, list[float]], ps: Any) -> dict[str, list[float]]:
    """Concatenate per-rank lists over the DP group in rank order (identical on TP peers)."""
    import torch.distributed as tdist

    if ps.dp_size == 1 or not tdist.is_initialized():
        return values
    parts: list[Any] = [None] * ps.dp_size
    tdist.all_gather_object(parts, values, group=ps.dp_group)
    return {key: [v for part in parts for v in part.get(key, [])] for key in values}
