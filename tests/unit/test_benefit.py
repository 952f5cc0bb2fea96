"""Thought benefit with controls (rlp/benefit.py), its scoring glue and run record (rlp/heldout.py).

* the reduction formulas on hand-computed scores;
* the no-thought and filler layouts cut from real rollout sequences (``rlp.rollout``);
* a scorer where the thought is informative by construction: positive benefit, zero filler
  benefit; a constant real model (zero output weights) through ``score_controls``: both 0;
* ``heldout.jsonl`` bookkeeping and the summary reading.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlp.benefit import (
    BENEFIT_KEYS,
    benefit_metrics,
    control_sequences,
    filler_lengths,
    per_context,
    thought_content_lengths,
    tile_filler,
)
from rlp.config import RewardConfig, RolloutConfig
from rlp.data.contexts import Context
from rlp.heldout import HeldoutLog, heldout_reading, paired_difference
from rlp.rollout import RolloutBatch, layout_rollouts
from tests.data_helpers import tiny_tokenizer

# --------------------------------------------------------------------------------------------
# formulas


def test_benefit_metrics_match_the_formulas():
    s_thought = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    s_none = torch.tensor([-2.0, -2.0])
    s_filler = torch.tensor([-2.5, -1.0])
    m = benefit_metrics(s_thought, s_none, s_filler)
    assert set(m) == set(BENEFIT_KEYS)
    # B = [[+1, -1], [0, 0]]; F = [-0.5, +1]; per-context mean B - F = [0.5, -1].
    assert m["benefit"] == pytest.approx(0.0)
    assert m["benefit_best"] == pytest.approx(0.5)
    assert m["frac_some_helps"] == pytest.approx(0.5)  # only context 0 has a thought > 0
    assert m["filler_benefit"] == pytest.approx(0.25)
    assert m["benefit_over_filler"] == pytest.approx(-0.25)
    assert m["benefit_over_filler_se"] == pytest.approx(math.sqrt(1.125) / math.sqrt(2))
    ctx = per_context(s_thought, s_none, s_filler)
    assert ctx["benefit_over_filler"].tolist() == pytest.approx([0.5, -1.0])
    assert ctx["benefit_best"].tolist() == pytest.approx([1.0, 0.0])


def test_benefit_metrics_single_context_has_no_standard_error_and_checks_shapes():
    m = benefit_metrics(torch.tensor([[-1.0, -2.0]]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    assert m["benefit"] == pytest.approx(0.0) and math.isnan(m["benefit_over_filler_se"])
    with pytest.raises(ValueError, match="s_thought"):
        benefit_metrics(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2))


def test_filler_lengths_round_the_group_mean_and_tile():
    content = torch.tensor([3, 4, 1, 1, 0, 0])  # groups of 2: means 3.5, 1, 0
    assert filler_lengths(content, 2) == [4, 1, 1]  # half rounds up; never below 1
    assert tile_filler([7], 3) == [7, 7, 7]
    assert tile_filler([7, 8], 5) == [7, 8, 7, 8, 7]
    with pytest.raises(ValueError):
        tile_filler([], 2)


# --------------------------------------------------------------------------------------------
# layouts on real rollout sequences

G = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _rollout(tok, contexts, thoughts, separator: str = "") -> RolloutBatch:
    cfg = RolloutConfig(num_thoughts=G, separator=separator, use_system_prompt=False)
    prompts = [[*c.prefix, tok.think_open_id] for c in contexts]
    logps = [torch.zeros(len(t)) for t in thoughts]
    stopped = [t[-1] == tok.think_close_id for t in thoughts]
    return layout_rollouts(contexts, prompts, thoughts, logps, stopped, tok, cfg)


def test_control_sequences_remove_or_replace_the_thought(tok):
    close, a, b, c, x = tok.think_close_id, 40, 41, 42, 43
    contexts = [Context(prefix=[10, 11, 12], target=[x]), Context(prefix=[20, 21], target=[x])]
    thoughts = [[a, b, close], [a, b, c, a, b], [c, close], [a, close]]  # row 1 hit the cap
    rollout = _rollout(tok, contexts, thoughts, separator=" ")
    sep = tok.encode(" ")
    content = thought_content_lengths(rollout.thought_len, rollout.closed_by_tag)
    assert content.tolist() == [2, 5, 1, 1]
    no_thought, filler = control_sequences(
        rollout.sequences, rollout.thought_start, content, G, [99]
    )
    head0, head1 = [10, 11, 12, tok.think_open_id], [20, 21, tok.think_open_id]
    assert no_thought == [[*head0, close, *sep, x], [*head1, close, *sep, x]]
    # Filler length = rounded mean content length of the group: (2 + 5) / 2 -> 4, (1 + 1) / 2 -> 1.
    assert filler == [[*head0, 99, 99, 99, 99, close, *sep, x], [*head1, 99, close, *sep, x]]
    # The thought rows themselves: the same prompt and tail around the content.
    assert rollout.sequences[1] == [*head0, a, b, c, a, b, close, *sep, x]


def test_filler_must_be_ordinary_tokens(tok):
    from rlp.config import ConfigError
    from rlp.heldout import filler_token_ids

    assert filler_token_ids(tok, ".") == tok.encode(".")
    for bad in ("</think>", ""):
        with pytest.raises(ConfigError, match="benefit.filler"):
            filler_token_ids(tok, bad)


def _informative_logp(
    seq: list[int], open_id: int, close_id: int, vocab: int, blank: list[int]
) -> float:
    """log p(last token | the rest) for a model that reads its thought: each token between the
    last ``<think>`` and ``</think>`` gets logit +3, every other token 0 (softmax over vocab);
    ``blank`` tokens (the filler) carry no information and are not read."""
    body = seq[:-1]
    start = len(body) - 1 - body[::-1].index(open_id)
    end = body.index(close_id, start)
    shown = set(body[start + 1 : end]) - set(blank)
    logit = 3.0 if seq[-1] in shown else 0.0
    log_z = math.log(len(shown) * math.exp(3.0) + (vocab - len(shown)))
    return logit - log_z


def test_informative_thought_has_positive_benefit_and_the_filler_none(tok):
    close, x, y = tok.think_close_id, 50, 51
    contexts = [Context(prefix=[10, 11], target=[x]), Context(prefix=[20, 21], target=[y])]
    # Each context: one thought that names its target, one that does not (same length).
    thoughts = [[x, 60, close], [61, 62, close], [63, 64, close], [y, 65, close]]
    rollout = _rollout(tok, contexts, thoughts)
    content = thought_content_lengths(rollout.thought_len, rollout.closed_by_tag)
    dot = tok.encode(".")
    no_thought, filler = control_sequences(
        rollout.sequences, rollout.thought_start, content, G, dot
    )
    assert all(len(f) == len(n) + 2 for f, n in zip(filler, no_thought))  # mean content: 2

    def score(seqs):
        ids = (tok.think_open_id, tok.think_close_id, tok.vocab_size, dot)
        return torch.tensor([_informative_logp(s, *ids) for s in seqs])

    m = benefit_metrics(score(rollout.sequences).view(2, G), score(no_thought), score(filler))
    assert m["benefit"] > 0.5 and m["benefit_best"] > m["benefit"]
    assert m["frac_some_helps"] == 1.0
    assert m["filler_benefit"] == pytest.approx(0.0, abs=1e-9)
    assert m["benefit_over_filler"] == pytest.approx(m["benefit"] - m["filler_benefit"])


def test_constant_model_gives_zero_benefit_and_zero_filler_benefit(tok):
    """A real megatron model whose output weights are zero predicts uniformly: every term of
    the benefit is the same log(1/V), through the same scoring path as training."""
    from rlp.heldout import _target_scores, score_controls
    from tests.model_helpers import build_tiny_model

    model = build_tiny_model(vocab_size=tok.vocab_size, tie_embeddings=False)
    with torch.no_grad():
        model.output_layer.weight.zero_()
    close = tok.think_close_id
    contexts = [Context(prefix=[10, 11, 12], target=[50]), Context(prefix=[20], target=[51])]
    thoughts = [[60, 61, close], [62, 63, 64, 65], [66, close], [50, 67, close]]
    rollout = _rollout(tok, contexts, thoughts)
    reward = RewardConfig()
    kw = dict(max_tokens=64, pad_id=tok.pad_id, device=torch.device("cpu"))
    s_none, s_filler = score_controls(model, rollout, tok.encode("."), reward, **kw)
    s_pred = _target_scores(model, rollout.sequences, 1, reward, **kw).view(2, G)
    m = benefit_metrics(s_pred, s_none, s_filler)
    uniform = -math.log(model.output_layer.weight.shape[0])  # padded vocabulary rows included
    assert torch.allclose(s_none, torch.full((2,), uniform), atol=1e-4)
    for key in ("benefit", "benefit_best", "filler_benefit", "benefit_over_filler"):
        assert m[key] == pytest.approx(0.0, abs=1e-5), key
    assert m["frac_some_helps"] == 0.0


# --------------------------------------------------------------------------------------------
# heldout.jsonl and the summary reading


def _row(step, over, se, benefit=0.1, nll=3.0):
    k = "eval/thought/"
    return {
        "step": step,
        "eval/nll": nll,
        k + "benefit": benefit,
        k + "benefit_best": benefit + 0.2,
        k + "frac_some_helps": 0.5,
        k + "filler_benefit": benefit - over,
        k + "benefit_over_filler": over,
        k + "benefit_over_filler_se": se,
    }


def test_heldout_log_appends_truncates_and_keeps_finite_numbers(tmp_path):
    log = HeldoutLog(tmp_path / "heldout.jsonl")
    for step in (0, 2, 4):
        log.append(step, {"eval/nll": 1.0 + step, "eval/x": float("nan"), "note": "text"})
    assert [r["step"] for r in log.rows()] == [0, 2, 4] and log.has(2) and not log.has(3)
    assert log.rows()[0] == {"step": 0, "eval/nll": 1.0, "eval/x": None}
    log.truncate_after(2)
    assert [r["step"] for r in log.rows()] == [0, 2]
    silent = HeldoutLog(tmp_path / "other.jsonl", enabled=False)
    silent.append(0, {"eval/nll": 1.0})
    assert silent.rows() == []
    log.append(6, {"eval/nll": 2.0}, {"benefit": [0.5, float("inf")]})
    assert log.rows()[-1]["per_context"] == {"benefit": [0.5, None]}


def test_heldout_reading_says_what_the_numbers_mean():
    lines = heldout_reading(_row(0, 0.01, 0.05), _row(30, 0.30, 0.05, nll=2.5))
    assert len(lines) == 3 and lines[0].startswith("held-out step 0:")
    assert "more than a same-length filler" in lines[2] and "changed (+0.2900" in lines[2]
    assert "3.0000 -> 2.5000" in lines[2]
    null = heldout_reading(_row(0, 0.0, 0.05), _row(30, 0.04, 0.05))[-1]
    assert "no better than a same-length filler" in null and "did not change beyond noise" in null
    worse = heldout_reading(_row(0, 0.0, 0.05), _row(30, -0.5, 0.05))[-1]
    assert "worse than a same-length filler" in worse
    assert heldout_reading({"step": 0, "eval/nll": 1.0}, {"step": 4, "eval/nll": 1.0}) == []
    no_se = heldout_reading(_row(0, 0.0, None), _row(4, 0.0, float("nan")))[-1]
    assert "raise eval.num_documents" in no_se


def test_paired_difference_uses_the_same_contexts():
    # Contexts differ a lot from each other (large s.e. of each level), but every context moves
    # by about +0.1: unpaired the change is noise, paired it is clear.
    before = [-2.0, 0.0, 2.0, -1.0, 1.0]
    after = [b + 0.1 + 0.01 * i for i, b in enumerate(before)]
    start, end = _row(0, 0.0, 0.7), _row(8, 0.12, 0.7)
    start["per_context"] = {"benefit_over_filler": before}
    end["per_context"] = {"benefit_over_filler": after}
    mean, se = paired_difference(start, end, "benefit_over_filler")
    assert mean == pytest.approx(0.12) and se == pytest.approx(0.01 * math.sqrt(2.5 / 5))
    assert "it changed (+0.1200" in heldout_reading(start, end)[-1]
    assert "did not change" in heldout_reading(_row(0, 0.0, 0.7), _row(8, 0.12, 0.7))[-1]
    assert paired_difference(start, _row(8, 0.1, 0.1), "benefit_over_filler") is None
