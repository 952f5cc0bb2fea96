"""MetricsLogger: JSONL rows, progress line with ETA, non-finite values, samples, wandb offline."""

from __future__ import annotations

import io
import json
import math

from rlp.config import LogConfig
from rlp.metrics import MetricsLogger, PhaseTimer, format_duration, reduce_metrics


def _logger(tmp_path, **kw):
    stream = io.StringIO()
    cfg = LogConfig(**kw)
    return MetricsLogger(cfg, tmp_path, enabled=True, total_steps=10, stream=stream), stream


def test_jsonl_rows_and_progress_line(tmp_path):
    logger, stream = _logger(tmp_path, every=2)
    for step in range(1, 5):
        logger.log(step, {"loss/total": 1.0 / step, "reward/mean": -0.5, "time/step": 0.1})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["loss/total"] == 0.5
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # every=2 -> steps 2 and 4
    assert lines[0].startswith("step  2/10") and "loss 0.5000" in lines[0] and "eta" in lines[0]


def test_non_finite_becomes_null(tmp_path):
    logger, _ = _logger(tmp_path)
    logger.log(1, {"loss/total": float("nan"), "optim/grad_norm": math.inf})
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss/total"] is None and row["optim/grad_norm"] is None


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(LogConfig(), tmp_path / "x", enabled=False, total_steps=3)
    logger.log(1, {"loss/total": 1.0})
    logger.log_samples(1, [{"a": 1}])
    assert logger.write_summary({"a": 1}) is None
    assert not (tmp_path / "x").exists()


def test_samples_and_summary(tmp_path):
    logger, _ = _logger(tmp_path)
    logger.log_samples(3, [{"prefix_tail": "a", "thought": "b", "target": "c", "reward": 0.1}])
    path = logger.write_summary({"steps": 3})
    logger.close()
    sample = json.loads((tmp_path / "samples.jsonl").read_text())
    assert sample == {"step": 3, "prefix_tail": "a", "thought": "b", "target": "c", "reward": 0.1}
    assert json.loads(path.read_text()) == {"steps": 3}


def test_wandb_offline_writes_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    logger, _ = _logger(tmp_path, wandb="offline")
    logger.log(1, {"loss/total": 1.0})
    logger.log_samples(1, [{"prefix_tail": "a", "thought": "b", "target": "c", "reward": 0.5}])
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    tables = list(runs[0].glob("files/media/table/samples_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["data"][0][1] == "b"


def test_phase_timer_accumulates():
    timer = PhaseTimer()
    with timer("a"):
        pass
    with timer("a"):
        pass
    with timer("b"):
        pass
    times = timer.reset()
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert timer.reset() == {}


def test_format_duration():
    assert format_duration(59) == "00:59"
    assert format_duration(3725) == "1:02:05"


def test_reduce_metrics_without_process_group_is_identity():
    metrics = {"a": 1.0, "b_max": 2, "c": "text"}
    assert reduce_metrics(metrics) == metrics
