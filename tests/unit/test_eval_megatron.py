"""Tests for rlp.eval.megatron_generation: our megatron model + KV-cache sampler as ``generate_fn``.

The tiny random Llama and its byte-level BPE tokenizer come from ``test_eval_generation``'s
helper; the weights are re-drawn with ``initializer_range=0.2`` so next-token distributions are
peaked (no greedy near-ties that float rounding between transformers and megatron could flip),
and the tokenizer gets a post-processor that prepends a BOS token, as Llama tokenizers do.
Greedy text must equal the Hugging Face path's on the same weights, from an HF directory and
from an rlp checkpoint converted from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from rlp.eval.generation import load_generate_fn  # noqa: E402
from rlp.eval.megatron_generation import (  # noqa: E402
    MegatronGenerator,
    split_at_gaps,
    token_stop_sequences,
)
from rlp.eval.prompts import STOP_STRINGS  # noqa: E402
from tests.unit.test_eval_generation import PROMPTS, _build_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BOS_ID = 0  # <|endoftext|> doubles as BOS, GPT-2 style


def build_peaked_llama(path: Path) -> Path:
    """``_build_tiny_model`` (2 layers, hidden 32, BPE tokenizer) with weights of std 0.2 and a
    tokenizer that prepends BOS."""
    from tokenizers import Tokenizer, processors
    from transformers import LlamaConfig, LlamaForCausalLM

    _build_tiny_model(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", BOS_ID)]
    )
    tok.save(str(path / "tokenizer.json"))
    config = LlamaConfig.from_pretrained(path)
    config.initializer_range = 0.2
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(peaked_llama_dir: Path) -> Path:
    return peaked_llama_dir


@pytest.fixture(scope="module")
def hf_gen(model_dir: Path):
    return load_generate_fn(model_dir, batch_size=8, device="cpu", backend="hf")


@pytest.fixture(scope="module")
def meg_gen(model_dir: Path) -> MegatronGenerator:
    gen = load_generate_fn(model_dir, backend="megatron", device="cpu")
    assert isinstance(gen, MegatronGenerator)
    return gen


def test_greedy_equals_hf_path(hf_gen, meg_gen: MegatronGenerator) -> None:
    # Same ids as the HF path feeds its model: BOS added by the tokenizer, no chat template.
    ids = meg_gen.encode_prompts(PROMPTS, 20)
    assert ids == hf_gen.tokenizer(PROMPTS)["input_ids"]
    assert all(row[0] == BOS_ID and BOS_ID not in row[1:] for row in ids)
    ref = hf_gen(PROMPTS, 2, 0.0, 20, 0)
    got = meg_gen(PROMPTS, 2, 0.0, 20, 0)
    assert got == ref
    assert all(row[0] for row in got)  # something was generated
    assert all(len(row) == 2 and row[0] == row[1] for row in got)
    # Batching (one sampler call, buckets, prefix sharing) does not change greedy text.
    assert [meg_gen([p], 1, 0.0, 20, 0)[0] for p in PROMPTS] == [[row[0]] for row in got]


def test_stop_strings_cut_like_hf(model_dir: Path, hf_gen, meg_gen: MegatronGenerator) -> None:
    full = meg_gen([PROMPTS[0]], 1, 0.0, 24, 0)[0][0]
    assert len(full) >= 6
    stop = full[3:5]
    stopped = load_generate_fn(model_dir, backend="megatron", device="cpu", stop_strings=[stop])
    hf_stopped = load_generate_fn(model_dir, backend="hf", device="cpu", stop_strings=[stop])
    cut = stopped([PROMPTS[0]], 1, 0.0, 24, 0)[0][0]
    assert cut == full[: full.find(stop)]
    assert cut == hf_stopped([PROMPTS[0]], 1, 0.0, 24, 0)[0][0]


def test_per_call_stop_strings(hf_gen, meg_gen: MegatronGenerator) -> None:
    full = meg_gen([PROMPTS[0]], 1, 0.0, 24, 0)[0][0]
    stop = full[3:5]
    for gen in (meg_gen, hf_gen):
        cut = gen([PROMPTS[0]], 1, 0.0, 24, 0, stop_strings=[stop])[0][0]
        assert cut == full[: full.find(stop)]
    # The call's stop strings do not stay behind.
    assert meg_gen([PROMPTS[0]], 1, 0.0, 24, 0)[0][0] == full
    assert meg_gen.token_stops == meg_gen._token_stops_for(STOP_STRINGS)


def test_teacher_forcing_equals_hf_path(hf_gen, meg_gen: MegatronGenerator) -> None:
    seqs = [meg_gen.encode(p, special=True) + meg_gen.encode(" 7}") for p in PROMPTS]
    assert seqs[0][0] == BOS_ID and meg_gen.decode(seqs[0]).endswith(" 7}")
    got, ref = meg_gen.score(seqs), hf_gen.score(seqs)
    assert [len(row) for row in got] == [len(s) - 1 for s in seqs]
    assert max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g, r)) < 1e-4
    # The HF path is a plain forward + log_softmax.
    with torch.no_grad():
        logits = hf_gen.model(torch.tensor([seqs[2]])).logits[0, :-1].float()
    direct = torch.log_softmax(logits, -1).gather(1, torch.tensor(seqs[2][1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(got[2], dtype=torch.float64), direct.double(), atol=1e-4)
    best = meg_gen.argmax(seqs)
    assert best == hf_gen.argmax(seqs)
    assert best[2] == logits.argmax(-1).tolist()
    # Micro-batches of one row (a tiny token budget) give the same numbers (up to rounding).
    meg_gen.score_tokens = 1
    try:
        alone = meg_gen.score(seqs)
        assert max(abs(a - b) for g, r in zip(alone, got) for a, b in zip(g, r)) < 1e-5
        assert meg_gen.argmax(seqs) == best
    finally:
        meg_gen.score_tokens = 4096
    with pytest.raises(ValueError, match="needs >= 2"):
        meg_gen.score([[1]])


def test_sampling_is_seeded(meg_gen: MegatronGenerator) -> None:
    a = meg_gen(PROMPTS, 3, 1.0, 10, 5)
    assert a == meg_gen(PROMPTS, 3, 1.0, 10, 5)
    assert a != meg_gen(PROMPTS, 3, 1.0, 10, 6)
    assert any(len(set(row)) > 1 for row in a)  # samples of one prompt differ
    assert [len(row) for row in a] == [3, 3, 3]


def test_eos_and_token_stops(meg_gen: MegatronGenerator) -> None:
    tok = meg_gen.hf_tokenizer
    assert meg_gen.eos_ids == [tok.eos_token_id]  # config.json's eos_token_id
    # Byte-level BPE: every default stop string is a stable token sequence.
    assert meg_gen.token_stops == [tok.encode(s, add_special_tokens=False) for s in STOP_STRINGS]


def test_unstable_stop_strings_are_left_to_truncation() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # SentencePiece-style: a standalone encode starts with the "▁" space marker, which a row
    # ending mid-text in those ids would not have written.
    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(
        ["Problem: one\n\nProblem: two", "Question: x"] * 20,
        trainers.BpeTrainer(vocab_size=120, min_frequency=1, show_progress=False),
    )
    assert sp.encode("Problem:").tokens[0].startswith("▁")
    kept = token_stop_sequences(
        lambda s: sp.encode(s, add_special_tokens=False).ids,
        lambda ids: sp.decode(ids),
        ["Problem:", "\n\nQuestion:"],
    )
    assert kept == []


def test_split_at_gaps() -> None:
    # Sorted lengths 5, 9, 30, 31, 100: gaps 4, 21, 1, 69.
    lengths = [30, 5, 100, 9, 31]
    assert split_at_gaps(lengths, 20) == [[1, 3], [0, 4], [2]]
    assert split_at_gaps(lengths, 69) == [[1, 3, 0, 4, 2]]
    assert split_at_gaps(lengths, 0) == [[1], [3], [0], [4], [2]]
    assert split_at_gaps([7, 7], 0) == [[0, 1]]


def test_split_batches_give_the_same_greedy_text(meg_gen: MegatronGenerator) -> None:
    # PROMPTS have different lengths: bucket_gap=0 decodes each in its own batch (own seed).
    together = meg_gen(PROMPTS, 2, 0.0, 12, 3)
    meg_gen.bucket_gap = 0
    try:
        assert meg_gen(PROMPTS, 2, 0.0, 12, 3) == together
        sampled = meg_gen(PROMPTS, 2, 1.0, 12, 3)
        assert sampled == meg_gen(PROMPTS, 2, 1.0, 12, 3)
    finally:
        meg_gen.bucket_gap = None


def test_rlp_checkpoint_gives_the_same_text(
    model_dir: Path, meg_gen: MegatronGenerator, tmp_path: Path
) -> None:
    from rlp.model.convert import convert_main

    ckpt = tmp_path / "ckpt"
    assert convert_main(["hf-to-mcore", str(model_dir), str(ckpt)]) == 0
    from_ckpt = load_generate_fn(ckpt, backend="megatron", device="cpu")
    assert from_ckpt(PROMPTS, 1, 0.0, 16, 0) == meg_gen(PROMPTS, 1, 0.0, 16, 0)


def test_errors(model_dir: Path, meg_gen: MegatronGenerator, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an rlp checkpoint"):
        load_generate_fn(tmp_path, backend="megatron")
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        load_generate_fn(model_dir, tp=2, backend="megatron")
    with pytest.raises(ValueError, match="does not fit the model's 1024 positions"):
        meg_gen(PROMPTS, 1, 0.0, 1024, 0)
    # The tokenizer wrapper adds <think>, which this model was never trained with.
    with pytest.raises(ValueError, match="outside the model's"):
        meg_gen(["a <think> b"], 1, 0.0, 4, 0)
    meg_gen.rank = 1
    try:
        with pytest.raises(RuntimeError, match="follower"):
            meg_gen(PROMPTS, 1, 0.0, 4, 0)
    finally:
        meg_gen.rank = 0
    with pytest.raises(RuntimeError, match="follower ranks"):
        meg_gen.serve()


def test_cli_parallel_errors(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlp.eval.command import main

    base = ["--checkpoint", str(model_dir), "--benchmarks", "gsm8k", "--no-progress"]
    assert main([*base, "--backend", "hf", "--tp", "2"]) == 2
    assert "--backend megatron" in capsys.readouterr().err
    assert main([*base, "--tp", "2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
    # Launched with 2 processes but --tp 1: refused before any process group is joined.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(base) == 2
    assert "2 processes but --tp is 1" in capsys.readouterr().err
