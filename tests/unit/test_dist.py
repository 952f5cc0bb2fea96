"""Launch detection (torchrun / srun / plain python) and process-group setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rlp import dist
from rlp.config import ConfigError, ParallelConfig
from tests.model_helpers import REPO_ROOT, free_port

TORCHRUN_ENV = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "node7",
    "MASTER_PORT": "29555",
}
SRUN_ENV = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_NODELIST": "gpu[003-004]",
    "SLURM_JOB_NODELIST": "gpu[003-004]",
}


@pytest.fixture
def no_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the built-in node-list parser (no SLURM on the test machine, or a different one)."""
    monkeypatch.setattr(dist.shutil, "which", lambda name: None)


def test_detect_torchrun() -> None:
    info = dist.detect_launch(TORCHRUN_ENV)
    assert info == dist.LaunchInfo("torchrun", 3, 8, 1, "node7", 29555)


def test_torchrun_wins_over_slurm_vars() -> None:
    """torchrun started inside an srun step: torchrun's ranks are the real ones."""
    assert dist.detect_launch({**SRUN_ENV, **TORCHRUN_ENV}).launcher == "torchrun"


def test_detect_srun(no_scontrol: None) -> None:
    info = dist.detect_launch(SRUN_ENV)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("srun", 5, 8, 1)
    assert info.master_addr == "gpu003"
    assert info.master_port == 20000 + 123456 % 20000  # same on every task of the job


def test_srun_env_overrides_and_fallbacks(no_scontrol: None) -> None:
    env = {**SRUN_ENV, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "31000"}
    info = dist.detect_launch(env)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 31000)
    # The job node list is used when the step's is missing.
    env = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_NODELIST"}
    env["SLURM_JOB_NODELIST"] = "cpu17,gpu[001-002]"
    assert dist.detect_launch(env).master_addr == "cpu17"


def test_sbatch_script_without_srun_is_single_process() -> None:
    """A batch script has SLURM_PROCID/SLURM_NTASKS but is one process (no srun step)."""
    env = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert dist.detect_launch(env) == dist.LaunchInfo("single", 0, 1, 0, None, None)


def test_detect_plain_python() -> None:
    assert dist.detect_launch({}).launcher == "single"


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node01", "node01"),
        ("gpu[003-005,010]", "gpu003"),
        ("gpu[7,9]-ib", "gpu7-ib"),
        ("a[1-2],b[3-4]", "a1"),
        ("login,gpu[1-4]", "login"),
    ],
)
def test_first_slurm_host_parser(no_scontrol: None, nodelist: str, first: str) -> None:
    assert dist.first_slurm_host(nodelist) == first


def test_bad_integer_env_names_the_variable() -> None:
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        dist.detect_launch({**SRUN_ENV, "SLURM_PROCID": "x"})


def test_resolve_backend() -> None:
    assert dist.resolve_backend("auto", cuda_available=False) == "gloo"
    assert dist.resolve_backend("auto", cuda_available=True) == "nccl"
    assert dist.resolve_backend("gloo", cuda_available=True) == "gloo"
    with pytest.raises(ConfigError, match="parallel.backend"):
        dist.resolve_backend("nccl", cuda_available=False)


def test_world_size_must_split_into_model_replicas() -> None:
    dist.check_world_size(4, ParallelConfig(tp_size=2))
    with pytest.raises(ConfigError, match=r"world size 3 .*parallel.tp_size \(2\)"):
        dist.check_world_size(3, ParallelConfig(tp_size=2))


_CHILD = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from rlp import dist
    from rlp.config import ConfigError, ParallelConfig
    cfg = ParallelConfig()
    before = dist.is_rank0()
    env = dist.init_distributed(cfg)
    again = dist.init_distributed(cfg)
    import torch.distributed as tdist
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dist.print0("hello")
    dist.barrier()
    try:
        dist.init_distributed(ParallelConfig(tp_size=2))
        bad = None
    except ConfigError as e:
        bad = str(e)
    result = dict(rank=env.rank, world=env.world_size, backend=env.backend,
                  launcher=env.launcher, device=str(env.device), same=again is env,
                  group_size=tdist.get_world_size(), before=before, printed=out.getvalue(),
                  bad=bad)
    dist.shutdown()
    result["after"] = tdist.is_initialized()
    dist.shutdown()  # twice is fine
    print(json.dumps(result))
    """
)


def _run_child(env_extra: dict[str, str]) -> dict:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_"))}
    env = {**keep, **env_extra, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("launcher", ["single", "torchrun"])
def test_init_distributed_real_process_group(launcher: str) -> None:
    extra = {}
    if launcher == "torchrun":
        port = str(free_port())
        extra = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
    got = _run_child(extra)
    assert got["launcher"] == launcher
    assert (got["rank"], got["world"], got["group_size"]) == (0, 1, 1)
    assert (got["backend"], got["device"]) == ("gloo", "cpu")
    assert got["same"] and got["before"] and not got["after"]
    assert got["printed"] == "hello\n"
    assert "parallel.tp_size" in got["bad"]


def test_rank_from_env_before_init(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Before the process group exists, rank-0 checks read the launcher's variables."""
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    assert dist.rank() == 3 and not dist.is_rank0()
    dist.print0("not from rank 3")
    assert capsys.readouterr().out == ""
    dist.barrier()  # no process group: a no-op rather than an error
