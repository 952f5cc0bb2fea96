"""Checkpoints load across megatron's local and transformer-engine layer specs, both ways.

transformer-engine cannot be installed on CPU, so the TE-spec model here is megatron's
``GPTModel`` built from a spec with TE's *structure*: ``input_layernorm`` / ``pre_mlp_layernorm``
are ``IdentityOp`` and the RMSNorm weights live in the next linear layer as ``layer_norm_weight``
(TE's ``TELayerNormColumnParallelLinear``), and every TE-replaced module carries a non-empty
``_extra_state`` (FP8 metadata in TE; core attention and QK norms too) and reports TE's module
path. Its parameter names are therefore exactly TE's (checked against the names the TE spec
rules give), its checkpoint keys and ``_extra_state`` objects those a TE model writes.

Checked: local -> TE and TE -> local through ``CheckpointManager`` (model + optimizer + EMA),
``checkpoint.init_from`` (``load_weights``), ``rlp convert mcore-to-hf`` (a TE-written checkpoint
converted by a local-spec process), HF import/export of a TE-spec model; a TE-spec model whose
core attention is not TE's (no ``_extra_state`` there) loads both ways; a real tensor missing
from the checkpoint is still an error. Norm weights are randomised, so a mapping that swapped or
dropped a norm would change the log-probs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlp.checkpoint import CheckpointManager, IncompatibleCheckpointError
from rlp.config import CheckpointConfig, OptimConfig, ParallelConfig
from rlp.model import layer_keys
from tests.model_helpers import REPO_ROOT, TINY_VOCAB, build_tiny_model, tiny_model_config

pytestmark = pytest.mark.integration

TE_MODULE = "megatron.core.extensions.transformer_engine"  # where megatron's TE wrappers live
QWEN = dict(family="qwen3", qk_layernorm=True, tie_embeddings=False)


def _te_like(cls: type, marker: float) -> type:
    """``cls`` with a TE-style non-empty ``_extra_state`` that records what it is given."""

    class TELike(cls):  # type: ignore[misc, valid-type]
        def get_extra_state(self) -> torch.Tensor:
            return torch.tensor([marker, float(self.extra_loads)])

        def set_extra_state(self, state: object) -> None:
            if state is None:  # like TE (megatron's linear layers' load hook passes None)
                return
            self.extra_loads += 1
            self.loaded_extra_state = state

    TELike.__name__ = f"TE{cls.__name__}"
    TELike.__module__ = TE_MODULE
    return TELike


def _fused_norm_linear(norm_bias: bool = False) -> type:
    from megatron.core.tensor_parallel import ColumnParallelLinear

    base = _te_like(ColumnParallelLinear, 1.0)

    class TELayerNormColumnParallelLinear(base):  # type: ignore[misc, valid-type]
        """RMSNorm(``layer_norm_weight``) fused in front of a column-parallel linear."""

        def __init__(self, input_size: int, output_size: int, **kwargs: object) -> None:
            super().__init__(input_size, output_size, **kwargs)
            self.extra_loads = 0
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
            if norm_bias:  # a LayerNorm-style extra tensor no local checkpoint has
                self.layer_norm_bias = torch.nn.Parameter(torch.zeros(input_size))
            self.norm_eps = kwargs["config"].layernorm_epsilon  # type: ignore[attr-defined]

        def forward(self, input_, weight=None, runtime_gather_output=None):  # noqa: ANN001, ANN201
            x = F.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.norm_eps)
            return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)

    TELayerNormColumnParallelLinear.__module__ = TE_MODULE
    return TELayerNormColumnParallelLinear


def te_layer_spec(model_cfg, device, *, te_core_attention: bool = True, norm_bias: bool = False):  # noqa: ANN001, ANN201
    """The TE spec's structure with CPU modules (see the module docstring)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    from rlp.model.attention import SDPAttention

    class RowInit(_te_like(RowParallelLinear, 2.0)):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.extra_loads = 0

    class CoreInit(_te_like(SDPAttention, 3.0)):  # type: ignore[misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.extra_loads = 0

    class TENorm(_te_like(torch.nn.RMSNorm, 4.0)):  # type: ignore[misc]
        def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:  # noqa: ANN001
            super().__init__(hidden_size, eps=eps)
            self.extra_loads = 0

    for cls in (RowInit, CoreInit, TENorm):
        cls.__module__ = TE_MODULE
    qk = model_cfg.qk_layernorm or model_cfg.family == "qwen3"
    spec = get_gpt_layer_local_spec(qk_layernorm=qk, normalization="RMSNorm")
    layer = spec.submodules
    layer.input_layernorm = IdentityOp
    layer.pre_mlp_layernorm = IdentityOp
    layer.sharded_state_dict_keys_map = {}  # TE modules carry the TE names themselves
    attn = layer.self_attention.submodules
    attn.linear_qkv = _fused_norm_linear(norm_bias)
    attn.linear_proj = RowInit
    attn.core_attention = CoreInit if te_core_attention else SDPAttention
    if qk:
        attn.q_layernorm = attn.k_layernorm = TENorm
    layer.mlp.submodules.linear_fc1 = _fused_norm_linear(norm_bias)
    layer.mlp.submodules.linear_fc2 = RowInit
    return spec


