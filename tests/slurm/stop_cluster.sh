#!/usr/bin/env bash
# Stop the daemons tests/slurm/start_cluster.sh started, by the PIDs it wrote, and nothing else:
# slurmd (both nodes), then slurmctld, then munged. Each gets SIGTERM, then SIGKILL after 15 s.
set -uo pipefail
state=${RRWKV_SLURM_STATE:-/run/rrwkv-slurm}

stop() {  # stop NAME EXPECTED_COMMAND
  local f="$state/$1.pid" pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  # A PID file can outlive its process and the PID be reused: only signal the daemon we expect.
  if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]]; then
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$f"
}

stop slurmd-node1 slurmd
stop slurmd-node2 slurmd
stop slurmctld slurmctld
stop munged munged
exit 0
