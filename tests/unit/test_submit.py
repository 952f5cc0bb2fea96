"""``rlp submit`` / ``rlp status`` without a SLURM cluster: rendering, shape checks that fail before
anything is submitted, submission through a stub ``sbatch``, status of a synthetic run dir."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from rlp.config import load_config
from rlp.monitor import latest_checkpoint, status_main
from rlp.submit import (
    PARAMS_MARKER,
    SubmitError,
    parse_slurm_time,
    render_script,
    submit_main,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "rlp" / "configs" / "tiny_cpu.yaml"
GPU_4x8 = shlex.split(
    "--nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 --account proj run.device=auto "
    "parallel.tp_size=2"
)


@pytest.fixture
def config(tmp_path: Path) -> list[str]:
    """``--config`` of the tiny CPU config, or of the defaults (same model shape) without it."""
    if TINY.exists():
        return ["--config", str(TINY)]
    path = tmp_path / "defaults.yaml"
    path.write_text("run:\n  name: tiny\n")
    return ["--config", str(path)]


def _stub(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _sbatch_lines(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            out[key] = value
    return out


def _dry_run(capsys, config, tmp_path: Path, *args: str) -> str:
    rc = submit_main([*config, *args, f"run.output_dir={tmp_path / 'run'}", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_dry_run_renders_4_nodes_8_gpus_tp2(config, capsys, tmp_path: Path) -> None:
    script = _dry_run(capsys, config, tmp_path, *GPU_4x8)
    run_dir = tmp_path / "run"
    sb = _sbatch_lines(script)
    assert sb["--nodes"] == "4" and sb["--ntasks-per-node"] == "8"  # one srun task per GPU
    assert sb["--gres"] == "gpu:8"
    assert sb["--partition"] == "gpu" and sb["--account"] == "proj"
    assert sb["--time"] == "24:00:00"
    assert sb["--signal"] == "B:USR1@300" and "--requeue" in sb
    assert sb["--open-mode"] == "append"
    assert sb["--output"] == f"{run_dir}/logs/slurm-%j.out"
    assert sb["--chdir"] == str(Path.cwd())
    # The template's own #SBATCH defaults are replaced, not kept alongside.
    assert sum(line.startswith("#SBATCH --nodes") for line in script.splitlines()) == 1
    assert "export RLP_NPROC_PER_NODE=8" in script
    assert f"export RLP_RUN_DIR={run_dir}" in script
    assert f"export RLP_CONFIG={run_dir}/slurm/config.yaml" in script
    assert "export RLP_OVERRIDES=''" in script
    assert "world 32 = TP 2 x PP 1 x DP 16" in script
    assert PARAMS_MARKER not in script
    assert "\nRLP_LAUNCH=gpu\n" in script and "torch.distributed.run" not in script
    assert f"export RLP_JOB_LIB={REPO / 'rlp' / 'slurm' / 'rlp_job.sh'}" in script
    # sbatch stops reading #SBATCH at the first command: everything before must be comments.
    first = script.splitlines().index(next(x for x in script.splitlines() if x.startswith("#SB")))
    last = max(i for i, x in enumerate(script.splitlines()) if x.startswith("#SBATCH"))
    assert all(x.startswith("#") for x in script.splitlines()[first : last + 1])
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not run_dir.exists(), "--dry-run must not write anything"


def test_dry_run_cpu_variant(config, capsys, tmp_path: Path) -> None:
    script = _dry_run(
        capsys,
        config,
        tmp_path,
        "--cpu",
        "--ntasks",
        "2",
        "--cpus-per-task",
        "1",
        "parallel.tp_size=2",
    )
    sb = _sbatch_lines(script)
    assert sb["--nodes"] == "1" and sb["--ntasks-per-node"] == "2"
    assert "--gres" not in sb and sb["--cpus-per-task"] == "1"
    assert "RLP_NPROC_PER_NODE" not in script and "\nRLP_LAUNCH=cpu\n" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_no_requeue_drops_signal_and_requeue(config, capsys, tmp_path: Path) -> None:
    sb = _sbatch_lines(_dry_run(capsys, config, tmp_path, "--cpu", "--no-requeue"))
    assert "--signal" not in sb and "--requeue" not in sb and "--no-requeue" in sb


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shell_scripts_are_shellcheck_clean(config, capsys, tmp_path: Path) -> None:
    rendered = tmp_path / "job.sbatch"
    rendered.write_text(_dry_run(capsys, config, tmp_path, *GPU_4x8))
    files = [
        REPO / "rlp" / "slurm" / "rlp.sbatch",
        REPO / "rlp" / "slurm" / "rlp_cpu.sbatch",
        REPO / "rlp" / "slurm" / "rlp_job.sh",
        REPO / "scripts" / "ci" / "local_slurm.sh",
        REPO / "benchmarks" / "gpu_suite.sh",
        rendered,
    ]
    proc = subprocess.run(["shellcheck", *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


GPU1x8 = "--nodes 1 --gpus-per-node 8 run.device=auto"
BAD_SHAPES = [
    (f"{GPU1x8} parallel.tp_size=3", ["parallel.tp_size", "num_attention_heads"]),
    (f"{GPU1x8} parallel.tp_size=4 model.num_query_groups=2", ["parallel.tp_size", "query_groups"]),
    (
        "--nodes 1 --gpus-per-node 3 run.device=auto parallel.tp_size=2",
        ["not divisible", "parallel.tp_size", "--gpus-per-node"],
    ),
    (
        "--nodes 2 --gpus-per-node 1 run.device=auto parallel.tp_size=2",
        ["parallel.tp_size", "one node"],
    ),
    ("--cpu --ntasks 3 parallel.tp_size=2", ["not divisible", "--ntasks"]),
    ("--cpu --ntasks 1 parallel.tp_size=2", ["smaller than", "parallel.tp_size"]),
    ("--nodes 1 --gpus-per-node 8 run.device=cpu", ["run.device", "--cpu"]),
    ("--cpu --nodes 2", ["--cpu", "one node"]),
    ("--cpu run.device=cuda", ["run.device"]),
    ("--nodes 2 run.device=auto", ["--gpus-per-node"]),
    ("--cpu checkpoint.resume=never", ["checkpoint.resume", "--no-requeue"]),
    ("--cpu --time 5 --signal-lead 300", ["--signal-lead", "--time"]),
    ("--cpu --time 1:2:3:4", ["--time"]),
    ("--nodes 0 --gpus-per-node 8", ["--nodes"]),
]


@pytest.mark.parametrize(("args", "names"), BAD_SHAPES)
def test_bad_shapes_fail_before_submitting(
    config, capsys, tmp_path, monkeypatch, args, names
) -> None:
    calls = tmp_path / "sbatch_calls"
    _stub(tmp_path / "bin", "sbatch", f'echo "$@" >> {calls}; echo 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    rc = submit_main([*config, *args.split(), f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    for name in names:
        assert name in err, f"{name!r} not named in: {err}"
    assert not calls.exists(), "sbatch must not be called"
    assert not (tmp_path / "run").exists()


def test_missing_sbatch_says_so_and_suggests_dry_run(capsys, config, tmp_path, monkeypatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rc = submit_main([*config, "--cpu", f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    assert not (tmp_path / "run").exists()


def test_submit_with_stub_sbatch(config, capsys, tmp_path, monkeypatch) -> None:
    calls = tmp_path / "sbatch_calls"
    _stub(tmp_path / "bin", "sbatch", f'echo "$@" >> {calls}; echo "4242;cluster"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    argv = [*config, *GPU_4x8, f"run.output_dir={run_dir}", "rollout.num_thoughts=8"]
    assert submit_main(argv) == 0
    out = capsys.readouterr().out
    assert "Submitted job 4242" in out
    assert f"rlp status {run_dir}" in out and f"{run_dir}/metrics.jsonl" in out
    assert f"{run_dir}/logs/slurm-4242.out" in out
    job_file = run_dir / "slurm" / "job.sbatch"
    assert calls.read_text().split() == ["--parsable", str(job_file)]
    assert (run_dir / "slurm" / "job_id").read_text().strip() == "4242"
    assert (run_dir / "logs").is_dir(), "sbatch --output needs its directory"
    frozen = load_config(run_dir / "slurm" / "config.yaml")
    assert frozen.rollout.num_thoughts == 8 and frozen.parallel.tp_size == 2
    assert frozen.run.output_dir == str(run_dir)
    assert frozen.checkpoint.dir == f"{run_dir}/checkpoints"
    assert _sbatch_lines(job_file.read_text())["--nodes"] == "4"


def test_relative_run_dir_is_made_absolute(config, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = submit_main([*config, "--cpu", "run.output_dir=runs/x", "--dry-run"])
    assert script == 0
    assert f"export RLP_RUN_DIR={tmp_path}/runs/x" in capsys.readouterr().out


def test_refuses_run_dir_with_active_job(config, capsys, tmp_path, monkeypatch) -> None:
    _stub(tmp_path / "bin", "sbatch", "echo 99")
    _stub(tmp_path / "bin", "squeue", "echo RUNNING")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "slurm" / "job_id").write_text("77\n")
    assert submit_main([*config, "--cpu", f"run.output_dir={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert "job 77 (RUNNING)" in err and "scancel 77" in err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("5:30", 330),
        ("2:00:00", 7200),
        ("24:00:00", 86400),
        ("1-0", 86400),
        ("1-2:30", 95400),
        ("2-00:00:10", 172810),
    ],
)
def test_parse_slurm_time(text: str, seconds: int) -> None:
    assert parse_slurm_time(text) == seconds


def test_render_requires_marker(
    config,
) -> None:
    with pytest.raises(SubmitError, match="RLP_PARAMETERS"):
        render_script("#!/bin/bash\n#SBATCH --nodes=1\necho hi\n", [], {}, [])


def _synthetic_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    for name in ("step_0000002", "step_0000010", ".tmp_step_0000012"):
        (ckpt / name).mkdir(parents=True)
    (ckpt / "latest").write_text("step_0000010\n")
    rows = [
        {"step": s, "loss/total": 1.0 / s, "time/step": 0.5, "reward/mean": 0.1}
        for s in range(1, 12)
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "loss/to'
    (run / "metrics.jsonl").write_text(text)
    (run / "config.yaml").write_text(f"run:\n  max_steps: 30\ncheckpoint:\n  dir: {ckpt}\n")
    (run / "slurm").mkdir()
    (run / "slurm" / "job_id").write_text("7\n")
    (run / "slurm" / "events.log").write_text(
        "t job=7 attempt=0 start\nt job=7 attempt=0 signal USR1\n"
    )
    return run


def test_status_of_a_run(capsys, tmp_path, monkeypatch) -> None:
    run = _synthetic_run(tmp_path)
    _stub(
        tmp_path / "bin",
        "scontrol",
        'echo "JobId=$3 JobName=x"; echo "   JobState=PENDING Reason=BeginTime Dependency=(null)";'
        ' echo "   Requeue=1 Restarts=1 BatchFlag=1 ExitCode=0:0"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert status_main([str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["step"] == 11 and report["metrics"]["records"] == 12
    assert report["max_steps"] == 30
    assert report["checkpoint"]["step"] == 10 and report["checkpoint"]["count"] == 2
    assert report["checkpoint"]["latest_file"] == "step_0000010"
    assert report["job"] == {
        "id": "7",
        "job_state": "PENDING",
        "reason": "BeginTime",
        "restarts": "1",
        "exit_code": "0:0",
    }
    assert report["finished"] is False and len(report["events"]) == 2
    assert status_main([str(run)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"step\s+11/30", text) and "loss/total=0.09091" in text
    assert "slurm job    7: PENDING" in text and "checkpoint   step 10" in text


def test_status_without_slurm_or_metrics(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "run").mkdir()
    assert status_main([str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "none yet" in text and "none recorded" in text
    assert status_main([str(tmp_path / "missing")]) == 2


def test_latest_checkpoint_ignores_partial_dirs(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "nothing") is None
    (tmp_path / ".tmp_step_0000009").mkdir()
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "step_0000003").mkdir()
    assert latest_checkpoint(tmp_path)["step"] == 3


def test_requeue_exit_code_agrees_with_trainer_and_templates() -> None:
    from rlp.submit import REQUEUE_EXIT_CODE

    text = (REPO / "rlp" / "slurm" / "rlp_job.sh").read_text()
    assert f"\nREQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in text
    trainer = REPO / "rlp" / "trainer.py"
    if trainer.exists():  # read, not imported: importing the trainer pulls in torch and megatron
        match = re.search(r"^REQUEUE_EXIT_CODE = (\d+)", trainer.read_text(), re.MULTILINE)
        assert match and int(match.group(1)) == REQUEUE_EXIT_CODE


# ------------------------------------------------------------------------------------------------
# Injection: nothing a user passes may become a live line of the job script (issue 15, item 2)

NEWLINE_PAYLOADS = [
    ["--job-name", "x\ntouch PWNED"],
    ["--job-name=x\n#SBATCH --uid=0"],
    ["--sbatch-arg=--constraint=h100\ntouch PWNED"],
    ["--partition", "gpu\rtouch PWNED"],
    ["--account", "a\x00b"],
    ["--qos", "q\x1b[2J"],
    ["--mem", "1G\u2028touch PWNED"],
    ["--venv", "/opt/venv\x85x"],
    ["run.name=x\ntouch PWNED"],
    ["data.shards=a.tar\n#SBATCH --wrap=id"],
]


@pytest.mark.parametrize("payload", NEWLINE_PAYLOADS, ids=lambda p: repr(p[-1])[:24])
def test_control_characters_are_refused_in_one_line(
    config, capsys, tmp_path, monkeypatch, payload
) -> None:
    calls = tmp_path / "sbatch_calls"
    _stub(tmp_path / "bin", "sbatch", f'echo "$@" >> {calls}; echo 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for dry in ([], ["--dry-run"]):
        rc = submit_main([*config, "--cpu", *payload, f"run.output_dir={tmp_path / 'run'}", *dry])
        out, err = capsys.readouterr()
        assert rc == 2, err
        assert out == "", "no script may be printed"
        assert len(err.strip().splitlines()) == 1 and "control character" in err, err
    assert not calls.exists() and not (tmp_path / "run").exists()


def test_control_characters_from_the_config_file_are_refused(capsys, tmp_path) -> None:
    cfg = tmp_path / "evil.yaml"
    cfg.write_text('run:\n  name: "x\\n#SBATCH --uid=0\\ntouch PWNED"\n  device: cpu\n')
    rc = submit_main(
        ["--config", str(cfg), "--cpu", f"run.output_dir={tmp_path / 'r'}", "--dry-run"]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "control character" in err, err


def test_render_script_refuses_control_characters() -> None:
    template = f"#!/bin/bash\n#SBATCH --nodes=1\n{PARAMS_MARKER}\necho hi\n"
    from rlp.config import ConfigError

    for header, params, comment in (
        (["#SBATCH --job-name=a\nb"], {}, []),
        ([], {"RLP_VENV": "a\nb"}, []),
        ([], {}, ["Command: rlp submit 'a\nb'"]),
    ):
        with pytest.raises(ConfigError, match="control character"):
            render_script(template, header, params, comment)


SHELL_PAYLOAD = "$(touch PWNED1)`touch PWNED2`';touch PWNED3;'\"$(touch PWNED4)\""


@pytest.mark.parametrize("template", ["cpu", "gpu"])
def test_shell_metacharacters_stay_inert_when_the_script_runs(
    config, capsys, tmp_path, monkeypatch, template
) -> None:
    """Printable payloads are allowed but inert: the rendered script passes ``bash -n`` and, run
    in a sandbox with stub ``srun``/``scontrol``, executes none of them."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    monkeypatch.chdir(sandbox)
    shape = ["--cpu", "--ntasks", "2"] if template == "cpu" else ["--gpus-per-node", "2"]
    run_dir = sandbox / f"run{SHELL_PAYLOAD.replace('/', '_')}"
    bin_dir = sandbox / "bin"
    _stub(bin_dir, "sbatch", "echo 4242")
    _stub(bin_dir, "scontrol", "echo localhost")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = [
        *config,
        *shape,
        "--job-name",
        SHELL_PAYLOAD,
        "--partition",
        SHELL_PAYLOAD,
        "--account",
        SHELL_PAYLOAD,
        f"--sbatch-arg=--comment={SHELL_PAYLOAD}",
        "--venv",
        str(sandbox / "venv"),
        f"run.output_dir={run_dir}",
        f"run.name={SHELL_PAYLOAD}",
        "parallel.tp_size=2",
        "run.device=" + ("cpu" if template == "cpu" else "auto"),
    ]
    assert submit_main(argv) == 0, capsys.readouterr().err
    job = run_dir / "slurm" / "job.sbatch"
    proc = subprocess.run(["bash", "-n", str(job)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # Execute it: stub srun/scontrol record their arguments; the venv is an empty activate.
    (sandbox / "venv" / "bin").mkdir(parents=True)
    (sandbox / "venv" / "bin" / "activate").write_text("")
    srun_args = sandbox / "srun_args"
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {shlex.quote(str(srun_args))}; exit 0')
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(sandbox),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_ON_NODE": "2",
    }
    proc = subprocess.run(
        ["bash", str(job)], cwd=sandbox, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert srun_args.is_file(), "the script did not reach srun"
    pwned = [p for p in tmp_path.rglob("PWNED*")]
    assert not pwned, f"payload executed: {pwned}"
    assert f"run.output_dir={run_dir}" in srun_args.read_text().splitlines()
