#!/usr/bin/env bash
# Bring up a one-node Slurm cluster on localhost for CI (run as root; idempotent).
#
#   bash .ci/slurm_up.sh            # install if missing, configure, start, wait for an idle node
#   bash .ci/slurm_up.sh --down     # stop the daemons this script started
#
# What it does:
#   1. apt-get installs slurm-wlm + munge if `slurmctld` is missing (Debian 12: Slurm 22.05).
#   2. Writes /etc/slurm/slurm.conf: one node named after `hostname -s` with all of
#      this machine's CPUs, proctrack/linuxproc + task/none (no cgroups or systemd
#      needed, works in containers), select/cons_tres, one default partition "ci".
#   3. Starts munged, slurmctld and slurmd unless they already run, then waits until
#      `sinfo` shows the node idle (at most SLURM_UP_WAIT_S seconds, default 60).
# The MPI launcher for tests comes from PyPI, not from here: `pip install mpich mpi4py`.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
WAIT_S=${SLURM_UP_WAIT_S:-60}
NODE=$(hostname -s)
NCPU=$(nproc)

if [[ "${1:-}" == "--down" ]]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm_up.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm_up.sh: installing slurm-wlm and munge from apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- munge: the key is created by the package's postinst; make one if it is missing
mkdir -p /run/munge /var/log/munge /var/lib/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || { echo "slurm_up.sh: munged did not start" >&2; exit 1; }
fi

# --- slurm.conf (rewritten every time; daemons are restarted only if it changed)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
NEW_CONF=$(cat <<EOF
# Written by .ci/slurm_up.sh: a one-node CI cluster on localhost.
ClusterName=vlmci
SlurmctldHost=${NODE}(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
KillWait=10
SchedulerParameters=sched_interval=2
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${NCPU} State=UNKNOWN
PartitionName=ci Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
CHANGED=0
if [[ ! -f $CONF ]] || [[ "$(cat $CONF)" != "$NEW_CONF" ]]; then
    echo "$NEW_CONF" > $CONF
    CHANGED=1
fi

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [[ $CHANGED -eq 1 ]]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        running $pidfile && kill "$(cat $pidfile)" && sleep 1
    done
fi
running /run/slurmctld.pid || /usr/sbin/slurmctld
running /run/slurmd.pid || /usr/sbin/slurmd

# --- wait for the node to be idle (a down/drained node from an earlier run is resumed)
for _ in $(seq $((WAIT_S * 2))); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
        idle*|mixed*|allocated*) echo "slurm_up.sh: node $NODE is $state ($NCPU CPUs)"; exit 0 ;;
        down*|drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
echo "slurm_up.sh: node $NODE not idle after ${WAIT_S}s (state: '${state:-no answer}')" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
