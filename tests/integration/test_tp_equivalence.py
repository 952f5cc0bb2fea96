"""TP=2 (two gloo processes) gives the same weights and per-token log-probs as TP=1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.model_helpers import run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "tp_logprobs.py"


@pytest.mark.integration
def test_tp2_logprobs_equal_tp1(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run_torchrun(SCRIPT, str(out), nproc=2, timeout=240)
    report = json.loads(out.read_text())
    assert set(report) == {"llama_sdpa", "qwen3_unfused"}
    for case, r in report.items():
        assert r["weight_max_abs_diff"] == 0.0, case  # same master weights, sliced
        assert r["logp_max_abs_diff"] < 1e-5, (case, r)
        assert r["score_max_abs_diff"] < 1e-5, (case, r)
        assert r["tp_ranks_max_abs_diff"] == 0.0, (case, r)
        assert -8.0 < r["logp_mean"] < -3.0, (case, r)  # ~log(1/vocab) for an untrained model
