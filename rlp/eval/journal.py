"""Append-only JSON-lines journals of the evaluation: crash-safe writes, resume checks.

This module owns the file format shared by ``items.jsonl`` (generations) and the
reasoning-quality journals (``probes.jsonl``, ``step_gain.jsonl``): a first ``{"type": "meta",
"settings": {...}}`` line with the settings that decide the content, then one JSON object per
record. Records are appended batch by batch in one write, flushed and fsynced; a line torn by a
crash is cut off the file when it is next read, so the batch it belonged to is simply redone.
Resuming with different settings is refused with the list of differences.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ResumeMismatchError(RuntimeError):
    """A journal in the output directory was written with different settings."""


def read_journal(path: Path, record_type: str) -> tuple[dict[str, Any] | None, list[dict]]:
    """Meta line and the records of ``record_type``; a torn last line is cut off the file."""
    if not path.exists():
        return None, []
    raw = path.read_bytes()
    good_end = 0
    meta: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl < 0:
            break  # no newline: torn write
        try:
            obj = json.loads(raw[pos:nl])
        except json.JSONDecodeError:
            break
        if obj.get("type") == "meta" and meta is None and not records:
            meta = obj
        elif obj.get("type") == record_type:
            records.append(obj)
        pos = good_end = nl + 1
    if good_end < len(raw):
        logger.warning("%s: dropping %d bytes of an unfinished write", path, len(raw) - good_end)
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return meta, records


def append_lines(path: Path, objs: Sequence[Mapping[str, Any]]) -> None:
    """Append JSON lines in one write, then flush and fsync."""
    data = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def check_meta(meta: Mapping[str, Any], settings: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`ResumeMismatchError` if ``meta`` was written with other ``settings``."""
    old = meta.get("settings", {})
    new = json.loads(json.dumps(settings))
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if diffs:
        raise ResumeMismatchError(
            f"{path} was written with different settings ({'; '.join(diffs)}). Resume with the "
            "same settings, or pass a new --out directory (or delete that file) to start over."
        )


def open_journal(
    path: Path, record_type: str, settings: Mapping[str, Any], **meta_fields: Any
) -> list[dict[str, Any]]:
    """Records already in ``path`` (after checking its settings), or a new journal's meta line.

    A journal with records but no meta line is refused.
    """
    meta, records = read_journal(path, record_type)
    if meta is not None and not records and len(path.read_bytes().splitlines()) == 1:
        # A start that failed before its first record binds nothing: the corrected re-run
        # (e.g. a lower --max-new-tokens) writes its own settings line.
        path.unlink()
        meta = None
    if meta is not None:
        check_meta(meta, settings, path)
    elif records:
        raise ResumeMismatchError(
            f"{path} has {record_type} records but no settings line; use a new --out directory"
        )
    else:
        append_lines(path, [{"type": "meta", "settings": dict(settings), **meta_fields}])
    return records
