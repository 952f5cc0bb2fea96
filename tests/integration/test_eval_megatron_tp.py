"""``benchmarks/evaluate.py --backend megatron`` at TP=2 (torchrun, 2 gloo processes) vs TP=1.

A tiny random Llama (HF directory, built here) is evaluated greedily on a generated 3-item GSM8K
fixture. Both runs must produce the same completions and the same results JSON (timing aside),
and under torchrun only rank 0 may report (rank 1 only generates).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.model_helpers import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "benchmarks" / "evaluate.py"


def _gsm8k_fixture(root: Path) -> Path:
    rows = [
        {"id": "g0", "question": "What is 2 + 3?", "answer": "5"},
        {"id": "g1", "question": "Sam has 3 apples and buys 4 more. How many?", "answer": "7"},
        {"id": "g2", "question": "What is 10 - 6?", "answer": "4"},
    ]
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    return root


def _samples(out: Path) -> list[tuple[str, int, list[str]]]:
    lines = (out / "items.jsonl").read_text(encoding="utf-8").splitlines()[1:]
    recs = [json.loads(x) for x in lines]
    return sorted((r["run"], r["index"], [s["text"] for s in r["samples"]]) for r in recs)


def _results(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    res.pop("timing")
    return res


@pytest.mark.integration
def test_tp2_eval_equals_tp1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from rlp.eval.command import main
    from tests.unit.test_eval_megatron import build_peaked_llama

    model = build_peaked_llama(tmp_path / "model")
    data = _gsm8k_fixture(tmp_path / "bench")
    common = [
        "--checkpoint", str(model), "--benchmarks", "gsm8k", "--data-dir", str(data),
        "--temperature", "0", "--max-new-tokens", "24", "--batch-size", "2",
        "--backend", "megatron", "--no-progress", "--verify-workers", "1", "--label", "tiny",
    ]  # fmt: skip
    tp2, tp1 = tmp_path / "tp2", tmp_path / "tp1"
    proc = run_torchrun(SCRIPT, *common, "--tp", "2", "--out", str(tp2), nproc=2, timeout=240)
    assert proc.stdout.count("results written to") == 1  # rank 0 reports, rank 1 does not
    assert "| GSM8K |" in proc.stdout

    assert main([*common, "--tp", "1", "--out", str(tp1)]) == 0
    capsys.readouterr()

    samples = _samples(tp2)
    assert [(run, i) for run, i, _ in samples] == [("gsm8k:greedy", i) for i in range(3)]
    assert any(texts[0] for _, _, texts in samples)  # something was generated
    assert samples == _samples(tp1)
    assert _results(tp2) == _results(tp1)
    for out in (tp2, tp1):
        assert (out / "summary.md").is_file() and (out / "accuracy.png").is_file()


REASONING_SCRIPT = REPO_ROOT / "tests" / "integration" / "scripts" / "eval_reasoning_tp.py"


def reasoning_records(gen, verifier) -> dict:
    """Probes (truncate, filler) and step gain on fixed chains (a random tiny model writes none)."""
    from rlp.eval.probes import ProbeSettings, probe_completions
    from rlp.eval.step_gain import StepGainSettings, step_gain_completions
    from tests.unit.test_eval_probes import MATH, MATH_TEXT, MC, MC_TEXT, _completion

    comps = [
        _completion(MATH, MATH_TEXT, "gsm8k:sampled"),
        _completion(MC, MC_TEXT, "mmlu:sampled"),
    ]
    probes = probe_completions(
        gen, comps, ProbeSettings(probes=("truncate", "filler")), verifier=verifier
    )
    return {"probes": probes, "gain": step_gain_completions(gen, comps[:1], StepGainSettings())}


@pytest.mark.integration
def test_tp2_probes_and_step_gain_equal_tp1(tmp_path: Path) -> None:
    """Forced greedy answers and teacher-forced scores through a TP=2 generator: rank 0 probes,
    rank 1 serves every generate and score request."""
    pytest.importorskip("transformers")
    from rlp.eval.generation import load_generate_fn
    from rlp.eval.grading import MathVerifier
    from tests.unit.test_eval_megatron import build_peaked_llama

    model = build_peaked_llama(tmp_path / "model")
    out = tmp_path / "tp2.json"
    run_torchrun(REASONING_SCRIPT, str(model), str(out), nproc=2, timeout=300)
    tp2 = json.loads(out.read_text(encoding="utf-8"))
    with MathVerifier(num_workers=1, timeout_s=20) as verifier:
        tp1 = reasoning_records(load_generate_fn(model, backend="megatron", device="cpu"), verifier)
    assert all(r["eligible"] for r in tp2["probes"])
    assert tp2["probes"] == tp1["probes"]
    (a,), (b,) = tp2["gain"], tp1["gain"]
    assert a["steps"] == b["steps"] == 2
    assert max(abs(x - y) for x, y in zip(a["logp"], b["logp"])) < 1e-4
    assert sum(a["step_gain"]) == a["total_gain"]
