"""`rlp eval` start-up errors (issue 15, item 8): --max-new-tokens beyond the model's positions is
refused before anything loads, and a start that failed before its first record does not block the
corrected re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rlp.eval.command import main as eval_main
from rlp.eval.journal import ResumeMismatchError, open_journal
from rlp.eval.runner import ITEMS_FILE, EvalSettings, check_resumable


def _hf_dir(tmp_path: Path, positions: int) -> Path:
    path = tmp_path / "hf"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": positions}))
    return path


def _rlp_root(tmp_path: Path, positions: int) -> Path:
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:07d}").mkdir(parents=True)
        cfg = {"model": {"max_position_embeddings": positions if step == 4 else 99999}}
        (root / f"step_{step:07d}" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.parametrize("kind", ["hf", "rlp"])
def test_max_new_tokens_beyond_positions_is_refused_before_loading(tmp_path, capsys, kind):
    ckpt = _hf_dir(tmp_path, 128) if kind == "hf" else _rlp_root(tmp_path, 128)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt), "--max-new-tokens", "200", "--out", str(out)]
    rc = eval_main([*argv, "--backend", "hf", "--benchmarks", "gsm8k", "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--max-new-tokens 200 does not fit the model's 128 positions" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_settings_line_without_records_does_not_block_the_rerun(tmp_path):
    path = tmp_path / ITEMS_FILE
    failed = EvalSettings(max_new_tokens=4096).fingerprint()
    corrected = EvalSettings(max_new_tokens=256)
    assert open_journal(path, "item", failed) == []  # the failed start wrote its settings line
    assert check_resumable(tmp_path, corrected) == 0
    assert open_journal(path, "item", corrected.fingerprint()) == []
    meta = json.loads(path.read_text().splitlines()[0])
    assert meta["settings"]["max_new_tokens"] == 256
    # Once a record exists, the settings bind: a different re-run is refused as before.
    with path.open("a") as fh:
        fh.write(json.dumps({"type": "item", "run": "gsm8k", "index": 0}) + "\n")
    with pytest.raises(ResumeMismatchError, match="max_new_tokens"):
        check_resumable(tmp_path, EvalSettings(max_new_tokens=128))
