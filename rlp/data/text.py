"""Text documents: extracting a sample's text and turning text into token ids.

This module owns the one rule by which text becomes a training document, shared by the shard
builder (:mod:`rlp.data.builder`, ahead of time) and the stream (text shards, on the fly in the
data workers), so both give identical token ids for identical text:

* the text is tokenised without BOS, with special-token strings inside it encoded as plain text
  (a document containing ``<|endoftext|>`` or ``<think>`` cannot inject control tokens), and EOS
  is appended;
* a whitespace-only text is no document (the builder drops it, the stream skips it).

:func:`sample_text` finds a text sample's text: its ``.txt`` member (UTF-8), else the
``text_key`` string field of its ``.json`` member (one object) or of every line of its ``.jsonl``
member (the lines' texts joined by newlines).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

_TOKENIZERS: dict[int, Any] = {}


class TextEncoder:
    """Token arrays (+ EOS) for texts, with the tokenizer's ``tokenizer.json`` backend.

    Picklable and cheap to send to worker processes: the backend is rebuilt from its JSON on
    first use in each process.
    """

    def __init__(self, backend_json: str, eos_id: int, dtype: str) -> None:
        self.backend_json, self.eos_id, self.dtype = backend_json, eos_id, np.dtype(dtype)
        self._tok: Any = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, dtype: np.dtype | str) -> TextEncoder:
        """From an :class:`rlp.tokenizer.Tokenizer` (which must have a fast backend)."""
        return cls(tokenizer.backend_json(), tokenizer.eos_id, np.dtype(dtype).str)

    def __getstate__(self) -> dict[str, Any]:
        return {"backend_json": self.backend_json, "eos_id": self.eos_id, "dtype": self.dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tok = None

    def _backend(self) -> Any:
        if self._tok is None:
            import tokenizers

            key = hash(self.backend_json)
            tok = _TOKENIZERS.get(key)
            if tok is None:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                tok = tokenizers.Tokenizer.from_str(self.backend_json)
                tok.encode_special_tokens = True
                _TOKENIZERS[key] = tok
            self._tok = tok
        return self._tok

    def encode(self, text: str) -> np.ndarray:
        """Token ids of one document, EOS appended."""
        ids = self._backend().encode(text, add_special_tokens=False).ids
        out = np.empty(len(ids) + 1, dtype=self.dtype)
        out[:-1] = ids
        out[-1] = self.eos_id
        return out

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """:meth:`encode` for many texts (one call into the Rust backend)."""
        encs = self._backend().encode_batch(texts, add_special_tokens=False)
        return [np.array([*e.ids, self.eos_id], dtype=self.dtype) for e in encs]


def is_document(text: str) -> bool:
    """False for whitespace-only text (no document)."""
    return bool(text.strip())


def sample_text(parts: dict[str, bytes], text_key: str) -> str:
    """The text of a text sample; ``ValueError`` (naming what is missing) when it has none."""
    if "txt" in parts:
        return parts["txt"].decode("utf-8", errors="replace")
    if "json" in parts:
        return _field(_json(parts["json"], "json"), text_key, ".json")
    if "jsonl" in parts:
        lines = parts["jsonl"].decode("utf-8", errors="replace").splitlines()
        return "\n".join(
            _field(_json(line, f"jsonl line {i}"), text_key, f".jsonl line {i}")
            for i, line in enumerate(lines, 1)
            if line.strip()
        )
    raise ValueError(f"no .txt, .json or .jsonl member (has {sorted(parts) or 'nothing'})")


def _json(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid {what} ({exc})") from None


def _field(row: Any, key: str, where: str) -> str:
    if not isinstance(row, dict) or key not in row:
        has = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where} has no field {key!r} (has {has}); set data.text_key")
    if not isinstance(row[key], str):
        raise ValueError(f"{where} field {key!r} is {type(row[key]).__name__}, not text")
    return row[key]
