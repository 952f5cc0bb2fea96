"""TP=2 (two gloo processes) log-prob head on a packed prefix tree == TP=1, values and gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.model_helpers import run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "tp_logprob_head.py"


@pytest.mark.integration
def test_tp2_log_prob_head_equals_tp1(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run_torchrun(SCRIPT, str(out), nproc=2, timeout=240)
    report = json.loads(out.read_text())
    assert set(report) == {"tied_sdpa", "untied_qwen3_unfused"}
    for case, r in report.items():
        assert r["num_labels"] > 20, case
        assert r["logp_max_abs_diff"] < 1e-5, (case, r)
        assert r["tp_ranks_max_abs_diff"] == 0.0, (case, r)  # reduced over the TP group
        assert r["grad_max_abs"] > 0, (case, r)
        assert r["grad_max_abs_diff"] < 1e-5 + 1e-4 * r["grad_max_abs"], (case, r)
