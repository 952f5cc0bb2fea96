"""Checkpoints that survive anything: atomic step directories, ``latest``, retention, resume.

This module owns *when and how* a run's state reaches disk and comes back; the tensor I/O
(megatron ``dist_checkpointing``, reshardable over TP/DP) is :mod:`rlp.model.sharded`'s, and this
module never imports megatron. Layout under ``checkpoint.dir``::

    latest                  text: name of the newest complete checkpoint (updated atomically)
    step_0000010/           one complete checkpoint (see rlp.model.sharded for dist/ + metadata)
      train_state.json      rank 0's train state, for humans and tools
      rank_states/rank_00000.pt   per rank: train state (data cursor!) + RNG states
      config.yaml           the run's resolved config (loads with rlp.config.load_config)
      tokenizer/            the run's tokenizer files
      files.json            every file above with its size (checked before loading)
    tmp_step_0000020/       a save in progress (or interrupted: removed on the next start)

Save protocol (:meth:`CheckpointManager.save`, collective): rank 0 creates ``tmp_step_N``; all
ranks write their shards and their own rank file and report those files' sizes; rank 0 writes
the run files, ``files.json`` (every file and its size), ``metadata.json`` and the
``COMPLETE`` marker, renames ``tmp_step_N`` -> ``step_N``, rewrites ``latest``, then applies
retention. A crash at any point leaves the previous checkpoint intact and ``latest`` pointing at
a complete one. A full disk removes the partial save and raises ``no space left on <dir>``.

Resume (:meth:`CheckpointManager.load_latest`) picks the newest directory *with* the marker whose
files match its ``files.json``; a damaged one (missing / truncated shard or rank file) is skipped
with a warning naming it, and the next older intact checkpoint is loaded.

Per-rank state: data cursors differ per DP rank and RNG streams per rank, so every rank stores
its own; when the world layout changed (TP/DP resharding) they cannot be mapped one-to-one and
:class:`LoadedCheckpoint` says so (``same_layout=False``).

:class:`SignalFlag` turns SIGTERM/SIGUSR1 into a flag the training loop polls (the handler only
sets the flag; saving inside a signal handler would re-enter collectives).
"""

from __future__ import annotations

import errno
import io
import json
import shutil
import signal
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rlp import dist
from rlp.config import CheckpointConfig
from rlp.model import sharded
from rlp.model.sharded import (
    CheckpointError,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)
from rlp.state import capture_rng

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "DamagedCheckpointError",
    "IncompatibleCheckpointError",
    "LoadedCheckpoint",
    "SignalFlag",
    "UnsafeCheckpointError",
]

LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
RANK_STATE_DIR = sharded.RANK_STATE_DIR
CONFIG_FILE = sharded.RUN_CONFIG_FILE
TMP_PREFIX = "tmp_"
_FULL_DISK_BYTES = 1 << 20
"""Free space below which a failed write counts as a full disk (torch.save's C++ writer
reports ENOSPC as ``[enforce fail at inline_container.cc]`` without an errno)."""


@dataclass
class LoadedCheckpoint:
    """What :meth:`CheckpointManager.load` restored, and what the caller must restore itself."""

    path: Path
    step: int
    metadata: dict[str, Any]
    train_state: dict[str, Any]
    """This rank's train state (incl. its data cursor) as passed to ``save``."""
    rng_state: dict[str, Any] | None
    """This rank's RNG states in :func:`rlp.state.capture_rng` form (``restore_rng`` them)."""
    same_layout: bool
    """False when world/TP/DP sizes differ from the saver's: per-rank state came from
    ``source_rank``'s file and RNG streams do not continue bit-exactly."""
    same_data_layout: bool
    """True when DP (and PP) sizes match the saver's: the data cursor in ``train_state`` is this
    rank's own DP slot and continues exactly (a TP-only change keeps the data order)."""
    source_rank: int
    skipped: tuple[str, ...] = ()
    """Why newer checkpoints were passed over (damaged), newest first; empty normally."""


