#!/usr/bin/env bash
# A local two-node SLURM cluster for tests: munge, slurmctld and two slurmd (nodes n1, n2) on loopback.
#
#   launch/local_slurm.sh up       install what is missing, start everything, wait until both nodes are idle
#   launch/local_slurm.sh down     stop the daemons (munged only if `up` started it) and remove the state
#   launch/local_slurm.sh status   print sinfo; exit 0 if the cluster is up, 1 otherwise
#
# Client commands must read this cluster's config:  export SLURM_CONF=$LMTRAIN_SLURM_DIR/slurm.conf
# (`up` prints the line). Must run as root. Environment:
#   LMTRAIN_SLURM_DIR      state, spool, logs and slurm.conf (default /tmp/lmtrain-slurm)
#   LMTRAIN_SLURM_CPUS     CPUs per emulated node (default 2)
#   LMTRAIN_SLURM_PORT     slurmctld port (default 16817); the nodes use 17001 and 17002
#   LMTRAIN_SLURM_TIMEOUT  seconds `up` waits for both nodes to be idle (default 60)
# Exit codes: 0 ok, 1 failed / not up, 2 usage, 3 cannot install slurm or munge, 4 not root.
set -euo pipefail

DIR=${LMTRAIN_SLURM_DIR:-/tmp/lmtrain-slurm}
CONF=$DIR/slurm.conf
CPUS=${LMTRAIN_SLURM_CPUS:-2}
CTLD_PORT=${LMTRAIN_SLURM_PORT:-16817}
TIMEOUT=${LMTRAIN_SLURM_TIMEOUT:-300}  # a bound for a broken cluster, not a guess at start-up time
NODES=(n1 n2)
NODE_PORTS=(17001 17002)
export SLURM_CONF=$CONF

log() { echo "local_slurm: $*" >&2; }
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# A running process (not a zombie: this machine's init may be slow to reap).
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]; }
pid_of() { [[ -s "$1" ]] && cat "$1" || true; }

need_root() { [[ $(id -u) -eq 0 ]] || { log "must run as root (it installs packages, edits /etc/hosts and runs slurmd as root)"; exit 4; }; }

install_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || { log "slurm/munge missing and no apt-get to install them"; exit 3; }
  log "installing slurm-wlm and munge with apt-get"
  # Keep the packages' init scripts from starting daemons with the system config during installation.
  local own_policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive apt-get update -q \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge; } >&2 || rc=$?
  [[ -n "$own_policy" ]] && rm -f /usr/sbin/policy-rc.d
  if [[ $rc -ne 0 ]] || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "apt-get could not install slurm-wlm and munge (exit $rc)"; exit 3
  fi
}

ensure_hosts() {
  # Job steps and Lightning's MASTER_ADDR (the first node of SLURM_NODELIST) use the node names.
  local missing=()
  for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null || missing+=("$n"); done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "127.0.0.1 ${missing[*]}  # lmtrain local_slurm" >> /etc/hosts
  fi
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return 0; fi
  local key=/etc/munge/munge.key
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge
  install -d -o munge -g munge -m 0700 /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s $key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key" --force >/dev/null
    else dd if=/dev/urandom of="$key" bs=1 count=1024 status=none; fi
  fi
  chown munge:munge "$key"; chmod 0400 "$key"
  local m; m=$(command -v munged)
  if command -v runuser >/dev/null; then runuser -u munge -- "$m" >&2 || "$m" --force >&2
  else "$m" --force >&2; fi
  touch "$DIR/munged.ours"
  for _ in $(seq 600); do munge_works && return 0; sleep 0.2; done  # up to 2 min on a busy machine
  log "munged did not start"; tail -n 20 /var/log/munge/munged.log >&2 2>/dev/null || true; exit 1
}

