"""Tokenizer wrapper: loading, RLP special tokens, EOS/PAD resolution and a portable identity hash.

This module owns everything the rest of ``rlp`` needs from a tokenizer and nothing model-specific:

* :func:`load_tokenizer` accepts a local directory (``tokenizer.json`` and/or
  ``tokenizer_config.json``), a ``tokenizer.json`` file, a ``.gguf`` file (the vocabulary is read
  from its metadata) or, with network access, a Hugging Face hub name. ``transformers`` is
  imported lazily (it costs ~1-3 s).
* ``<think>``/``</think>`` are added as special tokens when missing; :attr:`Tokenizer.num_added`
  tells the model builder that the vocabulary grew (new ids are appended after the existing ones,
  so existing ids and therefore pre-tokenised shards stay valid).
* :attr:`Tokenizer.hash` identifies the token-id mapping: a sha256 over the canonical JSON of the
  parts of ``tokenizer.json`` that decide ids (model, normalizer, pre-tokenizer, added tokens).
  Runtime-only parts (padding, truncation, the post-processor that ``transformers`` rewrites on
  load, the decoder) are left out so the same tokenizer hashes equally however it was loaded.
* :func:`train_bpe_tokenizer` trains a small byte-level BPE (demo corpus, test fixtures).

Encoding for training data never adds BOS/EOS itself; callers append EOS where documents end.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tokenizers
    from transformers import PreTrainedTokenizerBase

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
"""Tried, in order, when a tokenizer declares no EOS token and none is configured."""
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
"""Tried, in order, when a tokenizer declares no PAD token; EOS is the last resort."""
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<think>", "</think>")
"""Special tokens of tokenizers trained by :func:`train_bpe_tokenizer` (ids 0..3)."""

# Parts of tokenizer.json that decide which ids a text maps to (see the module docstring).
_HASHED_PARTS = ("normalizer", "pre_tokenizer", "model")
_ADDED_TOKEN_FIELDS = ("id", "content", "special", "single_word", "lstrip", "rstrip", "normalized")


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or lacks a required token; the message says what to do."""


