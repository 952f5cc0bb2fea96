"""rlp.rollout: the scoring layout of sampled thoughts, the EOS rule, sampling settings, the
sequence budget with the real tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlp.config import Config, ConfigError, RolloutConfig
from rlp.data.contexts import Context
from rlp.rollout import (
    TARGET_LABELS,
    THOUGHT_LABELS,
    baseline_groups,
    build_prompt,
    check_sequence_budget_with,
    layout_rollouts,
    policy_temperature,
    sampling_params,
)
from tests.data_helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _rollout(tok, thoughts, stopped, **cfg):
    cfg = RolloutConfig(num_thoughts=len(thoughts), use_system_prompt=False, **cfg)
    ctx = Context(prefix=[40, 41, 42], target=[50, 51])
    prompts = [build_prompt(ctx.prefix, [], tok.think_open_id)]
    logps = [-torch.arange(1.0, len(t) + 1) for t in thoughts]
    return layout_rollouts([ctx], prompts, thoughts, logps, stopped, tok, cfg)


def test_close_tag_cap_and_eos_layouts(tok) -> None:
    close, eos = tok.think_close_id, tok.eos_id
    thoughts = [[7, 8, close], [7, 8, 9], [7, 8, eos], [eos]]
    r = _rollout(tok, thoughts, [True, False, True, True], forbid_empty_thought=False)
    prompt = [40, 41, 42, tok.think_open_id]
    assert r.sequences == [
        [*prompt, 7, 8, close, 50, 51],  # sampled </think> kept (and trained)
        [*prompt, 7, 8, 9, close, 50, 51],  # cap: </think> appended
        [*prompt, 7, 8, close, 50, 51],  # EOS replaced by </think>
        [*prompt, close, 50, 51],  # nothing sampled left
    ]
    assert all(eos not in seq for seq in r.sequences)  # never a target after end-of-document
    assert r.thought_len.tolist() == [3, 3, 2, 0]
    assert r.ended_by_eos.tolist() == [False, False, True, True]
    assert r.closed_by_tag.tolist() == [True, False, False, False]
    assert r.valid.tolist() == [True, True, True, False]
    assert [lp.tolist() for lp in r.behaviour_logp] == [[-1, -2, -3], [-1, -2, -3], [-1, -2], []]
    assert r.thought_start.tolist() == [3, 3, 3, 3]
    assert r.thoughts == thoughts  # as sampled
    (group,) = r.groups()
    assert list(group.prefix) == prompt
    for row, branch in enumerate(group.branches):
        assert [*prompt, *branch.tokens] == r.sequences[row]
        assert list(branch.labels[TARGET_LABELS]) == [
            len(branch.tokens) - 2,
            len(branch.tokens) - 1,
        ]
    assert [list(b.labels[THOUGHT_LABELS]) for b in group.branches] == [
        [0, 1, 2],
        [0, 1, 2],
        [0, 1],
        [],
    ]


def test_eos_drop_option_excludes_the_thought(tok) -> None:
    eos = tok.eos_id
    r = _rollout(tok, [[7, 8, eos], [7, 9, 9]], [True, False], eos_in_thought="drop")
    assert r.valid.tolist() == [False, True]
    assert r.sequences[0][-3:] == [tok.think_close_id, 50, 51]  # same layout as "close"
    (group,) = r.groups()
    assert list(group.branches[0].labels[THOUGHT_LABELS]) == []  # no gradient, not in the loss


def test_baseline_groups_score_only_the_target() -> None:
    (group,) = baseline_groups([[5, 6, 7, 8]], 2)
    assert list(group.prefix) == [5, 6]
    (branch,) = group.branches
    assert list(branch.tokens) == [7, 8]
    assert list(branch.labels[THOUGHT_LABELS]) == [] and list(branch.labels[TARGET_LABELS]) == [
        0,
        1,
    ]
    with pytest.raises(ValueError, match="before its target"):
        baseline_groups([[1, 2]], 2)


def test_policy_log_probs_are_at_the_sampling_temperature_by_default(tok) -> None:
    cfg = RolloutConfig(temperature=0.7)
    assert policy_temperature(cfg) == 0.7
    assert sampling_params(tok, cfg).logprob_mode == "tempered"
    for other in (
        dataclasses.replace(cfg, logprob_temperature="raw"),
        dataclasses.replace(cfg, temperature=0.0),
    ):
        assert policy_temperature(other) == 1.0
        assert sampling_params(tok, other).logprob_mode == "raw"


def test_sequence_budget_counts_the_system_prompt(tok) -> None:
    cfg = Config()
    cfg.model.max_position_embeddings = 2 * 2048 + 3  # fits without the system prompt only
    system = len(tok.encode(cfg.rollout.system_prompt + "\n\n"))
    with pytest.raises(ConfigError, match=rf"system prompt {system} tokens.*max_position"):
        check_sequence_budget_with(tok, cfg)
    cfg.rollout.use_system_prompt = False
    check_sequence_budget_with(tok, cfg)
