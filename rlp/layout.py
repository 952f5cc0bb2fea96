"""Token layouts for scoring and training: prefix trees, positions, masks, labels, micro-batches.

This module owns *where* every token sits in a forward pass (pure torch, no model). The unit of
work is a :class:`PrefixGroup`: one shared prefix and its branches (for RLP: the prompt
``[system] + prefix + <think>`` and its G continuations ``thought + </think> + separator +
target``). Each branch names the tokens whose log-probs are wanted, in one or more *label sets*
(RLP: the thought tokens, scored at the sampling temperature, and the K target tokens, scored
raw). Branch token ``k`` is predicted by the branch token ``k - 1``, and token 0 by the prefix's
last token (the ``<think>`` position predicts the first token of every thought: G labels for one
position). A branch's last token is a label only, never an input (nothing after it reads it).

Two layouts, same labels (:func:`plan_micro_batches`):

* **Packed** (``share_prefix=True``): one row per micro-batch holding whole *trees*: a prefix once,
  then its branches, each restarting at position ``len(prefix)``, with a tree mask (a branch sees
  the prefix and itself causally, never its siblings). Several small trees share a row
  block-diagonally. A group whose tree exceeds the token budget is split into several trees,
  each with the prefix. Needs a core attention that takes an arbitrary mask.
* **Rows** (``share_prefix=False``): one right-padded row per ``prefix + branch``, positions
  ``0..w-1``, plain causal attention (``attention_mask=None``): what any attention kernel does.

Micro-batches are formed by a token budget (``objective.max_tokens_per_micro_batch``): a packed
row holds at most ``max_tokens`` tokens, a rows micro-batch at most ``max_tokens`` padded tokens
(rows x width); a single tree or row longer than the budget gets a micro-batch of its own. The
plan is deterministic (a pure function of the token lists), so scoring and the loss pass see the
same layout and the same kernels: on-policy ratios are exactly 1.

Label positions index the hidden states flattened *sequence-major*, ``hidden[s, b, h]
.reshape(s * b, h)`` (megatron's layout, a free view): ``flat = position * b + row``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Branch:
    """One continuation of a shared prefix and the indices of its tokens to score."""

    tokens: Sequence[int]
    """Token ids after the prefix."""
    labels: tuple[Sequence[int], ...]
    """Per label set: increasing indices into ``tokens`` whose log-probs are wanted."""


@dataclass(frozen=True)
class PrefixGroup:
    """A prefix (at least one token) and its branches; branch ids run over all groups in order."""

    prefix: Sequence[int]
    branches: Sequence[Branch]


@dataclass
class LabelIndex:
    """The labels of one label set in one micro-batch (M labels)."""

    position: torch.Tensor
    """[M] int64: flat sequence-major index of the hidden state that predicts each label."""
    token: torch.Tensor
    """[M] int64: the label token ids."""
    row: torch.Tensor
    """[M] int64: local branch index (into :attr:`MicroBatch.branches`) of each label."""
    offset: torch.Tensor
    """[M] int64: index of each label within its branch's label set."""
    counts: list[int]
    """Labels per local branch."""

    def to(self, device: torch.device | str) -> LabelIndex:
        return LabelIndex(
            self.position.to(device),
            self.token.to(device),
            self.row.to(device),
            self.offset.to(device),
            self.counts,
        )


@dataclass
class _Tree:
    start: int  # first token of the tree in the packed row
    prefix_len: int
    spans: list[tuple[int, int]]  # [begin, end) of each branch in the row


