"""rlp as a real package: a wheel installed (not editable) into a fresh venv works from an
unrelated directory: bundled configs by name, sbatch templates, the demo corpus builder.

Offline and without downloading torch: the wheel is built with the project venv's setuptools
(``--no-build-isolation``), installed with ``--no-deps`` into a venv made from the same base
Python, and that venv then sees the project venv's site-packages (torch, megatron-core, ...)
through a ``.pth`` line added *after* the install, so pip never sees the editable ``rlp``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_helpers import REPO_ROOT

pytestmark = pytest.mark.integration

PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "rlp", "data_pipelines")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_wheel_installs_and_runs_from_any_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PIP_NO_INDEX="1")
    # Build from a copy of the package sources: an in-tree build would write build/ into the repo.
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, src / name)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], src, env)
    (wheel,) = dist.glob("rlp-*.whl")

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], tmp_path, env)
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            tmp_path,
            env,
        ).strip()
    )
    # Every site-packages this interpreter sees, in order: the project venv's, and on machines
    # whose venv was made with --system-site-packages (an existing torch, as on GPU images, or
    # a bootstrap run from inside another venv) the base interpreter's as well.
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    assert any((Path(p) / "torch").is_dir() for p in deps), deps
    (site / "zz_project_deps.pth").write_text("".join(f"{p}\n" for p in deps))

    work = tmp_path / "elsewhere"
    work.mkdir()
    rlp = str(venv / "bin" / "rlp")
    where = _run([str(python), "-c", "import rlp; print(rlp.__file__)"], work, env)
    assert str(site) in where, where  # the wheel's rlp, not the repository's
    out = _run([rlp, "train", "--dry-run", "--config", "tiny_cpu"], work, env)
    assert "name: tiny_cpu" in out
    out = _run(
        [rlp, "submit", "--dry-run", "--cpu", "--config", "tiny_cpu", "run.output_dir=runs/x"],
        work,
        env,
    )
    assert "#SBATCH" in out and "rlp" in out
    _run([rlp, "data", "demo", "--out", "corpus", "--num-docs", "200", "--quiet"], work, env)
    assert (work / "corpus" / "shards" / "manifest.json").is_file()
    assert (work / "corpus" / "tokenizer" / "tokenizer.json").is_file()
    notice = (work / "corpus" / "NOTICE.txt").read_text()
    assert "In the Year 2889" in notice
    assert not (REPO_ROOT / "corpus").exists()