class Tokenizer:
    """A loaded tokenizer with the ids RLP needs. Create it with :func:`load_tokenizer`."""

    def __init__(
        self,
        hf: PreTrainedTokenizerBase,
        *,
        name: str,
        path: str,
        think_open: str,
        think_close: str,
        num_added: int,
    ) -> None:
        self.hf = hf
        """The underlying ``transformers`` tokenizer (after additions)."""
        self.name = name
        """What the tokenizer was loaded from, as given (path, file or hub name)."""
        self.path = path
        """Resolved local path (directory or file) or the hub name when loaded from the hub."""
        self.num_added = num_added
        """Tokens added on load (``<think>``/``</think>`` when missing): the vocabulary grew."""
        self.think_open = think_open
        self.think_close = think_close
        backend = getattr(hf, "backend_tokenizer", None)
        self._backend: tokenizers.Tokenizer | None = backend
        # A second backend that treats special-token strings inside text as plain text, so a
        # document that literally contains "<|endoftext|>" or "<think>" cannot inject control
        # tokens into the training data (see ``encode(parse_special=False)``).
        self._literal_backend: tokenizers.Tokenizer | None = None
        if backend is not None:
            import tokenizers as tk

            self._literal_backend = tk.Tokenizer.from_str(backend.to_str())
            self._literal_backend.encode_special_tokens = True
        self._hash: str | None = None
        self.think_open_id = self._require_id(think_open, "think_open")
        self.think_close_id = self._require_id(think_close, "think_close")
        self.eos_token: str = hf.eos_token
        self.eos_id = self._require_id(self.eos_token, "eos_token")
        self.pad_token: str = hf.pad_token
        self.pad_id = self._require_id(self.pad_token, "pad_token")

    # ------------------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of token ids, including added tokens (``len(hf)``)."""
        return len(self.hf)

    @property
    def hash(self) -> str:
        """sha256 of the canonical id mapping (identical for the same tokenizer anywhere)."""
        if self._hash is None:
            self._hash = _mapping_hash(self.hf)
        return self._hash

    def token_to_id(self, token: str) -> int | None:
        """Id of an exact token string, or ``None`` when it is not in the vocabulary."""
        if self._backend is not None:
            return self._backend.token_to_id(token)
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.hf.unk_token_id else int(tid)

    # ------------------------------------------------------------------------------ encoding

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` without BOS/EOS.

        ``parse_special=False`` encodes special-token strings in the text as ordinary text; use it
        for untrusted corpus text (the shard builder does).
        """
        if self._backend is None:
            if not parse_special:
                raise TokenizerError(
                    f"tokenizer {self.name!r} has no fast (tokenizers) backend, so special tokens "
                    "in text cannot be escaped; convert it to a tokenizer.json"
                )
            return list(self.hf.encode(text, add_special_tokens=False))
        backend = self._backend if parse_special else self._literal_backend
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, parse_special: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts (one call into the Rust backend)."""
        if self._backend is None:
            return [self.encode(t, parse_special=parse_special) for t in texts]
        backend = self._backend if parse_special else self._literal_backend
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids`` (special tokens kept unless ``skip_special``)."""
        ids = [int(i) for i in ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special)
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def backend_json(self) -> str:
        """The full ``tokenizer.json`` (after additions): rebuild with ``tokenizers.from_str``."""
        if self._backend is None:
            raise TokenizerError(f"tokenizer {self.name!r} has no tokenizer.json backend")
        return self._backend.to_str()

    # ------------------------------------------------------------------------------ saving

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (with additions, EOS and PAD).

        Reloading the directory gives the same :attr:`hash` and ids with ``num_added == 0``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        return directory

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, num_added={self.num_added}, hash={self.hash[:12]})"
        )

    def _require_id(self, token: str | None, what: str) -> int:
        tid = None if token is None else self.token_to_id(token)
        if tid is None:
            raise TokenizerError(
                f"tokenizer {self.name!r}: {what} {token!r} is not in its vocabulary"
            )
        return tid


# ---------------------------------------------------------------------------------- loading


def load_tokenizer(
    path_or_name: str | Path,
    think_open: str = "<think>",
    think_close: str = "</think>",
    eos_token: str | None = None,
) -> Tokenizer:
    """Load a tokenizer, add the thought tags when missing and resolve EOS/PAD.

    ``path_or_name``: a directory with ``tokenizer.json`` (and optionally
    ``tokenizer_config.json``), a ``tokenizer.json`` file, a ``.gguf`` file or a hub name.
    ``eos_token`` overrides the tokenizer's own EOS; it must already be in the vocabulary.
    """
    name = str(path_or_name)
    hf, resolved = _load_hf(name)
    num_added = _add_think_tokens(hf, think_open, think_close)
    _resolve_eos(hf, eos_token, name)
    _resolve_pad(hf)
    return Tokenizer(
        hf,
        name=name,
        path=resolved,
        think_open=think_open,
        think_close=think_close,
        num_added=num_added,
    )


def tokenizer_hash(path_or_name: str | Path) -> str:
    """:attr:`Tokenizer.hash` of the tokenizer as :func:`load_tokenizer` loads it."""
    return load_tokenizer(path_or_name).hash


def _looks_like_path(name: str) -> bool:
    """True when ``name`` can only mean a local path (a hub id is ``org/name`` or ``name``)."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.endswith((".json", ".gguf"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
    )


def _load_hf(name: str) -> tuple[PreTrainedTokenizerBase, str]:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(name).expanduser()
    tried: list[str] = []
    if path.is_file():
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), str(path)
        if path.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(path)), str(path)
        raise TokenizerError(
            f"tokenizer file {path} is neither a tokenizer.json nor a .gguf file; pass the "
            "directory that holds tokenizer.json/tokenizer_config.json instead (tokenizer.path)"
        )
    if path.is_dir():
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds {ggufs}: pass one of those files" if ggufs else ""
            raise TokenizerError(
                f"directory {path} has no tokenizer.json or tokenizer_config.json{hint}. Point "
                "tokenizer.path at a tokenizer directory (e.g. data/demo/tokenizer, built by "
                "`rlp data demo`) or save one with Tokenizer.save()"
            )
        try:
            return AutoTokenizer.from_pretrained(str(path)), str(path)
        except (ValueError, OSError, KeyError) as exc:
            if not (path / "tokenizer.json").is_file():
                raise TokenizerError(f"could not load the tokenizer in {path}: {exc}") from exc
            # A tokenizer.json next to a config naming a class this transformers lacks.
            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json")), str(path)
    tried.append(f"local path {path.resolve()} (does not exist)")
    if not _looks_like_path(name):
        try:
            return AutoTokenizer.from_pretrained(name), name
        except (OSError, ValueError) as exc:
            tried.append(f"Hugging Face hub name {name!r} ({type(exc).__name__}: {exc})")
    raise TokenizerError(
        f"could not load tokenizer {name!r}; tried: " + "; ".join(tried) + ". Set tokenizer.path "
        "to a directory with tokenizer.json, a tokenizer.json or .gguf file, or a hub name "
        "(needs network); `rlp data demo --out data/demo` builds the demo tokenizer"
    )


def _add_think_tokens(hf: PreTrainedTokenizerBase, think_open: str, think_close: str) -> int:
    from tokenizers import AddedToken

    if not think_open or not think_close or think_open == think_close:
        raise TokenizerError(
            f"think_open {think_open!r} and think_close {think_close!r} must be two different, "
            "non-empty tokens (tokenizer.think_open / tokenizer.think_close)"
        )
    vocab = hf.get_vocab()
    missing = [t for t in (think_open, think_close) if t not in vocab]
    if not missing:
        return 0
    tokens = [AddedToken(t, special=True, normalized=False) for t in missing]
    return int(hf.add_tokens(tokens, special_tokens=True))


def _resolve_eos(hf: PreTrainedTokenizerBase, eos_token: str | None, name: str) -> None:
    vocab = hf.get_vocab()
    if eos_token is not None:
        if eos_token not in vocab:
            raise TokenizerError(
                f"tokenizer.eos_token {eos_token!r} is not in the vocabulary of {name!r}; "
                f"special tokens it has: {sorted(hf.all_special_tokens)[:20]}"
            )
        hf.eos_token = eos_token
        return
    if hf.eos_token is not None and hf.eos_token in vocab:
        return
    for candidate in EOS_CANDIDATES:
        if candidate in vocab:
            hf.eos_token = candidate
            return
    raise TokenizerError(
        f"tokenizer {name!r} declares no EOS token and has none of {list(EOS_CANDIDATES)}; set "
        "tokenizer.eos_token to the token that ends a document"
    )


def _resolve_pad(hf: PreTrainedTokenizerBase) -> None:
    vocab = hf.get_vocab()
    if hf.pad_token is not None and hf.pad_token in vocab:
        return
    hf.pad_token = next((c for c in PAD_CANDIDATES if c in vocab), hf.eos_token)


# ---------------------------------------------------------------------------------- hashing


def _mapping_hash(hf: PreTrainedTokenizerBase) -> str:
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        raw = json.loads(backend.to_str())
        canonical: dict[str, Any] = {part: raw.get(part) for part in _HASHED_PARTS}
        added = sorted(raw.get("added_tokens") or [], key=lambda t: t["id"])
        canonical["added_tokens"] = [{k: t.get(k) for k in _ADDED_TOKEN_FIELDS} for t in added]
    else:  # no tokenizer.json: the vocabulary is the best available identity
        canonical = {"class": type(hf).__name__, "vocab": sorted(hf.get_vocab().items())}
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------- training


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|pad|>",
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts``, save it to ``out_dir`` and load it back.

    Special tokens take ids ``0..len(special_tokens)-1``. Deterministic for the same texts (the
    trainer breaks count ties by pair order). 2048 tokens on ~1 MB of text take about a second.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(special_tokens):
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs 256 byte tokens "
            f"plus {len(special_tokens)} special tokens"
        )
    for tok in (eos_token, pad_token):
        if tok not in special_tokens:
            raise TokenizerError(f"{tok!r} must be one of special_tokens {list(special_tokens)}")
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos_token, pad_token=pad_token)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)
