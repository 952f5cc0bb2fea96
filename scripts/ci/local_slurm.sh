#!/usr/bin/env bash
# A real one-node SLURM cluster (Debian's slurm-wlm 22.05) on loopback, for CI tests of the sbatch
# templates in slurm/. Runs without systemd and without cgroups; needs root.
#
#   scripts/ci/local_slurm.sh start [--gpus N] [--fresh]   install if missing, configure, start, wait
#   scripts/ci/local_slurm.sh stop                          cancel jobs, stop daemons (by pid file)
#   scripts/ci/local_slurm.sh status                        daemons, node state, queue (rc 0 = all up)
#
# Every command is idempotent. `start` on a live cluster with an unchanged config returns at once;
# a changed config (e.g. another --gpus) restarts slurmctld and slurmd, since plugin and GRES
# changes are not picked up by `scontrol reconfigure`.
#
# Knobs (flags win over environment):
#   --gpus N   / RLP_SLURM_GPUS      fake GPUs (GRES gpu:N backed by /dev/null-like char devices)
#                                    so scripts with --gres=gpu:N / --gpus-per-node can be submitted
#   --fresh    / RLP_SLURM_FRESH=1   wipe saved controller state (job ids restart, old jobs gone)
#   RLP_SLURM_RUNTIME                state, spool, logs, pid files (default /var/tmp/rlp-slurm)
#   RLP_SLURM_CONF                   where slurm.conf goes (default /etc/slurm/slurm.conf, where
#                                    the client commands look without SLURM_CONF)
#
# Exit codes: 0 ok, 1 failure (reason and log tails printed), 2 usage, 3 cannot run here (not
# root, no apt-get to install with): callers such as tests/slurm/conftest.py skip on 3.
set -euo pipefail

RUNTIME=${RLP_SLURM_RUNTIME:-/var/tmp/rlp-slurm}
CONF=${RLP_SLURM_CONF:-/etc/slurm/slurm.conf}
GPUS=${RLP_SLURM_GPUS:-0}
FRESH=${RLP_SLURM_FRESH:-0}
NODE=localhost
PARTITION=debug
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
CTLD_PID=$RUNTIME/slurmctld.pid
SLURMD_PID=$RUNTIME/slurmd.pid
PACKAGES=(slurmctld slurmd slurm-client munge)
T0=$(date +%s.%N)

log() { printf '[local_slurm] %s\n' "$*"; }
die() { printf '[local_slurm] ERROR: %s\n' "$*" >&2; exit 1; }
cannot() { printf '[local_slurm] cannot run a local cluster here: %s\n' "$*" >&2; exit 3; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

# ---------------------------------------------------------------------------------------------
# Processes: by pid file only, never by name; zombies count as stopped (PID 1 here may not reap).

# pid_alive PIDFILE COMM: true when the pid in PIDFILE runs, is not a zombie, and is named COMM
# (so a pid reused by an unrelated process is never signalled).
pid_alive() {
    local pidfile=$1 comm=$2 pid state name
    [[ -s $pidfile ]] || return 1
    # The daemon may remove its pid file between the test above and this read.
    pid=$(tr -dc '0-9' 2>/dev/null <"$pidfile") || return 1
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    name=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $name == "$comm" ]] || return 1
    # Field 3 of /proc/PID/stat is the state; comm (field 2) may contain spaces, so cut after ')'.
    state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ $state != Z && $state != X ]]
}

pid_of() { tr -dc '0-9' 2>/dev/null <"$1" || true; }

# stop_pid PIDFILE COMM: SIGTERM, wait up to 10 s, then SIGKILL; removes the pid file.
stop_pid() {
    local pidfile=$1 comm=$2 pid i
    if ! pid_alive "$pidfile" "$comm"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(pid_of "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pidfile" "$comm" || break
        sleep 0.1
    done
    if pid_alive "$pidfile" "$comm"; then
        log "$comm (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
    log "stopped $comm (pid $pid)"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s.
wait_for() {
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "timed out after ${limit}s waiting for $what"
    return 1
}

log_tails() {
    local f
    for f in "$RUNTIME/log/slurmctld.log" "$RUNTIME/log/slurmd.log" /var/log/munge/munged.log; do
        [[ -r $f ]] || continue
        printf -- '----- last lines of %s -----\n' "$f" >&2
        tail -n 15 "$f" >&2
    done
}

# ---------------------------------------------------------------------------------------------
# Install

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null
}

install_packages() {
    installed && return 0
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get"
    local t policy=/usr/sbin/policy-rc.d created_policy=0
    t=$(date +%s)
    # Package postinsts call invoke-rc.d to start the daemons, which fails without an init
    # system; a policy-rc.d that exits 101 tells them not to start anything.
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        created_policy=1
    fi
    log "installing ${PACKAGES[*]} (apt-get, --no-install-recommends)"
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${PACKAGES[@]}"
    } >"${TMPDIR:-/tmp}/rlp-slurm-apt.log" 2>&1 || rc=$?
    if ((created_policy)); then rm -f "$policy"; fi
    if ((rc != 0)); then
        tail -n 20 "${TMPDIR:-/tmp}/rlp-slurm-apt.log" >&2
        die "apt-get install failed (rc $rc); full log: ${TMPDIR:-/tmp}/rlp-slurm-apt.log"
    fi
    installed || die "packages installed but slurmctld/slurmd/sbatch/munged are not on PATH"
    log "installed in $(($(date +%s) - t)) s"
}

