#!/usr/bin/env python
"""Evaluate a checkpoint on the paper's eight benchmarks: the same as ``rlp eval``.

    python benchmarks/evaluate.py --checkpoint DIR --benchmarks gsm8k,mmlu --limit 20 --out OUT
    python benchmarks/evaluate.py --compare A/results.json B/results.json

Options, prompts and scoring: ``rlp/eval/command.py`` and ``docs/evaluation.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import rlp.eval  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlp.eval.command import main

if __name__ == "__main__":
    sys.exit(main())
