#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost for the tests, from Debian's slurmctld, slurmd and
# munge. Everything it writes lives in one folder; clients find it through SLURM_CONF.
#
#   tests/slurm/cluster.sh start DIR   write DIR/slurm.conf, start munged (if needed), slurmctld
#                                      and slurmd, wait until the node is idle
#   tests/slurm/cluster.sh stop DIR    stop the daemons this script started
#
# Needs root (slurmd starts jobs as their users). Ports: SLURM_TEST_CTLD_PORT and
# SLURM_TEST_SLURMD_PORT, default 6817 and 6818.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

stop() {
    local name pidfile
    for name in slurmd slurmctld; do
        pidfile=$dir/$name.pid
        if [[ -s $pidfile ]]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
    done
    for name in slurmd slurmctld; do
        pidfile=$dir/$name.pid
        for _ in $(seq 50); do
            if [[ ! -s $pidfile ]] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
                break
            fi
            sleep 0.1
        done
        rm -f "$pidfile"
    done
    if [[ -e $dir/munged.started ]]; then
        runuser -u munge -- /usr/sbin/munged --stop >/dev/null 2>&1 || true
        rm -f "$dir/munged.started"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already running: leave it alone
    fi
    [[ -s /etc/munge/munge.key ]] || { echo "no /etc/munge/munge.key: install munge" >&2; exit 1; }
    install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/munged.started"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "munged did not start" >&2
    exit 1
}

write_conf() {
    local node cpus memory
    node=$(hostname -s)
    cpus=$(nproc)
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mkdir -p "$dir/state" "$dir/spool"
    cat > "$dir/slurm.conf" <<CONF
ClusterName=mnistdist
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=${SLURM_TEST_CTLD_PORT:-6817}
SlurmdPort=${SLURM_TEST_SLURMD_PORT:-6818}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    stop
    start_munge
    write_conf
    export SLURM_CONF=$dir/slurm.conf
    /usr/sbin/slurmctld -f "$SLURM_CONF" -i
    /usr/sbin/slurmd -f "$SLURM_CONF"
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -o %t 2>/dev/null || true)
        [[ $state == idle ]] && return
        sleep 0.2
    done
    echo "the node did not become idle (state: ${state:-unknown}); see $dir/*.log" >&2
    exit 1
}

case $action in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