# ---------------------------------------------------------------------------------------------
# Configuration

# Node shape from `slurmd -C` (CPUs, sockets, cores, threads, memory) so slurmd does not report
# "reconfigured socket/core boundaries"; RealMemory gets a 5% margin against a low-memory drain.
node_line() {
    local shape key value cpus=1 sockets=1 cores=1 threads=1 mem=1024
    shape=$(slurmd -C 2>/dev/null | head -n 1) || die "slurmd -C failed"
    for kv in $shape; do
        key=${kv%%=*}
        value=${kv#*=}
        case $key in
            CPUs) cpus=$value ;;
            Sockets) sockets=$value ;;
            CoresPerSocket) cores=$value ;;
            ThreadsPerCore) threads=$value ;;
            RealMemory) mem=$value ;;
        esac
    done
    local line="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets"
    line+=" CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$((mem * 95 / 100))"
    if ((GPUS > 0)); then line+=" Gres=gpu:$GPUS"; fi
    printf '%s State=UNKNOWN\n' "$line"
}

render_conf() {
    local true_bin
    true_bin=$(command -v true)
    cat <<EOF
# Written by scripts/ci/local_slurm.sh: a one-node CI cluster on loopback. Do not edit.
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=$true_bin
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$RUNTIME/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$RUNTIME/state
SlurmdSpoolDir=$RUNTIME/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$RUNTIME/log/slurmctld.log
SlurmdLogFile=$RUNTIME/log/slurmd.log
EOF
    if ((GPUS > 0)); then echo "GresTypes=gpu"; fi
    node_line
    echo "PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
}

render_gres() {
    ((GPUS > 0)) || return 0
    # A GPU GRES without File= is dropped and the node turns INVALID; character devices with the
    # null device's numbers are accepted as "GPUs".
    printf 'NodeName=%s Name=gpu File=%s/fakegpu[0-%d]\n' "$NODE" "$RUNTIME" $((GPUS - 1))
}

# Writes slurm.conf/gres.conf when they differ; prints "changed" or "same".
write_conf() {
    local conf_dir new_conf new_gres status=same i
    conf_dir=$(dirname "$CONF")
    mkdir -p "$conf_dir" "$RUNTIME"/{state,spool,log}
    new_conf=$(render_conf)
    new_gres=$(render_gres)
    if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
        printf '%s\n' "$new_conf" >"$CONF"
        status=changed
    fi
    if ((GPUS > 0)); then
        for ((i = 0; i < GPUS; i++)); do
            [[ -c $RUNTIME/fakegpu$i ]] || mknod "$RUNTIME/fakegpu$i" c 1 3
        done
        if [[ ! -f $conf_dir/gres.conf ]] || [[ "$(cat "$conf_dir/gres.conf")" != "$new_gres" ]]; then
            printf '%s\n' "$new_gres" >"$conf_dir/gres.conf"
            status=changed
        fi
    elif [[ -f $conf_dir/gres.conf ]]; then
        rm -f "$conf_dir/gres.conf"
        status=changed
    fi
    echo "$status"
}

# ---------------------------------------------------------------------------------------------
# Daemons

start_munge() {
    if pid_alive "$MUNGE_PID" munged; then return 0; fi
    # systemd's RuntimeDirectory= normally creates this; without systemd nobody does.
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    runuser -u munge -- munged
    wait_for 10 "munged" bash -c 'munge -n | unmunge' ||
        { log_tails; die "munged did not start (check /var/log/munge/munged.log)"; }
    log "munged running (pid $(pid_of "$MUNGE_PID"))"
}

