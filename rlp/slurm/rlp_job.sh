# shellcheck shell=bash
# The body of an rlp SLURM job, sourced by rlp/slurm/rlp.sbatch (GPU nodes) and
# rlp/slurm/rlp_cpu.sbatch (one CPU node) after their #SBATCH header and parameter block; they
# set RLP_LAUNCH=gpu|cpu first. Both launch ONE srun task per rank (no torchrun): every task's
# wrapper runs `python -m ENTRY train`, the trainer finds its rank from srun's variables
# (rlp.dist), and srun's exit code (the highest of its tasks') reaches this shell directly.
#
# Parameters (environment; `rlp submit` writes them into RUN_DIR/slurm/job.sbatch):
#   RLP_CONFIG        run config YAML (required)
#   RLP_RUN_DIR       run directory (required): logs here, and passed on as run.output_dir
#   RLP_OVERRIDES     extra key=value overrides: one per line, or whitespace-separated on one line
#   RLP_NPROC_PER_NODE  ranks per GPU node (gpu; default: GPUs SLURM gave the node)
#   RLP_PYTHON        interpreter (default python3)         RLP_VENV       virtualenv to activate
#   RLP_SETUP_SCRIPT  file sourced before launch (module loads, site env)
#   RLP_CONTAINER_IMAGE / RLP_CONTAINER_MOUNTS  run the step in a pyxis/enroot container
#                     (srun --container-image / --container-mounts; mount RUN_DIR and the data)
#   RLP_ENTRY         Python module run as `-m ENTRY train ...` (default rlp.cli)
#   RLP_MAX_REQUEUES  stop requeueing after this many restarts (default 20)
#   RLP_EXIT_WAIT     seconds the other ranks get after the first one exits (default 120)
#   RLP_STOP_POLL     seconds between checks for the stop file (default 2)
#   RLP_MASTER_PORT   rendezvous port (default derived from the job id)
# Environment reaches the job as sbatch exports it (default --export=ALL): WANDB_API_KEY,
# WANDB_MODE, HF_HOME, NCCL_* ... pass through unchanged.
#
# Pre-emption (see docs/slurm.md): `--signal=B:USR1@SECONDS` signals only this batch shell
# SECONDS before the time limit (`scancel --signal=USR1 --batch JOBID` does the same by hand). The
# trap creates the attempt's stop file on RUN_DIR; each task's wrapper sees it and sends USR1 to
# its trainer process only (a SLURM step signal would also hit the trainer's helper processes,
# e.g. the checkpoint writer's manager). The trainer checkpoints and exits 75
# (rlp.trainer.REQUEUE_EXIT_CODE); this script runs `scontrol requeue` and the requeued job
# resumes from that checkpoint (checkpoint.resume=auto). Exit 75 without a signal also requeues;
# a TERM at the time limit requeues; scancel and other failures do not.
set -euo pipefail

REQUEUE_EXIT_CODE=75

log() { printf '[rlp %s] %s\n' "$(date +%Y-%m-%dT%H:%M:%S)" "$*"; }
die() {
    log "ERROR: $*" >&2
    exit 1
}
event() { printf '%s job=%s attempt=%s %s\n' "$(date +%Y-%m-%dT%H:%M:%S)" "$JOB_ID" "$ATTEMPT" \
    "$*" >>"$RLP_RUN_DIR/slurm/events.log"; }

JOB_ID=${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch or rlp submit}
ATTEMPT=${SLURM_RESTART_COUNT:-0}
: "${RLP_CONFIG:?set RLP_CONFIG to the run config YAML (rlp submit sets it)}"
: "${RLP_RUN_DIR:?set RLP_RUN_DIR to the run directory (rlp submit sets it)}"
PYTHON=${RLP_PYTHON:-python3}
ENTRY=${RLP_ENTRY:-rlp.cli}
MAX_REQUEUES=${RLP_MAX_REQUEUES:-20}
EXIT_WAIT=${RLP_EXIT_WAIT:-120}
STOP_POLL=${RLP_STOP_POLL:-2}
LOG_DIR=$RLP_RUN_DIR/logs/$JOB_ID/attempt$ATTEMPT
STOP_FILE=$LOG_DIR/STOP
mkdir -p "$LOG_DIR" "$RLP_RUN_DIR/slurm" || die "cannot create $LOG_DIR"
echo "$JOB_ID" >"$RLP_RUN_DIR/slurm/job_id"

