"""Fixtures shared by the evaluation tests that run tiny Hugging Face / megatron models
(``meg`` and ``hf`` load the ``model_dir`` fixture of the requesting module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the module: a 2-layer, width-32 model gains nothing from more, and
    on a busy 2-core machine they only add contention. Restored afterwards."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def peaked_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama HF directory with peaked next-token distributions
    (:func:`tests.unit.test_eval_megatron.build_peaked_llama`)."""
    pytest.importorskip("transformers")
    pytest.importorskip("megatron.core")
    from tests.unit.test_eval_megatron import build_peaked_llama

    return build_peaked_llama(tmp_path_factory.mktemp("peaked_llama"))


@pytest.fixture(scope="module")
def meg(model_dir: Path):
    """The megatron backend's ``generate_fn`` over the module's ``model_dir``."""
    from rlp.eval.generation import load_generate_fn

    return load_generate_fn(model_dir, backend="megatron", device="cpu")


@pytest.fixture(scope="module")
def hf(model_dir: Path):
    """The transformers backend's ``generate_fn`` over the module's ``model_dir`` (modules may
    define their own ``hf``)."""
    from rlp.eval.generation import load_generate_fn

    return load_generate_fn(model_dir, backend="hf", device="cpu")