start_slurmctld() {
    if pid_alive "$CTLD_PID" slurmctld; then return 0; fi
    slurmctld
    wait_for 20 "slurmctld to answer" scontrol ping ||
        { log_tails; die "slurmctld did not come up"; }
    log "slurmctld running (pid $(pid_of "$CTLD_PID"))"
}

start_slurmd() {
    if pid_alive "$SLURMD_PID" slurmd; then return 0; fi
    slurmd
    wait_for 10 "slurmd pid file" pid_alive "$SLURMD_PID" slurmd ||
        { log_tails; die "slurmd did not start"; }
    log "slurmd running (pid $(pid_of "$SLURMD_PID"))"
}

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1; }

# Waits for the node to be idle (or busy with jobs); resumes DOWN/DRAINED nodes left over from an
# earlier run's saved state; fails fast on INVALID (the config does not match the hardware).
wait_node_ready() {
    local state reason i resumed=0
    for ((i = 0; i < 300; i++)); do
        state=$(node_state)
        case $state in
            idle | mix | alloc | comp) return 0 ;;
            inval*)
                reason=$(scontrol show node "$NODE" | sed -n 's/^ *Reason=//p')
                log_tails
                die "node $NODE is INVALID (Reason=$reason); the rendered $CONF does not match" \
                    "this machine (try --gpus 0 or --fresh)"
                ;;
            down* | drain* | drng* | fail*)
                if ((resumed == 0)); then
                    log "node $NODE is $state (left in saved state); resuming"
                    scontrol update nodename="$NODE" state=resume || true
                    resumed=1
                fi
                ;;
        esac
        sleep 0.1
    done
    reason=$(scontrol show node "$NODE" 2>/dev/null | sed -n 's/^ *Reason=//p')
    log_tails
    die "node $NODE not idle after 30 s (state '${state:-unknown}', Reason=${reason:-none})"
}

cancel_jobs() {
    command -v squeue >/dev/null || return 0
    scontrol ping >/dev/null 2>&1 || return 0
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # one word per job id
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ -z $(squeue -h -o %A 2>/dev/null) ]] && return 0
        sleep 0.1
    done
    log "jobs still listed after 15 s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_start() {
    [[ $(id -u) -eq 0 ]] || cannot "needs root (daemons run as root, apt-get installs packages)"
    [[ $GPUS =~ ^[0-9]+$ ]] || die "--gpus must be a non-negative integer, got '$GPUS'"
    install_packages
    local changed
    changed=$(write_conf)
    if [[ $changed == changed || $FRESH == 1 ]] &&
        { pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; }; then
        log "configuration changed: restarting slurmctld and slurmd"
        cancel_jobs
        stop_pid "$SLURMD_PID" slurmd
        stop_pid "$CTLD_PID" slurmctld
    fi
    if [[ $FRESH == 1 ]]; then
        log "--fresh: wiping controller state in $RUNTIME/state"
        rm -rf "${RUNTIME:?}/state" && mkdir -p "$RUNTIME/state"
    fi
    start_munge
    start_slurmctld
    start_slurmd
    wait_node_ready
    log "cluster up: node $NODE $(node_state), partition $PARTITION, fake GPUs $GPUS," \
        "config $CONF, runtime $RUNTIME ($(elapsed) s)"
}

cmd_stop() {
    cancel_jobs
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$CTLD_PID" slurmctld
    stop_pid "$MUNGE_PID" munged
    log "stopped ($(elapsed) s)"
}

cmd_status() {
    local rc=0 pair pidfile comm
    for pair in "$MUNGE_PID:munged" "$CTLD_PID:slurmctld" "$SLURMD_PID:slurmd"; do
        pidfile=${pair%:*}
        comm=${pair##*:}
        if pid_alive "$pidfile" "$comm"; then
            printf '%-10s running (pid %s)\n' "$comm" "$(pid_of "$pidfile")"
        else
            printf '%-10s stopped\n' "$comm"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo -N -o '%N %t %c %m %G' || rc=1
        squeue -o '%.8i %.10j %.9T %.10M %R' || rc=1
    fi
    return "$rc"
}

main() {
    (($# >= 1)) || usage
    local cmd=$1
    shift
    while (($#)); do
        case $1 in
            --gpus) GPUS=${2:?--gpus needs a number}; shift 2 ;;
            --gpus=*) GPUS=${1#*=}; shift ;;
            --fresh) FRESH=1; shift ;;
            -h | --help) usage ;;
            *) printf 'unknown option: %s\n' "$1" >&2; usage ;;
        esac
    done
    case $cmd in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        -h | --help | help) usage ;;
        *) printf 'unknown command: %s\n' "$cmd" >&2; usage ;;
    esac
}

main "$@"