write_conf() {
  local tmp=$DIR/slurm.conf.new nodelist
  nodelist=$(IFS=,; echo "${NODES[*]}")
  cat > "$tmp" <<EOF
# Written by launch/local_slurm.sh: ${#NODES[@]} emulated nodes on loopback. Do not edit; it is rewritten.
ClusterName=lmtrain-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
PreemptType=preempt/none
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=120
Waittime=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmdParameters=config_overrides
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} CPUs=$CPUS RealMemory=1000 State=UNKNOWN" >> "$tmp"
  done
  echo "PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$tmp"
  if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$CONF"; return 0
}

node_states() { sinfo -h -N -o '%N %T' 2>/dev/null | sort -u; }

# Up: our daemons run, slurmctld answers and every node is usable (idle, or busy with jobs).
cluster_up() {
  alive "$(ctld_pid)" || return 1
  local states n
  for n in "${NODES[@]}"; do alive "$(slurmd_pid "$n")" || return 1; done
  scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  states=$(node_states)
  for n in "${NODES[@]}"; do
    grep -Eq "^$n (idle|allocated|mixed|completing)$" <<<"$states" || return 1
  done
}

all_idle() {
  local states n; states=$(node_states)
  for n in "${NODES[@]}"; do grep -Eq "^$n idle$" <<<"$states" || return 1; done
}

ctld_pid() { pid_of "$DIR/slurmctld.pid"; }
slurmd_pid() { pid_of "$DIR/slurmd-$1.pid"; }

stop_daemons() {
  local pids=() p n
  for n in "${NODES[@]}"; do p=$(slurmd_pid "$n"); alive "$p" && pids+=("$p"); done
  p=$(ctld_pid); alive "$p" && pids+=("$p")
  # Daemons started with this config whose pid file is gone.
  while read -r p; do [[ -n "$p" ]] && pids+=("$p"); done < <(pgrep -f -- "-f $CONF( |$)" || true)
  [[ ${#pids[@]} -eq 0 ]] && return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    local left=0; for p in "${pids[@]}"; do alive "$p" && left=1; done
    [[ $left -eq 0 ]] && return 0; sleep 0.2
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

show_logs() {
  for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd-*.log; do
    [[ -f $f ]] && { echo "--- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
}

cmd_up() {
  need_root
  if [[ -f $CONF ]] && cluster_up; then
    log "already up"; echo "export SLURM_CONF=$CONF"; return 0
  fi
  install_missing
  mkdir -p "$DIR"/{state,spool,log}
  if write_conf; then stop_daemons; fi  # config changed: restart whatever runs with the old one
  for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
  ensure_hosts
  start_munge
  if ! alive "$(ctld_pid)"; then
    slurmctld -f "$CONF" || { log "slurmctld failed to start"; show_logs; exit 1; }
  fi
  for n in "${NODES[@]}"; do
    if ! alive "$(slurmd_pid "$n")"; then
      slurmd -f "$CONF" -N "$n" || { log "slurmd $n failed to start"; show_logs; exit 1; }
    fi
  done
  local deadline=$((SECONDS + TIMEOUT))
  until all_idle; do
    if (( SECONDS >= deadline )); then
      log "nodes not idle after ${TIMEOUT}s:"; sinfo -N >&2 || true; show_logs; exit 1
    fi
    sleep 0.5
  done
  sinfo >&2
  log "up: nodes ${NODES[*]} idle in partition debug"
  echo "export SLURM_CONF=$CONF"
}

cmd_down() {
  need_root
  stop_daemons
  if [[ -f $DIR/munged.ours ]]; then
    local p; p=$(pid_of /run/munge/munged.pid)
    if alive "$p"; then
      kill "$p" 2>/dev/null || true
      for _ in $(seq 25); do alive "$p" || break; sleep 0.2; done
    fi
  fi
  rm -rf "$DIR"
  log "down"
}

cmd_status() {
  if ! command -v sinfo >/dev/null; then log "slurm is not installed"; return 1; fi
  if [[ -f $CONF ]] && cluster_up; then
    sinfo; echo "export SLURM_CONF=$CONF"; return 0
  fi
  if [[ -f $CONF ]] && scontrol ping 2>/dev/null | grep -q 'is UP'; then sinfo -N 2>&1 || true; fi
  log "not up"; return 1
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) usage ;;
esac
