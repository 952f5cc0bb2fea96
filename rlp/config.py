"""Run configuration: typed dataclasses, YAML loading, dotted ``key=value`` overrides.

This module owns every knob of an ``rlp`` run and nothing else. It imports only the standard
library and PyYAML (no torch), so config tests and ``rlp train --dry-run`` stay fast.

* Each section is a dataclass; each field has a docstring directly under it (read back with
  :func:`field_docs` for ``--help`` output and the generated reference YAML).
* :func:`load_config` reads a YAML file, applies ``a.b=c`` overrides, checks types and cross-field
  rules. Unknown or mistyped keys raise :class:`ConfigError` naming the key and the closest
  valid one; renamed keys keep no alias.
* Defaults follow the paper (``docs/method.md`` §9/§10) where it states a value.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PAPER_SYSTEM_PROMPT = (
    "You are a continuation-and-reasoning assistant. You will be given the prefix of a text: a "
    "context, a problem, a solution or a derivation. First think briefly, between <think> and "
    "</think>, about what most plausibly comes next. After </think>, continue the text in the same "
    "style, notation, LaTeX and tone, focusing on the next few steps rather than a final boxed "
    "answer. Do not restate the prefix and do not add meta commentary."
)
"""The paper's system prompt (v2 §10 "Prompt"), reworded from its description."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to change."""


@dataclass
class RunConfig:
    """Identity and length of a run."""

    name: str = "rlp"
    """Run name: used for the run directory and the wandb run name."""
    output_dir: str = "runs/${run.name}"
    """Directory for resolved config, metrics, checkpoints and logs (``${run.name}`` expands)."""
    seed: int = 1234
    """Base seed: model init, data order, sampling (offset per DP rank and step)."""
    max_steps: int = 100
    """Number of optimizer steps to run (total, counting steps done before a resume)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: ``auto`` picks CUDA when available."""
    deterministic: bool = False
    """Request deterministic kernels (slower on GPU; CPU runs are deterministic anyway)."""
    overwrite: bool = False
    """With ``checkpoint.resume: never`` in a directory that holds a run: move that run's records
    and checkpoints into ``output_dir/replaced_<time>/`` and start again (false refuses)."""
    threads: int | None = None
    """CPU threads per process for torch's kernels (``torch.set_num_threads``); ``null`` keeps
    ``OMP_NUM_THREADS`` / torch's default. Small models on a few shared cores run faster with 1
    (no spin-waiting threads when processes share cores); larger models profit from more."""


@dataclass
class ModelConfig:
    """Architecture of the policy (and EMA) network; Llama and Qwen3 families."""

    family: Literal["llama", "qwen3"] = "llama"
    """Architecture family; ``qwen3`` implies QK-norm in the HF converter."""
    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width d."""
    ffn_hidden_size: int = 172
    """SwiGLU intermediate size."""
    num_attention_heads: int = 4
    """Query heads; must be divisible by ``parallel.tp_size``."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); equal to heads for MHA."""
    kv_channels: int | None = None
    """Per-head dimension; ``null`` means hidden_size / num_attention_heads."""
    vocab_size: int | None = None
    """Output/embedding rows before TP padding; ``null`` = the tokenizer's size (with
    ``<think>``/``</think>``). Set it to a checkpoint's row count when that exceeds the tokenizer
    (Qwen3: 151,936): every row then takes part in the softmax, as in the HF model. Must be at
    least the tokenizer's size."""
    make_vocab_size_divisible_by: int = 64
    """Pad the embedding rows to a multiple of this times ``tp_size``."""
    max_position_embeddings: int = 8192
    """Longest sequence the model is used with: system prompt + data.max_prefix_tokens + <think> +
    rollout.max_thought_tokens + </think> + separator + reward.target_tokens must fit."""
    rotary_base: float = 10000.0
    """RoPE base frequency (Qwen3 uses 1e6, SmolLM2 1e5)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    tie_embeddings: bool = True
    """Share input embedding and output projection weights."""
    init_method_std: float = 0.02
    """Std of the normal init for random-weight models."""
    params_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter dtype: ``auto`` = bfloat16 on GPU, float32 on CPU."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer spec: ``auto`` uses transformer-engine only when it imports and CUDA is present."""
    attention_backend: Literal["sdpa", "unfused"] = "sdpa"
    """Core attention for the local spec: torch SDPA (no s x s scores on GPU) or Megatron's."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute in the loss pass: ``selective`` recomputes core attention, ``full``
    every transformer layer (megatron ``recompute_granularity``, uniform, one layer per chunk)."""


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from and which special tokens RLP needs."""

    path: str = "data/demo/tokenizer"
    """Local directory with tokenizer.json / tokenizer_config.json, or an HF hub name (online)."""
    think_open: str = "<think>"
    """Token that opens a thought; added to the vocabulary if missing."""
    think_close: str = "</think>"
    """Token that closes a thought (a stop sequence); added if missing."""
    eos_token: str | None = None
    """Override the tokenizer's end-of-sequence token."""


