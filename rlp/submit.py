"""``rlp submit``: render, check and submit a SLURM job (``rlp status`` is in :mod:`rlp.monitor`).

    rlp submit --config qwen3_1p7b_32xh100 --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 --account proj [key=value ...]
    rlp submit --cpu --ntasks 2 --config tiny_cpu parallel.tp_size=2 --dry-run

``submit`` loads the config with the overrides, checks it against the requested job shape before
anything reaches SLURM (world size vs ``parallel.tp_size``, TP inside a node, resume settings,
time limit vs pre-emption signal), then renders ``rlp/slurm/rlp.sbatch`` (GPU nodes, one srun task
per GPU) or ``rlp/slurm/rlp_cpu.sbatch`` (``--cpu``: one node, one srun task per rank) with its
``#SBATCH`` header and parameter block (both source ``rlp/slurm/rlp_job.sh``), freezes the
resolved config into ``RUN_DIR/slurm/config.yaml`` (a requeued job runs exactly what was
checked), writes ``RUN_DIR/slurm/job.sbatch`` and calls ``sbatch --parsable``. ``--dry-run``
prints the script and writes nothing.

This module imports no torch: it runs on login nodes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlp.config import Config, ConfigError, load_config, to_yaml
from rlp.options import add_fields, build, config_parser, parse

TEMPLATE_DIR = Path(__file__).resolve().parent / "slurm"
GPU_TEMPLATE = "rlp.sbatch"
CPU_TEMPLATE = "rlp_cpu.sbatch"
JOB_LIBRARY = TEMPLATE_DIR / "rlp_job.sh"
"""The job body both templates source (package data, like the templates)."""
PARAMS_MARKER = "# @RLP_PARAMETERS@"
REQUEUE_EXIT_CODE = 75
"""Mirrors ``rlp.trainer.REQUEUE_EXIT_CODE`` (not imported: the trainer pulls in torch)."""
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}


class SubmitError(RuntimeError):
    """The job cannot be submitted from here (no sbatch, sbatch failed, run dir busy)."""


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 control characters (newline, CR, NUL, ESC, ...), DEL and the Unicode line
separators: none of them may reach a rendered job script, where a newline would end a
``#SBATCH`` or comment line and start a live one."""


def check_printable(what: str, value: str) -> None:
    """Raise :class:`ConfigError` when ``value`` (described by ``what``) holds a control
    character; everything rendered into a job script passes through here."""
    found = _CONTROL_CHARS.search(value)
    if found:
        shown = repr(value if len(value) <= 60 else value[:57] + "...")
        raise ConfigError(
            f"{what} {shown} contains the control character {found.group()!r} at position "
            f"{found.start()}; job scripts take printable text only, remove it"
        )


# ------------------------------------------------------------------------------------------------
# Job shape and checks


