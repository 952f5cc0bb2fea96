"""DDP + AdamW: TP=2, DP=2 and the distributed optimizer reproduce single-process training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.model_helpers import init_single_process, run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "ddp_steps.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("ddp_steps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_parallel_layouts_match_single_process(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run_torchrun(SCRIPT, str(out), nproc=2, timeout=300)
    report = json.loads(out.read_text())

    steps = _script_module()
    from rlp.config import ParallelConfig

    state = init_single_process(seed=steps.SEED)
    reference = steps.run_steps(ParallelConfig(), _single_env(state))
    # The run trains: loss goes down, and clipping (0.5) was active at least once.
    assert reference["losses"][-1] < reference["losses"][0] - 0.05
    assert max(reference["grad_norms"]) > 0.5
    assert reference["lrs"][0] < reference["lrs"][1]  # warmup, then cosine decay

    assert set(report) == set(steps.LAYOUTS)
    for layout, got in report.items():
        for key in ("losses", "grad_norms"):
            for step, (a, b) in enumerate(zip(got[key], reference[key])):
                assert abs(a - b) < 1e-5, f"{layout} {key}[{step}]: {a} vs reference {b}"


def _single_env(state):
    from rlp.dist import get_env

    env = get_env()
    assert env.world_size == 1 and state.tp_size == 1
    return env
