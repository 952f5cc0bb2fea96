"""rlp.data.contexts (target positions, prefix cut, ContextBuilder) and rlp.data.packing."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from rlp.data.contexts import Context, ContextBuilder, document_contexts, target_positions
from rlp.data.packing import SequencePacker

ARGS = dict(target_tokens=1, min_prefix_tokens=4, seed=0)


def test_positions_are_valid_distinct_and_deterministic() -> None:
    for n in (5, 6, 20, 300):
        for k in (1, 2, 3):
            for count in (1, 3, 50):
                pos = target_positions(
                    n, target_tokens=k, count=count, min_prefix_tokens=4, seed=1, key=f"doc{n}"
                )
                valid = n - k - 4 + 1
                assert len(pos) == max(0, min(count, valid))
                assert pos == sorted(set(pos))
                assert all(4 <= t <= n - k for t in pos)
                assert pos == target_positions(
                    n, target_tokens=k, count=count, min_prefix_tokens=4, seed=1, key=f"doc{n}"
                )


def test_positions_depend_on_seed_key_and_epoch_and_are_uniform() -> None:
    base = [target_positions(1000, count=1, key=f"d{i}", **ARGS)[0] for i in range(200)]
    assert base != [
        target_positions(1000, count=1, key=f"d{i}", **{**ARGS, "seed": 1})[0] for i in range(200)
    ]
    assert base != [
        target_positions(1000, count=1, key=f"d{i}", epoch=1, **ARGS)[0] for i in range(200)
    ]
    # Uniform over the 7 valid positions of a 10-token document (t in 4..10 - K).
    hits = Counter(target_positions(11, count=1, key=str(i), **ARGS)[0] for i in range(7000))
    assert sorted(hits) == list(range(4, 11))
    counts = np.array([hits[t] for t in range(4, 11)])
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 22.5  # p ~ 0.001 for 6 degrees of freedom


def test_document_contexts_cut_prefix_and_target() -> None:
    eos = 0
    tokens = np.append(np.arange(10, 60), eos)  # 50 text tokens + EOS
    ctxs = document_contexts(
        tokens,
        "k",
        target_tokens=3,
        targets_per_document=40,
        min_prefix_tokens=5,
        max_prefix_tokens=8,
        seed=3,
        eos_id=eos,
    )
    # EOS is not text: valid t are 5..47 (t + 3 <= 50), 43 positions, all returned here.
    assert [c.position for c in ctxs][:3] == [5, 6, 7] and len(ctxs) == 40
    for c in ctxs:
        t = c.position
        assert c.target == list(range(10 + t, 13 + t))
        assert c.prefix == list(range(10 + max(0, t - 8), 10 + t))
        assert len(c.prefix) == min(t, 8) and c.key == "k"
    assert (
        document_contexts(
            tokens[:7],
            "k",
            target_tokens=3,
            targets_per_document=1,
            min_prefix_tokens=5,
            max_prefix_tokens=8,
            seed=3,
        )
        == []
    )


def _docs(lengths: list[int]):
    return iter(
        SimpleNamespace(key=f"d{i}", tokens=np.arange(n) + 100 * i, epoch=0)
        for i, n in enumerate(lengths)
    )


def test_context_builder_keeps_pending_contexts_across_calls_and_resume() -> None:
    kw = dict(
        target_tokens=1,
        targets_per_document=3,
        min_prefix_tokens=4,
        max_prefix_tokens=16,
        seed=0,
        eos_id=None,
    )
    lengths = [30, 3, 40, 2, 50, 60]
    full = ContextBuilder(**kw).next_contexts(_docs(lengths), 100)
    assert len(full) == 12  # 4 long documents x 3
    builder = ContextBuilder(**kw)
    docs = _docs(lengths)
    got = builder.next_contexts(docs, 2) + builder.next_contexts(docs, 5)
    state = json.loads(json.dumps(builder.state_dict()))  # plain data
    resumed = ContextBuilder(**kw)
    resumed.load_state_dict(state)
    got += resumed.next_contexts(docs, 100)
    assert got == full
    assert resumed.short_documents == 2 and resumed.contexts == 12
    assert Context.from_dict(full[0].to_dict()) == full[0]


def test_context_builder_refuses_to_spin_on_short_documents() -> None:
    builder = ContextBuilder(
        target_tokens=1,
        targets_per_document=1,
        min_prefix_tokens=64,
        max_prefix_tokens=64,
        seed=0,
        eos_id=None,
    )
    builder.MAX_SHORT_IN_A_ROW = 50
    with pytest.raises(ValueError, match="lower data.min_prefix_tokens"):
        builder.next_contexts(_docs([10] * 60), 1)


def test_packer_windows_share_one_token_and_add_eos_once() -> None:
    eos = 0
    packer = SequencePacker(seq_len=4, eos_id=eos)
    docs = [np.array([5, 6, 7]), np.array([8, 9, eos]), np.array([10, 11, 12, 13, 14, 15])]
    for i, d in enumerate(docs):
        packer.add(d, origin=f"doc{i}")
    stream = [5, 6, 7, eos, 8, 9, eos, 10, 11, 12, 13, 14, 15, eos]
    assert packer.available == 3
    windows = [packer.pop().tolist() for _ in range(3)]
    assert windows == [stream[0:5], stream[4:9], stream[8:13]]
    # The tail stream[12:] = [15, eos] is document 2 (10..15, eos) without its first 5 tokens.
    assert packer.origin == "doc2" and packer.state_dict() == {"seq_len": 4, "skip": 5}
    with pytest.raises(ValueError, match="add documents"):
        packer.pop()


def test_packer_batches_and_resume_from_a_position() -> None:
    docs = [np.arange(1, n + 1) for n in (7, 3, 12, 5, 9, 4, 11, 8, 6)]

    def stream(start: int = 0):
        return ((d, i) for i, d in enumerate(docs) if i >= start)  # (tokens, origin)

    ref_packer = SequencePacker(seq_len=5, eos_id=0)
    ref_docs = stream()
    ref = [ref_packer.next_batch(ref_docs, 2) for _ in range(6)]
    x, y = ref[0]
    assert x.shape == y.shape == (2, 5) and x.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all() and (x[1:, 0] == y[:-1, -1]).all()

    for cut in (1, 2, 3):
        packer, docs_iter = SequencePacker(seq_len=5, eos_id=0), stream()
        got = [packer.next_batch(docs_iter, 2) for _ in range(cut)]
        state = json.loads(json.dumps(packer.state_dict()))
        origin = packer.origin
        assert origin is not None and set(state) == {"seq_len", "skip"}
        resumed = SequencePacker(seq_len=5, eos_id=0)
        resumed.load_state_dict(state)
        assert resumed.state_dict() == state  # unchanged until documents arrive
        rest = stream(origin)  # the caller rewinds its document stream to the origin
        got += [resumed.next_batch(rest, 2) for _ in range(6 - cut)]
        for (a, b), (c, d) in zip(got, ref):
            assert (a == c).all() and (b == d).all()
    with pytest.raises(ValueError, match="ntp_seq_len"):
        SequencePacker(seq_len=6, eos_id=0).load_state_dict(state)
    bad = SequencePacker(seq_len=5, eos_id=0)
    bad.load_state_dict({"seq_len": 5, "skip": 50})
    with pytest.raises(ValueError, match="shards changed"):
        bad.add(np.arange(1, 4))