overrides=()
if [[ -n ${RLP_OVERRIDES:-} ]]; then
    if [[ $RLP_OVERRIDES == *$'\n'* ]]; then
        while IFS= read -r line; do
            if [[ -n $line ]]; then overrides+=("$line"); fi
        done <<<"$RLP_OVERRIDES"
    else
        read -r -a overrides <<<"$RLP_OVERRIDES"
    fi
fi
# Logs and trainer outputs go to the same place, whatever the config says.
overrides+=("run.output_dir=$RLP_RUN_DIR")

if [[ -n ${RLP_SETUP_SCRIPT:-} ]]; then
    set +u # site scripts (module, conda) often read unset variables
    # shellcheck disable=SC1090
    source "$RLP_SETUP_SCRIPT"
    set -u
fi
if [[ -n ${RLP_VENV:-} ]]; then
    set +u
    # shellcheck disable=SC1091
    source "$RLP_VENV/bin/activate"
    set -u
fi
container=()
if [[ -n ${RLP_CONTAINER_IMAGE:-} ]]; then
    container=(--container-image="$RLP_CONTAINER_IMAGE" --container-workdir="$PWD")
    if [[ -n ${RLP_CONTAINER_MOUNTS:-} ]]; then
        container+=(--container-mounts="$RLP_CONTAINER_MOUNTS")
    fi
else
    # Inside a container the interpreter and config are checked by the step itself.
    command -v "$PYTHON" >/dev/null || die "RLP_PYTHON=$PYTHON not found on the batch node"
    [[ -r $RLP_CONFIG ]] || die "RLP_CONFIG=$RLP_CONFIG is not readable on the batch node"
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Port from the job id and attempt: concurrent jobs on one node differ, and a requeued attempt does
# not meet the previous attempt's socket in TIME_WAIT. Stays below the Linux ephemeral range.
MASTER_PORT=${RLP_MASTER_PORT:-$((15000 + (JOB_ID * 8 + ATTEMPT) % 15000))}
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1

# The step's shape: GPU jobs start one task per GPU on every node; CPU jobs one per --ntasks.
step_shape=()
case ${RLP_LAUNCH:?the template sets RLP_LAUNCH=gpu or cpu} in
gpu)
    NNODES=${SLURM_JOB_NUM_NODES:-1}
    NPROC=${RLP_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] ||
        die "ranks per node unknown: set RLP_NPROC_PER_NODE or request GPUs (--gres=gpu:G)"
    step_shape=(--nodes="$NNODES" --ntasks-per-node="$NPROC" --gres=gpu:"$NPROC")
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1} # Megatron TP overlap
    shape="$NNODES nodes x $NPROC ranks"
    ;;
cpu)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    shape="${SLURM_NTASKS:-1} ranks"
    ;;
*) die "RLP_LAUNCH=$RLP_LAUNCH: expected gpu or cpu" ;;
esac

wandb_key=${WANDB_API_KEY:+<set>} # never print the key itself
log "job $JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST: $shape, master $MASTER_ADDR:$MASTER_PORT"
log "config $RLP_CONFIG, run dir $RLP_RUN_DIR, rank logs $LOG_DIR/rank<N>.log"
log "env: WANDB_MODE=${WANDB_MODE:-<unset>} WANDB_API_KEY=${wandb_key:-<unset>}" \
    "HF_HOME=${HF_HOME:-<unset>} CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-}" \
    "OMP_NUM_THREADS=${OMP_NUM_THREADS:-} container=${RLP_CONTAINER_IMAGE:-none}"
event "start nodes=$SLURM_JOB_NODELIST $shape"