@dataclass
class ParallelConfig:
    """Process layout: tensor, pipeline and data parallel sizes."""

    tp_size: int = 1
    """Tensor-parallel size; must divide attention heads and query groups."""
    pp_size: int = 1
    """Pipeline-parallel size (only 1 is supported by the in-process sampler)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: ``auto`` = NCCL with CUDA, gloo without."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs transformer-engine norms; GPU only)."""
    timeout_minutes: int = 30
    """Collective timeout for process-group init."""


@dataclass
class DataConfig:
    """Training stream: shards, splitting, contexts for RLP and packed NTP batches."""

    shards: str = "data/demo/shards/demo-{000000..000003}.tar"
    """Shard URLs (docs/data.md): path, glob, brace pattern, ``file://``, ``http(s)://``,
    ``s3://``/``gs://`` (fsspec or gsutil), or ``pipe:`` command; comma-separated list."""
    manifest: str | None = None
    """manifest.json of the shard set (path or URL); ``null`` looks next to the first shard."""
    format: Literal["auto", "tokens", "text"] = "auto"
    """Samples: pre-tokenised (``.npy``), text (``.txt`` or a ``.json``/``.jsonl`` field, tokenised
    on the fly), or ``auto`` (the manifest says; without one, per sample)."""
    text_key: str = "text"
    """Field of ``.json``/``.jsonl`` members that holds a text sample's text."""
    build_demo_if_missing: bool = False
    """Build the bundled demo corpus (shards + tokenizer) when the shards do not exist."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    shuffle_shards: bool = True
    """Shuffle shard order each epoch (deterministic under seed and epoch)."""
    shuffle_buffer: int = 256
    """Sample shuffle buffer size; 0 disables sample shuffling."""
    on_corrupt: Literal["error", "skip"] = "error"
    """Corrupt/missing shard or sample: stop with an error, or skip it with a counted warning."""
    check_tokenizer: bool = True
    """Refuse shards whose manifest tokenizer hash differs from the run's tokenizer."""
    verify_checksums: bool = False
    """Check each shard's sha256 against the manifest before reading it (local files only)."""
    targets_per_document: int = 1
    """Target positions t drawn per document (paper: one, uniformly at random)."""
    min_prefix_tokens: int = 16
    """Smallest prefix x_<t considered for a target position."""
    max_prefix_tokens: int = 2048
    """Longest prefix kept; longer prefixes are cut from the left (window ends at t)."""
    ntp_seq_len: int = 256
    """Length of packed next-token-loss sequences."""
    ntp_batch_size: int = 4
    """Packed NTP sequences per step and DP rank (used when ``objective.ntp_weight > 0``)."""


