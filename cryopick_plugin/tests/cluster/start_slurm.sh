#!/usr/bin/env bash
# Start a private single-node SLURM (munged, slurmctld, slurmd) for the cluster tests, then wait until
# its node is idle.
#
#   start_slurm.sh DIR [OWNER_PID]   DIR: a folder of its own for keys, configuration, state and logs
#   stop_slurm.sh DIR                 stops it again
#
# With OWNER_PID (the test session), a watchdog stops this SLURM once that process is gone, so a session
# that is killed before it can call stop_slurm.sh leaves no daemons behind.
#
# Everything lives under DIR (munge key and socket, slurm.conf, spool, logs), on ports picked free, so it
# touches no system-wide SLURM and two instances can run side by side. Commands use it through
# SLURM_CONF=DIR/slurm.conf (written to DIR/env). One node with this machine's cores and memory, two
# partitions: `cpu` (default) and `gpu` (one GPU declared on /dev/null: jobs asking for --gres=gpu:1
# are scheduled, and find no CUDA device on a machine without one). Accounting: job
# completion records in a text file, read by `sacct --completion`. Needs root (the daemons run jobs as
# the submitting user) and Debian's slurm-wlm and munge. Exit 3 with one line when something is missing.
set -euo pipefail
DIR=${1:?usage: start_slurm.sh DIR [OWNER_PID]}
OWNER=${2:-}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)

fail() { echo "start_slurm.sh: $*" >&2; exit 3; }
missing=()
for prog in munged slurmctld slurmd sinfo sbatch squeue scancel sacct scontrol; do
  command -v "$prog" >/dev/null 2>&1 || missing+=("$prog")
done
[ ${#missing[@]} -eq 0 ] || fail "not installed: ${missing[*]} (Debian packages slurm-wlm and munge; bash setup.sh as root installs them)"
[ "$(id -u)" = 0 ] || fail "must run as root (slurmd starts jobs as the submitting user)"

# one free TCP port per daemon
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in socks))
PY
}
read -r CTLD_PORT SLURMD_PORT < <(free_ports 2)

HOST=$(hostname -s)
# This machine as slurmd sees it; memory a little under the total so the node is never drained for
# having less than declared.
HW=$(slurmd -C | head -1)
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(( MEM * 9 / 10 ))
[ -n "$CPUS" ] && [ -n "$MEM" ] || fail "cannot read this machine's cores and memory from 'slurmd -C': $HW"

mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
chmod 700 "$DIR/munge"
# munge: a fresh key, its own socket; munged refuses world-writable folders on the socket path
head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
chmod 400 "$DIR/munge/munge.key"
SOCKET="$DIR/munge/munge.socket"
munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munge/munged.pid" \
       --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
  || fail "munged did not start (see $DIR/log/munged.log)"

cat > "$DIR/slurm.conf" <<CONF
# Written by start_slurm.sh for the cryopick cluster tests: one node, nothing system-wide.
ClusterName=cryopick
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# no cgroups inside a container: processes tracked by parentage, no CPU binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# short waits: a cancelled job is killed 2 s after SIGTERM; the scheduler looks at new jobs at once
KillWait=2
SchedulerParameters=sched_min_interval=0
MessageTimeout=20
SlurmdTimeout=60
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
CONF
# SLURM counts a GPU only with a device file; /dev/null stands in for one (no CUDA device appears).
cat > "$DIR/gres.conf" <<CONF
AutoDetect=off
NodeName=$HOST Name=gpu Count=1 File=/dev/null
CONF
printf 'export SLURM_CONF=%q\n' "$DIR/slurm.conf" > "$DIR/env"
export SLURM_CONF="$DIR/slurm.conf"

if [ -n "$OWNER" ]; then
  setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -f "$2/slurm.conf" ]; do sleep 5; done
                  [ -f "$2/slurm.conf" ] && exec bash "$3/stop_slurm.sh" "$2"' watchdog "$OWNER" "$DIR" "$HERE" \
    </dev/null >/dev/null 2>&1 &
  echo $! > "$DIR/watchdog.pid"
fi
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (see $DIR/log/slurmctld.log)"
slurmd -f "$SLURM_CONF" || fail "slurmd did not start (see $DIR/log/slurmd.log)"

# wait for the node to register and be idle
for _ in $(seq 240); do
  state=$(sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in
    idle) echo "start_slurm.sh: node $HOST idle ($CPUS CPUs, $MEM MB) in $DIR"; exit 0 ;;
    down*|drain*|unknown*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
fail "node $HOST not idle after 120 s (state '${state:-none}'; see $DIR/log/slurmctld.log and slurmd.log)"
