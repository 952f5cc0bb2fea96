"""Sharded (reshardable) save/load of model, optimizer and EMA state, and the checkpoint layout.

This is the only user of ``megatron.core.dist_checkpointing`` in ``rlp``. One checkpoint is one
directory::

    step_0000010/
      dist/            megatron dist checkpoint: "model", "optimizer", "ema" sharded state dicts
                       (its own metadata.json, common.pt, .metadata, *.distcp)
      tokenizer/       tokenizer files of the run (optional)
      ...              files of rlp.checkpoint (train state, per-rank state, run config)
      files.json       every other file with its size in bytes (verified before loading)
      metadata.json    ours: step, contents, layout, layer spec, architecture, model config,
                       tokenizer hash, versions
      COMPLETE         written last; a directory without it is not a checkpoint

Everything is stored in megatron's TP-independent form, so a checkpoint written at one TP/DP
layout loads at any other (the distributed optimizer uses ``fully_reshardable``). EMA tensors are
saved as sharded tensors with the exact sharding of the parameters they shadow (a second
``sharded_state_dict`` of the model under the ``ema.`` prefix with the EMA tensors swapped in).

:func:`load_checkpoint` checks the metadata against the live model *before* megatron runs, so an
incompatible checkpoint fails with a message naming what differs, not a shape error deep inside
torch.distributed.checkpoint. It also verifies the files against ``files.json`` (a missing or
truncated shard or rank file raises :class:`DamagedCheckpointError`) and checks megatron's pickled
``dist/.metadata`` with an allow-list unpickler first (:func:`check_dcp_metadata`; a checkpoint
that would import anything else raises :class:`UnsafeCheckpointError`). Keys are matched across
megatron's local and transformer-engine layer specs (:mod:`rlp.model.layer_keys`).
``megatron.core`` is imported lazily: reading metadata is cheap.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlp.model import layer_keys

DIST_SUBDIR = "dist"
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's pickled index
TOKENIZER_SUBDIR = "tokenizer"
RANK_STATE_DIR = "rank_states"
RUN_CONFIG_FILE = "config.yaml"
METADATA_FILE = "metadata.json"
FILE_LIST = "files.json"
COMPLETE_MARKER = "COMPLETE"
FORMAT = "rlp-checkpoint"
FORMAT_VERSION = 1
STEP_PREFIX = "step_"
# The distributed optimizer's only format that reshards over TP and DP
# (docs/megatron-core.md §4 rule 6).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
EmaState = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]
"""EMA tensors keyed by parameter name, or a sequence in ``model.parameters()`` order."""


class CheckpointError(RuntimeError):
    """A missing, incomplete or unreadable checkpoint."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint that does not fit the running model/optimizer/tokenizer; names what differs."""


class DamagedCheckpointError(CheckpointError):
    """A complete checkpoint whose files are missing, truncated or unreadable."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickled files reference code a checkpoint never needs (tampered)."""