@dataclass
class JobShape:
    """What the job asks SLURM for."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpu: bool

    @property
    def world_size(self) -> int:
        """Trainer processes (srun tasks): nodes x GPUs, or --ntasks on one CPU node."""
        per_node = self.tasks_per_node if self.cpu else self.gpus_per_node
        return self.nodes * per_node

    def describe(self) -> str:
        if self.cpu:
            return f"--ntasks {self.tasks_per_node} (CPU, one node)"
        return f"--nodes {self.nodes} x --gpus-per-node {self.gpus_per_node}"


def parse_slurm_time(text: str) -> int:
    """Seconds in a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(
            f"--time {text!r} is not a SLURM time (use minutes, H:M:S, or D-H:M:S, e.g. 24:00:00)"
        )
    days, a, b, c = match.groups()
    if days is not None:  # D-H[:M[:S]]
        parts = [int(a), int(b or 0), int(c or 0)]
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def check_shape(
    cfg: Config,
    shape: JobShape,
    *,
    requeue: bool = True,
    time_limit_s: int | None = None,
    signal_lead_s: int = 300,
) -> list[str]:
    """Raise :class:`ConfigError` (naming what to change) when the config cannot run on ``shape``;
    return warnings for settings that run but are probably unintended."""
    p, m, r = cfg.parallel, cfg.model, cfg.rollout
    world, mp = shape.world_size, p.tp_size * p.pp_size
    where = shape.describe()
    if world < mp:
        raise ConfigError(
            f"world size {world} ({where}) is smaller than parallel.tp_size x parallel.pp_size = "
            f"{mp}; request more processes or lower parallel.tp_size"
        )
    if world % mp:
        raise ConfigError(
            f"world size {world} ({where}) is not divisible by parallel.tp_size x "
            f"parallel.pp_size = {mp}, so the data-parallel size is not whole; change "
            f"{'--ntasks' if shape.cpu else '--nodes/--gpus-per-node'} or parallel.tp_size"
        )
    # Heads / query groups divisible by tp_size: already enforced by rlp.config.validate.
    if shape.cpu:
        if shape.nodes != 1:
            raise ConfigError("--cpu runs on one node (rlp/slurm/rlp_cpu.sbatch); drop --nodes")
        bad = {
            "run.device": cfg.run.device == "cuda",
            "parallel.backend": p.backend == "nccl",
            "parallel.sequence_parallel": p.sequence_parallel,
            "model.transformer_impl": m.transformer_impl == "transformer_engine",
        }
        for key, is_bad in bad.items():
            if is_bad:
                raise ConfigError(
                    f"{key} needs GPUs but --cpu was given; change {key} or drop --cpu"
                )
    else:
        if cfg.run.device == "cpu":
            raise ConfigError(
                "run.device=cpu on a GPU job; set run.device=auto (or cuda), or submit with --cpu"
            )
        if p.tp_size > shape.gpus_per_node or shape.gpus_per_node % p.tp_size:
            raise ConfigError(
                f"parallel.tp_size={p.tp_size} does not fit inside one node of "
                f"--gpus-per-node {shape.gpus_per_node}: a TP group must stay on one node (its "
                f"all-reduces run every layer); use a tp_size dividing {shape.gpus_per_node}"
            )
    if requeue and cfg.checkpoint.resume != "auto":
        raise ConfigError(
            f"checkpoint.resume={cfg.checkpoint.resume} with a requeueing job: a requeued attempt "
            "would start again from step 0; set checkpoint.resume=auto or pass --no-requeue"
        )
    if time_limit_s is not None and requeue and signal_lead_s >= time_limit_s:
        raise ConfigError(
            f"--signal-lead {signal_lead_s}s is not shorter than the --time limit "
            f"({time_limit_s}s): the checkpoint signal would arrive at once; lower --signal-lead "
            "or raise --time"
        )
    warnings = []
    if requeue and not cfg.checkpoint.save_on_signal:
        warnings.append(
            "checkpoint.save_on_signal=false: no checkpoint is written on the pre-timeout signal; "
            "a requeued job resumes from the last periodic checkpoint (checkpoint.save_every)"
        )
    if r.sample_batch_size % r.num_thoughts:
        warnings.append(
            f"rollout.sample_batch_size={r.sample_batch_size} is not a multiple of "
            f"rollout.num_thoughts={r.num_thoughts}: groups are split across decode batches"
        )
    if cfg.log.wandb == "online" and not os.environ.get("WANDB_API_KEY"):
        warnings.append(
            "log.wandb=online but WANDB_API_KEY is not set here (sbatch passes this shell's "
            "environment to the job); set it, or use ~/.netrc, or log.wandb=offline"
        )
    return warnings


# ------------------------------------------------------------------------------------------------
# Rendering


def _sbatch_header(args: SubmitOptions, cfg: Config, shape: JobShape, run_dir: Path) -> list:
    lines = [f"--job-name={args.job_name or cfg.run.name}", f"--nodes={shape.nodes}"]
    if shape.cpu:
        lines.append(f"--ntasks-per-node={shape.tasks_per_node}")
    else:
        lines += [f"--ntasks-per-node={shape.gpus_per_node}", f"--gres=gpu:{shape.gpus_per_node}"]
    optional = {
        "--cpus-per-task": args.cpus_per_task,
        "--mem": args.mem,
        "--time": args.time,
        "--partition": args.partition,
        "--account": args.account,
        "--qos": args.qos,
    }
    lines += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    if args.exclusive:
        lines.append("--exclusive")
    if args.requeue:
        lines += [f"--signal=B:USR1@{args.signal_lead}", "--requeue"]
    else:
        lines.append("--no-requeue")
    lines += [
        "--open-mode=append",
        f"--output={run_dir}/logs/slurm-%j.out",
        f"--chdir={Path.cwd()}",
    ]
    lines += list(args.sbatch_arg)
    return [f"#SBATCH {line}" for line in lines]