def _encode(obj: Any) -> Any:
    """Make plain data loadable with ``torch.load(weights_only=True)``: numpy arrays (the numpy
    RNG state) become tagged tensors, numpy scalars Python numbers."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj.astype(np.int64)), "dtype": str(obj.dtype)}
    if isinstance(obj, Mapping):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        if "__ndarray__" in obj:
            return obj["__ndarray__"].numpy().astype(obj["dtype"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    """Plain file write, so a full disk surfaces as ``OSError(ENOSPC)`` (torch.save's C++ writer
    turns it into an errno-less ``enforce fail``)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()


def _is_disk_full(err: BaseException, where: Path) -> bool:
    """Whether ``err`` (or what caused it) is a full disk / exhausted quota under ``where``."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        # torch DCP's CheckpointException carries each rank's (exception, traceback).
        failures = getattr(e, "failures", None)
        if isinstance(failures, Mapping):
            todo += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
    try:
        return shutil.disk_usage(where).free < _FULL_DISK_BYTES
    except OSError:
        return False


def _as_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _tokenizer_hash(tokenizer_dir: str | Path | None) -> str | None:
    """:func:`rlp.tokenizer.tokenizer_hash` of a local tokenizer directory; None for anything
    else (a hub name is not hashed: it would need the network)."""
    from rlp.model.hf_files import has_tokenizer_files

    if not has_tokenizer_files(tokenizer_dir):
        return None
    from rlp.tokenizer import tokenizer_hash

    return tokenizer_hash(Path(tokenizer_dir))  # type: ignore[arg-type]


def _ema_tensors(ema: Any, ema_state: Any) -> Any:
    """EMA tensors from an :class:`rlp.ema.EMA`-like object (``.params``) or given directly."""
    if ema_state is not None:
        return ema_state
    if ema is None or not getattr(ema, "initialized", True):
        return None
    return ema.params


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run directory.

    ``ckpt_cfg.dir`` is used as given (a relative path is relative to the working directory, like
    ``run.output_dir`` it is usually built from); ``run_dir`` only supplies the default
    ``<run_dir>/checkpoints`` when ``ckpt_cfg.dir`` is empty. Construction removes stale
    ``tmp_*`` directories of interrupted saves (rank 0 only; call it before any save).
    """

    def __init__(self, ckpt_cfg: CheckpointConfig, run_dir: str | Path | None = None) -> None:
        if ckpt_cfg.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        self.cfg = ckpt_cfg
        base = ckpt_cfg.dir or (Path(run_dir) / "checkpoints" if run_dir else "checkpoints")
        self.root = Path(base)
        if dist.is_rank0():
            self.remove_stale()

    # ------------------------------------------------------------------ finding checkpoints

    def prepare_for_signals(self) -> None:
        """Start the checkpoint writer's helper process now, so a SIGTERM cannot kill it before
        the save that the signal asks for (:func:`rlp.model.writer_processes.start_writer_service`;
        the helper still dies with this process)."""
        from rlp.model import writer_processes

        writer_processes.start_writer_service()

    def should_save(self, step: int) -> bool:
        """True every ``save_every`` steps (never at step 0; the end of a run is the caller's)."""
        every = self.cfg.save_every
        return every > 0 and step > 0 and step % every == 0

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as ``(step, path)``, oldest first."""
        return sharded.list_checkpoints(self.root)

    def latest_path(self) -> Path | None:
        """The newest complete checkpoint (by step, not by the ``latest`` file), or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def remove_stale(self) -> list[Path]:
        """Delete ``tmp_*`` entries left by interrupted saves; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if not p.name.startswith(TMP_PREFIX):
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: Any = None,
        ema: Any = None,
        ema_state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
        train_state: Mapping[str, Any] | None = None,
        rng_state: Mapping[str, Any] | None = None,
        config: Any = None,
        tokenizer_dir: str | Path | None = None,
        vocab_size: int | None = None,
        tokenizer_hash: str | None = None,
    ) -> Path:
        """Collective: write checkpoint ``step`` atomically; returns its final path.

        ``ema`` is an :class:`rlp.ema.EMA` (its ``params``; skipped while uninitialised) or pass
        the tensors as ``ema_state`` (by parameter name, or in ``model.parameters()`` order).
        ``train_state`` (plain data, may differ per rank: data cursor) and ``rng_state`` (default:
        :func:`rlp.state.capture_rng` now) go to this rank's own file; megatron's TP RNG streams
        are added automatically. ``config`` is the run :class:`~rlp.config.Config` (or its dict).
        """
        final = self.root / sharded.step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        try:
            self._write(
                tmp,
                final,
                step,
                model=model,
                optimizer=optimizer,
                ema_state=_ema_tensors(ema, ema_state),
                train_state=train_state,
                rng_state=rng_state,
                config=config,
                tokenizer_dir=tokenizer_dir,
                vocab_size=vocab_size,
                tokenizer_hash=tokenizer_hash,
            )
        except BaseException as err:  # torch DCP's CheckpointException is a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)) or not _is_disk_full(
                err, self.root
            ):
                raise
            if dist.is_rank0():
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            previous = self.latest_path()
            kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(
                f"no space left on {self.root}: checkpoint step {step} was not written "
                f"({kept}); free space or set checkpoint.dir to a larger disk"
            ) from None
        return final

    def _write(
        self,
        tmp: Path,
        final: Path,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: Any,
        ema_state: Any,
        train_state: Mapping[str, Any] | None,
        rng_state: Mapping[str, Any] | None,
        config: Any,
        tokenizer_dir: str | Path | None,
        vocab_size: int | None,
        tokenizer_hash: str | None,
    ) -> None:
        if dist.is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANK_STATE_DIR).mkdir(parents=True)
        dist.barrier()
        contents = sharded.save_state(tmp, model=model, optimizer=optimizer, ema_state=ema_state)
        layout = sharded.parallel_layout()
        rank = torch.distributed.get_rank()
        rank_file = {
            "rank": rank,
            "layout": layout,
            "train_state": _encode(dict(train_state or {})),
            "rng": _encode(dict(rng_state) if rng_state is not None else capture_rng()),
            "megatron_rng": sharded.rng_tracker_states(),
        }
        _write_bytes(tmp / RANK_STATE_DIR / f"rank_{rank:05d}.pt", _torch_bytes(rank_file))
        dist.barrier()  # every rank's shards and rank file are on disk
        claimed = sharded.gather_rank_file_sizes(tmp)
        if dist.is_rank0():
            cfg = _as_dict(config)
            (tmp / TRAIN_STATE_FILE).write_text(
                json.dumps(dict(train_state or {}), indent=2, default=str) + "\n"
            )
            if cfg is not None:
                (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg, sort_keys=False, width=100))
            if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
                from rlp.model.hf_files import copy_tokenizer_files

                copy_tokenizer_files(tokenizer_dir, tmp / sharded.TOKENIZER_SUBDIR)
                tokenizer_hash = tokenizer_hash or _tokenizer_hash(tokenizer_dir)
            meta = sharded.make_metadata(
                step,
                model=model,
                optimizer=optimizer,
                contents=contents,
                model_config=(cfg or {}).get("model"),
                vocab_size=vocab_size,
                tokenizer_hash=tokenizer_hash,
            )
            sharded.write_file_list(tmp, claimed)
            self._publish(tmp, final, meta)
        dist.barrier()

    def _publish(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        """Rank 0, all files written: marker + rename, then ``latest``, then retention."""
        sharded.finalize_checkpoint(tmp, final, meta)
        latest_tmp = self.root / f"{TMP_PREFIX}{LATEST_FILE}"
        latest_tmp.write_text(final.name + "\n")
        latest_tmp.replace(self.root / LATEST_FILE)
        newer = [p.name for s, p in self.checkpoints() if s > meta["step"]]
        if newer:
            warnings.warn(
                f"{self.root} holds checkpoints newer than step {meta['step']} "
                f"({', '.join(newer)}), e.g. from an earlier run: auto-resume picks the newest "
                "step, not this one; use a fresh checkpoint.dir per run",
                stacklevel=3,
            )
        self._apply_retention(protect=final)

    def _apply_retention(self, protect: Path | None = None) -> list[Path]:
        """Keep the newest ``keep_last`` complete checkpoints (and ``protect``, the one just
        written); incomplete directories are not touched."""
        found = self.checkpoints()
        doomed = [p for _, p in found[: max(0, len(found) - self.cfg.keep_last)] if p != protect]
        for p in doomed:
            # Rename first so a crash mid-delete leaves a tmp_* dir (cleaned up), not a
            # step dir that lost files but kept its COMPLETE marker.
            trash = p.with_name(f"{TMP_PREFIX}deleted_{p.name}")
            p.replace(trash)
            shutil.rmtree(trash, ignore_errors=True)
        return doomed

    # ------------------------------------------------------------------ loading

    def load_latest(self, **kwargs: Any) -> LoadedCheckpoint | None:
        """Collective: :meth:`load` the newest intact checkpoint; None when there is none.

        A complete checkpoint whose files do not match its ``files.json`` (a shard or rank file
        missing or truncated, e.g. by a failing disk or a copy) is skipped with a warning that
        names it; the next older one is tried. When every checkpoint is damaged this raises
        :class:`DamagedCheckpointError` naming them.
        """
        damaged: list[str] = []
        for _, path in reversed(self.checkpoints()):
            problem = _agreed_problem(path)
            if problem is None:
                loaded = self._load(path, verified=True, **kwargs)
                loaded.skipped = tuple(damaged)
                return loaded
            damaged.append(problem)
            if dist.is_rank0():
                warnings.warn(
                    f"{problem}; skipping it and resuming from an older checkpoint", stacklevel=2
                )
        if damaged:
            names = ", ".join(p.name for _, p in reversed(self.checkpoints()))
            raise DamagedCheckpointError(
                f"every checkpoint under {self.root} is damaged ({names}; first: {damaged[0]}); "
                "move them away to start over, or set checkpoint.resume=never"
            )
        return None

    def load(
        self,
        path: str | Path,
        *,
        model: torch.nn.Module,
        optimizer: Any = None,
        ema: Any = None,
        ema_state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
        config: Any = None,
        tokenizer_hash: str | None = None,
    ) -> LoadedCheckpoint:
        """Collective: restore model, optimizer and EMA in place; return train/RNG state.

        ``path`` is a checkpoint or a checkpoints root (newest). Compatibility (architecture,
        tokenizer hash from ``tokenizer_hash`` or ``config.tokenizer.path``, optimizer kind) is
        checked first. An uninitialised ``ema`` is initialised from the model, then overwritten.
        Megatron's TP RNG streams are restored here when the layout is unchanged; the trainer
        restores ``rng_state`` (python/numpy/torch) itself.
        """
        return self._load(
            sharded.resolve_checkpoint(path),
            verified=False,
            model=model,
            optimizer=optimizer,
            ema=ema,
            ema_state=ema_state,
            config=config,
            tokenizer_hash=tokenizer_hash,
        )

    def _load(
        self,
        path: Path,
        *,
        verified: bool,
        model: torch.nn.Module,
        optimizer: Any = None,
        ema: Any = None,
        ema_state: Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
        config: Any = None,
        tokenizer_hash: str | None = None,
    ) -> LoadedCheckpoint:
        meta = sharded.read_metadata(path)
        cfg = _as_dict(config)
        if tokenizer_hash is None and cfg is not None:
            tokenizer_hash = _tokenizer_hash(cfg.get("tokenizer", {}).get("path"))
        if ema_state is None and ema is not None:
            if "ema" in meta["contents"]:
                if not getattr(ema, "initialized", True):
                    ema.initialize(list(model.parameters()))
                ema_state = ema.params
            else:
                warnings.warn(
                    f"{path} has no EMA state; the EMA starts from the policy weights", stacklevel=2
                )
        sharded.load_checkpoint(
            path,
            model=model,
            optimizer=optimizer,
            ema_state=ema_state,
            tokenizer_hash=tokenizer_hash,
            verify=not verified,
        )
        return self._load_rank_state(path, meta)

    def _load_rank_state(self, path: Path, meta: dict[str, Any]) -> LoadedCheckpoint:
        layout = sharded.parallel_layout()
        rank = torch.distributed.get_rank()
        saved = meta["layout"]
        same = saved == layout
        same_dp = saved["dp_size"] == layout["dp_size"] and saved["pp_size"] == layout["pp_size"]
        if same:
            source = rank
        elif same_dp:
            # Only TP changed: take the state of a saver rank in the same DP slot, whose data
            # cursor is exactly this rank's (megatron orders ranks TP-fastest, dp = rank // tp).
            source = (rank // layout["tp_size"]) * saved["tp_size"]
        else:
            source = rank if rank < saved["world_size"] else 0
        file = path / RANK_STATE_DIR / f"rank_{source:05d}.pt"
        if not file.is_file():
            raise CheckpointError(f"{path} is missing per-rank state {file.name}")
        raw = _read_rank_state(file)
        if same:
            sharded.set_rng_tracker_states(raw["megatron_rng"])
        elif rank == 0:
            warnings.warn(
                f"{path} was saved with layout {saved}, this job is {layout}: RNG streams are "
                f"taken from the saver's rank {source}"
                + ("" if same_dp else "; the data order restarts (DP size changed)"),
                stacklevel=3,
            )
        return LoadedCheckpoint(
            path=path,
            step=int(meta["step"]),
            metadata=meta,
            train_state=_decode(raw["train_state"]),
            rng_state=_decode(raw["rng"]),
            same_layout=same,
            same_data_layout=same_dp,
            source_rank=source,
        )

    def load_weights(
        self, source: str | Path, model: torch.nn.Module, config: Any = None
    ) -> dict[str, Any] | None:
        """Collective: initial weights from an rlp checkpoint (or root) or an HF model directory.

        Returns the checkpoint metadata, or None for an HF directory. Nothing but the model is
        touched (``checkpoint.init_from``: optimizer and counters start fresh).
        """
        src = Path(source)
        if (src / "config.json").is_file() and not sharded.is_complete(src):
            from rlp.model.hf_bridge import load_hf_into_model

            load_hf_into_model(model, src)
            return None
        cfg = _as_dict(config)
        tok = _tokenizer_hash(cfg.get("tokenizer", {}).get("path")) if cfg else None
        return sharded.load_checkpoint(
            sharded.resolve_checkpoint(src), model=model, tokenizer_hash=tok
        )


def _read_rank_state(file: Path) -> dict[str, Any]:
    """A rank state file, unpickled with torch's allow-list (``weights_only=True``: tensors and
    plain data, never code); anything else is refused with one line."""
    import pickle

    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is many lines; its first names the offending global.
        reason = next((ln for ln in str(e).splitlines() if "GLOBAL" in ln), "not plain data")
        raise UnsafeCheckpointError(
            f"refusing to load {file}: it holds objects other than tensors and plain data "
            f"({reason.strip()}); load only trusted checkpoints"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DamagedCheckpointError(f"{file} is damaged: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not {"train_state", "rng", "megatron_rng"} <= set(raw):
        raise DamagedCheckpointError(f"{file} is damaged: not an rlp rank state")
    return raw


def _agreed_problem(path: Path) -> str | None:
    """Collective: why ``path`` is damaged (None when intact) as every rank agrees: a checkpoint
    damaged on any rank's view is damaged on all, so they fall back together."""
    try:
        sharded.read_metadata(path)
        sharded.verify_checkpoint(path)
        problem = None
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        problem = str(e)
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return problem
    flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and problem is None:
        problem = f"checkpoint {path} is damaged as another rank sees it"
    return problem


class SignalFlag:
    """Records SIGTERM/SIGUSR1 (SLURM pre-emption) so the training loop can save and exit.

    The handler only sets :attr:`raised` / :attr:`name`; the loop polls the flag between steps
    (use :meth:`raised_anywhere` with several ranks: a signal may reach only some of them, and
    they must agree before entering the collective save). :meth:`restore` puts back the previous
    handlers; the object is also a context manager.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "SignalFlag must be created in the main thread (Python delivers signals only there)"
            )
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handler) for s in signals}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def raised_anywhere(self) -> bool:
        """Collective: True on every rank if any rank received a signal."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return self.raised
        flag = torch.tensor([1 if self.raised else 0], dtype=torch.int32)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def clear(self) -> None:
        self.signum = None

    def restore(self) -> None:
        """Reinstall the handlers that were active before this object (idempotent)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> SignalFlag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