@dataclass
class MicroBatch:
    """One forward pass: token tensors, a mask recipe, and where the labels are."""

    input_ids: torch.Tensor
    """[b, s] int64."""
    position_ids: torch.Tensor
    """[b, s] int64 (RoPE positions; branches restart after their prefix)."""
    branches: list[int]
    """Global branch ids in this micro-batch, in local order."""
    labels: list[LabelIndex]
    """One :class:`LabelIndex` per label set."""
    trees: list[_Tree] = field(default_factory=list)
    """Packed layout only: the trees in the row (empty = plain causal rows)."""

    @property
    def num_tokens(self) -> int:
        """Tokens in the forward pass, padding included (what the budget counts)."""
        return self.input_ids.numel()

    @property
    def packed(self) -> bool:
        return bool(self.trees)

    def attention_mask(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """``[1, 1, s, s]`` bool, **True = masked**, for a packed row; ``None`` (causal) for rows.

        Built on demand (``s^2`` bytes): keep it only for the forward that needs it.
        """
        if not self.trees:
            return None
        s = self.input_ids.size(1)
        mask = torch.ones(s, s, dtype=torch.bool, device=device)
        for tree in self.trees:
            a, p = tree.start, tree.prefix_len
            mask[a : a + p, a : a + p] = _future(p, device)
            for begin, end in tree.spans:
                mask[begin:end, a : a + p] = False
                mask[begin:end, begin:end] = _future(end - begin, device)
        return mask[None, None]

    def to(self, device: torch.device | str) -> MicroBatch:
        """Token and label tensors on ``device`` (the mask is built there by the caller)."""
        return MicroBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.branches,
            [labels.to(device) for labels in self.labels],
            self.trees,
        )

    def padded(self, values: torch.Tensor, label_set: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter per-label ``values`` [M] of one label set into ``[branches, W]`` (W = the
        largest label count, at least 1) and the bool mask of filled entries. Differentiable."""
        index = self.labels[label_set]
        width = max([1, *index.counts])
        rows = len(self.branches)
        out = values.new_zeros(rows, width).index_put((index.row, index.offset), values)
        mask = torch.zeros(rows, width, dtype=torch.bool, device=values.device)
        mask[index.row, index.offset] = True
        return out, mask


def _future(n: int, device: torch.device | str) -> torch.Tensor:
    """[n, n] bool, True strictly above the diagonal (the causal mask's masked part)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def plan_micro_batches(
    groups: Sequence[PrefixGroup],
    max_tokens: int,
    *,
    share_prefix: bool = True,
    pad_id: int = 0,
) -> list[MicroBatch]:
    """Lay ``groups`` out in micro-batches of at most ``max_tokens`` tokens (see module doc)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not groups:
        return []
    num_sets = len(groups[0].branches[0].labels) if groups[0].branches else 0
    ids: list[tuple[int, int]] = []  # (group, branch) per global branch id
    for g, group in enumerate(groups):
        if len(group.prefix) < 1:
            raise ValueError("every prefix needs at least one token (it predicts branch token 0)")
        for b, branch in enumerate(group.branches):
            if len(branch.labels) != num_sets:
                raise ValueError("every branch needs the same number of label sets")
            for labels in branch.labels:
                if labels and (min(labels) < 0 or max(labels) >= len(branch.tokens)):
                    raise ValueError("label indices must lie inside the branch's tokens")
            ids.append((g, b))
    if share_prefix:
        return _plan_packed(groups, ids, max_tokens, num_sets)
    return _plan_rows(groups, ids, max_tokens, num_sets, pad_id)


def _plan_packed(
    groups: Sequence[PrefixGroup], ids: list[tuple[int, int]], max_tokens: int, num_sets: int
) -> list[MicroBatch]:
    # 1. Trees: a group's branches in order, a new tree (with the prefix again) when over budget.
    trees: list[tuple[int, list[int]]] = []  # (group, global branch ids)
    gid = 0
    for g, group in enumerate(groups):
        size, current = len(group.prefix), []
        for branch in group.branches:
            if current and size + _inputs(branch) > max_tokens:
                trees.append((g, current))
                size, current = len(group.prefix), []
            current.append(gid)
            size += _inputs(branch)
            gid += 1
        if current:
            trees.append((g, current))
    # 2. Rows: next-fit of whole trees in order.
    batches: list[list[tuple[int, list[int]]]] = []
    used = max_tokens + 1
    for g, members in trees:
        size = len(groups[g].prefix) + sum(_inputs(_branch(groups, ids, i)) for i in members)
        if used + size > max_tokens:
            batches.append([])
            used = 0
        batches[-1].append((g, members))
        used += size
    return [_packed_batch(groups, ids, batch, num_sets) for batch in batches]


def _inputs(branch: Branch) -> int:
    """Input tokens a branch adds to a forward pass (its last token is only a label)."""
    return max(0, len(branch.tokens) - 1)


def _branch(groups: Sequence[PrefixGroup], ids: list[tuple[int, int]], gid: int) -> Branch:
    g, b = ids[gid]
    return groups[g].branches[b]


def _packed_batch(
    groups: Sequence[PrefixGroup],
    ids: list[tuple[int, int]],
    batch: list[tuple[int, list[int]]],
    num_sets: int,
) -> MicroBatch:
    tokens: list[int] = []
    positions: list[int] = []
    trees: list[_Tree] = []
    branches: list[int] = []
    labels = [_LabelLists() for _ in range(num_sets)]
    for g, members in batch:
        prefix = groups[g].prefix
        start, p = len(tokens), len(prefix)
        tokens.extend(prefix)
        positions.extend(range(p))
        tree = _Tree(start=start, prefix_len=p, spans=[])
        for gid in members:
            branch = _branch(groups, ids, gid)
            begin = len(tokens)
            tokens.extend(branch.tokens[:-1])
            positions.extend(range(p, p + len(branch.tokens) - 1))
            tree.spans.append((begin, len(tokens)))
            local = len(branches)
            branches.append(gid)
            for k, wanted in enumerate(branch.labels):
                # Token j of the branch is predicted at row index begin + j - 1, token 0 by the
                # prefix's last token (start + p - 1).
                labels[k].add(
                    local,
                    [begin + j - 1 if j else start + p - 1 for j in wanted],
                    [branch.tokens[j] for j in wanted],
                )
        trees.append(tree)
    s = len(tokens)
    return MicroBatch(
        input_ids=torch.tensor(tokens, dtype=torch.long).view(1, s),
        position_ids=torch.tensor(positions, dtype=torch.long).view(1, s),
        branches=branches,
        labels=[lab.finish(num_rows=1, packed=True) for lab in labels],
        trees=trees,
    )


def _plan_rows(
    groups: Sequence[PrefixGroup],
    ids: list[tuple[int, int]],
    max_tokens: int,
    num_sets: int,
    pad_id: int,
) -> list[MicroBatch]:
    lengths = [len(groups[g].prefix) + _inputs(groups[g].branches[b]) for g, b in ids]
    # Longest first so that similar lengths share a micro-batch (less padding); stable ties.
    order = sorted(range(len(ids)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    width = 0
    for i in order:
        if batches and (len(batches[-1]) + 1) * max(width, lengths[i]) <= max_tokens:
            batches[-1].append(i)
            width = max(width, lengths[i])
        else:
            batches.append([i])
            width = lengths[i]
    return [_rows_batch(groups, ids, batch, lengths, num_sets, pad_id) for batch in batches]


def _rows_batch(
    groups: Sequence[PrefixGroup],
    ids: list[tuple[int, int]],
    batch: list[int],
    lengths: list[int],
    num_sets: int,
    pad_id: int,
) -> MicroBatch:
    b, s = len(batch), max(lengths[i] for i in batch)
    tokens = torch.full((b, s), pad_id, dtype=torch.long)
    labels = [_LabelLists() for _ in range(num_sets)]
    for row, gid in enumerate(batch):
        g, _ = ids[gid]
        prefix, branch = groups[g].prefix, _branch(groups, ids, gid)
        p = len(prefix)
        row_ids = [*prefix, *branch.tokens[:-1]]
        tokens[row, : lengths[gid]] = torch.tensor(row_ids, dtype=torch.long)
        for k, wanted in enumerate(branch.labels):
            labels[k].add(row, [p + j - 1 for j in wanted], [branch.tokens[j] for j in wanted])
    return MicroBatch(
        input_ids=tokens,
        position_ids=torch.arange(s).expand(b, s).clone(),
        branches=list(batch),
        labels=[lab.finish(num_rows=b, packed=False) for lab in labels],
    )


class _LabelLists:
    """Accumulates one label set's labels branch by branch."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.tokens: list[int] = []
        self.rows: list[int] = []
        self.offsets: list[int] = []
        self.counts: list[int] = []

    def add(self, local: int, positions: list[int], tokens: list[int]) -> None:
        self.positions.extend(positions)
        self.tokens.extend(tokens)
        self.rows.extend([local] * len(positions))
        self.offsets.extend(range(len(positions)))
        self.counts.append(len(positions))

    def finish(self, num_rows: int, packed: bool) -> LabelIndex:
        """Flat sequence-major indices ``position * num_rows + row``: in a rows micro-batch the
        local branch is the row; a packed micro-batch is one row (0)."""
        rows = torch.tensor(self.rows, dtype=torch.long)
        pos = torch.tensor(self.positions, dtype=torch.long)
        flat = pos if packed else pos * num_rows + rows
        return LabelIndex(
            position=flat,
            token=torch.tensor(self.tokens, dtype=torch.long),
            row=rows,
            offset=torch.tensor(self.offsets, dtype=torch.long),
            counts=self.counts,
        )


def sequence_groups(sequences: Sequence[Sequence[int]], label_sets: int = 1) -> list[PrefixGroup]:
    """Plain sequences as single-branch groups scoring every token after the first (NTP): the
    first token is the prefix, label set 0 covers tokens ``1..len-1`` (other sets are empty)."""
    groups = []
    for seq in sequences:
        if len(seq) < 2:
            raise ValueError("every sequence needs >= 2 tokens (one input, one label)")
        rest = list(seq[1:])
        wanted = (range(len(rest)),) + tuple(() for _ in range(label_sets - 1))
        groups.append(PrefixGroup(prefix=list(seq[:1]), branches=[Branch(rest, wanted)]))
    return groups


def plan_tokens(plan: Sequence[MicroBatch]) -> int:
    """Tokens through the model for a plan (padding included)."""
    return sum(mb.num_tokens for mb in plan)
