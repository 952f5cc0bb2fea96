"""Held-out evaluation during training: NTP loss without thoughts, thought benefit with controls.

Every ``eval.every`` steps (and before the first step and after the last, see
:class:`rlp.trainer.Trainer`) the trainer calls :meth:`HeldoutEvaluator.run`. Each run opens a
fresh, unshuffled stream over ``eval.shards`` with a fixed seed, so every evaluation sees the same
documents and the same target positions; thoughts are sampled with ``eval.sample_seed``. Values
are comparable across steps and between runs.

* ``eval/nll``, ``eval/ppl``: next-token NLL (nats/token) of the policy on packed held-out
  sequences with no thought (the paper's Table S.8 perplexity): does training cost language
  modelling?
* ``eval/ema_nll``: the same for the EMA teacher.
* ``eval/thought/*`` (``benefit.heldout``): the thought benefit of :mod:`rlp.benefit` on G sampled
  thoughts per held-out context, all terms scored with the policy weights theta:
  ``benefit``, ``benefit_best``, ``frac_some_helps``, ``filler_benefit``, ``benefit_over_filler``
  (+ ``_se``), and ``prompt_effect`` = mean S_theta(prompt + ``</think>`` + target) -
  S_theta(prefix + target): what the system prompt and the empty think tags alone do to the target.
* ``eval/info_gain``: mean RLP reward r = S_pred - S_ema (Eq. 5) of the sampled thoughts (moves when
  the EMA lags, so it is not evidence that thoughts help); ``eval/frac_positive``: share of r > 0.

:class:`HeldoutLog` keeps every evaluation of a run in ``RUN_DIR/heldout.jsonl`` (step 0 = before
training); :func:`heldout_reading` turns the first and last rows into the end-of-run summary lines.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from rlp.benefit import benefit_metrics, control_sequences, per_context, thought_content_lengths
from rlp.config import (
    BenefitConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    RewardConfig,
    RolloutConfig,
)
from rlp.data.stream import RLPDataStream
from rlp.model.engine import RolloutEngine
from rlp.model.forward import tree_attention_supported
from rlp.model.logprobs import score_sequences, token_logprobs
from rlp.reward import span_score
from rlp.rollout import RolloutBatch, baseline_sequences, generate_rollouts, system_prompt_ids
from rlp.scoring import score_rollouts
from rlp.tokenizer import Tokenizer

EVAL_SEED = 20_251_001
"""Fixed seed for held-out documents and target positions (independent of the run seed); also
the thought sampling seed when ``eval.sample_seed`` is null."""

Teacher = Callable[[], AbstractContextManager]


def filler_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``benefit.filler``; refuses special tokens (they are not content-free)."""
    ids = tokenizer.encode(text)
    special = {tokenizer.think_open_id, tokenizer.think_close_id, tokenizer.eos_id}
    if not ids or special & set(ids):
        raise ConfigError(
            f"benefit.filler={text!r} must encode to >= 1 ordinary token (not <think>, </think> "
            "or EOS); choose another filler, e.g. '.'"
        )
    return ids


