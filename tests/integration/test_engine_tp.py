"""Cascade rollout engine under tensor and data parallelism (2 gloo processes via torchrun).

TP=2 ranks (heads split per rank by megatron's own TP layers, logits gathered for sampling) draw
identical samples, checked inside the script by all-gathering them, and equal a TP=1 run of the
same weights and seed; DP ranks draw different samples, and DP rank 0 draws what a single process
draws.
"""

from __future__ import annotations

import pytest
import torch

from tests.model_helpers import REPO_ROOT, run_torchrun

MODEL_SEED = 4321
SEED = 99
SAMPLES = 3
PROMPTS = [[5, 17, 42, 99, 3, 7], [11, 12], list(range(100, 131))]
ENGINE = {"check_every": 2, "kv_block": 4}
CASES: dict[str, dict] = {
    "greedy": {"temperature": 0.0, "max_new_tokens": 12},
    "sampled": {
        "temperature": 0.8,
        "top_p": 0.95,
        "max_new_tokens": 12,
        "stop_sequences": [[t] for t in range(0, 256, 9)],
        "forbid_first": [0, 9],
    },
}
SCRIPT = REPO_ROOT / "tests" / "integration" / "scripts" / "engine_tp.py"


@pytest.mark.integration
def test_tp2_cascade_matches_each_other_and_tp1(tmp_path):
    from rlp.model.cascade import CascadeEngine
    from rlp.model.sampler import SamplingParams
    from tests.model_helpers import build_tiny_model

    out = tmp_path / "samples.pt"
    run_torchrun(SCRIPT, str(out), nproc=2, timeout=240)
    got = torch.load(out)

    model = build_tiny_model(seed=MODEL_SEED, init_method_std=0.2)
    engine = CascadeEngine(model, **ENGINE)
    for name, kw in CASES.items():
        ref = engine.generate(PROMPTS, SAMPLES, SamplingParams(**kw), SEED)
        for layout in ("tp2", "dp2rank0"):
            other = got[f"{layout}/{name}"]
            assert torch.equal(other["tokens"], ref.tokens), f"{layout}/{name} tokens differ"
            assert torch.equal(other["lengths"], ref.lengths), f"{layout}/{name} lengths differ"
            torch.testing.assert_close(other["logprobs"], ref.logprobs, atol=1e-4, rtol=0)
    assert got["tp2/sampled/compactions"] >= 1  # rows stopped at different steps
