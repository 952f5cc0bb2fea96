"""Rollouts: turn RLP contexts into G sampled thoughts each, laid out for scoring and the loss.

For a context (document prefix x_<t, target x_t..x_{t+K-1}) the policy prompt is

    [system prompt] + prefix + <think>

and the sampler draws G thoughts from it (stopping at ``</think>`` or EOS, or at the cap). Each
thought then becomes one *scoring sequence*

    prompt + thought + [</think> if the thought did not close itself] + separator + target

which serves three passes with one layout: S_pred (log-prob of the target tokens, paper Eq. 3),
the behaviour log-probs of the thought tokens (ratio denominator, Eq. 8) and the policy log-probs
with gradient. Keeping one layout and one micro-batching for all three is what keeps the ratio at
exactly 1 on-policy (batch-variant kernels otherwise bias it; NeMo-RL ``dtensor-tp-accuracy``).

Gradient mask: only *sampled* thought tokens (including a sampled ``</think>`` or EOS). A
``</think>`` appended after the cap was not drawn from the policy, so it conditions the target but
gets no policy gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlp.config import RolloutConfig
from rlp.data.contexts import Context
from rlp.model.sampler import Sampler, SamplingParams
from rlp.tokenizer import Tokenizer


@dataclass
class RolloutBatch:
    """B contexts x G thoughts, flattened row-major (row = b * G + g)."""

    num_contexts: int
    num_thoughts: int
    sequences: list[list[int]]
    """Scoring sequences: prompt + thought (+ closing tag) + separator + target."""
    thought_start: torch.Tensor  # [n] label index of the first thought token
    thought_len: torch.Tensor  # [n] sampled thought tokens (gradient mask length)
    target_len: int
    """K: target tokens at the end of every sequence."""
    behaviour_logp: list[torch.Tensor]  # n x [thought_len] log-probs recorded while sampling
    stopped: torch.Tensor  # [n] bool: the thought closed itself (</think> or EOS)
    closed_by_tag: torch.Tensor  # [n] bool: the thought emitted </think>
    prompt_len: torch.Tensor  # [b] prompt tokens per context
    thoughts: list[list[int]]  # n sampled thought token ids

    @property
    def num_rows(self) -> int:
        return len(self.sequences)

    def label_masks(self, rows: slice, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks over label positions of rows ``rows`` right-padded to ``width`` labels.

        Label position j predicts token j + 1 of a sequence. Returns
        ``(thought_mask[r, width], target_mask[r, width])`` (bool).
        """
        lengths = torch.tensor([len(s) for s in self.sequences[rows]])
        pos = torch.arange(width).unsqueeze(0)
        start = self.thought_start[rows].unsqueeze(1)
        thought_mask = (pos >= start) & (pos < start + self.thought_len[rows].unsqueeze(1))
        label_end = (lengths - 1).unsqueeze(1)
        target_mask = (pos >= label_end - self.target_len) & (pos < label_end)
        return thought_mask, target_mask


def build_prompt(prefix: Sequence[int], system_ids: Sequence[int], think_open_id: int) -> list[int]:
    """``[system prompt] + prefix + <think>`` as token ids."""
    return [*system_ids, *prefix, think_open_id]


def system_prompt_ids(tokenizer: Tokenizer, cfg: RolloutConfig) -> list[int]:
    """Token ids of the system prompt followed by a blank line (empty when disabled)."""
    if not cfg.use_system_prompt or not cfg.system_prompt:
        return []
    return tokenizer.encode(cfg.system_prompt + "\n\n")


def sampling_params(tokenizer: Tokenizer, cfg: RolloutConfig) -> SamplingParams:
    """Sampler settings for thoughts: stop at ``</think>``/EOS; never an empty thought."""
    forbid = [tokenizer.think_close_id, tokenizer.eos_id] if cfg.forbid_empty_thought else []
    return SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_thought_tokens,
        stop_sequences=[[tokenizer.think_close_id]],
        eos_id=tokenizer.eos_id,
        forbid_first=forbid,
        pad_id=tokenizer.pad_id,
    )


def generate_rollouts(
    model: torch.nn.Module,
    sampler: Sampler,
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
    # The sampler buckets prompts (at most ``rollout.sample_batch_size`` rows share a KV cache)
    # and returns rows prompt-major: prompt 0's G thoughts, then prompt 1's, ...
    batch = sampler.sample(model, prompts, num_thoughts, params, seed=seed)
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
    """Build scoring sequences and masks from sampled thoughts (rows grouped by context)."""
    num_thoughts = cfg.num_thoughts
    if len(thoughts) != len(contexts) * num_thoughts:
        raise ValueError(f"expected {len(contexts) * num_thoughts} thoughts, got {len(thoughts)}")
    target_lens = {len(c.target) for c in contexts}
    if len(target_lens) != 1:
        raise ValueError(f"all contexts must have the same number of target tokens: {target_lens}")
    separator = tokenizer.encode(cfg.separator) if cfg.separator else []
    close_id = tokenizer.think_close_id
    sequences, starts, lens, closed = [], [], [], []
    for row, thought in enumerate(thoughts):
        if not thought:
            raise ValueError("the sampler returned an empty thought; RLP requires |c| >= 1")
        ctx = contexts[row // num_thoughts]
        prompt = prompts[row // num_thoughts]
        by_tag = thought[-1] == close_id
        tail = [] if by_tag else [close_id]
        sequences.append([*prompt, *thought, *tail, *separator, *ctx.target])
        starts.append(len(prompt) - 1)
        lens.append(len(thought))
        closed.append(by_tag)
    return RolloutBatch(
        num_contexts=len(contexts),
        num_thoughts=num_thoughts,
        sequences=sequences,
        thought_start=torch.tensor(starts),
        thought_len=torch.tensor(lens),
        target_len=target_lens.pop(),
        behaviour_logp=logps,
        stopped=torch.tensor(stopped),
        closed_by_tag=torch.tensor(closed),
        prompt_len=torch.tensor([len(p) for p in prompts]),
        thoughts=thoughts,
    )


def baseline_sequences(
    contexts: list[Context], system_ids: Sequence[int], ema_context: str
) -> list[list[int]]:
    """No-thought sequences for S_ema (Eq. 4): [system prompt +] prefix + target."""
    head = list(system_ids) if ema_context == "prompt" else []
    return [[*head, *c.prefix, *c.target] for c in contexts]


def rollout_stats(rollout: RolloutBatch, max_thought_tokens: int) -> dict[str, float]:
    """Thought statistics: length mean/max, cap-hit and ``</think>`` rates, token counts.

    A falling ``thought/len_mean`` with a rising ``thought/close_rate`` is the "no-think"
    collapse third-party replications hit; a high ``thought/cap_rate`` means the cap binds.
    """
    lens = rollout.thought_len.float()
    return {
        "thought/len_mean": float(lens.mean()),
        "thought/len_max": float(lens.max()),
        "thought/cap_rate": float((~rollout.stopped).float().mean()),
        "thought/close_rate": float(rollout.closed_by_tag.float().mean()),
        "thought/tokens": float(lens.sum()),
        "rollout/sequence_tokens": float(sum(len(s) for s in rollout.sequences)),
        "rollout/prompt_tokens": float(rollout.prompt_len.sum()),
        "rollout/max_thought_tokens": float(max_thought_tokens),
    }
