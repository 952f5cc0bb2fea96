"""RLP contexts: choose target positions in a document and cut the prefix before each.

This module owns the data side of one RLP example (paper §3 "Positions"; ``docs/method.md`` §3):
for a document ``x`` of ``L`` tokens it draws ``targets_per_document`` positions ``t`` uniformly,
without replacement, among the positions that have at least ``min_prefix_tokens`` tokens before
them and ``K`` target tokens from ``t`` on. The context is the prefix ``x[max(0, t - P) : t]``
(``P = max_prefix_tokens``: long prefixes are cut from the left so the window ends at ``t``) and the
target is ``x[t : t + K]``.

:class:`ContextBuilder` applies this to a document stream and keeps the contexts of a document
that are not handed out yet (``targets_per_document > 1``) in its resumable state.

The draw is a pure function of ``(seed, epoch, document key)``: every TP peer and every rerun picks
the same positions, and a document seen again in a later epoch gets fresh positions. A trailing
EOS (appended by the shard builder) is not a target: it ends the document, it is not its text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Context:
    """One RLP example: the document prefix ``x_<t`` and the ``K`` target tokens from ``t``."""

    prefix: list[int]
    """``x[max(0, t - max_prefix_tokens) : t]``."""
    target: list[int]
    """``x[t : t + K]``."""
    key: str = ""
    """Key of the source document in its shard."""
    position: int = 0
    """``t``: index of the first target token in the document."""
    epoch: int = 0
    """Data epoch the document was read in."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Context:
        return cls(
            prefix=[int(t) for t in raw["prefix"]],
            target=[int(t) for t in raw["target"]],
            key=str(raw["key"]),
            position=int(raw["position"]),
            epoch=int(raw["epoch"]),
        )


def _key_entropy(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def target_positions(
    num_tokens: int,
    *,
    target_tokens: int,
    count: int,
    min_prefix_tokens: int,
    seed: int,
    key: str,
    epoch: int = 0,
) -> list[int]:
    """Sorted distinct positions ``t`` with ``min_prefix_tokens <= t <= num_tokens - K``.

    Returns ``min(count, #valid)`` positions; an empty list when the document is too short.
    """
    if target_tokens < 1 or count < 1 or min_prefix_tokens < 1:
        raise ValueError("target_tokens, count and min_prefix_tokens must be >= 1")
    valid = num_tokens - target_tokens - min_prefix_tokens + 1
    if valid <= 0:
        return []
    seq = np.random.SeedSequence([seed & (2**64 - 1), epoch, _key_entropy(key)])
    rng = np.random.default_rng(seq)
    if count >= valid:
        picks = np.arange(valid)
    elif count == 1:
        picks = rng.integers(0, valid, size=1)
    else:
        picks = rng.choice(valid, size=count, replace=False)
    return sorted(int(p) + min_prefix_tokens for p in picks)


def document_contexts(
    tokens: np.ndarray | list[int],
    key: str,
    *,
    target_tokens: int,
    targets_per_document: int,
    min_prefix_tokens: int,
    max_prefix_tokens: int,
    seed: int,
    epoch: int = 0,
    eos_id: int | None = None,
) -> list[Context]:
    """The contexts of one document (``[]`` when it is shorter than ``min_prefix_tokens + K``)."""
    if max_prefix_tokens < min_prefix_tokens:
        raise ValueError(
            f"max_prefix_tokens={max_prefix_tokens} < min_prefix_tokens={min_prefix_tokens}"
        )
    arr = np.asarray(tokens)
    n = len(arr)
    if eos_id is not None and n and int(arr[-1]) == eos_id:
        n -= 1
    positions = target_positions(
        n,
        target_tokens=target_tokens,
        count=targets_per_document,
        min_prefix_tokens=min_prefix_tokens,
        seed=seed,
        key=key,
        epoch=epoch,
    )
    # Only the windows around the targets become Python lists (a document may be millions long).
    return [
        Context(
            prefix=arr[max(0, t - max_prefix_tokens) : t].astype(np.int64).tolist(),
            target=arr[t : t + target_tokens].astype(np.int64).tolist(),
            key=key,
            position=t,
            epoch=epoch,
        )
        for t in positions
    ]


class ContextBuilder:
    """Turns a document iterator into a stream of contexts; its state joins the data cursor.

    Documents are objects with ``key``, ``tokens`` and ``epoch`` (``rlp.data.stream.Document``).
    The contexts of one document come out consecutively; those not yet handed out are kept in
    the state, so a resume never drops or repeats one.
    """

    MAX_SHORT_IN_A_ROW = 10_000
    """Fail instead of spinning when the data never yields a context (e.g. all docs too short)."""

    def __init__(
        self,
        *,
        target_tokens: int,
        targets_per_document: int,
        min_prefix_tokens: int,
        max_prefix_tokens: int,
        seed: int,
        eos_id: int | None,
    ) -> None:
        self._args = dict(
            target_tokens=target_tokens,
            targets_per_document=targets_per_document,
            min_prefix_tokens=min_prefix_tokens,
            max_prefix_tokens=max_prefix_tokens,
            seed=seed,
            eos_id=eos_id,
        )
        self._pending: list[Context] = []
        self.contexts = 0
        """Contexts handed out."""
        self.short_documents = 0
        """Documents skipped because no position has ``min_prefix_tokens`` before it."""
        self._short_in_a_row = 0

    def next_contexts(self, documents: Iterator[Any], n: int) -> list[Context]:
        """Up to ``n`` contexts (fewer only when ``documents`` is exhausted)."""
        out: list[Context] = []
        while len(out) < n:
            if self._pending:
                take = min(n - len(out), len(self._pending))
                out.extend(self._pending[:take])
                del self._pending[:take]
                continue
            doc = next(documents, None)
            if doc is None:
                break
            contexts = document_contexts(doc.tokens, doc.key, epoch=doc.epoch, **self._args)
            if contexts:
                self._short_in_a_row = 0
                self._pending = contexts
                continue
            self.short_documents += 1
            self._short_in_a_row += 1
            if self._short_in_a_row >= self.MAX_SHORT_IN_A_ROW:
                raise ValueError(
                    f"{self._short_in_a_row} documents in a row have fewer than "
                    f"data.min_prefix_tokens ({self._args['min_prefix_tokens']}) + "
                    f"reward.target_tokens ({self._args['target_tokens']}) tokens; lower "
                    "data.min_prefix_tokens or use longer documents"
                )
        self.contexts += len(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": [c.to_dict() for c in self._pending],
            "contexts": self.contexts,
            "short_documents": self.short_documents,
            "short_in_a_row": self._short_in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = [Context.from_dict(c) for c in state["pending"]]
        self.contexts = int(state["contexts"])
        self.short_documents = int(state["short_documents"])
        self._short_in_a_row = int(state["short_in_a_row"])