# ---- signals: USR1 -> stop file (checkpoint + requeue); TERM -> remember ----------------------
signalled=""
# shellcheck disable=SC2317,SC2329  # invoked by the traps below
on_signal() {
    if [[ -z $signalled ]]; then
        signalled=$1
        event "signal $1"
        if [[ $1 == USR1 ]]; then
            log "received SIGUSR1: asking the trainer to checkpoint and exit ($STOP_FILE)"
            touch "$STOP_FILE"
        else
            # SLURM has sent TERM to every process of the step itself (scancel, pre-emption,
            # time limit); the trainer checkpoints on it if it can within KillWait.
            log "received SIGTERM"
        fi
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

requeue() {
    if ((ATTEMPT >= MAX_REQUEUES)); then
        log "not requeueing: attempt $ATTEMPT reached RLP_MAX_REQUEUES=$MAX_REQUEUES"
        event "requeue refused (max $MAX_REQUEUES)"
        exit "$REQUEUE_EXIT_CODE"
    fi
    event "requeue ($1)"
    log "requeueing job $JOB_ID ($1); the next attempt resumes from the newest checkpoint"
    if ! scontrol requeue "$JOB_ID"; then
        log "scontrol requeue failed; resume by resubmitting: sbatch $RLP_RUN_DIR/slurm/job.sbatch"
        exit "$REQUEUE_EXIT_CODE"
    fi
    exit 0
}

# SLURM's reason for ending the job: TimeLimit at the time limit, None after scancel.
job_reason() {
    scontrol show job "$JOB_ID" 2>/dev/null | grep -oE 'Reason=[A-Za-z_]+' | head -n 1 |
        cut -d= -f2 || true
}

if [[ -n $signalled ]]; then requeue "signal before launch"; fi

# The srun task of every rank: sets the torchrun-style rank variables, runs the trainer (its own
# child, so no process scanning), sends it USR1 once the stop file appears, and outlives SLURM's
# step-wide signals until the trainer exits (a task that died first would make SLURM kill the
# trainer mid-checkpoint). Trapped, not ignored: the trainer starts with default signal
# dispositions. Exits with the trainer's exit code.
# shellcheck disable=SC2016  # expanded by the task's shell, not here
task_cmd='stop=$1 poll=$2
shift 2
trap : TERM USR1
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-$SLURM_NTASKS}
"$@" &
child=$!
sent=0
while kill -0 "$child" 2>/dev/null; do
    if ((sent == 0)) && [[ -e $stop ]]; then
        kill -USR1 "$child" 2>/dev/null
        sent=1
    fi
    sleep "$poll"
done
wait "$child"'
# --wait: when one rank exits (e.g. after its part of a checkpoint), the others get EXIT_WAIT
# seconds before SLURM kills them, so a crashed rank cannot leave the rest hanging in a collective.
srun "${step_shape[@]}" --kill-on-bad-exit=0 --wait="$EXIT_WAIT" --output="$LOG_DIR/rank%t.log" \
    "${container[@]}" bash -c "$task_cmd" rlp-task "$STOP_FILE" "$STOP_POLL" \
    "$PYTHON" -m "$ENTRY" train --config "$RLP_CONFIG" "${overrides[@]}" &
step_pid=$!

# `wait` returns early when a trapped signal arrives; keep waiting until srun itself has exited.
rc=0
while :; do
    wait "$step_pid" && rc=0 || rc=$?
    kill -0 "$step_pid" 2>/dev/null || break
done
event "step exit rc=$rc${signalled:+ after SIG$signalled}"

if ((rc == 0)); then
    log "training finished (rc 0)"
    exit 0
fi
if [[ $signalled == TERM ]]; then
    # SLURM sends TERM on scancel, on pre-emption and at the time limit. Only the time limit is
    # requeued here: a cancel must stay cancelled, and pre-emption requeues are SLURM's decision.
    reason=$(job_reason)
    if [[ $reason == TimeLimit ]]; then requeue "time limit, step exit $rc"; fi
    log "stopped by SIGTERM (Reason=${reason:-unknown}), step exit $rc: not requeueing"
    exit "$rc"
fi
if ((rc == REQUEUE_EXIT_CODE)); then requeue "trainer exit $rc"; fi
if [[ $signalled == USR1 ]]; then requeue "SIGUSR1, step exit $rc"; fi
log "training failed with exit code $rc${signalled:+ after SIG$signalled}; last lines of rank 0:"
tail -n 30 "$LOG_DIR/rank0.log" 2>/dev/null || true
exit "$rc"
