"""Metrics sinks and progress: stdout progress line, ``metrics.jsonl``, optional wandb, timers.

Only rank 0 writes (the trainer reduces metrics across ranks before calling :meth:`log`). Metric
names are slash-namespaced (``loss/rl``, ``reward/mean``, ``time/sample``,
``throughput/thought_tokens_per_s``). Non-finite values are written as ``null`` in JSONL (JSON has
no NaN) and counted, so a broken step is visible rather than silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rlp.config import LogConfig


class PhaseTimer:
    """Wall-clock time per named phase of one step (``with timer("sample"): ...``)."""

    def __init__(self, sync: Any = None) -> None:
        self._sync = sync  # e.g. torch.cuda.synchronize, so GPU work is attributed to its phase
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Writes per-step metrics to stdout, JSONL and wandb (each optional) on rank 0."""

    def __init__(
        self,
        log_cfg: LogConfig,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        run_name: str = "rlp",
        config: dict[str, Any] | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.cfg = log_cfg
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.stream = stream or sys.stdout
        self._t0 = time.perf_counter()
        self._jsonl: TextIO | None = None
        self._wandb_run: Any = None
        self.history: list[dict[str, Any]] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if log_cfg.jsonl:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if log_cfg.wandb != "disabled":
            self._wandb_run = self._init_wandb(run_name, config or {})

    def _init_wandb(self, run_name: str, config: dict[str, Any]) -> Any:
        import wandb

        os.environ.setdefault("WANDB_DIR", str(self.run_dir))
        if self.cfg.wandb == "online" and not os.environ.get("WANDB_API_KEY"):
            netrc = Path.home() / ".netrc"
            if not netrc.exists() or "api.wandb.ai" not in netrc.read_text():
                raise RuntimeError(
                    "log.wandb=online but no wandb API key is configured: set WANDB_API_KEY, run "
                    "`wandb login`, or use log.wandb=offline / log.wandb=disabled"
                )
        return wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=run_name,
            dir=str(self.run_dir),
            mode=self.cfg.wandb,
            config=config,
            resume="allow",
            id=_wandb_id(self.run_dir, run_name),
        )

    def truncate_after(self, step: int) -> None:
        """Drop ``metrics.jsonl`` rows past ``step`` (a resume replays those steps)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.enabled or not path.exists():
            return
        if self._jsonl is not None:
            self._jsonl.close()
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in kept))
        if self.cfg.jsonl:
            self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (rank 0) and print a progress line every ``log.every``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)
        if step % self.cfg.every == 0 or step == self.total_steps:
            self.stream.write(self.progress_line(step, metrics) + "\n")
            self.stream.flush()

    def progress_line(self, step: int, metrics: dict[str, Any]) -> str:
        done = max(1, step - self.start_step)
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * max(0, self.total_steps - step)
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        for key, label, fmt in (
            ("loss/total", "loss", ".4f"),
            ("reward/mean", "reward", "+.4f"),
            ("reward/frac_positive", "r>0", ".2f"),
            ("thought/len_mean", "thought", ".1f"),
            ("throughput/tokens_per_s", "tok/s", ".0f"),
            ("time/step", "s/step", ".2f"),
        ):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                parts.append(f"{label} {value:{fmt}}")
        parts.append(f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}")
        return " | ".join(parts)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Samples (text, token ids, scores) to ``samples.jsonl``; their scalar and text columns
        also as a wandb table."""
        if not self.enabled or not rows:
            return
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self._wandb_run is not None:
            import wandb

            columns = [c for c, v in rows[0].items() if isinstance(v, (str, int, float))]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self._wandb_run.log({"samples": table}, step=step)

    def write_summary(self, summary: dict[str, Any]) -> Path | None:
        """End-of-run ``summary.json`` (final metrics, throughput, hardware)."""
        if not self.enabled:
            return None
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if self._wandb_run is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float, str)):
                    self._wandb_run.summary[key] = value
        return path

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _wandb_id(run_dir: Path, run_name: str) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = f"{run_name[:40]}-{uuid.uuid4().hex[:8]}"
    path.write_text(run_id + "\n")
    return run_id


def reduce_metrics(metrics: dict[str, Any], group: Any = None) -> dict[str, Any]:
    """Average numeric metrics over a process group (``*_max`` keys take the max, ``*_min`` the
    min). Non-numeric values pass through. A no-op without an initialised multi-rank group."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_available() or not tdist.is_initialized():
        return metrics
    size = tdist.get_world_size(group)
    if size == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
    out = dict(metrics)
    for op, select in (
        (tdist.ReduceOp.MAX, lambda k: k.endswith("_max")),
        (tdist.ReduceOp.MIN, lambda k: k.endswith("_min")),
        (tdist.ReduceOp.SUM, lambda k: not (k.endswith("_max") or k.endswith("_min"))),
    ):
        chosen = [k for k in keys if select(k)]
        if not chosen:
            continue
        values = torch.tensor([float(metrics[k]) for k in chosen], dtype=torch.float64)
        tdist.all_reduce(values, op=op, group=group)
        if op == tdist.ReduceOp.SUM:
            values /= size
        out.update({k: float(v) for k, v in zip(chosen, values.tolist())})
    return out


def all_ranks_true(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (so all ranks skip a bad step together)."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_available() or not tdist.is_initialized():
        return flag
    value = torch.tensor([0.0 if flag else 1.0])
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item() == 0.0)
