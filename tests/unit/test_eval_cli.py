"""Tests for benchmarks/evaluate.py: argument handling, error messages, --compare, --list."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from rlp.eval.benchmarks import DATA_DIR_ENV, REGISTRY, BenchmarkItem
from rlp.eval.runner import EvalSettings, build_results, plan_runs

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "evaluate.py"


@pytest.fixture(scope="module")
def cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rlp_evaluate_cli_args", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results_file(path: Path, label: str, correct: int) -> Path:
    settings = EvalSettings(temperature=0.0)
    runs = plan_runs(["gsm8k"], settings)
    items = {"gsm8k": [BenchmarkItem(f"g{i}", "q", None, "1", "gsm8k") for i in range(4)]}
    records = [
        {
            "type": "item",
            "run": "gsm8k:greedy",
            "index": i,
            "id": f"g{i}",
            "gold": "1",
            "num_samples": 1,
            "num_correct": int(i < correct),
            "samples": [
                {
                    "text": "",
                    "extracted": "1",
                    "method": "boxed",
                    "status": "correct" if i < correct else "incorrect",
                    "detail": "",
                }
            ],
        }
        for i in range(4)
    ]
    res = build_results(runs, items, records, settings, label=label)
    path.write_text(json.dumps(res), encoding="utf-8")
    return path


def test_list(cli: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert name in out


def test_unknown_benchmark_lists_valid_names(
    cli: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--checkpoint", "x", "--benchmarks", "gsm8k,bogus"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "mmlu_pro" in err and "aime24" in err


def test_missing_data_dir_message(
    cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_data"
    assert cli.main(["--checkpoint", "x", "--data-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--data-dir" in err and DATA_DIR_ENV in err


def test_missing_checkpoint_is_reported_before_generation(
    cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bench" / "gsm8k"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text('{"id": "1", "question": "q", "answer": "1"}\n')
    assert (
        cli.main(
            [
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--benchmarks",
                "gsm8k",
                "--data-dir",
                str(tmp_path / "bench"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["--benchmarks", "gsm8k"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


def test_bad_numbers_are_rejected(cli: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--checkpoint", "x", "--num-samples", "0"]) == 2
    assert "--num-samples" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--probes", "paraphrase"], "--paraphraser"),
        (["--paraphraser", "m"], "paraphrase probe"),
        (["--probes", "truncate,bogus"], "unknown probe"),
        (["--benchmarks", "mmlu", "--step-info-gain"], "math benchmark"),
        (["--step-info-gain", "--max-steps", "0"], "max_steps"),
    ],
)
def test_reasoning_flag_errors(
    cli: ModuleType, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--checkpoint", "x", "--benchmarks", "gsm8k", *flags]) == 2
    assert message in capsys.readouterr().err


def test_compare(cli: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _results_file(tmp_path / "a.json", "base", 1)
    b = _results_file(tmp_path / "b.json", "rlp", 3)
    assert cli.main(["--compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "base (A) vs rlp (B)" in out
    assert "| GSM8K | 25.00 | 75.00 | 50.00 |" in out
    assert out.startswith((tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8"))
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["--compare", str(a), str(tmp_path / "none.json")]) == 2


def test_script_runs_from_a_checkout() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"],
        capture_output=True,
        text=True,
        cwd=REPO.parent,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "gpqa_diamond" in proc.stdout