def score_controls(
    model: torch.nn.Module,
    rollout: RolloutBatch,
    filler_ids: Sequence[int],
    reward_cfg: RewardConfig,
    *,
    max_tokens: int,
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_theta(no thought) and S_theta(filler) per context, ``[B]`` each (no gradient).

    Used per training step (``benefit.per_step``), where S_theta(thought) is the step's S_pred.
    """
    content = thought_content_lengths(rollout.thought_len, rollout.closed_by_tag)
    no_thought, filler = control_sequences(
        rollout.sequences, rollout.thought_start, content, rollout.num_thoughts, filler_ids
    )
    scores = _target_scores(
        model, [*no_thought, *filler], rollout.target_len, reward_cfg, max_tokens, pad_id, device
    )
    b = rollout.num_contexts
    return scores[:b], scores[b:]


def _target_scores(
    model: torch.nn.Module,
    sequences: list[list[int]],
    k: int,
    reward_cfg: RewardConfig,
    max_tokens: int,
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """S = log p(last k tokens | the rest) per sequence, reduced like the reward (``[n]``).

    Rows per micro-batch: as many of the longest sequence as fit in ``max_tokens`` padded tokens.
    """
    rows = max(1, max_tokens // max(len(s) for s in sequences))
    with torch.no_grad():
        logps = score_sequences(model, sequences, micro_batch=rows, pad_id=pad_id, device=device)
    per_token = torch.stack([lp[-k:].float().cpu() for lp in logps])  # [n, K]
    return span_score(per_token, reward_cfg)


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
        max_tokens: int,
        device: torch.device,
        benefit_cfg: BenefitConfig | None = None,
        tp_group: Any = None,
    ) -> None:
        if not eval_cfg.shards:
            raise ValueError("eval.shards is not set: give held-out shard URLs or set eval.every=0")
        self.cfg = eval_cfg
        # Held-out order must not depend on the training data settings' shuffling or workers;
        # the held-out shards have their own manifest and may be token or text shards whatever
        # the training shards are.
        self.data_cfg = dataclasses.replace(
            data_cfg,
            manifest=eval_cfg.manifest,
            format="auto",
            shuffle_shards=False,
            shuffle_buffer=0,
            num_workers=0,
            ntp_seq_len=eval_cfg.ntp_seq_len or data_cfg.ntp_seq_len,
        )
        self.rollout_cfg = rollout_cfg
        self.reward_cfg = reward_cfg
        self.benefit_cfg = benefit_cfg or BenefitConfig()
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.max_tokens = max_tokens
        self.device = device
        self.tp_group = tp_group
        """Tensor-parallel group: its first rank reads the held-out shards and relays them."""
        self.num_local = max(1, math.ceil(eval_cfg.num_documents / dp_size))
        self.sample_seed = EVAL_SEED if eval_cfg.sample_seed is None else eval_cfg.sample_seed
        self.filler_ids = filler_token_ids(tokenizer, self.benefit_cfg.filler)
        self.per_context: dict[str, list[float]] = {}
        """Per held-out context values of the last :meth:`run` (this rank's contexts, in order):
        ``benefit``, ``benefit_best``, ``filler_benefit``, ``benefit_over_filler``."""

    def _stream(self) -> RLPDataStream:
        return RLPDataStream(
            self.cfg.shards,
            self.data_cfg,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=EVAL_SEED,
            target_tokens=self.reward_cfg.target_tokens,
            tokenizer=self.tokenizer,
            tp_group=self.tp_group,
            device=self.device,
        )

    def run(
        self,
        model: torch.nn.Module,
        engine: RolloutEngine,
        teacher: Teacher | None,
    ) -> dict[str, Any]:
        """Evaluate ``model`` (and the EMA weights that ``teacher()`` swaps in; ``None`` = no EMA
        model yet: the EMA metrics are left out)."""
        self.per_context = {}
        stream = self._stream()
        try:
            inputs, labels = stream.next_ntp_batch(self.num_local)
            contexts = stream.next_contexts(self.num_local)
        finally:
            stream.close()
        nll = self._nll(model, inputs, labels)
        out: dict[str, Any] = {"eval/nll": nll, "eval/ppl": math.exp(nll)}
        if teacher is not None:
            with teacher():
                out["eval/ema_nll"] = self._nll(model, inputs, labels)
        if contexts:
            out.update(self._thoughts(model, engine, teacher, contexts))
        return out

    def _nll(self, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        total, size = 0.0, max(1, self.max_tokens // inputs.shape[1])
        with torch.no_grad():
            for first in range(0, len(inputs), size):
                rows = slice(first, first + size)
                logp = token_logprobs(
                    model, inputs[rows].to(self.device), labels[rows].to(self.device)
                )
                total -= float(logp.double().sum())
        return total / labels.numel()

    def _thoughts(self, model, engine, teacher, contexts) -> dict[str, float]:
        """G thoughts per context. S_pred (and S_ema) come from the trainer's rollout scoring
        (:func:`rlp.scoring.score_rollouts`, as in a training step); the no-thought, filler and
        bare-prefix controls from :func:`rlp.model.logprobs.score_sequences`, all with theta."""
        rollout = generate_rollouts(
            engine, contexts, self.tokenizer, self.rollout_cfg, seed=self.sample_seed
        )
        b, g, k = rollout.num_contexts, rollout.num_thoughts, rollout.target_len
        system_ids = system_prompt_ids(self.tokenizer, self.rollout_cfg)
        baseline = baseline_sequences(contexts, system_ids, self.reward_cfg.ema_context)
        scores = score_rollouts(
            model,
            rollout,
            baseline,
            teacher or nullcontext,
            max_tokens=self.max_tokens,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
            packed=tree_attention_supported(model),
        )
        s_pred = span_score(scores.s_pred, self.reward_cfg).view(b, g)
        out = {"eval/thought_len_mean": float(rollout.thought_len.float().mean())}
        if teacher is not None:
            rewards = s_pred - span_score(scores.s_ema, self.reward_cfg).view(b, g)
            out["eval/info_gain"] = float(rewards.mean())
            out["eval/frac_positive"] = float((rewards > 0).float().mean())
        if self.benefit_cfg.heldout:
            content = thought_content_lengths(rollout.thought_len, rollout.closed_by_tag)
            no_thought, filler = control_sequences(
                rollout.sequences, rollout.thought_start, content, g, self.filler_ids
            )
            plain = [[*c.prefix, *c.target] for c in contexts]
            args = (k, self.reward_cfg, self.max_tokens, self.tokenizer.pad_id, self.device)
            controls = _target_scores(model, [*no_thought, *filler, *plain], *args)
            s_none, s_filler, s_plain = controls.view(3, b)
            metrics = benefit_metrics(s_pred, s_none, s_filler)
            metrics["prompt_effect"] = float((s_none - s_plain).double().mean())
            self.per_context = {
                key: values.tolist()
                for key, values in per_context(s_pred, s_none, s_filler).items()
            }
            out.update({f"eval/thought/{key}": value for key, value in metrics.items()})
        return out


# -------------------------------------------------------------------------------- run record


class HeldoutLog:
    """``RUN_DIR/heldout.jsonl``: one row per held-out evaluation (rank 0 writes).

    Row ``{"step": s, "eval/...": ...}``; step 0 is the evaluation before the first update. On a
    resume, rows after the resumed step are dropped (those steps are replayed).
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def has(self, step: int) -> bool:
        return any(row.get("step") == step for row in self.rows())

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [row for row in self.rows() if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def append(
        self,
        step: int,
        metrics: dict[str, Any],
        per_context: dict[str, list[float]] | None = None,
    ) -> None:
        """One row: the numeric ``metrics`` (non-finite -> null) and, under ``"per_context"``,
        per held-out context values (for paired comparisons between evaluations)."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                row[key] = value if math.isfinite(value) else None
        if per_context:
            row["per_context"] = {
                k: [v if math.isfinite(v) else None for v in vals]
                for k, vals in per_context.items()
            }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def heldout_reading(start: dict[str, Any], end: dict[str, Any]) -> list[str]:
    """Summary lines: held-out thought benefit, filler control and NTP loss at the first and last
    evaluation, and one line saying what they mean (2-standard-error rule on benefit - filler)."""
    key = "eval/thought/"
    lines = []
    for row in (start, end):
        if row.get(key + "benefit") is None:
            continue
        lines.append(
            f"held-out step {row['step']}: thought benefit {row[key + 'benefit']:+.4f} nats "
            f"(best of G {row[key + 'benefit_best']:+.4f}, some thought helps in "
            f"{row[key + 'frac_some_helps']:.0%} of contexts), same-length filler "
            f"{row[key + 'filler_benefit']:+.4f}, thought - filler "
            f"{row[key + 'benefit_over_filler']:+.4f} ± "
            f"{_num(row.get(key + 'benefit_over_filler_se'))}"
            f"; NTP loss without thoughts {row['eval/nll']:.4f}"
        )
    if not lines:
        return []
    lines.append("reading: " + _verdict(start, end))
    return lines


def paired_difference(
    start: dict[str, Any], end: dict[str, Any], name: str
) -> tuple[float, float] | None:
    """Mean and standard error of ``end - start`` of a per-context value over the same held-out
    contexts (rows of :class:`HeldoutLog`); None when either row lacks it or they differ in size."""
    a = (start.get("per_context") or {}).get(name)
    b = (end.get("per_context") or {}).get(name)
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    diffs = [y - x for x, y in zip(a, b) if x is not None and y is not None]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def _num(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _verdict(start: dict[str, Any], end: dict[str, Any]) -> str:
    key = "eval/thought/benefit_over_filler"
    over, se = end.get(key), end.get(key + "_se")
    if over is None or se is None or not math.isfinite(se):
        return "too few held-out contexts for a standard error; raise eval.num_documents"
    if over > 2 * se:
        what = (
            f"at step {end['step']} the sampled thoughts raise log p(x_t) by {over:.4f} nats more "
            "than a same-length filler (> 2 s.e.): their content helps predict held-out text"
        )
    elif over < -2 * se:
        what = (
            f"at step {end['step']} the sampled thoughts predict held-out tokens worse than a "
            f"same-length filler ({over:+.4f} nats, < -2 s.e.): no sign that they carry useful "
            "content"
        )
    else:
        what = (
            f"at step {end['step']} the sampled thoughts are no better than a same-length filler "
            f"({over:+.4f} ± {se:.4f} nats): no evidence yet that they carry useful content"
        )
    if end["step"] != start["step"] and start.get(key) is not None:
        delta = over - start[key]
        paired = paired_difference(start, end, "benefit_over_filler")
        if paired is not None:  # the same held-out contexts: per-context differences
            band = 2 * paired[1]
        else:
            band = 2 * math.sqrt(se**2 + (start.get(key + "_se") or 0.0) ** 2)
        moved = "changed" if abs(delta) > band else "did not change beyond noise"
        what += f"; since step {start['step']} it {moved} ({delta:+.4f}, 2 s.e. {band:.4f})"
    nll0, nll1 = start.get("eval/nll"), end.get("eval/nll")
    if end["step"] != start["step"] and nll0 is not None and nll1 is not None:
        what += f"; held-out NTP loss {nll0:.4f} -> {nll1:.4f}"
    return what