# --------------------------------------------------------------------------------------------
# Layout: names, metadata, completeness


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def is_complete(path: str | Path) -> bool:
    """A finished checkpoint: marker and metadata present (an interrupted save has neither)."""
    p = Path(path)
    return (p / COMPLETE_MARKER).is_file() and (p / METADATA_FILE).is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete ``step_*`` checkpoints under ``root`` as ``(step, path)``, oldest first."""
    out = []
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            suffix = p.name[len(STEP_PREFIX) :]
            if p.name.startswith(STEP_PREFIX) and suffix.isdigit() and is_complete(p):
                out.append((int(suffix), p))
    return sorted(out)


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest complete checkpoint under it."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if is_complete(p):
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1][1]
    if p.name.startswith(STEP_PREFIX) or (p / DIST_SUBDIR).is_dir():
        raise CheckpointError(
            f"{p} is an incomplete checkpoint (no {COMPLETE_MARKER} marker: the save was "
            "interrupted); use an older step directory"
        )
    raise CheckpointError(
        f"{p} is not an rlp checkpoint (no {METADATA_FILE} + {COMPLETE_MARKER}) and holds no "
        f"complete {STEP_PREFIX}* checkpoints; for an HF model directory use "
        "`rlp convert hf-to-mcore` or checkpoint.init_from"
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Our ``metadata.json`` of a complete checkpoint directory (not a checkpoints root)."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {p}")
    if not is_complete(p):
        raise CheckpointError(
            f"{p} is not a complete rlp checkpoint (needs {METADATA_FILE} and {COMPLETE_MARKER})"
        )
    try:
        meta = json.loads((p / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpointError(f"checkpoint {p} is damaged: {METADATA_FILE}: {e}") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT
        or meta.get("format_version", 0) > FORMAT_VERSION
    ):
        raise CheckpointError(
            f"{p}/{METADATA_FILE}: format {_get(meta, 'format')!r} "
            f"v{_get(meta, 'format_version')}; "
            f"this rlp reads {FORMAT!r} up to v{FORMAT_VERSION}"
        )
    if not (p / DIST_SUBDIR / "metadata.json").is_file():
        raise CheckpointError(f"{p} lacks its megatron dist checkpoint ({DIST_SUBDIR}/)")
    return meta


def _get(meta: Any, key: str) -> Any:
    return meta.get(key) if isinstance(meta, dict) else None


# --------------------------------------------------------------------------------------------
# Manifest and verification


def gather_rank_file_sizes(ckpt_dir: str | Path) -> dict[str, int]:
    """Collective: every rank's :func:`rank_file_sizes`, merged (on every rank)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    own = rank_file_sizes(ckpt_dir, rank)
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return own
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, own)
    return {k: v for part in parts for k, v in part.items()}


def rank_file_sizes(ckpt_dir: str | Path, rank: int) -> dict[str, int]:
    """Sizes of the files this rank wrote itself (its dist shards ``dist/__<rank>_*.distcp`` and
    its rank state file), relative to ``ckpt_dir``. The writer's own ``stat`` is exact, also on
    network filesystems whose attribute caches may show other nodes' files late."""
    root = Path(ckpt_dir)
    files = list((root / DIST_SUBDIR).glob(f"__{rank}_*.distcp"))
    files += list((root / RANK_STATE_DIR).glob(f"rank_{rank:05d}.pt"))
    return {f.relative_to(root).as_posix(): f.stat().st_size for f in files}


def write_file_list(ckpt_dir: str | Path, claimed: Mapping[str, int] | None = None) -> Path:
    """Rank 0, after every rank finished writing: ``files.json`` listing every file of the
    checkpoint with its size. ``claimed`` (path -> size) are the sizes other ranks reported for
    their own files (:func:`rank_file_sizes`); everything else is ``stat``-ed here."""
    root = Path(ckpt_dir)
    skip = {FILE_LIST, METADATA_FILE, COMPLETE_MARKER}
    files = dict(claimed or {})
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in skip and rel not in files:
                files[rel] = (Path(dirpath) / name).stat().st_size
    listing = {"format": "rlp-checkpoint-files", "files": dict(sorted(files.items()))}
    _fsync_write(root / FILE_LIST, json.dumps(listing, indent=1) + "\n")
    return root / FILE_LIST


def _file_list_problems(path: Path) -> list[str]:
    file = path / FILE_LIST
    if not file.is_file():
        return []  # written before file lists existed: nothing to compare with
    try:
        files = json.loads(file.read_text())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        return [f"{FILE_LIST} is unreadable ({e})"]
    problems = []
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {size} were written")
    return problems