@dataclass
class RolloutConfig:
    """Sampling G thoughts per context from the behaviour policy."""

    contexts_per_step: int = 4
    """Contexts B per optimizer step and DP rank (paper: 512 global)."""
    num_thoughts: int = 16
    """Thoughts G sampled per context (paper: 16)."""
    max_thought_tokens: int = 2048
    """Thought cap; ``</think>`` is appended when reached (paper: 2048; < 1024 warns)."""
    temperature: float = 0.7
    """Sampling temperature (paper: 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    top_k: int = 0
    """Top-k sampling; 0 disables."""
    sample_batch_size: int = 64
    """Reference engine: thoughts decoded together (a multiple of num_thoughts keeps prefixes
    shared). The cascade engine decodes all of a DP rank's thoughts together."""
    engine: Literal["cascade", "reference"] = "cascade"
    """Rollout engine (docs/rollout.md): ``cascade`` = one ragged batch, each prefix's KV stored
    and read once per group, CUDA-graph decode steps; ``reference`` = the bucketed KV-cache
    sampler. ``cascade`` falls back to ``reference`` (logged) for a model whose core attention
    is not SDPA (model.attention_backend=unfused, transformer-engine spec)."""
    check_every: int = 16
    """Cascade engine: decode steps between host checks for finished rows (one sync each)."""
    kv_block: int = 128
    """Cascade engine: thought KV grows in blocks of this many tokens."""
    cuda_graphs: bool = True
    """Cascade engine: capture the decode step as a CUDA graph on GPU (no effect on CPU)."""
    prefill_tokens: int = 16384
    """Cascade engine: padded prompt tokens per prefill forward."""
    offload: bool = False
    """Free the optimizer state and gradient buffers from the GPU while thoughts are generated
    (moved to host memory and back every step)."""
    use_system_prompt: bool = True
    """Prepend the system prompt before the document prefix."""
    system_prompt: str = PAPER_SYSTEM_PROMPT
    """The continuation-and-reasoning instruction (paper v2 §10)."""
    forbid_empty_thought: bool = True
    """Suppress ``</think>``/EOS at the first decode step so |c| >= 1 (paper Alg. 1)."""
    separator: str = ""
    """Text between ``</think>`` and the target token x_t (paper: none)."""
    logprob_consistency_alert: float = 1.05
    """Warn when mean exp(|sampled - recomputed logp|) of thought tokens exceeds this."""
    logprob_temperature: Literal["sampling", "raw"] = "sampling"
    """Policy log-probs in the ratio and the policy gradient, recorded and recomputed alike:
    ``sampling`` = log_softmax(logits / rollout.temperature) over the full vocabulary (the
    sampling distribution without top-k/top-p; TRL, the paper's stack), ``raw`` = temperature 1.
    The reward's S_pred and S_ema are always raw."""
    eos_in_thought: Literal["close", "drop"] = "close"
    """A thought that stops on EOS: ``close`` replaces the EOS by ``</think>`` (which, like the one
    appended at the cap, conditions the target but gets no gradient); ``drop`` excludes the
    thought from the loss and from its group's baseline."""


@dataclass
class RewardConfig:
    """Information-gain reward and group-relative advantage."""

    target_tokens: int = 1
    """K: tokens scored after the thought (paper: 1; >1 is an extension)."""
    span_reduction: Literal["sum", "discounted"] = "sum"
    """How a K-token span reward combines per-token gains."""
    span_discount: float = 0.7
    """Discount gamma for ``span_reduction: discounted``."""
    baseline_mode: Literal["group_mean_loo", "ema_only", "batch_mean"] = "group_mean_loo"
    """Advantage baseline: leave-one-out group mean (paper Eq. 7), raw EMA reward, or batch mean."""
    std_scale: bool = False
    """Divide advantages by the group reward std (off in the paper)."""
    reward_clip: float | None = None
    """Clip raw rewards to [-c, c] before centring (makes the EMA matter); ``null`` = off."""
    advantage_clip: float | None = None
    """Clip advantages to [-c, c]; ``null`` = off."""
    ema_context: Literal["prefix", "prompt"] = "prefix"
    """S_ema context: the document prefix alone (Eq. 4) or system prompt + prefix."""


