"""Thought benefit: does a sampled thought raise the log-likelihood of the real next token?

Pure maths and sequence layout (torch and lists only; no model, no megatron). The trainer
(per step, ``benefit.per_step``) and the held-out evaluator (:mod:`rlp.heldout`) score the
sequences built here with the *same* weights theta and reduce the scores with
:func:`benefit_metrics`. Because every term uses theta, neither the EMA teacher's lag nor
training on the target moves these numbers: they measure the thought, not the baseline.

For one context (prompt = ``[system prompt] + prefix + <think>``, target x_t, separator s)
three kinds of scoring sequence are compared (``docs/method.md``, "Thought benefit"):

    thought    prompt + c_i + </think> + s + x_t        (the rollout's own scoring sequence)
    no thought prompt +       </think> + s + x_t        (the same text with the thought removed)
    filler     prompt + f^L + </think> + s + x_t        (L copies of a content-free filler)

With ``S(.) = log p_theta(x_t | .)`` (summed over the K target tokens when K > 1):

    B_i      = S(thought_i) - S(no thought)                      thought benefit of thought i
    F        = S(filler)    - S(no thought)                      filler benefit (length control)
    benefit              = mean_b mean_i B_{b,i}
    benefit_best         = mean_b max_i B_{b,i}                  best of the G thoughts
    frac_some_helps      = mean_b [max_i B_{b,i} > 0]            contexts where a thought helps
    filler_benefit       = mean_b F_b
    benefit_over_filler  = mean_b (mean_i B_{b,i} - F_b)         what the thought's *content* adds
    benefit_over_filler_se = std_b(...) / sqrt(B)                its standard error over contexts

L is the mean number of tokens between ``<think>`` and ``</think>`` over the context's G thoughts
(rounded, at least 1), so the filler costs one scoring per context, like the no-thought sequence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BENEFIT_KEYS = (
    "benefit",
    "benefit_best",
    "frac_some_helps",
    "filler_benefit",
    "benefit_over_filler",
    "benefit_over_filler_se",
)
"""Keys returned by :func:`benefit_metrics` (prefixed ``thought/`` per step, ``eval/thought/``
in held-out evaluation)."""


def thought_content_lengths(thought_len: torch.Tensor, closed_by_tag: torch.Tensor) -> torch.Tensor:
    """Tokens strictly between ``<think>`` and ``</think>``: the sampled thought minus a sampled
    closing tag (a thought cut at the cap gets ``</think>`` appended, which is not content)."""
    return thought_len.long() - closed_by_tag.long()


def filler_lengths(content_len: torch.Tensor, num_thoughts: int) -> list[int]:
    """Per context: the rounded mean content length of its G thoughts, at least 1 token."""
    groups = content_len.double().view(-1, num_thoughts)
    return [max(1, int(math.floor(m + 0.5))) for m in groups.mean(1).tolist()]


def tile_filler(filler_ids: Sequence[int], length: int) -> list[int]:
    """``length`` tokens of the filler's ids, repeated cyclically (``[a, b, a, b, a]``)."""
    if not filler_ids:
        raise ValueError("the filler has no tokens")
    reps = -(-length // len(filler_ids))
    return (list(filler_ids) * reps)[:length]


def control_sequences(
    sequences: Sequence[Sequence[int]],
    thought_start: torch.Tensor,
    content_len: torch.Tensor,
    num_thoughts: int,
    filler_ids: Sequence[int],
) -> tuple[list[list[int]], list[list[int]]]:
    """The no-thought and filler sequences of each context, cut from its first thought's row.

    ``sequences`` are rollout scoring sequences (rows grouped by context, G per context) laid
    out as ``prompt + content + </think> + separator + target``; ``thought_start[row] + 1`` is the
    prompt length and ``content_len[row]`` the content length of that row. Returns
    ``(no_thought[b], filler[b])``: the same prompt and tail with the content removed, or replaced
    by :func:`filler_lengths` tokens of ``filler_ids``.
    """
    if len(sequences) % num_thoughts:
        raise ValueError(f"{len(sequences)} rows do not form groups of {num_thoughts}")
    lengths = filler_lengths(content_len, num_thoughts)
    no_thought, filler = [], []
    for b, length in enumerate(lengths):
        row = b * num_thoughts
        seq = list(sequences[row])
        cut = int(thought_start[row]) + 1
        prompt, tail = seq[:cut], seq[cut + int(content_len[row]) :]
        no_thought.append(prompt + tail)
        filler.append(prompt + tile_filler(filler_ids, length) + tail)
    return no_thought, filler


def per_context(
    s_thought: torch.Tensor, s_none: torch.Tensor, s_filler: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per context (``[B]`` float64): ``benefit`` = mean_i B_i, ``benefit_best`` = max_i B_i,
    ``filler_benefit`` = F and ``benefit_over_filler`` = mean_i B_i - F.

    Shapes: ``s_thought[B, G]`` = S(thought), ``s_none[B]`` = S(no thought), ``s_filler[B]`` =
    S(filler), all log p_theta of the target (nats).
    """
    if (
        s_thought.dim() != 2
        or s_none.shape != s_thought.shape[:1]
        or s_filler.shape != s_none.shape
    ):
        raise ValueError(
            f"expected s_thought [B, G], s_none [B], s_filler [B]; got {tuple(s_thought.shape)}, "
            f"{tuple(s_none.shape)}, {tuple(s_filler.shape)}"
        )
    s_thought, s_none, s_filler = s_thought.double(), s_none.double(), s_filler.double()
    benefit = s_thought - s_none.unsqueeze(1)  # [B, G]
    filler = s_filler - s_none
    return {
        "benefit": benefit.mean(dim=1),
        "benefit_best": benefit.max(dim=1).values,
        "filler_benefit": filler,
        "benefit_over_filler": benefit.mean(dim=1) - filler,
    }


def benefit_metrics(
    s_thought: torch.Tensor, s_none: torch.Tensor, s_filler: torch.Tensor
) -> dict[str, float]:
    """Reduce target log-probs to the :data:`BENEFIT_KEYS` (formulas in the module docstring);
    shapes as in :func:`per_context`."""
    ctx = per_context(s_thought, s_none, s_filler)
    over = ctx["benefit_over_filler"]
    n = over.numel()
    se = float(over.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return {
        "benefit": float(ctx["benefit"].mean()),
        "benefit_best": float(ctx["benefit_best"].mean()),
        "frac_some_helps": float((ctx["benefit_best"] > 0).double().mean()),
        "filler_benefit": float(ctx["filler_benefit"].mean()),
        "benefit_over_filler": float(over.mean()),
        "benefit_over_filler_se": se,
    }