# Globals torch.distributed.checkpoint's `.metadata` pickle may reference: its own dataclasses
# and enums, torch.Size, dtypes / layouts / memory formats, plain containers. Nothing callable
# beyond constructors of these data types is reachable.
_DCP_DATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
)
_DCP_FILESYSTEM_CLASSES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
}
_SAFE_BUILTINS = frozenset(
    ("set", "frozenset", "list", "dict", "tuple", "slice", "complex", "bytearray", "int", "float")
    + ("str", "bool", "bytes", "range")
)


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if module == "torch" and (name == "Size" or not name.startswith("_")):
            candidate = getattr(torch, name, None)
            if name == "Size" or isinstance(candidate, (torch.dtype, torch.memory_format)):
                obj = candidate
        elif module == "torch.serialization" and name == "_get_layout":
            obj = torch.serialization._get_layout
        elif module == "collections" and name in ("OrderedDict", "defaultdict"):
            import collections

            obj = getattr(collections, name)
        elif module == "builtins" and name in _SAFE_BUILTINS:
            import builtins

            obj = getattr(builtins, name)
        elif module in _DCP_DATA_MODULES or (module, name) in _DCP_FILESYSTEM_CLASSES:
            import importlib

            candidate = getattr(importlib.import_module(module), name, None)
            if isinstance(candidate, type) and candidate.__module__ == module:
                obj = candidate  # a dataclass or enum of torch DCP's index
        if obj is None:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return obj


def check_dcp_metadata(path: str | Path) -> None:
    """Unpickle ``dist/.metadata`` with an allow-list (torch DCP classes, torch.Size, dtypes)
    before megatron / torch unpickle it without one: a crafted file raises
    :class:`UnsafeCheckpointError` instead of running code; an unreadable one
    :class:`DamagedCheckpointError`."""
    p = Path(path)
    file = p / DIST_SUBDIR / DCP_METADATA_FILE
    if not file.is_file():
        raise DamagedCheckpointError(f"checkpoint {p} is damaged: {DIST_SUBDIR}/.metadata is gone")
    try:
        with open(file, "rb") as f:
            _DcpMetadataUnpickler(io.BufferedReader(f)).load()
    except pickle.UnpicklingError as e:
        if "forbidden global" in str(e):
            raise UnsafeCheckpointError(
                f"refusing to load {p}: {DIST_SUBDIR}/.metadata references {str(e).split()[-1]}, "
                "which no checkpoint needs (a crafted file?); load only trusted checkpoints"
            ) from None
        raise DamagedCheckpointError(
            f"checkpoint {p} is damaged: {DIST_SUBDIR}/.metadata: {e}"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DamagedCheckpointError(
            f"checkpoint {p} is damaged: {DIST_SUBDIR}/.metadata is unreadable ({e!r})"
        ) from None


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`DamagedCheckpointError` (naming the directory and the files) when a
    complete checkpoint's files do not match its ``files.json`` or its index is unreadable, and
    :class:`UnsafeCheckpointError` for a tampered index. Cheap: ``stat`` per file plus one
    restricted unpickle of ``dist/.metadata``."""
    p = Path(path)
    problems = _file_list_problems(p)
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise DamagedCheckpointError(f"checkpoint {p} is damaged: {'; '.join(problems[:4])}{more}")
    check_dcp_metadata(p)


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize_checkpoint(tmp_dir: str | Path, final_dir: str | Path, metadata: dict) -> Path:
    """Rank 0, after every rank finished writing: metadata, marker, then rename into place.

    ``os.replace`` of a directory is atomic on POSIX filesystems, so readers see either no
    ``final_dir`` or a complete one. An existing ``final_dir`` (the same step saved again) is
    moved aside first and deleted after the rename.
    """
    tmp, final = Path(tmp_dir), Path(final_dir)
    _fsync_write(tmp / METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    _fsync_write(tmp / COMPLETE_MARKER, f"{metadata.get('step')}\n")
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f"tmp_old_{final.name}_{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# Facts about the live model / optimizer / job


def megatron_version() -> str:
    from importlib.metadata import version

    return version("megatron-core")


def architecture(model: torch.nn.Module) -> dict[str, Any]:
    """Shape-deciding facts of a built model (compared on load)."""
    from rlp.model.build import unwrap

    gpt = unwrap(model)
    c = gpt.config
    return {
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": c.num_query_groups or c.num_attention_heads,
        "kv_channels": c.kv_channels,
        "padded_vocab_size": gpt.vocab_size,
        "qk_layernorm": bool(c.qk_layernorm),
        "tie_embeddings": bool(gpt.share_embeddings_and_output_weights),
    }


def parallel_layout() -> dict[str, int]:
    """World, TP, DP and PP sizes of the running job."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": torch.distributed.get_world_size(),
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "dp_size": ps.get_data_parallel_world_size(),
        "pp_size": ps.get_pipeline_model_parallel_world_size(),
    }