@dataclass
class ObjectiveConfig:
    """Clipped policy-gradient loss on thought tokens, optional KL and next-token loss."""

    rl_weight: float = 1.0
    """Weight of the RLP surrogate; 0 turns the run into plain continued pretraining."""
    eps_low: float = 0.2
    """Lower clip: ratios below 1 - eps_low are clipped."""
    eps_high: float = 0.2
    """Upper clip: ratios above 1 + eps_high are clipped."""
    kl_coef: float = 0.0
    """Token-level KL to the EMA model on thought tokens (paper: 0)."""
    ppo_epochs: int = 1
    """Optimizer passes over each rollout batch (1 = on-policy, ratio == 1)."""
    max_tokens_per_micro_batch: int = 16384
    """Token budget of one forward/backward micro-batch (scoring, the loss and NTP): a context's
    prompt with as many of its thoughts as fit, several contexts per packed row when small."""
    ntp_weight: float = 0.0
    """Weight of the interleaved next-token loss (paper method: 0)."""
    ntp_every: int = 1
    """Apply the NTP loss every k steps (1 = every step, mixed)."""


@dataclass
class EMAConfig:
    """EMA teacher phi used for the no-thought baseline S_ema."""

    enabled: bool = True
    """Keep the EMA teacher; ``false`` scores S_ema with the policy (logged only, no copy)."""
    decay: float = 0.999
    """tau in phi <- tau * phi + (1 - tau) * theta, after every applied optimizer step."""
    dtype: Literal["float32", "float64"] = "float32"
    """Storage dtype of phi whatever the parameter dtype (a bf16 shadow would never move)."""


@dataclass
class OptimConfig:
    """AdamW, LR schedule, gradient clipping and bad-step handling."""

    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6 constant)."""
    min_lr: float = 0.0
    """Final LR for the cosine schedule."""
    schedule: Literal["constant", "cosine"] = "constant"
    """LR schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with NaN/Inf loss or gradients."""


@dataclass
class CheckpointConfig:
    """Saving, retention, auto-resume and initial weights."""

    dir: str = "${run.output_dir}/checkpoints"
    """Checkpoint directory."""
    save_every: int = 50
    """Save every N steps (and at the end); 0 saves only at the end and on signals."""
    keep_last: int = 2
    """Complete checkpoints to keep."""
    resume: Literal["auto", "never"] = "auto"
    """``auto`` resumes from the newest complete checkpoint in ``dir``."""
    init_from: str | None = None
    """Initial weights: one of our checkpoints or an HF model directory; ``null`` = random init."""
    save_on_signal: bool = True
    """Checkpoint and exit on SIGTERM/SIGUSR1 (SLURM pre-emption)."""


@dataclass
class EvalConfig:
    """Held-out evaluation during training: NTP loss, thought benefit, information gain."""

    every: int = 0
    """Evaluate every N steps, before the first step and after the last; 0 disables."""
    shards: str | None = None
    """Held-out shard URLs; ``null`` disables. Their format (token or text samples) is detected
    per shard, whatever ``data.format`` says."""
    manifest: str | None = None
    """Manifest of the held-out shards; ``null`` = the ``manifest.json`` next to them when there is
    one (required for ``pipe:`` URLs, like ``data.manifest``)."""
    num_documents: int = 32
    """Held-out documents per evaluation."""
    sample_seed: int | None = None
    """Seed for sampling thoughts on held-out contexts; ``null`` = a fixed seed. The documents and
    target positions are fixed regardless."""
    ntp_seq_len: int | None = None
    """Length of the packed held-out NTP sequences; ``null`` = ``data.ntp_seq_len``."""


@dataclass
class BenefitConfig:
    """Thought benefit with the same weights: does a thought beat no thought and a filler?"""

    per_step: bool = False
    """Log ``thought/benefit``, ``thought/filler_benefit``, ... for each training step's contexts
    (one extra no-thought and one filler scoring per context)."""
    heldout: bool = True
    """Compute the same metrics on the held-out contexts in every evaluation (``eval.every``)."""
    filler: str = "."
    """Text whose token ids, repeated to the thoughts' mean length, replace the thought in the
    filler control (content-free: more tokens, no information)."""


@dataclass
class LogConfig:
    """Metrics sinks and progress output."""

    every: int = 1
    """Print a progress line every N steps."""
    jsonl: bool = True
    """Write metrics.jsonl in the run directory."""
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    """wandb mode (CI uses offline or disabled)."""
    wandb_project: str = "rlp"
    """wandb project."""
    wandb_entity: str | None = None
    """wandb entity (team); ``null`` uses the default."""
    samples_every: int = 10
    """Log samples (text, token ids, S_pred, S_ema, reward, advantage) every N steps; 0 = never."""
    num_samples: int = 4
    """Rows in the sample table."""
    all_samples: bool = False
    """Log every thought of a sample step (all contexts x num_thoughts rows) to samples.jsonl."""


@dataclass
class Config:
    """A complete run configuration: one section per concern."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benefit: BenefitConfig = field(default_factory=BenefitConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


