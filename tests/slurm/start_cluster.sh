#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests and CI (run as root):
# munged, slurmctld, and two slurmd daemons `slurmd -N node1` / `slurmd -N node2`, both nodes at
# 127.0.0.1 with their own Port and SlurmdSpoolDir. No cgroups (proctrack/linuxproc, task/none).
#
#   tests/slurm/start_cluster.sh [--install]   # --install: apt-get the Debian packages first
#   tests/slurm/stop_cluster.sh                # stops exactly the daemons this script started
#
# The daemons' PIDs are written to $RRWKV_SLURM_STATE (default /run/rrwkv-slurm) as
# {munged,slurmctld,slurmd-node1,slurmd-node2}.pid; a daemon whose PID file names a live process is
# left alone, so running this twice is harmless. It writes /etc/slurm/slurm.conf (the machine's
# default config, so plain `sbatch`/`squeue` find it) and adds node1/node2 to /etc/hosts.
# Exit status 0 once both nodes are idle; 1 with the daemons' log tails otherwise.
set -euo pipefail

state=${RRWKV_SLURM_STATE:-/run/rrwkv-slurm}
conf=/etc/slurm/slurm.conf
logs=/var/log/slurm
# Both "nodes" get the whole machine; jobs may share CPUs (OverSubscribe=FORCE), so a 2-node job
# with one task per node, or an array job of several 1-CPU tasks, fits on a 2-core machine.
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))

if [[ ${1:-} == --install ]]; then
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      slurmctld slurmd slurm-client munge
  fi
fi
for bin in munged slurmctld slurmd sbatch scontrol; do
  command -v "$bin" >/dev/null || { echo "start_cluster.sh: $bin not found; run it with --install (Debian: slurmctld slurmd slurm-client munge)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "start_cluster.sh: run as root (it starts system daemons)" >&2; exit 1; }

mkdir -p "$state" "$logs" /var/spool/slurmctld /var/spool/slurmd /run/munge /etc/slurm
chown munge:munge /run/munge
chmod 0755 /run/munge

grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1" >> /etc/hosts
grep -qE '^127\.0\.0\.1[[:space:]].*\bnode2\b' /etc/hosts || echo "127.0.0.1 node2" >> /etc/hosts

host=$(hostname -s)
cat > "$conf.tmp" <<EOF
# Written by tests/slurm/start_cluster.sh: a two-node test cluster on one machine.
ClusterName=rrwkv-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
AuthType=auth/munge
# Requeued jobs wait cred_expire seconds before they start again (default 120).
AuthInfo=cred_expire=10
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Schedule every 2 s (defaults 60 s / 30 s): a requeued job starts again soon after its BeginTime.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmdTimeout=120
InactiveLimit=0
MailProg=/bin/true
NodeName=node1 NodeAddr=127.0.0.1 NodeHostname=$host Port=6818 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 NodeHostname=$host Port=6819 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
mv "$conf.tmp" "$conf"

alive() {  # alive NAME: the PID in $state/NAME.pid is a live process
  local f="$state/$1.pid"
  [[ -s $f ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

if ! alive munged; then
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid   # forks; the daemon writes its PID
  for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$state/munged.pid"
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null | unmunge >/dev/null || { echo "start_cluster.sh: munged did not start" >&2; tail -20 "$logs/munged.out" >&2; exit 1; }
fi
if ! alive slurmctld; then
  rm -f "$state/slurmctld.pid"
  slurmctld -c        # -c: a fresh cluster, no jobs from an earlier start
fi
for n in node1 node2; do
  if ! alive "slurmd-$n"; then
    rm -f "$state/slurmd-$n.pid"
    slurmd -N "$n"
  fi
done

# Wait for the daemons' PID files and for both nodes to register as idle.
for _ in $(seq 300); do
  if alive slurmctld && alive slurmd-node1 && alive slurmd-node2; then
    idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|allocated)/' | wc -l)
    [[ $idle -ge 2 ]] && { sinfo -N; exit 0; }
    # Nodes left DOWN/DRAINED by an earlier run come back here.
    scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
  fi
  sleep 0.2
done
echo "start_cluster.sh: the nodes did not become idle within 60 s" >&2
sinfo -N >&2 || true
tail -n 20 "$logs/slurmctld.log" "$logs"/slurmd-node*.log >&2 || true
exit 1
