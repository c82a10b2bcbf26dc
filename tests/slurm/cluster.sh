#!/usr/bin/env bash
# A real SLURM cluster on this machine for the tests, from Debian's slurmctld, slurmd and munge.
# Everything it writes lives in one folder; clients find it through SLURM_CONF=DIR/slurm.conf.
#
#   tests/slurm/cluster.sh start DIR [--nodes N]   write DIR/slurm.conf, start munged (if none
#                                      runs), slurmctld and N slurmd, wait until all are idle
#   tests/slurm/cluster.sh stop DIR    stop and remove everything start made (also after a
#                                      start that failed half-way)
#   tests/slurm/cluster.sh kill-node DIR I    node I dies: its link goes down, then every
#                                      process in its namespace is killed (slurmd, jobs)
#   tests/slurm/cluster.sh start-node DIR I   node I comes back: link up, slurmd started
#   tests/slurm/cluster.sh exec DIR I CMD...  run CMD on node I (in its namespaces)
#   tests/slurm/cluster.sh pids DIR I         the processes running on node I
#
# N = 1 (the default): one node, this host itself, on 127.0.0.1.
# N > 1: each node is a network namespace with its own host name (a UTS namespace), node1 ...
# nodeN, at 10.213.0.11 ... on a private bridge that lives in a namespace of its own; this host
# reaches the bridge through one veth at 10.213.0.1, where slurmctld listens. No traffic leaves
# the namespaces made here. Each node sees DIR/hosts as its /etc/hosts (a mount namespace per
# node), which names every node. Nodes share the file system (and munged's socket) with this host, so jobs see the
# same project, environment and data. The subnet's first three numbers: SLURM_TEST_SUBNET
# (default 10.213.0).
#
# Needs root (slurmd starts jobs as their users; namespaces). Ports: SLURM_TEST_CTLD_PORT and
# SLURM_TEST_SLURMD_PORT, default 6817 and 6818.
set -euo pipefail

