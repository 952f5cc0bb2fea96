"""torchrun --nproc-per-node 2 convert_hf.py WORK_DIR

HF <-> megatron conversion for tiny random Llama and Qwen3 models (tied and untied, GQA, Qwen3
head dim != hidden / heads, a vocabulary that needs padding), at TP=2 and then at TP=1 (DP=2):

* logits of our model (TP shards gathered) and ``token_logprobs`` match transformers' (fp32);
* ``export_to_hf`` writes a directory that ``AutoModelForCausalLM`` loads with a state dict
  bit-identical to the original HF model, plus the tokenizer;
* ``rlp convert hf-to-mcore --tp 2`` writes a checkpoint (converted back by the pytest wrapper
  in a single process, i.e. at TP=1).

Rank 0 writes WORK_DIR/report.json; the pytest wrapper asserts on it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

from rlp.config import ParallelConfig
from rlp.dist import barrier, init_distributed, shutdown
from rlp.model.build import build_model
from rlp.model.convert import convert_main
from rlp.model.hf_bridge import export_to_hf, load_hf_into_model
from rlp.model.hf_mapping import hf_to_model_config
from rlp.model.logprobs import token_logprobs
from rlp.model.parallel import initialize_model_parallel

CASES = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True), 256),
    "llama_untied_padded": ("llama", dict(tie_word_embeddings=False), 250),
    "qwen3_tied_hd32": ("qwen3", dict(tie_word_embeddings=True, head_dim=32), 256),
    # Qwen3Config defaults to head_dim 128 (!= hidden / heads = 16).
    "qwen3_untied_padded": ("qwen3", dict(tie_word_embeddings=False), 250),
}


def make_tokenizer(vocab: int, out: Path) -> None:
    """A word-level tokenizer with ``vocab`` entries (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(out))


def make_hf_model(family: str, extra: dict, vocab: int, out: Path) -> None:
    """A tiny random HF model with every weight (norms included) randomised, saved to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        **extra,
    )
    torch.manual_seed(len(family) + vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1: perturb so a swapped norm would show
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(out))
    make_tokenizer(vocab, out)


def gathered_logits(model, ids: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        local = model(ids, None, None)  # [b, s, V/tp] vocab-parallel logits
    size = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(local) for _ in range(size)]
    tdist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def run_case(name: str, tp: int, env, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    family, extra, vocab = CASES[name]
    hf_dir = work / f"hf_{name}"
    if env.rank == 0 and not hf_dir.exists():
        make_hf_model(family, extra, vocab, hf_dir)
    barrier()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model_cfg = hf_to_model_config(hf.config)
    model_cfg.params_dtype, model_cfg.transformer_impl = "float32", "local"
    initialize_model_parallel(ParallelConfig(tp_size=tp), seed=1, env=env)
    model = build_model(model_cfg, vocab, env.device).eval()
    load_hf_into_model(model, hf_dir)

    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    ours = gathered_logits(model, ids)
    ref_lp = torch.log_softmax(ref[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    with torch.no_grad():
        lp = token_logprobs(model, ids[:, :-1], ids[:, 1:])
    report = {
        "logits_max_abs_diff": (ours[..., :vocab] - ref).abs().max().item(),
        "padded_logits_max": ours[..., vocab:].max().item() if ours.shape[-1] > vocab else None,
        "logp_max_abs_diff": (lp - ref_lp).abs().max().item(),
    }
    out = work / f"export_{name}_tp{tp}"
    export_to_hf(model, out, hf_dir, model_cfg=model_cfg)
    if env.rank == 0:
        back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        a, b = hf.state_dict(), back.state_dict()
        report["state_dict_keys_equal"] = set(a) == set(b)
        report["state_dict_exact"] = all(torch.equal(a[k], b[k]) for k in a if k in b)
        report["tokenizer_copied"] = (out / "tokenizer.json").is_file()
        report["tied_in_export"] = back.config.tie_word_embeddings
    return report


def main() -> None:
    work = Path(sys.argv[1])
    env = init_distributed(ParallelConfig(tp_size=2))
    report: dict = {}
    for tp in (2, 1):
        for name in CASES:
            t0 = time.perf_counter()
            report[f"{name}_tp{tp}"] = run_case(name, tp, env, work)
            report[f"{name}_tp{tp}"]["seconds"] = time.perf_counter() - t0
        from rlp.model.parallel import destroy_model_parallel

        destroy_model_parallel()
    # The CLI at TP=2; the pytest wrapper converts the result back at TP=1.
    t0 = time.perf_counter()
    rc = convert_main(
        [
            "hf-to-mcore",
            str(work / "hf_qwen3_untied_padded"),
            str(work / "mcore_qwen3"),
            "--tp",
            "2",
        ]
    )
    report["hf_to_mcore_rc"] = rc
    report["hf_to_mcore_seconds"] = time.perf_counter() - t0
    if env.rank == 0:
        (work / "report.json").write_text(json.dumps(report, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