def build(spec: str, seed: int, monkeypatch: pytest.MonkeyPatch, **spec_kw: object):  # noqa: ANN201
    """A tiny Qwen3-style model under the local spec or the CPU stand-in of the TE spec."""
    from rlp.model import build as model_build

    with monkeypatch.context() as m:
        if spec == "te":
            m.setattr(
                model_build, "layer_spec", lambda cfg, dev: te_layer_spec(cfg, dev, **spec_kw)
            )
        model = build_tiny_model(seed=seed, **QWEN)
    with torch.no_grad():  # norms start at 1: make every weight distinct so swaps would show
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logprobs(model: torch.nn.Module) -> torch.Tensor:
    from rlp.model.logprobs import token_logprobs

    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return token_logprobs(model, ids[:, :-1], ids[:, 1:])


def local_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by local-spec name (what a correct mapping makes comparable)."""
    return {layer_keys.local_name(n): p.detach().clone() for n, p in model.named_parameters()}


def with_optimizer(model: torch.nn.Module):  # noqa: ANN201
    from rlp.model import optimizer as mopt

    pcfg = ParallelConfig()
    ddp = mopt.wrap_ddp(model, pcfg)
    return ddp, mopt.build_optimizer(ddp, OptimConfig(lr=1e-2), pcfg, torch.float32)


def train_step(ddp, opt) -> None:  # noqa: ANN001
    from rlp.model import optimizer as mopt
    from rlp.model.logprobs import token_logprobs

    ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    mopt.zero_grad(ddp, opt)
    (-token_logprobs(ddp, ids[:, :-1], ids[:, 1:]).mean()).backward()
    mopt.finalize_grads(ddp)
    assert mopt.optimizer_step(opt).applied


def save(model: torch.nn.Module, root: Path, opt=None, ema=None) -> Path:  # noqa: ANN001
    return CheckpointManager(CheckpointConfig(dir=str(root))).save(
        1,
        model=model,
        optimizer=opt,
        ema_state=ema,
        train_state={"step": 1},
        config={"model": dataclasses.asdict(tiny_model_config(**QWEN))},
        vocab_size=TINY_VOCAB,
    )


def test_te_stand_in_has_the_te_spec_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in's parameter names are what the TE spec rules give for the local names, and
    its checkpoint keys equal the local model's (megatron maps the local norms to TE keys)."""
    local, te = build("local", 1, monkeypatch), build("te", 1, monkeypatch)
    local_names = [n for n, _ in local.named_parameters()]
    expected = set()
    for name in local_names:  # the TE spec rules, written out
        name = name.replace(
            ".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"
        )
        expected.add(name.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"))
    assert {n for n, _ in te.named_parameters()} == expected
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in expected
    assert layer_keys.layer_spec_of(te) == "transformer_engine"
    assert layer_keys.layer_spec_of(local) == "local"
    te_extra = {k for k in te.state_dict() if layer_keys.is_extra_state(k)}
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in te_extra
    assert "decoder.layers.0.self_attention.q_layernorm._extra_state" in te_extra

    def tensor_keys(model: torch.nn.Module) -> set[str]:
        return {
            v.key for k, v in model.sharded_state_dict().items() if not layer_keys.is_extra_state(k)
        }

    assert tensor_keys(local) == tensor_keys(te)


def test_local_checkpoint_resumes_under_te_spec_and_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = build("local", 1, monkeypatch)
    ddp, opt = with_optimizer(local)
    train_step(ddp, opt)  # optimizer state worth restoring
    ema = {n: p.detach() * 0.5 for n, p in local.named_parameters()}
    ckpt = save(local, tmp_path / "local_ckpt", opt, ema)
    assert json.loads((ckpt / "metadata.json").read_text())["layer_spec"] == "local"
    reference, ref_params = logprobs(local), local_params(local)
    train_step(ddp, opt)
    after_step = local_params(local)

    te = build("te", 2, monkeypatch)
    assert not torch.allclose(logprobs(te), reference)
    te_ddp, te_opt = with_optimizer(te)
    te_ema = {n: torch.zeros_like(p) for n, p in te.named_parameters()}
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "local_ckpt")))
    loaded = manager.load(ckpt, model=te, optimizer=te_opt, ema_state=te_ema)
    assert loaded.step == 1
    assert torch.equal(logprobs(te), reference)
    got = local_params(te)
    assert all(torch.equal(got[k], ref_params[k]) for k in ref_params)
    assert all(torch.equal(te_ema[n], ema[layer_keys.local_name(n)]) for n in te_ema)
    # TE modules keep their own extra state: nothing from the other spec is fed to them.
    qkv = te.decoder.layers[0].self_attention.linear_qkv
    assert qkv.extra_loads == 0
    train_step(te_ddp, te_opt)  # the restored Adam moments give the same update
    got = local_params(te)
    assert max((got[k] - after_step[k]).abs().max().item() for k in got) < 1e-6

    # ... and back: the TE-spec checkpoint (with its extra states) resumes under the local spec.
    te_ckpt = save(te, tmp_path / "te_ckpt", te_opt)
    assert json.loads((te_ckpt / "metadata.json").read_text())["layer_spec"] == (
        "transformer_engine"
    )
    back = build("local", 3, monkeypatch)
    _, back_opt = with_optimizer(back)
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "te_ckpt"))).load(
        te_ckpt, model=back, optimizer=back_opt
    )
    assert torch.equal(logprobs(back), logprobs(te))