def _parameters(args: SubmitOptions, shape: JobShape, run_dir: Path) -> dict[str, str]:
    python = args.python or ("python3" if args.container_image else sys.executable)
    params = {
        "RLP_CONFIG": str(run_dir / "slurm" / "config.yaml"),
        "RLP_RUN_DIR": str(run_dir),
        "RLP_OVERRIDES": "",  # applied already: the frozen config is the resolved one
        "RLP_PYTHON": python,
        "RLP_ENTRY": args.entry,
        "RLP_VENV": args.venv or "",
        "RLP_SETUP_SCRIPT": args.setup_script or "",
        "RLP_MAX_REQUEUES": str(args.max_requeues),
        "RLP_JOB_LIB": str(JOB_LIBRARY),
    }
    if not shape.cpu:
        params["RLP_NPROC_PER_NODE"] = str(shape.gpus_per_node)
        params["RLP_CONTAINER_IMAGE"] = args.container_image or ""
        params["RLP_CONTAINER_MOUNTS"] = args.container_mounts or ""
    return params


def render_script(
    template: str, header: list[str], params: dict[str, str], comment: list[str]
) -> str:
    """Replace the template's ``#SBATCH`` lines by ``header`` and its parameter marker by
    ``export`` lines (every parameter is written, so stale values in the submitting shell, which
    sbatch would export, cannot leak in)."""
    lines = template.splitlines()
    sbatch_at = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    marker_at = [i for i, line in enumerate(lines) if line.strip() == PARAMS_MARKER]
    if not sbatch_at or len(marker_at) != 1:
        raise SubmitError(f"template lacks #SBATCH lines or exactly one '{PARAMS_MARKER}' line")
    # Last line of defence: no rendered value may start a line of its own.
    for line in header:
        check_printable("#SBATCH line", line)
    for line in comment:
        check_printable("comment", line)
    for key, value in params.items():
        check_printable(f"parameter {key}", value)
    exports = [f"export {key}={shlex.quote(value)}" for key, value in params.items()]
    out = []
    for i, line in enumerate(lines):
        if i == sbatch_at[0]:
            out += [f"# {c}" if c else "#" for c in comment] + header
        if i in sbatch_at:
            continue
        out += exports if i == marker_at[0] else [line]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# rlp submit


@dataclass
class SubmitOptions:
    """What ``rlp submit`` asks SLURM for and how the job starts: the command's options (its flags
    are generated from these fields; ``key=value`` words set them too)."""

    nodes: int | None = None
    """GPU nodes (default 1)."""
    gpus_per_node: int | None = None
    """GPUs per node = trainer ranks per node (one srun task each)."""
    cpu: bool = False
    """One CPU node, one srun task per rank, gloo (rlp/slurm/rlp_cpu.sbatch)."""
    ntasks: int | None = None
    """Ranks of a --cpu job (default parallel.tp_size x parallel.pp_size)."""
    cpus_per_task: int | None = None
    """CPUs per rank."""
    mem: str | None = None
    """Memory per node, e.g. 200G."""
    exclusive: bool = False
    """Whole nodes."""
    partition: str | None = None
    """SLURM partition."""
    time: str | None = None
    """Time limit, e.g. 24:00:00 (minutes, H:M:S or D-H:M:S)."""
    account: str | None = None
    """SLURM account."""
    qos: str | None = None
    """SLURM quality of service."""
    job_name: str | None = None
    """Job name (default: run.name)."""
    sbatch_arg: list[str] = field(default_factory=list)
    """Extra sbatch option, e.g. --sbatch-arg=--constraint=h100."""
    signal_lead: int = 300
    """Seconds before the time limit at which USR1 asks for a checkpoint and a requeue."""
    requeue: bool = True
    """Pre-timeout signal and requeue (--no-requeue: neither)."""
    max_requeues: int = 20
    """Stop requeueing after this many restarts."""
    python: str | None = None
    """Interpreter on the nodes (default: this one; python3 in a container)."""
    venv: str | None = None
    """Virtualenv to activate on the nodes."""
    setup_script: str | None = None
    """File sourced first on the nodes (module loads, site environment)."""
    container_image: str | None = None
    """Pyxis container image for the job step (GPU template)."""
    container_mounts: str | None = None
    """Pyxis container mounts: RUN_DIR and the data."""
    entry: str = "rlp.cli"
    """Module run as ``python -m ENTRY train ...``."""
    template: str | None = None
    """Sbatch template to render instead of the bundled one."""
    dry_run: bool = False
    """Print the job script; write and submit nothing."""