usage() {
    echo "usage: $0 start DIR [--nodes N] | stop DIR | kill-node DIR I | start-node DIR I | exec DIR I CMD... | pids DIR I" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
shift 2

# Names of this cluster's namespaces and links derive from DIR, so that `stop` finds them
# without any state (a start may have died before writing one), and two clusters do not clash.
tag=$(printf %s "$dir" | cksum | cut -d' ' -f1)
tag=$((tag % 100000))
prefix=mdist$tag
hub=$prefix-hub
host_link=md${tag}h # interface names have at most 15 characters
subnet=${SLURM_TEST_SUBNET:-10.213.0}

node_ns() { echo "$prefix-node$1"; }
node_addr() { echo "$subnet.$((10 + $1))"; }

stop() {
    local pidfile pid ns
    for pidfile in "$dir"/slurmd*.pid "$dir/slurmctld.pid"; do
        if [[ -s $pidfile ]]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    for pidfile in "$dir"/slurmd*.pid "$dir/slurmctld.pid"; do
        [[ -e $pidfile ]] || continue
        for _ in $(seq 50); do
            if [[ ! -s $pidfile ]] || ! kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
                break
            fi
            sleep 0.1
        done
        if [[ -s $pidfile ]]; then kill -9 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true; fi
        rm -f "$pidfile"
    done
    # Whatever still runs in a node (job steps, training processes) goes with it.
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$host_link" 2>/dev/null || true
    if [[ -e $dir/munged.started ]]; then
        runuser -u munge -- /usr/sbin/munged --stop >/dev/null 2>&1 || true
        rm -f "$dir/munged.started"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return # a munged is already running: leave it alone
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
    local nodes=$1 host ctld_addr cpus memory i
    host=$(hostname -s)
    cpus=$(nproc)
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    ctld_addr=127.0.0.1
    ((nodes == 1)) || ctld_addr=$subnet.1
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$dir/slurm.conf" <<CONF
ClusterName=mnistdist
SlurmctldHost=$host($ctld_addr)
SlurmctldPort=${SLURM_TEST_CTLD_PORT:-6817}
SlurmdPort=${SLURM_TEST_SLURMD_PORT:-6818}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
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
# A node that stops answering is DOWN (and its jobs requeued) after 30 s (SLURM's default: 300).
SlurmdTimeout=30
CONF
    if ((nodes == 1)); then
        echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN" >>"$dir/slurm.conf"
    else
        for i in $(seq "$nodes"); do
            echo "NodeName=node$i NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$memory State=UNKNOWN"
        done >>"$dir/slurm.conf"
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
}

make_network() {
    local nodes=$1 i ns
    if ip -4 addr | grep -q "inet $subnet\."; then
        echo "$subnet.0/24 is already in use here (another cluster?); set SLURM_TEST_SUBNET" >&2
        exit 1
    fi
    ip netns add "$hub"
    ip -n "$hub" link add br0 type bridge
    ip -n "$hub" link set br0 up
    ip link add "$host_link" type veth peer name host netns "$hub"
    ip -n "$hub" link set host master br0 up
    ip addr add "$subnet.1/24" dev "$host_link"
    ip link set "$host_link" up
    {
        echo "127.0.0.1 localhost"
        echo "$subnet.1 $(hostname -s)"
        for i in $(seq "$nodes"); do echo "$(node_addr "$i") node$i"; done
    } >"$dir/hosts"
    for i in $(seq "$nodes"); do
        ns=$(node_ns "$i")
        ip netns add "$ns"
        ip -n "$hub" link add "node$i" type veth peer name eth0 netns "$ns"
        ip -n "$hub" link set "node$i" master br0 up
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

# slurmd for node I in its namespaces; it daemonizes and writes DIR/slurmd-nodeI.pid.
start_slurmd() {
    local i=$1
    mkdir -p "$dir/spool/node$i"
    # The node's network namespace, and new UTS and mount namespaces for its host name and its
    # /etc/hosts; `exec` keeps slurmd (and the jobs it starts) in them. (Not `ip netns exec`:
    # it mounts a /sys without /sys/fs/cgroup, and slurmd does not start without one.)
    # shellcheck disable=SC2016  # expanded by the inner shell
    nsenter --net="/run/netns/$(node_ns "$i")" unshare --uts --mount sh -c \
        'mount --bind "$3" /etc/hosts && hostname "$1" && exec /usr/sbin/slurmd -f "$2" -N "$1"' \
        sh "node$i" "$dir/slurm.conf" "$dir/hosts"
}

wait_idle() {
    local state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)
        [[ $state == "idle " ]] && return
        sleep 0.2
    done
    echo "the nodes did not become idle (states: ${state:-unknown}); see $dir/*.log" >&2
    exit 1
}

start() {
    local nodes=1 i
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) nodes=${2:-}; shift 2 || usage ;;
            *) usage ;;
        esac
    done
    [[ $nodes =~ ^[1-9][0-9]?$ ]] || { echo "--nodes must be 1-99, got '$nodes'" >&2; exit 2; }
    stop
    # A start that fails half-way leaves nothing behind.
    trap 'echo "cluster start failed; cleaning up" >&2; stop' ERR EXIT
    start_munge
    write_conf "$nodes"
    export SLURM_CONF=$dir/slurm.conf
    if ((nodes == 1)); then
        /usr/sbin/slurmctld -f "$SLURM_CONF" -i
        /usr/sbin/slurmd -f "$SLURM_CONF"
    else
        make_network "$nodes"
        /usr/sbin/slurmctld -f "$SLURM_CONF" -i
        for i in $(seq "$nodes"); do start_slurmd "$i"; done
    fi
    wait_idle
    trap - ERR EXIT
}

node_arg() {
    [[ ${1:-} =~ ^[1-9][0-9]?$ ]] || usage
    ip netns list | grep -q "^$(node_ns "$1")\b" || { echo "no node $1 in $dir" >&2; exit 1; }
}

kill_node() {
    local i=$1 pid
    node_arg "$i"
    # The link first: the other nodes get no goodbye (no TCP reset), as when a machine dies.
    ip -n "$hub" link set "node$i" down
    for pid in $(ip netns pids "$(node_ns "$i")"); do
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -f "$dir/slurmd-node$i.pid"
}

start_node() {
    local i=$1
    node_arg "$i"
    ip -n "$hub" link set "node$i" up
    SLURM_CONF=$dir/slurm.conf start_slurmd "$i"
}

case $action in
    start) start "$@" ;;
    stop) [[ $# -eq 0 ]] || usage; stop ;;
    kill-node) [[ $# -eq 1 ]] || usage; kill_node "$1" ;;
    start-node) [[ $# -eq 1 ]] || usage; start_node "$1" ;;
    pids) [[ $# -eq 1 ]] || usage; node_arg "$1"; ip netns pids "$(node_ns "$1")" ;;
    exec)
        [[ $# -ge 2 ]] || usage
        node_arg "$1"
        i=$1
        shift
        # slurmd's own namespaces: network, host name and mounts (its /etc/hosts).
        exec nsenter --target "$(cat "$dir/slurmd-node$i.pid")" --net --uts --mount --wd="$PWD" "$@"
        ;;
    *) usage ;;
esac