def uses_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    leaves = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(isinstance(o, DistributedOptimizer) for o in leaves)


def rng_tracker_states() -> dict[str, torch.Tensor]:
    """Megatron's named (TP-aware) RNG streams on this rank."""
    from megatron.core import tensor_parallel

    return {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}


def set_rng_tracker_states(states: Mapping[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(dict(states))


# --------------------------------------------------------------------------------------------
# Sharded state dicts


def _ema_by_name(gpt: torch.nn.Module, ema_state: EmaState) -> dict[str, torch.Tensor]:
    names = [n for n, _ in gpt.named_parameters()]
    if isinstance(ema_state, Mapping):
        by_name = dict(ema_state)
        if set(by_name) != set(names):
            missing, extra = sorted(set(names) - set(by_name)), sorted(set(by_name) - set(names))
            raise ValueError(
                "ema_state keys must be the model's parameter names; "
                f"missing {missing[:4]}, extra {extra[:4]}"
            )
    else:
        tensors = list(ema_state)
        if len(tensors) != len(names):
            raise ValueError(f"ema_state has {len(tensors)} tensors, the model {len(names)} params")
        by_name = dict(zip(names, tensors))
    return by_name


def _ema_sharded_state_dict(gpt: torch.nn.Module, ema_state: EmaState) -> dict[str, Any]:
    """The model's sharded state dict under ``ema.`` with each param's tensor replaced by its EMA
    shadow: same global shapes, offsets, replica ids and factories (fused SwiGLU fc1)."""
    by_name = _ema_by_name(gpt, ema_state)
    out = {}
    for key, sh in gpt.sharded_state_dict(prefix="ema.").items():
        name = key.removeprefix("ema.")
        if name not in by_name:  # _extra_state objects and buffers have no EMA
            continue
        ema = by_name[name]
        if ema.shape != sh.data.shape:
            raise ValueError(
                f"EMA tensor of {name} has shape {tuple(ema.shape)}, "
                f"the parameter {tuple(sh.data.shape)}"
            )
        sh.data = ema
        if hasattr(sh, "dtype"):  # ShardedTensor records it; an fp32 EMA of bf16 params differs
            sh.dtype = ema.dtype
        out[key] = sh
    return out


def _sharded_state_dict(
    model: torch.nn.Module, optimizer: Any, ema_state: EmaState | None, *, loading: bool
) -> dict[str, Any]:
    from rlp.model import cpu_compat
    from rlp.model.build import unwrap

    gpt = unwrap(model)  # DDP keys carry a "module." prefix (``docs/megatron-core.md`` §4 rule 5)
    model_sd = gpt.sharded_state_dict()
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        if loading:
            cpu_compat.prepare_optimizer_for_load(optimizer)  # rows 9-10
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=loading, metadata=_OPTIMIZER_METADATA
        )
    if ema_state is not None:
        sd["ema"] = _ema_sharded_state_dict(gpt, ema_state)
    return sd


def save_state(
    ckpt_dir: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: Any = None,
    ema_state: EmaState | None = None,
) -> list[str]:
    """Collective: write the sharded model (+ optimizer, + EMA) under ``ckpt_dir/dist``.

    ``ckpt_dir`` must exist. The calling script needs an ``if __name__ == "__main__":`` guard
    (the torch_dist writer spawns a manager process that re-imports ``__main__``).
    """
    from megatron.core import dist_checkpointing

    from rlp.dist import barrier, is_rank0
    from rlp.model import writer_processes

    target = Path(ckpt_dir) / DIST_SUBDIR
    if is_rank0():
        target.mkdir(parents=True, exist_ok=True)  # dist_checkpointing needs it (rule 4)
    barrier()
    sd = _sharded_state_dict(model, optimizer, ema_state, loading=False)
    layer_keys.canonicalise_keys(sd)
    writer_processes.start_writer_service()
    with writer_processes.writers_die_with_parent():
        dist_checkpointing.save(sd, str(target))
    return list(sd)


def make_metadata(
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    contents: list[str],
    model_config: Mapping[str, Any] | None,
    vocab_size: int | None,
    tokenizer_hash: str | None,
) -> dict[str, Any]:
    """Our ``metadata.json`` content for a checkpoint of the live job."""
    import rlp
    from rlp.model.build import unwrap

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "created_unix": time.time(),
        "contents": contents,
        "layout": parallel_layout(),
        "distributed_optimizer": optimizer is not None and uses_distributed_optimizer(optimizer),
        "layer_spec": layer_keys.layer_spec_of(unwrap(model)),
        "architecture": architecture(model),
        "model_config": dict(model_config) if model_config is not None else None,
        "vocab_size": vocab_size or getattr(unwrap(model), "rlp_vocab_size", None),
        "tokenizer_hash": tokenizer_hash,
        "versions": {
            "megatron_core": megatron_version(),
            "torch": torch.__version__,
            "rlp": rlp.__version__,
        },
    }


