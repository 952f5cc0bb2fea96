"""Faithfulness probes and step gain through a TP=2 ``MegatronGenerator`` under torchrun (2 gloo
processes): rank 0 runs them and writes the records as JSON, rank 1 serves its requests.
Usage: ``eval_reasoning_tp.py MODEL_DIR OUT.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlp.eval.generation import load_generate_fn
from rlp.eval.grading import MathVerifier
from tests.integration.test_eval_megatron_tp import reasoning_records


def main() -> int:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    gen = load_generate_fn(model_dir, tp=2, backend="megatron", device="cpu")
    if not gen.is_leader:
        code = gen.serve()
        gen.teardown()
        return code
    code = 1
    try:
        with MathVerifier(num_workers=1, timeout_s=20) as verifier:
            out.write_text(json.dumps(reasoning_records(gen, verifier)), encoding="utf-8")
        code = 0
    finally:
        gen.close(code)
        gen.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