def _submit_parser() -> argparse.ArgumentParser:
    ap = config_parser(
        "rlp submit",
        "Check a config against a SLURM job shape, render the sbatch script, submit.",
        required=True,
    )
    add_fields(
        ap,
        SubmitOptions,
        aliases={"partition": ["-p"], "time": ["-t"], "account": ["-A"], "job_name": ["-J"]},
        metavars={"sbatch_arg": "ARG", "signal_lead": "SECONDS", "template": "FILE"},
    )
    return ap


def _shape(args: SubmitOptions, cfg: Config) -> JobShape:
    if args.cpu:
        if args.gpus_per_node is not None or args.container_image:
            raise ConfigError("--cpu takes --ntasks, not --gpus-per-node/--container-image")
        ntasks = args.ntasks or cfg.parallel.tp_size * cfg.parallel.pp_size
        return JobShape(args.nodes or 1, ntasks, 0, True)
    if args.ntasks is not None:
        raise ConfigError("--ntasks is for --cpu jobs; GPU jobs take --nodes and --gpus-per-node")
    if args.gpus_per_node is None:
        raise ConfigError("pass --gpus-per-node G (GPUs per node), or --cpu for a CPU job")
    return JobShape(args.nodes or 1, 1, args.gpus_per_node, False)


def _positive(args: SubmitOptions) -> None:
    for flag in ("nodes", "gpus_per_node", "ntasks", "cpus_per_task", "signal_lead"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.max_requeues < 0:
        raise ConfigError(f"--max-requeues must be >= 0, got {args.max_requeues}")
    for extra in args.sbatch_arg:
        if not extra.startswith("-"):
            raise ConfigError(
                f"--sbatch-arg {extra!r} is not an sbatch option; write it as "
                "--sbatch-arg=--constraint=h100"
            )


def _absolute_config(path: str, overrides: list[str]) -> tuple[Config, Path]:
    """Load the config; pin run.output_dir (and a relative checkpoint.dir) to absolute paths so
    the job, whatever its working directory, writes where the submitter expects."""
    cfg = load_config(path, overrides)
    run_dir = Path(os.path.abspath(cfg.run.output_dir))
    pinned = [*overrides, f"run.output_dir={run_dir}"]
    cfg = load_config(path, pinned)
    if not os.path.isabs(cfg.checkpoint.dir):
        pinned.append(f"checkpoint.dir={os.path.abspath(cfg.checkpoint.dir)}")
        cfg = load_config(path, pinned)
    return cfg, run_dir


def _active_job(run_dir: Path) -> tuple[str, str] | None:
    """(job id, state) of a queued or running job that already writes into ``run_dir``."""
    id_file = run_dir / "slurm" / "job_id"
    if not id_file.is_file() or shutil.which("squeue") is None:
        return None
    job_id = id_file.read_text().strip()
    proc = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    )
    state = proc.stdout.strip()
    return (job_id, state) if proc.returncode == 0 and state in ACTIVE_STATES else None