def check_compatible(
    meta: Mapping[str, Any],
    *,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    want_ema: bool = False,
    tokenizer_hash: str | None = None,
    where: str = "checkpoint",
) -> None:
    """Raise :class:`IncompatibleCheckpointError` naming each difference that would break a load."""
    problems = []
    if model is not None:
        have, saved = architecture(model), meta.get("architecture", {})
        diffs = [
            f"{k}: checkpoint {saved.get(k)} vs model {v}"
            for k, v in have.items()
            if saved.get(k) != v and k != "padded_vocab_size"
        ]
        problems += [f"model architecture differs ({'; '.join(diffs)})"] if diffs else []
        if not diffs and saved.get("padded_vocab_size") != have["padded_vocab_size"]:
            problems.append(
                f"padded vocabulary differs: checkpoint {saved.get('padded_vocab_size')} "
                f"(tp {meta['layout']['tp_size']}) vs model {have['padded_vocab_size']} (tp "
                f"{parallel_layout()['tp_size']}); set model.make_vocab_size_divisible_by so "
                "vocab padding is the same at both TP sizes (e.g. 128 for TP 1 and 2)"
            )
    contents = set(meta.get("contents", []))
    if optimizer is not None:
        if "optimizer" not in contents:
            problems.append(
                "it holds no optimizer state (weights only, e.g. from "
                "`rlp convert hf-to-mcore`); load it as checkpoint.init_from"
            )
        elif meta.get("distributed_optimizer") != uses_distributed_optimizer(optimizer):
            problems.append(
                f"optimizer kinds differ: checkpoint distributed_optimizer="
                f"{meta.get('distributed_optimizer')}, running "
                f"{uses_distributed_optimizer(optimizer)} (parallel.use_distributed_optimizer); "
                "megatron cannot convert between the two"
            )
    if want_ema and "ema" not in contents:
        problems.append("it holds no EMA state (saved with ema.enabled=off?)")
    saved_hash = meta.get("tokenizer_hash")
    if tokenizer_hash and saved_hash and saved_hash != tokenizer_hash:
        problems.append(
            f"tokenizer differs: checkpoint tokenizer hash {saved_hash[:12]}… vs "
            f"running {tokenizer_hash[:12]}… (tokenizer.path)"
        )
    saved_mc = str(meta.get("versions", {}).get("megatron_core", "0"))
    if _minor(saved_mc) > _minor(megatron_version()):
        problems.append(
            f"written by megatron-core {saved_mc}, which uses a newer dist-checkpoint "
            f"layout than the installed {megatron_version()} reads"
        )
    if problems:
        raise IncompatibleCheckpointError(f"{where} cannot be loaded: " + "; ".join(problems))