# --------------------------------------------------------------------------------------------
# Field docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal under each field."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def reference_yaml() -> str:
    """Every key with its default and docstring, as commented YAML (``configs/reference.yaml``)."""
    lines = ["# Every rlp config key with its default. Generated by `rlp config --reference`."]
    default = Config()
    for section in SECTIONS:
        sub = getattr(default, section)
        docs = field_docs(type(sub))
        lines.append("")
        lines.append(f"# {type(sub).__doc__}")
        lines.append(f"{section}:")
        for f in dataclasses.fields(sub):
            lines.append(f"  # {docs.get(f.name, '')}")
            dumped = yaml.safe_dump({f.name: getattr(sub, f.name)}, width=10_000).rstrip()
            lines.extend("  " + line for line in dumped.splitlines())
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Type checking of values


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow int -> float. Raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key '{section}.{key}'{_closest(key, names)}; "
                f"valid keys in '{section}': {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a checked :class:`Config` from a nested dict (missing keys take defaults)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"unknown config section '{name}'{_closest(name, list(SECTIONS))}; "
                f"valid sections: {', '.join(SECTIONS)}"
            )
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"section '{name}' must be a mapping, got {values!r}")
        sections[name] = _build_section(hints[name], values, name)
    cfg = Config(**sections)
    _expand_refs(cfg)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Overrides and ${section.key} references


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value``; the value is parsed as a YAML scalar (``null``, numbers, bools)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key '{key}' must be section.key (e.g. rollout.num_thoughts)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (unknown keys are caught by :func:`from_dict`)."""
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return raw


PATH_KEYS = frozenset(
    {
        "run.output_dir",
        "tokenizer.path",
        "data.manifest",
        "checkpoint.dir",
        "checkpoint.init_from",
        "eval.shards",
    }
)
"""Path-valued keys whose leading ``~`` is expanded to the home directory."""


def _expand_refs(cfg: Config) -> None:
    """Expand ``${section.key}`` inside string fields (section order, one level deep) and a
    leading ``~`` in path keys."""
    for section in SECTIONS:
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, str) and "${" in value:
                value = _expand_string(cfg, value, f"{section}.{f.name}")
            if isinstance(value, str) and f"{section}.{f.name}" in PATH_KEYS:
                value = os.path.expanduser(value)
            setattr(sub, f.name, value)


def _expand_string(cfg: Config, value: str, key: str) -> str:
    out, rest = "", value
    while "${" in rest:
        head, _, tail = rest.partition("${")
        ref, sep, rest = tail.partition("}")
        if not sep:
            raise ConfigError(f"{key}: unterminated '${{' in {value!r}")
        section, _, name = ref.partition(".")
        try:
            target = getattr(getattr(cfg, section), name)
        except AttributeError:
            raise ConfigError(f"{key}: reference ${{{ref}}} names no config key") from None
        out += head + str(target)
    return out + rest


# --------------------------------------------------------------------------------------------
# Cross-field validation


def validate(cfg: Config) -> None:
    """Cross-field rules; each error names the key to change."""
    m, p, r, o = cfg.model, cfg.parallel, cfg.rollout, cfg.objective
    positive = {
        "run.max_steps": cfg.run.max_steps,
        "model.num_layers": m.num_layers,
        "model.hidden_size": m.hidden_size,
        "model.num_attention_heads": m.num_attention_heads,
        "model.num_query_groups": m.num_query_groups,
        "parallel.tp_size": p.tp_size,
        "parallel.pp_size": p.pp_size,
        "rollout.contexts_per_step": r.contexts_per_step,
        "rollout.max_thought_tokens": r.max_thought_tokens,
        "rollout.sample_batch_size": r.sample_batch_size,
        "rollout.check_every": r.check_every,
        "rollout.kv_block": r.kv_block,
        "rollout.prefill_tokens": r.prefill_tokens,
        "objective.max_tokens_per_micro_batch": o.max_tokens_per_micro_batch,
        "objective.ppo_epochs": o.ppo_epochs,
        "objective.ntp_every": o.ntp_every,
        "reward.target_tokens": cfg.reward.target_tokens,
        "data.targets_per_document": cfg.data.targets_per_document,
        "data.ntp_seq_len": cfg.data.ntp_seq_len,
        "log.every": cfg.log.every,
    }
    if cfg.run.threads is not None:
        positive["run.threads"] = cfg.run.threads
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    _check_values(cfg)
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
            f"model.num_query_groups ({m.num_query_groups})"
        )
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) is not divisible by model.num_attention_heads "
            f"({m.num_attention_heads}); set model.kv_channels explicitly"
        )
    for what, n in (
        ("num_attention_heads", m.num_attention_heads),
        ("num_query_groups", m.num_query_groups),
    ):
        if n % p.tp_size:
            raise ConfigError(
                f"parallel.tp_size={p.tp_size} does not divide model.{what}={n}; choose a "
                f"tp_size that divides both heads ({m.num_attention_heads}) and query groups "
                f"({m.num_query_groups})"
            )
    if p.pp_size != 1:
        raise ConfigError(
            "parallel.pp_size must be 1: thoughts are sampled in-process on the training "
            "weights and the sampler does not yet support pipeline stages; use tp_size and DP"
        )
    if r.num_thoughts < 2 and cfg.reward.baseline_mode == "group_mean_loo":
        raise ConfigError(
            "rollout.num_thoughts must be >= 2 for reward.baseline_mode=group_mean_loo "
            "(the leave-one-out baseline needs another thought in the group)"
        )
    if r.temperature < 0:
        raise ConfigError(f"rollout.temperature must be >= 0, got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if o.eps_low < 0 or o.eps_high < 0 or o.eps_low >= 1:
        raise ConfigError("objective.eps_low must be in [0, 1) and objective.eps_high >= 0")
    if o.rl_weight < 0 or o.ntp_weight < 0:
        raise ConfigError("objective.rl_weight and objective.ntp_weight must be >= 0")
    if o.rl_weight == 0 and o.ntp_weight == 0:
        raise ConfigError(
            "objective.rl_weight and objective.ntp_weight are both 0: nothing to train"
        )
    if o.rl_weight == 0 and o.ntp_every > 1:
        raise ConfigError(
            "objective.rl_weight=0 with objective.ntp_every > 1 leaves steps with nothing to "
            "train; set objective.ntp_every=1 for plain continued pretraining"
        )
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    if not cfg.ema.enabled and needs_ema(cfg):
        raise ConfigError(
            f"ema.enabled=false but reward.baseline_mode={cfg.reward.baseline_mode} / "
            "reward.reward_clip / objective.kl_coef need the EMA model; set ema.enabled=true"
        )
    if not cfg.data.text_key:
        raise ConfigError("data.text_key must name a JSON field, got an empty string")
    if cfg.data.min_prefix_tokens < 1 or cfg.data.max_prefix_tokens < cfg.data.min_prefix_tokens:
        raise ConfigError("data.min_prefix_tokens must be >= 1 and <= data.max_prefix_tokens")
    if cfg.eval.every and not cfg.eval.shards:
        raise ConfigError(
            "eval.every > 0 needs eval.shards (held-out shard URLs); or set eval.every=0"
        )
    if cfg.eval.ntp_seq_len is not None and not (
        1 <= cfg.eval.ntp_seq_len <= cfg.model.max_position_embeddings
    ):
        raise ConfigError(
            f"eval.ntp_seq_len={cfg.eval.ntp_seq_len} must be in [1, "
            f"model.max_position_embeddings={cfg.model.max_position_embeddings}]"
        )
    if not cfg.benefit.filler:
        raise ConfigError("benefit.filler must be a non-empty text (e.g. '.')")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if m.vocab_size is not None and m.vocab_size < 1:
        raise ConfigError(f"model.vocab_size must be >= 1 or null, got {m.vocab_size}")
    # The system prompt and separator lengths need the tokenizer; the trainer checks them again.
    check_sequence_budget(cfg)


def sequence_budget(cfg: Config, system_tokens: int = 0, separator_tokens: int = 0) -> int:
    """Positions of the longest sequence a run scores: system prompt + data.max_prefix_tokens +
    ``<think>`` + rollout.max_thought_tokens + ``</think>`` + separator + reward.target_tokens."""
    return (
        system_tokens
        + cfg.data.max_prefix_tokens
        + 1
        + cfg.rollout.max_thought_tokens
        + 1
        + separator_tokens
        + cfg.reward.target_tokens
    )


def check_sequence_budget(cfg: Config, system_tokens: int = 0, separator_tokens: int = 0) -> None:
    """Raise :class:`ConfigError` when the longest sequence (:func:`sequence_budget`) exceeds
    ``model.max_position_embeddings`` or ``objective.max_tokens_per_micro_batch``, or when NTP
    rows exceed the positions. Token counts of the system prompt and separator are 0 at config
    time (unknown without the tokenizer)."""
    need = sequence_budget(cfg, system_tokens, separator_tokens)
    parts = (
        f"system prompt {system_tokens} tokens + data.max_prefix_tokens="
        f"{cfg.data.max_prefix_tokens} + <think> + rollout.max_thought_tokens="
        f"{cfg.rollout.max_thought_tokens} + </think> + separator {separator_tokens} tokens + "
        f"reward.target_tokens={cfg.reward.target_tokens}"
    )
    positions = cfg.model.max_position_embeddings
    if need > positions:
        raise ConfigError(
            f"the longest scored sequence needs {need} positions ({parts}) but "
            f"model.max_position_embeddings={positions}; lower data.max_prefix_tokens or "
            "rollout.max_thought_tokens, or raise model.max_position_embeddings"
        )
    budget = cfg.objective.max_tokens_per_micro_batch
    if need > budget:
        raise ConfigError(
            f"objective.max_tokens_per_micro_batch={budget} is smaller than the longest scored "
            f"sequence, {need} tokens ({parts}); raise it or lower data.max_prefix_tokens or "
            "rollout.max_thought_tokens"
        )
    if cfg.data.ntp_seq_len > positions:
        raise ConfigError(
            f"data.ntp_seq_len={cfg.data.ntp_seq_len} exceeds model.max_position_embeddings="
            f"{positions}; lower data.ntp_seq_len"
        )


def _check_values(cfg: Config) -> None:
    """Value ranges of single keys: every number finite, counts and rates in range."""
    for section in SECTIONS:
        sub = getattr(cfg, section)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
    m, o, opt, r, d = cfg.model, cfg.objective, cfg.optim, cfg.reward, cfg.data
    at_least = {
        0: {
            "optim.lr": opt.lr,
            "optim.min_lr": opt.min_lr,
            "optim.weight_decay": opt.weight_decay,
            "optim.clip_grad": opt.clip_grad,
            "optim.warmup_steps": opt.warmup_steps,
            "objective.kl_coef": o.kl_coef,
            "rollout.top_k": cfg.rollout.top_k,
            "data.num_workers": d.num_workers,
            "data.shuffle_buffer": d.shuffle_buffer,
            "checkpoint.save_every": cfg.checkpoint.save_every,
            "eval.every": cfg.eval.every,
            "log.samples_every": cfg.log.samples_every,
            "log.num_samples": cfg.log.num_samples,
        },
        1: {
            "model.ffn_hidden_size": m.ffn_hidden_size,
            "model.max_position_embeddings": m.max_position_embeddings,
            "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
            "data.ntp_batch_size": d.ntp_batch_size,
            "optim.max_bad_steps": opt.max_bad_steps,
            "eval.num_documents": cfg.eval.num_documents,
            "parallel.timeout_minutes": cfg.parallel.timeout_minutes,
        },
    }
    for low, values in at_least.items():
        for key, value in values.items():
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
    above_zero = {
        "optim.eps": opt.eps,
        "model.rotary_base": m.rotary_base,
        "model.norm_epsilon": m.norm_epsilon,
        "model.init_method_std": m.init_method_std,
        "reward.reward_clip": r.reward_clip,
        "reward.advantage_clip": r.advantage_clip,
    }
    for key, value in above_zero.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in (("optim.beta1", opt.beta1), ("optim.beta2", opt.beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if not 0 < r.span_discount <= 1:
        raise ConfigError(f"reward.span_discount must be in (0, 1], got {r.span_discount}")
    for key, value in (("model.kv_channels", m.kv_channels), ("model.vocab_size", m.vocab_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be >= 1 or null, got {value}")


def needs_ema(cfg: Config) -> bool:
    """True when the EMA model changes the gradient (not only the logged reward)."""
    return (
        cfg.reward.baseline_mode != "group_mean_loo"
        or cfg.reward.reward_clip is not None
        or cfg.objective.kl_coef > 0
    )


def ema_active(cfg: Config) -> bool:
    """Whether the run keeps an EMA model at all."""
    return cfg.ema.enabled


# --------------------------------------------------------------------------------------------
# Loading and saving


BUNDLED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""Configs shipped inside the package (``rlp train --config tiny_cpu``)."""