def submit_main(argv: list[str]) -> int:
    """``rlp submit``; returns 0 on success, 2 for a request that cannot work, 1 when SLURM
    (or its absence) stops the submission."""
    try:
        for arg in argv:  # before argparse: its messages would echo the raw value
            check_printable("argument", arg)
    except ConfigError as err:
        print(f"rlp submit: error: {err}", file=sys.stderr)
        return 2
    try:
        parsed = parse(_submit_parser(), argv, run_config=True)
        args = build(SubmitOptions, parsed)
        _positive(args)
        cfg, run_dir = _absolute_config(parsed.config, parsed.overrides)
        shape = _shape(args, cfg)
        time_limit = parse_slurm_time(args.time) if args.time else None
        warnings = check_shape(
            cfg,
            shape,
            requeue=args.requeue,
            time_limit_s=time_limit,
            signal_lead_s=args.signal_lead,
        )
    except ConfigError as err:
        print(f"rlp submit: error: {err}", file=sys.stderr)
        return 2
    for text in warnings:
        print(f"rlp submit: warning: {text}", file=sys.stderr)

    template = Path(args.template or TEMPLATE_DIR / (CPU_TEMPLATE if shape.cpu else GPU_TEMPLATE))
    if not template.is_file():
        print(
            f"rlp submit: error: sbatch template {template} not found; run from a source "
            "checkout of rlp or pass --template",
            file=sys.stderr,
        )
        return 2
    p = cfg.parallel
    dp = shape.world_size // (p.tp_size * p.pp_size)
    summary = (
        f"{shape.describe()}: world {shape.world_size} = TP {p.tp_size} x PP {p.pp_size} x "
        f"DP {dp}; {cfg.rollout.contexts_per_step * dp} contexts x {cfg.rollout.num_thoughts} "
        f"thoughts per step; {cfg.run.max_steps} steps"
    )
    comment = [
        f"Rendered by `rlp submit` from {template.name} on {_dt.datetime.now():%Y-%m-%d %H:%M}.",
        summary,
        "Command: rlp submit " + shlex.join(argv),
    ]
    try:
        script = render_script(
            template.read_text(),
            _sbatch_header(args, cfg, shape, run_dir),
            _parameters(args, shape, run_dir),
            comment,
        )
    except ConfigError as err:
        print(f"rlp submit: error: {err}", file=sys.stderr)
        return 2
    except SubmitError as err:
        print(f"rlp submit: error: {template}: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(script, end="")
        print(f"rlp submit: dry run ({summary}); nothing written or submitted", file=sys.stderr)
        return 0
    try:
        job_id = _submit(script, cfg, run_dir)
    except SubmitError as err:
        print(f"rlp submit: error: {err}", file=sys.stderr)
        return 1
    _print_submitted(job_id, summary, cfg, run_dir)
    return 0


def _submit(script: str, cfg: Config, run_dir: Path) -> str:
    if shutil.which("sbatch") is None:
        raise SubmitError(
            "sbatch not found on PATH: submit from a SLURM login node, or pass --dry-run to "
            "print the job script"
        )
    active = _active_job(run_dir)
    if active:
        raise SubmitError(
            f"job {active[0]} ({active[1]}) already writes into {run_dir}; wait for it, "
            f"`scancel {active[0]}`, or choose another run.name / run.output_dir"
        )
    slurm_dir = run_dir / "slurm"
    for d in (slurm_dir, run_dir / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    frozen = slurm_dir / "config.yaml"
    frozen.write_text(to_yaml(cfg))
    if load_config(frozen).to_dict() != cfg.to_dict():
        raise SubmitError(f"{frozen} does not load back to the checked config (please report)")
    job_file = slurm_dir / "job.sbatch"
    job_file.write_text(script)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(job_file)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise SubmitError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"could not read a job id from sbatch output {proc.stdout!r}")
    (slurm_dir / "job_id").write_text(job_id + "\n")
    with open(slurm_dir / "submissions.log", "a") as f:
        f.write(f"{_dt.datetime.now().isoformat(timespec='seconds')} job={job_id}\n")
    return job_id


def _print_submitted(job_id: str, summary: str, cfg: Config, run_dir: Path) -> None:
    print(f"Submitted job {job_id}: {summary}")
    print(f"  script       {run_dir}/slurm/job.sbatch (config frozen in slurm/config.yaml)")
    print(f"  job log      {run_dir}/logs/slurm-{job_id}.out")
    print(f"  rank logs    {run_dir}/logs/{job_id}/attempt<K>/rank<N>.log")
    print(f"  metrics      {run_dir}/metrics.jsonl")
    print(f"  checkpoints  {cfg.checkpoint.dir}")
    print(f"  status       rlp status {run_dir}")
    print(f"  cancel       scancel {job_id}")


# ------------------------------------------------------------------------------------------------
# rlp status