def test_same_spec_restores_extra_state_and_tolerates_core_attention_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    te = build("te", 1, monkeypatch)
    ckpt = save(te, tmp_path / "a")
    again = build("te", 2, monkeypatch)
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "a"))).load(ckpt, model=again)
    qkv = again.decoder.layers[1].self_attention.linear_qkv
    assert qkv.extra_loads == 1 and torch.equal(qkv.loaded_extra_state, torch.tensor([1.0, 0.0]))
    assert torch.equal(logprobs(again), logprobs(te))

    # TE spec with SDPA core attention (no _extra_state there): loads the checkpoint above,
    # and its own checkpoint loads into the TE-attention variant.
    sdpa = build("te", 3, monkeypatch, te_core_attention=False)
    assert not any("core_attention._extra_state" in k for k in sdpa.state_dict())
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "a"))).load(ckpt, model=sdpa)
    assert torch.equal(logprobs(sdpa), logprobs(te))
    sdpa_ckpt = save(sdpa, tmp_path / "b")
    full = build("te", 4, monkeypatch)
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "b"))).load(sdpa_ckpt, model=full)
    assert torch.equal(logprobs(full), logprobs(te))
    core = full.decoder.layers[0].self_attention.core_attention
    assert core.extra_loads == 0  # nothing in the checkpoint for it: keeps its own


def test_only_extra_state_may_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = save(build("local", 1, monkeypatch), tmp_path / "c")
    with_bias = build("te", 2, monkeypatch, norm_bias=True)
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "c")))
    with pytest.raises(IncompatibleCheckpointError, match=r"lacks \[.*layer_norm_bias"):
        manager.load(ckpt, model=with_bias)


def test_init_from_and_hf_round_trip_under_te_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlp.model.hf_bridge import export_to_hf, gather_tp_shards, load_hf_into_model

    local = build("local", 1, monkeypatch)
    save(local, tmp_path / "w")
    te = build("te", 2, monkeypatch)
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "unused")))
    meta = manager.load_weights(tmp_path / "w", te)  # checkpoint.init_from = a checkpoints root
    assert meta is not None and meta["step"] == 1
    assert torch.equal(logprobs(te), logprobs(local))

    model_cfg = tiny_model_config(**QWEN)
    hf_dir = export_to_hf(te, tmp_path / "hf", model_cfg=model_cfg, vocab_size=TINY_VOCAB)
    fresh = build("te", 3, monkeypatch)
    load_hf_into_model(fresh, hf_dir)
    assert torch.equal(logprobs(fresh), logprobs(local))
    shards = gather_tp_shards(fresh)
    assert shards is not None and set(shards[0]) == set(local_params(local))

    # `rlp convert mcore-to-hf` (a local-spec process) on the TE-spec checkpoint.
    te_ckpt = save(fresh, tmp_path / "te")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlp.cli",
            "convert",
            "mcore-to-hf",
            str(te_ckpt),
            str(tmp_path / "o"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = (
        load_file(str(hf_dir / "model.safetensors")),
        load_file(str(tmp_path / "o" / "model.safetensors")),
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
