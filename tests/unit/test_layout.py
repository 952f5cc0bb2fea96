"""rlp.layout: prefix trees, positions, masks, label index and token-budget micro-batches."""

from __future__ import annotations

import random

import pytest
import torch

from rlp.layout import (
    Branch,
    PrefixGroup,
    plan_micro_batches,
    plan_tokens,
    sequence_groups,
)


def _groups(seed: int = 0, contexts: int = 3, g: int = 4) -> list[PrefixGroup]:
    rng = random.Random(seed)
    groups = []
    for _ in range(contexts):
        prefix = [rng.randrange(100) for _ in range(rng.randrange(1, 9))]
        branches = []
        for _ in range(g):
            n = rng.randrange(1, 8)
            tokens = [rng.randrange(100) for _ in range(n)]
            thought = list(range(rng.randrange(0, n + 1)))
            branches.append(Branch(tokens, (thought, [n - 1])))
        groups.append(PrefixGroup(prefix, branches))
    return groups


def _flat_branches(groups: list[PrefixGroup]) -> list[tuple[list[int], Branch]]:
    return [(list(gr.prefix), br) for gr in groups for br in gr.branches]


def _visible_context(mb, flat_pos: int) -> tuple[list[int], list[int]]:
    """(tokens, positions) that the query at flat position ``flat_pos`` attends to, in order."""
    b = mb.input_ids.size(0)
    row, pos = flat_pos % b, flat_pos // b
    mask = mb.attention_mask()
    if mask is None:  # causal rows
        keys = list(range(pos + 1))
    else:
        keys = [j for j in range(mb.input_ids.size(1)) if not mask[0, 0, pos, j]]
    return [int(mb.input_ids[row, j]) for j in keys], [int(mb.position_ids[row, j]) for j in keys]


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("budget", [6, 13, 1000])
def test_every_label_sees_exactly_its_own_sequence(share_prefix: bool, budget: int) -> None:
    """For each label, the query predicting it attends to prefix + branch[:j] at positions
    0..len-1 and nothing else; every label of every branch is there exactly once."""
    groups = _groups()
    flat = _flat_branches(groups)
    plan = plan_micro_batches(groups, budget, share_prefix=share_prefix, pad_id=7)
    seen = {}
    for mb in plan:
        for k, index in enumerate(mb.labels):
            for m in range(len(index.token)):
                gid = mb.branches[int(index.row[m])]
                prefix, branch = flat[gid]
                j = branch.labels[k][int(index.offset[m])]
                assert int(index.token[m]) == branch.tokens[j]
                tokens, positions = _visible_context(mb, int(index.position[m]))
                expected = [*prefix, *branch.tokens[:j]]
                assert tokens == expected
                assert positions == list(range(len(expected)))
                seen[(gid, k, j)] = seen.get((gid, k, j), 0) + 1
    wanted = {
        (gid, k, j)
        for gid, (_, br) in enumerate(flat)
        for k, js in enumerate(br.labels)
        for j in js
    }
    assert set(seen) == wanted and set(seen.values()) == {1}


def test_packed_budget_split_and_sharing() -> None:
    prefix = list(range(10))
    branches = [Branch([50 + i] * 5, (range(4), [4])) for i in range(6)]  # 4 input tokens each
    groups = [PrefixGroup(prefix, branches)]
    one = plan_micro_batches(groups, 100)
    assert len(one) == 1 and one[0].num_tokens == 10 + 6 * 4 and one[0].packed
    # Budget 20: a tree holds the prefix and 2 branches (18 tokens); 3 trees, 3 rows.
    split = plan_micro_batches(groups, 20)
    assert [mb.num_tokens for mb in split] == [18, 18, 18]
    assert all(mb.input_ids[0, :10].tolist() == prefix for mb in split)
    assert [mb.branches for mb in split] == [[0, 1], [2, 3], [4, 5]]
    # Without sharing: one row per branch of 14 tokens; 2 rows per 30-token budget.
    rows = plan_micro_batches(groups, 30, share_prefix=False)
    assert [tuple(mb.input_ids.shape) for mb in rows] == [(2, 14)] * 3
    assert all(mb.attention_mask() is None and not mb.packed for mb in rows)
    assert plan_tokens(one) == 34 and plan_tokens(rows) == 84


def test_small_trees_share_a_row_block_diagonally() -> None:
    groups = [
        PrefixGroup([1, 2], [Branch([3, 4], ([0, 1],))]),
        PrefixGroup([5], [Branch([6, 7, 8], ([0, 1, 2],))]),
    ]
    (mb,) = plan_micro_batches(groups, 100)
    assert mb.input_ids.tolist() == [[1, 2, 3, 5, 6, 7]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    mask = mb.attention_mask()[0, 0]
    assert mask[3:, :3].all() and mask[:3, 3:].all()  # trees never see each other
    assert not mask[5, 3:6].any()


def test_oversized_tree_gets_its_own_micro_batch() -> None:
    groups = [PrefixGroup([1] * 8, [Branch([2] * 10, ([0],)), Branch([3] * 2, ([0],))])]
    plan = plan_micro_batches(groups, 12)
    assert [mb.num_tokens for mb in plan] == [17, 9]


def test_padded_scatter_round_trip_and_grad() -> None:
    groups = _groups(seed=1, contexts=2, g=3)
    (mb,) = plan_micro_batches(groups, 1000)
    index = mb.labels[0]
    values = torch.randn(len(index.token), requires_grad=True)
    padded, mask = mb.padded(values, 0)
    assert padded.shape[0] == len(mb.branches)
    assert mask.sum(-1).tolist() == index.counts
    assert torch.equal(padded[index.row, index.offset], values.detach())
    assert not padded[~mask].any()
    padded[mask].sum().backward()
    assert torch.equal(values.grad, torch.ones_like(values))


def test_sequence_groups_score_every_next_token() -> None:
    seqs = [[1, 2, 3, 4], [5, 6, 7, 8]]
    (mb,) = plan_micro_batches(sequence_groups(seqs), 8, share_prefix=False)
    assert mb.input_ids.tolist() == [[1, 2, 3], [5, 6, 7]]
    labels = mb.labels[0]
    b = mb.input_ids.size(0)
    got = [
        (int(mb.input_ids[p % b, p // b]), int(t)) for p, t in zip(labels.position, labels.token)
    ]
    assert sorted(got) == sorted([(1, 2), (2, 3), (3, 4), (5, 6), (6, 7), (7, 8)])


def test_plan_input_errors() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        plan_micro_batches(_groups(), 0)
    with pytest.raises(ValueError, match="prefix"):
        plan_micro_batches([PrefixGroup([], [Branch([1], ([0],))])], 10)
    with pytest.raises(ValueError, match="inside"):
        plan_micro_batches([PrefixGroup([1], [Branch([1], ([3],))])], 10)
    assert plan_micro_batches([], 10) == []
