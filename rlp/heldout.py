"""Held-out evaluation during training: perplexity without thoughts and information gain.

Every ``eval.every`` steps the trainer calls :meth:`HeldoutEvaluator.run`. Each run opens a fresh,
unshuffled stream over ``eval.shards`` with a fixed seed, so every evaluation sees the same
documents, the same target positions and the same sampling seed: values are comparable across
steps and between runs.

* ``eval/nll``, ``eval/ppl``: next-token NLL (nats/token) of the policy on packed held-out
  sequences with no thought (the paper's Table S.8 perplexity).
* ``eval/ema_nll``: the same for the EMA teacher.
* ``eval/info_gain``: mean RLP reward r = S_pred - S_ema (Eq. 5) of G sampled thoughts per
  held-out context; ``eval/frac_positive``: share of thoughts that raise the target's likelihood.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from rlp.config import DataConfig, EvalConfig, RewardConfig, RolloutConfig
from rlp.data.stream import RLPDataStream
from rlp.model.logprobs import token_logprobs
from rlp.model.sampler import Sampler
from rlp.reward import span_reward
from rlp.rollout import baseline_sequences, generate_rollouts, system_prompt_ids
from rlp.scoring import score_rollouts
from rlp.tokenizer import Tokenizer

EVAL_SEED = 20_251_001
"""Fixed seed for held-out contexts and thoughts (independent of the run seed)."""


class HeldoutEvaluator:
    """Intrinsic metrics on held-out shards for one DP rank."""

    def __init__(
        self,
        eval_cfg: EvalConfig,
        data_cfg: DataConfig,
        rollout_cfg: RolloutConfig,
        reward_cfg: RewardConfig,
        *,
        tokenizer: Tokenizer,
        dp_rank: int,
        dp_size: int,
        micro_batch: int,
        device: torch.device,
    ) -> None:
        if not eval_cfg.shards:
            raise ValueError("eval.shards is not set: give held-out shard URLs or set eval.every=0")
        self.cfg = eval_cfg
        # Held-out order must not depend on the training data settings' shuffling or workers.
        self.data_cfg = dataclasses.replace(
            data_cfg, shuffle_shards=False, shuffle_buffer=0, num_workers=0
        )
        self.rollout_cfg = rollout_cfg
        self.reward_cfg = reward_cfg
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_batch = micro_batch
        self.device = device
        self.num_local = max(1, math.ceil(eval_cfg.num_documents / dp_size))

    def _stream(self) -> RLPDataStream:
        return RLPDataStream(
            self.cfg.shards,
            self.data_cfg,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=EVAL_SEED,
            target_tokens=self.reward_cfg.target_tokens,
            tokenizer=self.tokenizer,
        )

    def run(
        self,
        model: torch.nn.Module,
        sampler: Sampler,
        teacher: Callable[[], AbstractContextManager],
    ) -> dict[str, Any]:
        """Evaluate ``model`` (and the EMA weights that ``teacher()`` swaps in)."""
        stream = self._stream()
        try:
            inputs, labels = stream.next_ntp_batch(self.num_local)
            contexts = stream.next_contexts(self.num_local)
        finally:
            stream.close()
        nll = self._nll(model, inputs, labels)
        with teacher():
            ema_nll = self._nll(model, inputs, labels)
        out: dict[str, Any] = {"eval/nll": nll, "eval/ppl": math.exp(nll), "eval/ema_nll": ema_nll}
        if contexts:
            out.update(self._info_gain(model, sampler, teacher, contexts))
        return out

    def _nll(self, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        total = 0.0
        with torch.no_grad():
            for first in range(0, len(inputs), self.micro_batch):
                rows = slice(first, first + self.micro_batch)
                logp = token_logprobs(
                    model, inputs[rows].to(self.device), labels[rows].to(self.device)
                )
                total -= float(logp.double().sum())
        return total / labels.numel()

    def _info_gain(self, model, sampler, teacher, contexts) -> dict[str, float]:
        rollout = generate_rollouts(
            model, sampler, contexts, self.tokenizer, self.rollout_cfg, seed=EVAL_SEED
        )
        system_ids = system_prompt_ids(self.tokenizer, self.rollout_cfg)
        scores = score_rollouts(
            model,
            rollout,
            baseline_sequences(contexts, system_ids, self.reward_cfg.ema_context),
            teacher,
            micro_batch=self.micro_batch,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
        )
        rewards = span_reward(scores.s_pred, scores.s_ema, self.reward_cfg)
        return {
            "eval/info_gain": float(rewards.mean()),
            "eval/frac_positive": float((rewards > 0).float().mean()),
            "eval/thought_len_mean": float(rollout.thought_len.float().mean()),
        }
