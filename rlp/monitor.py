"""``rlp status RUN_DIR``: latest step and metrics, newest checkpoint and SLURM job state.

Reads ``RUN_DIR/metrics.jsonl`` (last row only, read from the end), the checkpoint directory and,
when ``RUN_DIR/slurm/job_id`` exists and SLURM is on PATH, ``scontrol show job``. Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rlp.options import parse

STATUS_METRICS = (
    "loss/total",
    "loss/rl",
    "loss/ntp",
    "reward/mean",
    "time/step",
    "throughput/thought_tokens_per_s",
)


def last_json_line(path: Path, chunk: int = 1 << 16) -> tuple[dict | None, int]:
    """(last complete JSON object, number of lines) of a JSONL file that may be mid-write."""
    if not path.is_file():
        return None, 0
    with open(path, "rb") as f:
        lines = sum(1 for _ in f)
        f.seek(max(0, f.seek(0, os.SEEK_END) - chunk))
        tail = f.read().decode(errors="replace").splitlines()
    for text in reversed(tail):
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            return row, lines
    return None, lines


def _checkpoint_dir(run_dir: Path) -> Path:
    resolved = run_dir / "config.yaml"
    for path in (resolved, run_dir / "slurm" / "config.yaml"):
        if path.is_file():
            raw = yaml.safe_load(path.read_text()) or {}
            ckpt = (raw.get("checkpoint") or {}).get("dir")
            if ckpt:
                return Path(ckpt) if os.path.isabs(ckpt) else Path.cwd() / ckpt
    return run_dir / "checkpoints"


def latest_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    """Newest ``step_N`` directory (names starting with '.' or ending in .tmp are partial)."""
    if not ckpt_dir.is_dir():
        return None
    found = []
    for d in ckpt_dir.iterdir():
        match = re.fullmatch(r"step_(\d+)", d.name)
        if d.is_dir() and match:
            found.append((int(match.group(1)), d))
    if not found:
        return None
    step, path = max(found)
    info: dict[str, Any] = {
        "step": step,
        "path": str(path),
        "count": len(found),
        "age_s": time.time() - path.stat().st_mtime,
    }
    latest = ckpt_dir / "latest"
    if latest.is_file():
        info["latest_file"] = latest.read_text().strip()
    return info


def _scontrol_fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", text))


def slurm_job(job_id: str) -> dict[str, Any]:
    """State of ``job_id`` from scontrol (finished jobs stay there MinJobAge) or squeue."""
    info: dict[str, Any] = {"id": job_id}
    if shutil.which("scontrol") is None:
        info["state"] = "unknown (no scontrol on PATH)"
        return info
    proc = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        info["state"] = "not known to the controller (finished a while ago, or another cluster)"
        return info
    fields = _scontrol_fields(proc.stdout)
    for key in (
        "JobState",
        "Reason",
        "Restarts",
        "ExitCode",
        "RunTime",
        "TimeLimit",
        "NodeList",
        "StartTime",
        "EligibleTime",
    ):
        if key in fields:
            info[key[0].lower() + re.sub(r"([A-Z])", r"_\1", key[1:]).lower()] = fields[key]
    return info


def status_main(argv: list[str]) -> int:
    """``rlp status RUN_DIR [--json]``."""
    ap = argparse.ArgumentParser(prog="rlp status", description="Progress of an rlp run.")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = parse(ap, argv)
    run_dir = args.run_dir
    if not run_dir.is_dir():
        print(
            f"rlp status: error: {run_dir} is not a directory (pass run.output_dir)",
            file=sys.stderr,
        )
        return 2
    row, lines = last_json_line(run_dir / "metrics.jsonl")
    report: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "metrics": None}
    if row is not None:
        age = time.time() - (run_dir / "metrics.jsonl").stat().st_mtime
        report["metrics"] = {"records": lines, "age_s": age, **row}
    max_steps = None
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        max_steps = ((yaml.safe_load(cfg_path.read_text()) or {}).get("run") or {}).get("max_steps")
    report["max_steps"] = max_steps
    report["checkpoint"] = latest_checkpoint(_checkpoint_dir(run_dir))
    summary = run_dir / "summary.json"
    report["finished"] = summary.is_file()
    id_file = run_dir / "slurm" / "job_id"
    report["job"] = slurm_job(id_file.read_text().strip()) if id_file.is_file() else None
    events = run_dir / "slurm" / "events.log"
    report["events"] = events.read_text().splitlines()[-5:] if events.is_file() else []
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_status(report)
    return 0


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _print_status(report: dict[str, Any]) -> None:
    done = "  (finished: summary.json)" if report["finished"] else ""
    print(f"run          {report['run_dir']}{done}")
    m = report["metrics"]
    if m is None:
        print("metrics      none yet (metrics.jsonl missing or empty)")
    else:
        of = f"/{report['max_steps']}" if report["max_steps"] else ""
        values = "  ".join(
            f"{k}={m[k]:.4g}" for k in STATUS_METRICS if isinstance(m.get(k), (int, float))
        )
        print(f"step         {m.get('step')}{of}  ({_ago(m['age_s'])}, {m['records']} records)")
        if values:
            print(f"metrics      {values}")
    c = report["checkpoint"]
    if c is None:
        print("checkpoint   none yet")
    else:
        print(f"checkpoint   step {c['step']}: {c['path']} ({_ago(c['age_s'])}, {c['count']} kept)")
    job = report["job"]
    if job is None:
        print("slurm job    none recorded (no RUN_DIR/slurm/job_id)")
    else:
        skip = ("id", "state", "job_state")
        details = ", ".join(f"{k}={v}" for k, v in job.items() if k not in skip)
        state = job.get("job_state") or job.get("state")
        print(f"slurm job    {job['id']}: {state}" + (f" ({details})" if details else ""))
    for line in report["events"]:
        print(f"  event      {line}")
