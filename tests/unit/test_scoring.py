"""rlp.scoring on a tiny model: packed prefix trees == causal rows == full-logit references for
S_pred, S_ema (EMA weights) and the tempered behaviour log-probs; the consistency metric."""

from __future__ import annotations

import pytest
import torch

from tests.data_helpers import tiny_tokenizer
from tests.model_helpers import build_tiny_model

pytest.importorskip("megatron.core")

from rlp.config import RolloutConfig  # noqa: E402
from rlp.data.contexts import Context  # noqa: E402
from rlp.ema import EMA  # noqa: E402
from rlp.layout import plan_tokens  # noqa: E402
from rlp.rollout import baseline_sequences, build_prompt, layout_rollouts  # noqa: E402
from rlp.scoring import score_rollouts  # noqa: E402

T = 0.7


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _full_logprobs(model, seq: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of every next token of ``seq`` from one plain forward."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(ids[:, :-1], None, None)[0].double()
    return torch.log_softmax(logits / temperature, -1).gather(1, ids[0, 1:, None])[:, 0]


def _rollout(tok, model, g: int = 3):
    gen = torch.Generator().manual_seed(0)
    close = tok.think_close_id
    contexts = [
        Context(prefix=torch.randint(5, 300, (n,), generator=gen).tolist(), target=[60, 61])
        for n in (12, 5)
    ]
    prompts = [build_prompt(c.prefix, [], tok.think_open_id) for c in contexts]
    thoughts, stopped = [], []
    for row in range(len(contexts) * g):
        n = 2 + 3 * (row % 3)
        t = torch.randint(5, 300, (n,), generator=gen).tolist()
        if row % 2:
            t[-1] = close  # closed itself; the others hit the cap
        thoughts.append(t)
        stopped.append(bool(row % 2))
    cfg = RolloutConfig(num_thoughts=g, use_system_prompt=False)
    # Behaviour log-probs as a sampler at T records them: the tempered full-vocabulary values.
    logps = []
    for row, t in enumerate(thoughts):
        prompt = prompts[row // g]
        full = _full_logprobs(model, [*prompt, *t], T)
        logps.append(full[len(prompt) - 1 :].float())
    return contexts, layout_rollouts(contexts, prompts, thoughts, logps, stopped, tok, cfg)


def test_packed_and_rows_scoring_equal_the_references(tok) -> None:
    model = build_tiny_model(seed=9, vocab_size=tok.vocab_size).eval()
    teacher_model = build_tiny_model(seed=10, vocab_size=tok.vocab_size).eval()
    ema = EMA()
    ema.initialize(list(teacher_model.parameters()))
    contexts, rollout = _rollout(tok, model)
    baseline = baseline_sequences(contexts, [], "prefix")
    params = list(model.parameters())

    def score(packed: bool, budget: int):
        return score_rollouts(
            model,
            rollout,
            baseline,
            lambda: ema.swap_into(params),
            max_tokens=budget,
            pad_id=tok.pad_id,
            device=torch.device("cpu"),
            temperature=T,
            packed=packed,
            with_reference=True,
        )

    packed, split, rows = score(True, 10_000), score(True, 30), score(False, 10_000)
    assert len(packed.plan) == 1 and len(split.plan) > 2 and not rows.plan[0].packed
    # Prefix sharing: fewer tokens through the model than one row per thought.
    assert plan_tokens(packed.plan) < sum(len(s) - 1 for s in rollout.sequences)
    for other in (split, rows):
        torch.testing.assert_close(other.s_pred, packed.s_pred, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.s_ema, packed.s_ema, atol=1e-5, rtol=0)
    assert packed.consistency == pytest.approx(1.0, abs=1e-5)
    assert rows.consistency == pytest.approx(1.0, abs=1e-5)
    # S_pred: raw log-probs of the K targets after each full sequence.
    for row, seq in enumerate(rollout.sequences):
        ref = _full_logprobs(model, seq)[-2:]
        torch.testing.assert_close(packed.s_pred[row].double(), ref, atol=1e-5, rtol=0)
    # S_ema: the teacher's weights on prefix + target, shared by the context's G thoughts.
    for b, seq in enumerate(baseline):
        ref = _full_logprobs(teacher_model, seq)[-2:]
        for row in range(b * 3, b * 3 + 3):
            torch.testing.assert_close(packed.s_ema[row].double(), ref, atol=1e-5, rtol=0)
    # Thought log-probs (behaviour, and the teacher's for the KL term) at temperature T.
    (mb,) = packed.plan
    counts = mb.labels[0].counts
    teacher_thoughts = torch.split(packed.logp_ref[0], counts)
    for local, row in enumerate(mb.branches):
        prompt = rollout.prompts[row // 3]
        n = int(rollout.thought_len[row])
        ref = _full_logprobs(teacher_model, rollout.sequences[row], T)[len(prompt) - 1 :][:n]
        torch.testing.assert_close(teacher_thoughts[local].double(), ref, atol=1e-5, rtol=0)
    # The policy weights are back after the teacher passes.
    assert all(
        torch.equal(p, q)
        for p, q in zip(params, build_tiny_model(seed=9, vocab_size=tok.vocab_size).parameters())
    )


def test_consistency_detects_a_temperature_mismatch(tok) -> None:
    model = build_tiny_model(seed=9, vocab_size=tok.vocab_size).eval()
    contexts, rollout = _rollout(tok, model)
    scores = score_rollouts(
        model,
        rollout,
        baseline_sequences(contexts, [], "prefix"),
        lambda: torch.no_grad(),
        max_tokens=10_000,
        pad_id=tok.pad_id,
        device=torch.device("cpu"),
        temperature=1.0,  # recorded at T=0.7: not the same footing
    )
    assert scores.consistency > 1.001
