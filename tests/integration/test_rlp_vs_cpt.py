"""``benchmarks/rlp_vs_cpt.py --quick``: a tiny random model, one seed, a few steps per arm; it
must produce the JSON, the Markdown table and the plots, with arms that share their start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_helpers import REPO_ROOT

pytestmark = pytest.mark.integration

METRICS = (
    "eval/thought/benefit",
    "eval/thought/filler_benefit",
    "eval/thought/benefit_over_filler",
    "eval/nll",
)


def test_quick_experiment_writes_json_table_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("matplotlib")
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "rlp_vs_cpt.py"),
        "--quick",
        "--out",
        str(out),
        "--work-dir",
        str(work),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    result = json.loads((out / "rlp_vs_cpt.json").read_text())
    agg = result["aggregate"]
    assert set(agg) == {"rlp", "cpt", "none"}
    for arm in agg:
        assert agg[arm]["steps"] == [0, 2, 4], arm
        for key in METRICS:
            assert all(v["mean"] is not None for v in agg[arm][key]), (arm, key)
    for key in METRICS:  # one start for every arm; no training stays there
        start = {agg[arm][key][0]["mean"] for arm in agg}
        assert max(start) - min(start) < 1e-4, key
        assert len({v["mean"] for v in agg["none"][key]}) == 1, key
    # CPT reads about as many document tokens as RLP's contexts hold, for far fewer FLOPs.
    rlp, cpt = result["runs"]["rlp"]["1"], result["runs"]["cpt"]["1"]
    assert cpt["data_tokens"] == pytest.approx(rlp["data_tokens"], rel=0.25)
    assert rlp["train_flops"] > 5 * cpt["train_flops"] > 0
    # Only CPT trains on next tokens: its held-out NTP loss moves from the start.
    assert agg["cpt"]["eval/nll"][-1]["mean"] != agg["cpt"]["eval/nll"][0]["mean"]
    assert "thought/benefit" in rlp["train_curve"]

    table = (out / "rlp_vs_cpt.md").read_text()
    assert "| rlp |" in table and "| cpt |" in table and "| none |" in table
    for name in ("benefit", "filler_benefit", "benefit_over_filler", "nll", "rlp_vs_cpt"):
        png = out / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
