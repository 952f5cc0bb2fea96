"""Checkpoint round trips and TP/DP resharding with model + optimizer + EMA + per-rank state.

Three jobs (``scripts/ckpt_resume.py``):

1. two ranks: save at TP=2 (plain optimizer) and at DP=2 (distributed optimizer); each is
   reloaded in the same layout into fresh objects and step 3 is redone bit-exactly;
2. one rank: save at TP=1; load the TP=2 and the DP=2 checkpoints at TP=1;
3. two ranks: load the TP=1 checkpoint at TP=2 and the DP=2 distributed-optimizer one at TP=2.

After a resharded load the weights and EMA are bit-identical to the saver's and log-probs /
the next update agree to float rounding (the TP reduction order differs). A load that skipped the
optimizer state would move the weights by ~lr = 1e-2 in step 3, far outside the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.model_helpers import run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "ckpt_resume.py"


@pytest.mark.integration
def test_save_reload_and_reshard_tp_dp(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    a, b, d = tmp_path / "A", tmp_path / "B", tmp_path / "D"
    run_torchrun(SCRIPT, str(report), f"save:{a}:2:plain", f"save:{d}:1:distopt", timeout=300)
    run_torchrun(
        SCRIPT,
        str(report),
        f"save:{b}:1:plain",
        f"resume:{a}:1:plain",
        f"resume:{d}:1:distopt",
        nproc=1,
        timeout=300,
    )
    run_torchrun(SCRIPT, str(report), f"resume:{b}:2:plain", f"resume:{d}:2:distopt", timeout=300)
    results = json.loads(report.read_text())

    saves = {k: v for k, v in results.items() if k.startswith("save:")}
    assert set(saves) == {"save:A:w2:tp2:plain", "save:D:w2:tp1:distopt", "save:B:w1:tp1:plain"}
    for name, r in saves.items():
        assert r["same_layout"] and r["step"] == 2, name
        assert r["cursor_ok"], name  # this rank's data cursor came back
        for key in ("lp_save_exact", "lp_after_exact", "weights_after_exact", "ema_after_exact"):
            assert r[key], (name, key)

    resumes = {k: v for k, v in results.items() if k.startswith("resume:")}
    assert set(resumes) == {
        "resume:A:w1:tp1:plain",
        "resume:D:w1:tp1:distopt",
        "resume:B:w2:tp2:plain",
        "resume:D:w2:tp2:distopt",
    }
    for name, r in resumes.items():
        assert not r["same_layout"], name
        assert r["lp_changed_by_load"] > 0.1, name  # the fresh model really was different
        assert r["weights_exact"] and r["ema_exact"], name
        assert r["lp_save_diff"] < 1e-5, (name, r)
        assert r["lp_after_diff"] < 1e-5, (name, r)
        assert r["weights_after_diff"] < 1e-5, (name, r)
