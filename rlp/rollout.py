"""Rollouts: turn RLP contexts into G sampled thoughts each, laid out for scoring and the loss.

For a context (document prefix x_<t, target x_t..x_{t+K-1}) the policy prompt is

    [system prompt] + prefix + <think>

and the sampler draws G thoughts from it (stopping at ``</think>`` or EOS, or at the cap). Each
thought then becomes one *continuation* of the prompt

    thought + [</think> unless the thought closed itself] + separator + target

and prompt + continuation is its scoring sequence. One layout serves three passes: S_pred (log-prob
of the target tokens, paper Eq. 3), the behaviour log-probs of the thought tokens (ratio
denominator, Eq. 8) and the policy log-probs with gradient. :meth:`RolloutBatch.groups` gives the
prompt with its G continuations as one prefix tree (:mod:`rlp.layout`), so the prompt is scored
once per tree instead of G times; the same plan and kernels serve all three passes, which keeps
the ratio at exactly 1 on-policy (batch-variant kernels otherwise bias it; NeMo-RL
``dtensor-tp-accuracy``).

Gradient mask: only *sampled* thought tokens (including a sampled ``</think>``). A ``</think>``
appended after the cap was not drawn from the policy, so it conditions the target but gets no
policy gradient.

EOS inside a thought (``rollout.eos_in_thought``): the sampler stops at EOS, but x_t must not be
scored after an end-of-document token. ``close`` (default) treats the EOS as the thought's end:
the EOS is replaced by ``</think>``, which (like the ``</think>`` appended at the cap) conditions
the target and gets no gradient; the thought's sampled tokens before it keep theirs. ``drop``
keeps the same layout but marks the thought invalid: it gets no gradient and is left out of its
group's leave-one-out baseline (:func:`rlp.reward.group_advantages` ``valid_mask``). A thought
with no sampled token left (EOS first, possible only with ``rollout.forbid_empty_thought=false``)
is invalid under both rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlp.config import Config, RolloutConfig, check_sequence_budget
from rlp.data.contexts import Context
from rlp.layout import Branch, PrefixGroup
from rlp.model.engine import RolloutEngine
from rlp.model.sampler import SamplingParams
from rlp.tokenizer import Tokenizer

THOUGHT_LABELS = 0
"""Label set of the thought tokens (policy log-probs, at the policy temperature)."""
TARGET_LABELS = 1
"""Label set of the K target tokens (S_pred / S_ema, raw log-probs)."""


@dataclass
class RolloutBatch:
    """B contexts x G thoughts, flattened row-major (row = b * G + g)."""

    num_contexts: int
    num_thoughts: int
    prompts: list[list[int]]
    """Per context: ``[system prompt] + prefix + <think>``."""
    sequences: list[list[int]]
    """Scoring sequences: prompt + thought (+ closing tag) + separator + target."""
    thought_start: torch.Tensor  # [n] label index of the first thought token (= prompt len - 1)
    thought_len: torch.Tensor  # [n] sampled thought tokens kept (the gradient tokens)
    target_len: int
    """K: target tokens at the end of every sequence."""
    behaviour_logp: list[torch.Tensor]  # n x [thought_len] log-probs recorded while sampling
    stopped: torch.Tensor  # [n] bool: the thought closed itself (</think> or EOS)
    closed_by_tag: torch.Tensor  # [n] bool: the thought emitted </think>
    ended_by_eos: torch.Tensor  # [n] bool: the thought stopped on EOS (replaced by </think>)
    valid: torch.Tensor  # [n] bool: the thought takes part in the loss and the baseline
    prompt_len: torch.Tensor  # [b] prompt tokens per context
    thoughts: list[list[int]]  # n sampled thought token ids, as sampled (EOS included)

    @property
    def num_rows(self) -> int:
        return len(self.sequences)

    def groups(self) -> list[PrefixGroup]:
        """Each prompt with its G continuations: label set :data:`THOUGHT_LABELS` = the kept
        sampled thought tokens of valid thoughts, :data:`TARGET_LABELS` = the K target tokens."""
        out = []
        k = self.target_len
        for b, prompt in enumerate(self.prompts):
            branches = []
            for row in range(b * self.num_thoughts, (b + 1) * self.num_thoughts):
                tokens = self.sequences[row][len(prompt) :]
                n = int(self.thought_len[row]) if bool(self.valid[row]) else 0
                branches.append(Branch(tokens, (range(n), range(len(tokens) - k, len(tokens)))))
            out.append(PrefixGroup(prompt, branches))
        return out


def build_prompt(prefix: Sequence[int], system_ids: Sequence[int], think_open_id: int) -> list[int]:
    """``[system prompt] + prefix + <think>`` as token ids."""
    return [*system_ids, *prefix, think_open_id]


def system_prompt_ids(tokenizer: Tokenizer, cfg: RolloutConfig) -> list[int]:
    """Token ids of the system prompt followed by a blank line (empty when disabled)."""
    if not cfg.use_system_prompt or not cfg.system_prompt:
        return []
    return tokenizer.encode(cfg.system_prompt + "\n\n")


def policy_temperature(cfg: RolloutConfig) -> float:
    """Temperature of the policy log-probs (ratio, policy gradient, consistency check):
    ``rollout.temperature`` under ``rollout.logprob_temperature: sampling`` (1 for greedy
    sampling, whose distribution has no temperature), else 1."""
    if cfg.logprob_temperature == "sampling" and cfg.temperature > 0:
        return cfg.temperature
    return 1.0


def sampling_params(tokenizer: Tokenizer, cfg: RolloutConfig) -> SamplingParams:
    """Sampler settings for thoughts: stop at ``</think>``/EOS; never an empty thought. The
    recorded log-probs are the policy's at :func:`policy_temperature` (``tempered``: log-softmax
    of logits / T over the full vocabulary, no top-k/top-p/forbid; ``raw``: temperature 1), the
    same footing as the teacher-forced recompute."""
    forbid = [tokenizer.think_close_id, tokenizer.eos_id] if cfg.forbid_empty_thought else []
    return SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_thought_tokens,
        stop_sequences=[[tokenizer.think_close_id]],
        eos_id=tokenizer.eos_id,
        forbid_first=forbid,
        logprob_mode="tempered" if policy_temperature(cfg) != 1.0 else "raw",
        pad_id=tokenizer.pad_id,
    )


def check_sequence_budget_with(tokenizer: Tokenizer, cfg: Config) -> None:
    """Start-up check of the longest sequence with the real system prompt and separator token
    counts (:func:`rlp.config.check_sequence_budget`); raises a one-line ConfigError."""
    system = len(system_prompt_ids(tokenizer, cfg.rollout))
    separator = len(tokenizer.encode(cfg.rollout.separator)) if cfg.rollout.separator else 0
    check_sequence_budget(cfg, system_tokens=system, separator_tokens=separator)


def generate_rollouts(
    engine: RolloutEngine,
    contexts: list[Context],
    tokenizer: Tokenizer,
    cfg: RolloutConfig,
    seed: int,
) -> RolloutBatch:
    """Sample ``cfg.num_thoughts`` thoughts per context and lay them out as scoring sequences."""
    system_ids = system_prompt_ids(tokenizer, cfg)
    prompts = [build_prompt(c.prefix, system_ids, tokenizer.think_open_id) for c in contexts]
    params = sampling_params(tokenizer, cfg)
    num_thoughts = cfg.num_thoughts
    # The engine (rollout.engine, bound to the live model) returns rows prompt-major: prompt 0's
    # G thoughts, then prompt 1's, ...
    batch = engine.generate(prompts, num_thoughts, params, seed)
    expected = torch.arange(len(prompts)).repeat_interleave(num_thoughts)
    if not torch.equal(batch.prompt_index.cpu(), expected):
        raise RuntimeError("sampler rows are not grouped prompt-major; cannot form RLP groups")
    lengths = batch.lengths.tolist()
    thoughts = [batch.tokens[row, :n].tolist() for row, n in enumerate(lengths)]
    logps = [batch.logprobs[row, :n].float().cpu() for row, n in enumerate(lengths)]
    stopped = batch.stopped.tolist()
    return layout_rollouts(contexts, prompts, thoughts, logps, stopped, tokenizer, cfg)


def layout_rollouts(
    contexts: list[Context],
    prompts: list[list[int]],
    thoughts: list[list[int]],
    logps: list[torch.Tensor],
    stopped: list[bool],
    tokenizer: Tokenizer,
    cfg: RolloutConfig,
) -> RolloutBatch:
    """Build scoring sequences and masks from sampled thoughts (rows grouped by context).

    A thought that ends on ``</think>`` keeps it (a sampled token, with gradient); one that hit the
    cap gets ``</think>`` appended; one that stopped on EOS has the EOS replaced by ``</think>``
    (``rollout.eos_in_thought``, module doc).
    """
    num_thoughts = cfg.num_thoughts
    if len(thoughts) != len(contexts) * num_thoughts:
        raise ValueError(f"expected {len(contexts) * num_thoughts} thoughts, got {len(thoughts)}")
    target_lens = {len(c.target) for c in contexts}
    if len(target_lens) != 1:
        raise ValueError(f"all contexts must have the same number of target tokens: {target_lens}")
    separator = tokenizer.encode(cfg.separator) if cfg.separator else []
    close_id, eos_id = tokenizer.think_close_id, tokenizer.eos_id
    sequences, starts, lens, closed, by_eos, valid, kept_logps = [], [], [], [], [], [], []
    for row, thought in enumerate(thoughts):
        if not thought:
            raise ValueError("the sampler returned an empty thought; RLP requires |c| >= 1")
        ctx = contexts[row // num_thoughts]
        prompt = prompts[row // num_thoughts]
        by_tag = thought[-1] == close_id
        eos = not by_tag and stopped[row] and eos_id is not None and thought[-1] == eos_id
        kept = thought[:-1] if eos else thought
        tail = [] if by_tag else [close_id]
        sequences.append([*prompt, *kept, *tail, *separator, *ctx.target])
        starts.append(len(prompt) - 1)
        lens.append(len(kept))
        closed.append(by_tag)
        by_eos.append(eos)
        valid.append(len(kept) > 0 and not (eos and cfg.eos_in_thought == "drop"))
        kept_logps.append(logps[row][: len(kept)])
    return RolloutBatch(
        num_contexts=len(contexts),
        num_thoughts=num_thoughts,
        prompts=[list(p) for p in prompts],
        sequences=sequences,
        thought_start=torch.tensor(starts),
        thought_len=torch.tensor(lens),
        target_len=target_lens.pop(),
        behaviour_logp=kept_logps,
        stopped=torch.tensor(stopped),
        closed_by_tag=torch.tensor(closed),
        ended_by_eos=torch.tensor(by_eos),
        valid=torch.tensor(valid),
        prompt_len=torch.tensor([len(p) for p in prompts]),
        thoughts=thoughts,
    )


def baseline_sequences(
    contexts: list[Context], system_ids: Sequence[int], ema_context: str
) -> list[list[int]]:
    """No-thought sequences for S_ema (Eq. 4): [system prompt +] prefix + target."""
    head = list(system_ids) if ema_context == "prompt" else []
    return [[*head, *c.prefix, *c.target] for c in contexts]


def baseline_groups(baseline: Sequence[Sequence[int]], target_len: int) -> list[PrefixGroup]:
    """The S_ema sequences as one-branch prefix trees (prefix, then the K target tokens as label
    set :data:`TARGET_LABELS`; no thought labels), packed like the rollouts."""
    groups = []
    for seq in baseline:
        if len(seq) <= target_len:
            raise ValueError("a baseline sequence needs at least one token before its target")
        target = list(seq[-target_len:])
        groups.append(
            PrefixGroup(list(seq[:-target_len]), [Branch(target, ((), range(target_len)))])
        )
    return groups


def rollout_stats(rollout: RolloutBatch, max_thought_tokens: int) -> dict[str, float]:
    """Thought statistics: length mean/max, cap-hit and ``</think>`` rates, token counts.

    A falling ``thought/len_mean`` with a rising ``thought/close_rate`` is the "no-think"
    collapse third-party replications hit; a high ``thought/cap_rate`` means the cap binds.
    """
    lens = torch.tensor([float(len(t)) for t in rollout.thoughts])
    return {
        "thought/len_mean": float(lens.mean()),
        "thought/len_max": float(lens.max()),
        "thought/cap_rate": float((~rollout.stopped).float().mean()),
        "thought/close_rate": float(rollout.closed_by_tag.float().mean()),
        "thought/eos_rate": float(rollout.ended_by_eos.float().mean()),
        "thought/valid_rate": float(rollout.valid.float().mean()),
        "thought/tokens": float(lens.sum()),
        "rollout/sequence_tokens": float(sum(len(s) for s in rollout.sequences)),
        "rollout/prompt_tokens": float(rollout.prompt_len.sum()),
        "rollout/max_thought_tokens": float(max_thought_tokens),
    }
