#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/cluster: munged, slurmctld and slurmd started as root,
# every file under DIR, every daemon listening on 127.0.0.1 only (CommunicationParameters: bind to the address
# this host's name resolves to, which `up` checks is 127.0.0.1).
#
#   tests/cluster/slurm.sh up DIR     # installs slurm-wlm + munge if missing; waits until the node is idle
#   export SLURM_CONF=DIR/slurm.conf  # then sinfo, sbatch, submitit ... talk to it
#   tests/cluster/slurm.sh down DIR   # cancels every job, stops the daemons (also after a failed `up`)
#
# Without systemd or a cgroup mount (a container): processes are tracked through /proc (proctrack/linuxproc)
# and not bound to cores (task/none), so a job sees every core and learns its share from SLURM_CPUS_PER_TASK.
set -euo pipefail

cmd=${1:?usage: $0 up|down DIR}
DIR=$(realpath -m "${2:?usage: $0 up|down DIR}")
export SLURM_CONF=$DIR/slurm.conf
NODE=$(hostname -s)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop_pid() {  # stop_pid PIDFILE: TERM, wait up to 20 s, then KILL
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  if [ -s "$DIR/slurmctld.pid" ]; then
    scancel --full --quiet --user=root 2>/dev/null || true           # the job steps end with their jobs
    for _ in $(seq 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 1; done
  fi
  stop_pid "$DIR/slurmd.pid"
  stop_pid "$DIR/slurmctld.pid"
  stop_pid "$DIR/munged.pid"
}

up() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm munge >/dev/null; }
  fi
  if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    echo "slurm.sh: a cluster already runs from $DIR; stop it first: $0 down $DIR" >&2; exit 1
  fi
  if [ "$(getent ahostsv4 "$NODE" | awk 'NR==1{print $1}')" != 127.0.0.1 ]; then
    echo "slurm.sh: this host's name $NODE must resolve to 127.0.0.1 (add '127.0.0.1 $NODE' to /etc/hosts)" >&2; exit 1
  fi
  mkdir -p "$DIR"/{state,spool,munge}
  chmod 700 "$DIR" "$DIR/munge"
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munged.seed"

  # The node as slurmd sees this machine (CPUs, sockets, cores, memory), reached at the loopback address.
  local node_line
  node_line=$(slurmd -C | head -1)
  cat >"$SLURM_CONF" <<EOF
ClusterName=cnnpipe-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
# The partition the README's submitit_slurm command names.
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -c
  slurmd -N "$NODE"

  for _ in $(seq 60); do
    [ "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" = idle ] && { echo "slurm.sh: node $NODE idle; SLURM_CONF=$SLURM_CONF"; return 0; }
    sleep 1
  done
  echo "slurm.sh: the node did not become idle within 60 s; sinfo says: $(sinfo -h -o '%T %E' 2>&1)" >&2
  tail -n 20 "$DIR"/*.log >&2 || true
  down
  exit 1
}

case $cmd in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down DIR" >&2; exit 2 ;;
esac
