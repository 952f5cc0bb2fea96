"""Tests for rlp.eval.generation: the Hugging Face path with a tiny random Llama, end to end.

The model (2 layers, hidden 32) and a byte-level BPE tokenizer are built in the test; nothing is
downloaded.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from rlp.eval.generation import HFGenerator, load_generate_fn  # noqa: E402
from rlp.eval.runner import EvalSettings, evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
CORPUS = [
    "Solve the following math problem step by step. Put your final answer within \\boxed{}.",
    "Problem: Sam has 3 apples and buys 4 more. How many apples does he have?",
    "Solution: 3 + 4 = 7. The final answer is $\\boxed{7}$.",
    "Question: Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth",
    "Answer: Let's think step by step. The answer is (B).",
]


def _build_tiny_model(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def generator(model_dir: Path) -> HFGenerator:
    return load_generate_fn(model_dir, tp=1, batch_size=4, seed=0, device="cpu")


PROMPTS = [
    "Problem: What is 2 + 3?\n\nSolution:",
    "Question: x",
    "A much longer prompt with many more words so that the batch needs left padding",
]


def test_load_generate_fn_builds_cpu_fp32_generator(generator: HFGenerator) -> None:
    assert generator.device.type == "cpu"
    assert next(generator.model.parameters()).dtype == torch.float32
    assert generator.tokenizer.padding_side == "left"
    assert not generator.model.training


def test_output_shape(generator: HFGenerator) -> None:
    out = generator(PROMPTS, 3, 1.0, 6, 0)
    assert len(out) == 3 and all(len(row) == 3 for row in out)
    assert all(isinstance(t, str) for row in out for t in row)


def test_batched_left_padded_greedy_equals_unbatched(generator: HFGenerator) -> None:
    batched = generator(PROMPTS, 1, 0.0, 8, 0)
    single = [generator([p], 1, 0.0, 8, 0)[0] for p in PROMPTS]
    assert batched == single
    assert any(row[0] for row in batched)  # something was generated


def test_greedy_samples_identical(generator: HFGenerator) -> None:
    out = generator(PROMPTS[:2], 4, 0.0, 6, 123)
    assert all(len(set(row)) == 1 and len(row) == 4 for row in out)


def test_sampling_reproducible_per_seed(generator: HFGenerator) -> None:
    a = generator(PROMPTS, 2, 1.0, 10, 5)
    b = generator(PROMPTS, 2, 1.0, 10, 5)
    c = generator(PROMPTS, 2, 1.0, 10, 6)
    assert a == b
    assert a != c


def test_model_generation_config_cannot_change_protocol(generator: HFGenerator) -> None:
    # A checkpoint shipping top_k=1 (or a repetition penalty) in generation_config must not turn
    # temperature sampling into greedy decoding: the generator sets every knob explicitly.
    gen_cfg = generator.model.generation_config
    saved = (gen_cfg.top_k, gen_cfg.repetition_penalty)
    gen_cfg.top_k, gen_cfg.repetition_penalty = 1, 5.0
    try:
        sampled = generator(PROMPTS, 4, 1.0, 8, 11)
        greedy = generator(PROMPTS, 1, 0.0, 8, 11)
    finally:
        gen_cfg.top_k, gen_cfg.repetition_penalty = saved
    assert any(len(set(row)) > 1 for row in sampled)
    assert greedy == generator(PROMPTS, 1, 0.0, 8, 11)


def test_stop_strings_cut_output(model_dir: Path, generator: HFGenerator) -> None:
    full = generator([PROMPTS[0]], 1, 0.0, 16, 0)[0][0]
    assert len(full) >= 4
    stop = full[2:4]
    stopped = load_generate_fn(model_dir, batch_size=2, device="cpu", stop_strings=[stop])
    cut = stopped([PROMPTS[0]], 1, 0.0, 16, 0)[0][0]
    assert cut == full[: full.find(stop)]


def test_load_errors(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_generate_fn(tmp_path / "missing")
    (tmp_path / "megatron_ckpt").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_generate_fn(tmp_path / "megatron_ckpt")
    with pytest.raises(ValueError, match="--tp 1"):
        load_generate_fn(model_dir, tp=2)


def _fixture_data(root: Path) -> Path:
    rows = {
        "gsm8k": [
            {"id": f"g{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)
        ],
        "mmlu": [
            {
                "id": f"astronomy/{i}",
                "question": f"Planet {i}?",
                "choices": ["Mars", "Jupiter", "Venus", "Earth"],
                "answer": "B",
            }
            for i in range(2)
        ],
    }
    for name, rs in rows.items():
        (root / name).mkdir(parents=True)
        (root / name / "test.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rs), encoding="utf-8"
        )
    return root


def test_evaluate_end_to_end_with_tiny_model(generator: HFGenerator, tmp_path: Path) -> None:
    data = _fixture_data(tmp_path / "bench")
    settings = EvalSettings(
        data_dir=str(data), num_samples=2, max_new_tokens=8, batch_size=2, verify_workers=1
    )
    res = evaluate(
        generator,
        ["gsm8k", "mmlu"],
        settings,
        tmp_path / "out",
        progress=False,
        write_reports=False,
    )
    assert set(res["runs"]) == {"gsm8k:sampled", "mmlu:greedy", "mmlu:sampled"}
    records = [
        json.loads(x)
        for x in (tmp_path / "out" / "items.jsonl").read_text(encoding="utf-8").splitlines()[1:]
    ]
    assert len(records) == 3 + 2 + 2
    for rec in records:
        assert len(rec["samples"]) == rec["num_samples"]
        for s in rec["samples"]:
            assert s["status"] in {"correct", "incorrect", "no_answer", "timeout", "error"}
            assert s["status"] not in {"timeout", "error"}


def _load_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "rlp_evaluate_cli", REPO / "benchmarks" / "evaluate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_end_to_end_and_resume(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = _load_cli()
    data = _fixture_data(tmp_path / "bench")
    out = tmp_path / "eval"
    argv = [
        "--checkpoint",
        str(model_dir),
        "--benchmarks",
        "gsm8k,mmlu",
        "--data-dir",
        str(data),
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--verify-workers",
        "1",
    ]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| GSM8K |" in stdout and "results written to" in stdout
    first = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(first["runs"]) == {"gsm8k:greedy", "mmlu:greedy"}
    assert first["checkpoint"] == str(model_dir)
    assert (out / "accuracy.png").is_file() and (out / "summary.md").is_file()
    # Re-running resumes (nothing left to generate) and reports the same numbers.
    assert cli.main(argv) == 0
    second = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert second["timing"]["batches_generated"] == 0
    first.pop("timing")
    second.pop("timing")
    assert first == second
    # Different settings on the same --out are refused with a clear message.
    assert cli.main([*argv, "--seed", "3"]) == 2
    assert "seed" in capsys.readouterr().err


def test_cli_reasoning_probes_on_the_hf_backend(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = _load_cli()
    data = _fixture_data(tmp_path / "bench")
    out = tmp_path / "eval"
    argv = [
        "--checkpoint", str(model_dir), "--benchmarks", "gsm8k,mmlu", "--data-dir", str(data),
        "--num-samples", "2", "--max-new-tokens", "8", "--batch-size", "2", "--backend", "hf",
        "--out", str(out), "--no-progress", "--verify-workers", "1",
        "--probes", "truncate,filler,paraphrase", "--paraphraser", str(model_dir),
        "--step-info-gain",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert "Faithfulness probes" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(res["probes"]) == {"gsm8k", "mmlu"} and set(res["step_info_gain"]) == {"gsm8k"}
    assert res["probes"]["gsm8k"]["paraphraser"] == str(model_dir)
    assert len(res["step_info_gain"]["gsm8k"]["items"]) == 3 * 2
    assert (out / "probes.jsonl").is_file() and (out / "step_gain.jsonl").is_file()