def _minor(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    return tuple(parts)


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: Any = None,
    ema_state: EmaState | None = None,
    tokenizer_hash: str | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Collective: check compatibility, then load model (+ optimizer, + EMA in place).

    Returns the checkpoint's metadata. Loads at any TP/DP layout and under either layer spec
    (local <-> transformer-engine: ``_extra_state`` entries may be missing or extra, nothing
    else). ``verify=False`` skips :func:`verify_checkpoint` when the caller just ran it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from rlp.model import cpu_compat
    from rlp.model.build import unwrap

    path = Path(path)
    meta = read_metadata(path)
    if verify:
        verify_checkpoint(path)
    check_compatible(
        meta,
        model=model,
        optimizer=optimizer,
        want_ema=ema_state is not None,
        tokenizer_hash=tokenizer_hash,
        where=str(path),
    )
    gpt = unwrap(model)
    sd = _sharded_state_dict(model, optimizer, ema_state, loading=True)
    layer_keys.canonicalise_keys(sd)
    saved_spec = meta.get("layer_spec")
    same_spec = saved_spec in (None, layer_keys.layer_spec_of(gpt))
    layer_keys.drop_unneeded_extra_state(sd["model"], same_spec=same_spec)
    dist_dir = str(path / DIST_SUBDIR)
    saved_keys = {v.key for v in load_sharded_metadata(dist_dir).values()}
    try:
        layer_keys.reconcile_request(sd, saved_keys, where=str(path))
        loaded = dist_checkpointing.load(sd, dist_dir)
        layer_keys.load_model_state(gpt, loaded["model"])
    except layer_keys.LayerKeyError as e:
        raise IncompatibleCheckpointError(f"{path} cannot be loaded: {e}") from None
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        cpu_compat.fix_optimizer_after_load(optimizer)  # row 11
    if ema_state is not None:
        by_name = _ema_by_name(gpt, ema_state)
        with torch.no_grad():
            for key, value in loaded["ema"].items():
                by_name[key.removeprefix("ema.")].copy_(value)
    return meta


def save_weights_checkpoint(
    out_dir: str | Path,
    *,
    model: torch.nn.Module,
    model_config: Mapping[str, Any],
    vocab_size: int,
    tokenizer_dir: str | Path | None = None,
    tokenizer_hash: str | None = None,
) -> Path | None:
    """Collective: a weights-only checkpoint (step 0) at ``out_dir``, written to a temporary
    sibling first. Returns the path on rank 0, ``None`` elsewhere."""
    from rlp.dist import barrier, is_rank0
    from rlp.model.hf_files import copy_tokenizer_files

    out = Path(out_dir)
    tmp = out.with_name(f"tmp_{out.name}")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    contents = save_state(tmp, model=model)
    claimed = gather_rank_file_sizes(tmp)
    result = None
    if is_rank0():
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp / TOKENIZER_SUBDIR)
        meta = make_metadata(
            0,
            model=model,
            optimizer=None,
            contents=contents,
            model_config=model_config,
            vocab_size=vocab_size,
            tokenizer_hash=tokenizer_hash,
        )
        write_file_list(tmp, claimed)
        result = finalize_checkpoint(tmp, out, meta)
    barrier()
    return result
