#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the scheduler tests and CI.
#
#   scripts/slurm_local_cluster.sh start  [STATE_DIR]   # install if missing, start, wait for the node
#   scripts/slurm_local_cluster.sh status [STATE_DIR]   # exit 0 when the controller answers and the node is up
#   scripts/slurm_local_cluster.sh stop   [STATE_DIR]   # stop the daemons this script started (by PID file)
#   scripts/slurm_local_cluster.sh conf   [STATE_DIR]   # print the slurm.conf path (for SLURM_CONF)
#
# STATE_DIR defaults to $SPARSE_LORA_SLURM_DIR or /var/tmp/sparse-lora-slurm. It holds slurm.conf, the
# daemons' state, PID files and logs; clients find the cluster with SLURM_CONF=STATE_DIR/slurm.conf
# (nothing is written under /etc/slurm). Debian's slurm-wlm and munge, started without systemd as
# ../shared/docs/slurm-on-one-machine.md describes: munged as user munge, slurmctld and slurmd as plain
# daemons, no accounting database (job states come from squeue / scontrol, kept for MinJobAge).
# `start` is idempotent (a running cluster is reused) and serialised by a lock in STATE_DIR; it needs
# root, and installs the packages with apt-get only where they are missing (set
# SPARSE_LORA_SLURM_INSTALL=0 to forbid that). Exit status: 0 ok, 1 failed (reason on stderr),
# 2 usage, 3 impossible here (not root, no packages and no apt-get).
set -euo pipefail

usage() {
    echo "usage: $0 start|status|stop|conf [STATE_DIR]" >&2
    exit 2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
ACTION=$1
STATE_DIR=${2:-${SPARSE_LORA_SLURM_DIR:-/var/tmp/sparse-lora-slurm}}
CONF="$STATE_DIR/slurm.conf"
export SLURM_CONF="$CONF"

die() {
    echo "slurm_local_cluster: $1" >&2
    exit "${2:-1}"
}

alive() { # alive PIDFILE: the process named in PIDFILE exists
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() { # the node's state as sinfo reports it (empty if the controller does not answer)
    timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true
}

is_up() {
    alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/slurmd.pid" \
        && timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' \
        && case "$(node_state)" in idle* | mixed* | allocated* | completing*) true ;; *) false ;; esac
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "${SPARSE_LORA_SLURM_INSTALL:-1}" != 0 ] || die "slurm-wlm/munge are not installed and SPARSE_LORA_SLURM_INSTALL=0" 3
    command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get to install them" 3
    echo "slurm_local_cluster: installing slurm-wlm and munge (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge >&2 \
        || die "apt-get install slurm-wlm munge failed" 3
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a munged is already serving this machine: reuse it, and never stop it
    fi
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge, or run mungekey)"
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged 9>&- # daemons must not inherit the start lock
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid" # ours: `stop` ends it
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged started but 'munge -n | unmunge' fails"
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    # What slurmd sees on this machine; RealMemory must not exceed it.
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n 1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
    [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs/RealMemory from 'slurmd -C'"
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/d"
    cat >"$CONF.partial" <<EOF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DependencyParameters=kill_invalid_depend
ReturnToService=2
MinJobAge=3600
DefMemPerCPU=500
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.partial" "$CONF"
}

wait_node_idle() {
    local host state
    host=$(hostname -s)
    for i in $(seq 150); do
        state=$(node_state)
        case "$state" in
            idle* | mixed* | allocated*) return 0 ;;
            down* | drain*) [ $((i % 10)) -eq 1 ] && scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    die "the node did not become idle within 30 s (sinfo says '${state:-no answer}'; logs in $STATE_DIR)"
}

start() {
    if is_up; then # a running cluster needs no root to be reused
        echo "slurm_local_cluster: already running ($CONF)" >&2
        echo "$CONF"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "starting munged/slurmctld/slurmd needs root (point SLURM_CONF at a running cluster instead)" 3
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 120 9 || die "another start holds $STATE_DIR/lock"
    if is_up; then # started by whoever held the lock
        echo "slurm_local_cluster: already running ($CONF)" >&2
        echo "$CONF"
        return 0
    fi
    install_packages
    start_munge
    write_conf
    alive "$STATE_DIR/slurmctld.pid" || slurmctld -f "$CONF" 9>&- \
        || die "slurmctld did not start (is another controller using port 6817? see $STATE_DIR/slurmctld.log)"
    alive "$STATE_DIR/slurmd.pid" || slurmd -f "$CONF" 9>&- \
        || die "slurmd did not start (is another slurmd using port 6818? see $STATE_DIR/slurmd.log)"
    wait_node_idle
    echo "slurm_local_cluster: running ($CONF)" >&2
    echo "$CONF"
}

stop_pid() { # stop_pid PIDFILE NAME: TERM the process, wait up to 10 s, then KILL
    local pidfile=$1 pid
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    echo "slurm_local_cluster: $2 ($pid) ignored TERM; killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop() {
    [ -d "$STATE_DIR" ] || return 0
    stop_pid "$STATE_DIR/slurmd.pid" slurmd
    stop_pid "$STATE_DIR/slurmctld.pid" slurmctld
    stop_pid "$STATE_DIR/munged.pid" munged # only if this script started it
    echo "slurm_local_cluster: stopped ($STATE_DIR)" >&2
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status)
        if is_up; then
            echo "up: node $(node_state), SLURM_CONF=$CONF"
        else
            echo "down ($STATE_DIR)"
            exit 1
        fi
        ;;
    conf) echo "$CONF" ;;
    *) usage ;;
esac
