"""The trainer's step in-process on the demo corpus: the backpropagated loss is the objective's
(gradient equal to an independent full-logit computation of ``combine_losses``), the EMA skips
skipped steps, and every PPO epoch is logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

pytest.importorskip("megatron.core")

from rlp.config import load_config  # noqa: E402
from rlp.objective import combine_losses, ntp_loss, rlp_policy_loss  # noqa: E402
from rlp.reward import group_advantages, span_reward  # noqa: E402
from rlp.rollout import policy_temperature  # noqa: E402
from rlp.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from rlp.data.demo import ensure_demo_corpus

    return ensure_demo_corpus(tmp_path_factory.mktemp("demo"))


def _trainer(demo: Path, run_dir: Path, *extra: str) -> Trainer:
    cfg = load_config(
        "tiny_cpu",
        [
            f"run.output_dir={run_dir}",
            f"tokenizer.path={demo / 'tokenizer'}",
            f"data.shards={demo / 'shards' / 'demo-{000000..000003}.tar'}",
            "data.build_demo_if_missing=false",
            "eval.every=0",
            "benefit.per_step=false",
            "log.samples_every=0",
            "checkpoint.save_every=0",
            "checkpoint.save_on_signal=false",
            "rollout.contexts_per_step=2",
            *extra,
        ],
    )
    return Trainer(cfg)


def _main_grads(trainer: Trainer) -> list[torch.Tensor]:
    return [p.main_grad.detach().clone() for p in trainer.ddp.module.parameters()]


def test_backpropagated_loss_is_the_objective(demo, tmp_path) -> None:
    """Trainer (prefix trees, token-budget micro-batches, log-prob head, partial shares) ==
    combine_losses(rl mean, ntp mean) built here from full logits of one row per sequence."""
    trainer = _trainer(
        demo,
        tmp_path / "run",
        "objective.rl_weight=0.7",
        "objective.ntp_weight=0.3",
        "objective.max_tokens_per_micro_batch=160",  # several micro-batches, split trees
        "data.ntp_batch_size=3",
    )
    cfg = trainer.cfg
    contexts, rollout = trainer._sample(0)
    scores = trainer._score(contexts, rollout)
    assert len(scores.plan) > 1
    ntp_batch = trainer.stream.next_ntp_batch(cfg.data.ntp_batch_size)
    metrics = trainer._loss_and_backward(rollout, scores, ntp_batch)
    got = _main_grads(trainer)

    # Independent: rewards -> advantages -> clipped surrogate (mean over thoughts) on full-logit
    # log-probs at the policy temperature, NTP mean over tokens, combined by the objective.
    for p in trainer.ddp.module.parameters():
        p.main_grad.zero_()
    temp = policy_temperature(cfg.rollout)
    rewards = span_reward(scores.s_pred, scores.s_ema, cfg.reward)
    adv = group_advantages(rewards.view(rollout.num_contexts, -1), cfg.reward).flatten()
    width = int(rollout.thought_len.max())
    logp_new = torch.zeros(rollout.num_rows, width)
    mask = torch.zeros(rollout.num_rows, width, dtype=torch.bool)
    rows = []
    for row, seq in enumerate(rollout.sequences):
        ids = torch.tensor([seq])
        logits = trainer.ddp(ids[:, :-1], None, None)[0].float()
        start, n = int(rollout.thought_start[row]), int(rollout.thought_len[row])
        logp = torch.log_softmax(logits / temp, -1).gather(1, ids[0, 1:, None])[:, 0]
        rows.append(logp[start : start + n])
        mask[row, :n] = True
    logp_new = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    rl = rlp_policy_loss(logp_new, logp_new.detach(), adv, mask, cfg.objective).loss
    inputs, labels = ntp_batch
    logits = trainer.ddp(inputs, None, None).float()
    nll_sum, count = ntp_loss(
        torch.log_softmax(logits, -1).gather(2, labels[..., None])[..., 0],
        torch.ones_like(labels, dtype=torch.bool),
    )
    total = combine_losses(rl, nll_sum / count, cfg.objective, trainer.state.step)
    total.backward()
    want = _main_grads(trainer)

    assert metrics["loss/total"] == pytest.approx(total.item(), abs=1e-5)
    assert metrics["ratio/mean"] == 1.0
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-6 + 1e-4 * w.abs().max().item()
    assert max(w.abs().max().item() for w in want) > 0


def test_skipped_step_leaves_the_ema_and_ppo_epochs_are_logged(demo, tmp_path) -> None:
    trainer = _trainer(
        demo,
        tmp_path / "diverge",
        "optim.lr=1e30",
        "optim.clip_grad=0",
        "optim.max_bad_steps=5",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "objective.ppo_epochs=2",
        "ema.decay=0.5",
    )
    skipped = False
    for _ in range(4):
        before = [e.clone() for e in trainer.ema.params] if trainer.ema.initialized else None
        metrics = trainer.train_step()
        for epoch in (0, 1):
            for key in ("loss/rl", "loss/total", "clip/frac", "ratio/mean", "optim/skipped"):
                assert f"{key}/epoch{epoch}" in metrics
        if before is not None and metrics["optim/skipped/epoch0"] == 1.0:
            skipped = metrics["optim/skipped/epoch1"] == 1.0
            if skipped:
                assert all(torch.equal(a, b) for a, b in zip(before, trainer.ema.params))
                break
    assert skipped, "lr=1e30 should make a step non-finite within 4 steps"
