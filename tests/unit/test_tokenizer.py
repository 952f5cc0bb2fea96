"""rlp.tokenizer: loading paths, thought tags, EOS/PAD resolution, the portable hash, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlp.tokenizer import TokenizerError, load_tokenizer, tokenizer_hash, train_bpe_tokenizer
from tests.data_helpers import generate_texts, tiny_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tiny_tokenizer(tmp_path_factory.mktemp("tok")).path)


def _raw_bpe(path: Path, specials: list[str], vocab: int = 300) -> Path:
    """A bare tokenizer.json (no config, no think tags) as other projects ship them."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        generate_texts(100),
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    raw.save(str(path))
    return path


def test_trained_tokenizer_ids_and_roundtrip(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.vocab_size == 384 and tok.num_added == 0
    assert (tok.eos_id, tok.pad_id, tok.think_open_id, tok.think_close_id) == (0, 1, 2, 3)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    text = "We add 12 and 30 to get 42. The orbit of the planet."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]


def test_hash_is_the_same_for_every_way_of_loading(tok_dir: Path, tmp_path: Path) -> None:
    a = load_tokenizer(tok_dir)
    b = load_tokenizer(
        tok_dir / "tokenizer.json"
    )  # file path: transformers' post-processor differs
    saved = load_tokenizer(a.save(tmp_path / "copy"))
    assert a.hash == b.hash == saved.hash == tokenizer_hash(tok_dir)
    assert len(a.hash) == 64
    other = train_bpe_tokenizer(generate_texts(50, seed=9), 300, tmp_path / "other")
    assert other.hash != a.hash


def test_think_tags_added_when_missing_and_persisted(tmp_path: Path) -> None:
    path = _raw_bpe(tmp_path / "tokenizer.json", ["</s>"])
    tok = load_tokenizer(path)
    assert tok.num_added == 2 and tok.vocab_size == 302
    # New ids are appended: the existing mapping (and pre-tokenised data) is unchanged.
    assert (tok.think_open_id, tok.think_close_id) == (300, 301)
    assert tok.eos_token == "</s>" and tok.pad_id == tok.eos_id == 0  # PAD falls back to EOS
    assert tok.encode("a <think> b") == [*tok.encode("a "), 300, *tok.encode(" b")]
    again = load_tokenizer(tok.save(tmp_path / "saved"))
    assert again.num_added == 0 and again.hash == tok.hash
    assert (again.think_open_id, again.eos_id, again.pad_id) == (300, 0, 0)
    custom = load_tokenizer(path, think_open="<reason>", think_close="</reason>")
    assert custom.hash != tok.hash and custom.think_open_id == 300


def test_literal_special_tokens_in_text_are_not_parsed(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    text = "x <|endoftext|> y </think>"
    assert tok.eos_id in tok.encode(text) and tok.think_close_id in tok.encode(text)
    plain = tok.encode(text, parse_special=False)
    assert tok.eos_id not in plain and tok.think_close_id not in plain
    assert tok.decode(plain) == text
    assert tok.encode_batch([text], parse_special=False) == [plain]


def test_eos_resolution_and_override(tmp_path: Path) -> None:
    path = _raw_bpe(tmp_path / "tokenizer.json", ["<|endoftext|>", "<|im_end|>", "<pad>"])
    tok = load_tokenizer(path)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<pad>"
    assert load_tokenizer(path, eos_token="<|im_end|>").eos_id == 1
    with pytest.raises(TokenizerError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        load_tokenizer(path, eos_token="<|nope|>")
    bare = _raw_bpe(tmp_path / "bare.json", ["<unk>"])
    with pytest.raises(TokenizerError, match="declares no EOS token.*tokenizer.eos_token"):
        load_tokenizer(bare)


def test_wrong_paths_say_what_was_tried(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "tokenizer"
    with pytest.raises(TokenizerError, match="tried: local path .*does not exist.*tokenizer.path"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match="neither a tokenizer.json nor a .gguf"):
        load_tokenizer(tmp_path / "vocab.txt")
    path = _raw_bpe(tmp_path / "t.json", ["</s>"])
    with pytest.raises(TokenizerError, match="must be two different"):
        load_tokenizer(path, think_open="<t>", think_close="<t>")


def test_saved_config_records_eos_and_pad(tmp_path: Path) -> None:
    tok = load_tokenizer(_raw_bpe(tmp_path / "tokenizer.json", ["<|endoftext|>"]))
    out = tok.save(tmp_path / "saved")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|endoftext|>"


def test_gguf_file(tok_dir: Path, tmp_path: Path) -> None:
    """A vocab-only GGUF (as llama.cpp ships them) loads; saving it gives a normal directory."""
    gguf = pytest.importorskip("gguf")
    src = load_tokenizer(tok_dir)
    spec = json.loads(src.backend_json())
    tokens = [""] * src.vocab_size
    for text, i in spec["model"]["vocab"].items():
        tokens[i] = text
    specials = {t["id"] for t in spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    )
    writer.add_eos_token_id(src.eos_id)
    writer.add_bos_token_id(src.eos_id)
    writer.add_pad_token_id(src.pad_id)
    for add in (
        writer.add_context_length,
        writer.add_embedding_length,
        writer.add_block_count,
        writer.add_head_count,
        writer.add_feed_forward_length,
    ):
        add(8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    tok = load_tokenizer(tmp_path / "tiny.gguf")
    text = "Document 7. We add 12 and 30 to get 42."
    assert tok.encode(text) == src.encode(text)
    assert (tok.eos_id, tok.pad_id, tok.think_open_id) == (
        src.eos_id,
        src.pad_id,
        src.think_open_id,
    )
    saved = load_tokenizer(tok.save(tmp_path / "from_gguf"))
    assert saved.hash == tok.hash and saved.encode(text) == tok.encode(text)