def bundled_configs() -> list[str]:
    """Names of the bundled configs (file stems), without the generated ``reference``."""
    return sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.yaml") if p.stem != "reference")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path: an existing file, else a bundled config by name (``tiny_cpu`` or
    ``tiny_cpu.yaml``). Raises :class:`ConfigError` listing the bundled names."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_file():
        return path
    if path.parent == Path("."):
        bundled = BUNDLED_CONFIG_DIR / (
            path.name if path.suffix == ".yaml" else f"{path.name}.yaml"
        )
        if bundled.is_file():
            return bundled
    raise ConfigError(
        f"config file not found: {name_or_path} (give a YAML file or a bundled config name: "
        f"{', '.join(bundled_configs())})"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (or defaults when ``path`` is None), apply dotted overrides, validate.

    ``path`` is a YAML file or the name of a bundled config (:func:`resolve_config_path`).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        raw = read_yaml_mapping(path)
    return from_dict(apply_overrides(raw, list(overrides or [])))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; :class:`ConfigError` (naming the file and,
    for a syntax error, the line) for an unreadable, empty, malformed or non-mapping file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        context_mark = getattr(exc, "context_mark", None)
        if context and context_mark is not None:
            context += f" that started at line {context_mark.line + 1}"
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: YAML syntax error: {detail}") from None
    if loaded is None:
        raise ConfigError(
            f"config file {path} is empty; give at least one section (see `rlp config "
            "--reference`), or leave out --config for the default"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections (run:, model:, ...), got "
            f"{type(loaded).__name__}"
        )
    return loaded


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, width=100)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (e.g. into the run directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
