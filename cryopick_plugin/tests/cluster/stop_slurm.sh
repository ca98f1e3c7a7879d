#!/usr/bin/env bash
# Stop the SLURM that start_slurm.sh DIR started: cancel its jobs, stop slurmd, slurmctld and munged
# (by the process ids they wrote under DIR), wait until they are gone, and forget those ids.
set -uo pipefail
DIR=${1:?usage: stop_slurm.sh DIR}
# the owner watchdog (start_slurm.sh), unless it is what runs this script
if [ -f "$DIR/watchdog.pid" ]; then
  wd=$(cat "$DIR/watchdog.pid")
  [ -n "$wd" ] && [ "$wd" != "$$" ] && [ "$wd" != "$PPID" ] && kill "$wd" 2>/dev/null
  rm -f "$DIR/watchdog.pid"
fi
export SLURM_CONF="$DIR/slurm.conf"
if [ -f "$SLURM_CONF" ]; then
  jobs=$(squeue -h -o '%i' 2>/dev/null || true)
  [ -z "$jobs" ] || scancel $jobs 2>/dev/null || true
  for _ in $(seq 20); do [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break; sleep 0.5; done
fi
pids=()
for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then pids+=("$pid"); fi
done
for pid in "${pids[@]}"; do
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
done
# stale ids must never reach a later kill (ids are reused)
rm -f "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"
exit 0
