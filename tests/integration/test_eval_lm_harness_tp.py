"""``rlp eval lm-eval --model rlp`` at TP=2 (torchrun, 2 gloo processes) vs TP=1.

Rank 0 runs lm-eval, rank 1 builds the same model from the same command line and serves its
scoring and generation requests. The metrics must match the TP=1 run (up to float rounding of the
log-likelihoods) and only rank 0 may write results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.model_helpers import run_torchrun

pytest.importorskip("lm_eval")


def _metrics(out: Path) -> dict:
    (path,) = out.rglob("results_*.json")
    return json.loads(path.read_text(encoding="utf-8"))["results"]


@pytest.mark.integration
def test_lm_eval_tp2_equals_tp1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from rlp.eval.command import main
    from tests.unit.test_eval_lm_harness import _tasks
    from tests.unit.test_eval_megatron import build_peaked_llama

    model = build_peaked_llama(tmp_path / "model")
    tasks = _tasks(tmp_path / "tasks")

    def argv(tp: int, out: Path) -> list[str]:
        return [
            "lm-eval", "--model", "rlp", "--model_args", f"checkpoint={model},tp={tp}",
            "--device", "cpu", "--batch_size", "4",
            "--tasks", "rlp_tiny_mc,rlp_tiny_rolling,rlp_tiny_gen",
            "--include_path", str(tasks), "--output_path", str(out),
        ]  # fmt: skip

    tp2, tp1 = tmp_path / "tp2", tmp_path / "tp1"
    proc = run_torchrun("-m", "rlp.cli", "eval", *argv(2, tp2), nproc=2, timeout=400)
    assert proc.stdout.count("rlp_tiny_mc") >= 1
    assert len(list(tp2.rglob("results_*.json"))) == 1  # rank 0 only
    assert main(argv(1, tp1)) == 0
    capsys.readouterr()
    a, b = _metrics(tp2), _metrics(tp1)
    assert a["rlp_tiny_mc"]["acc,none"] == b["rlp_tiny_mc"]["acc,none"]
    assert a["rlp_tiny_gen"]["exact_match,none"] == b["rlp_tiny_gen"]["exact_match,none"]
    ppl_a = a["rlp_tiny_rolling"]["word_perplexity,none"]
    ppl_b = b["rlp_tiny_rolling"]["word_perplexity,none"]
    assert ppl_a == pytest.approx(ppl_b, rel=1e-4)
