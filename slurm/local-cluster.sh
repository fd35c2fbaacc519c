#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the tests (tests/test_slurm.py) and for
# trying the sbatch templates: munged + slurmctld + slurmd started by hand, as root, no systemd,
# no cgroups, no accounting daemon (a small `sacct` stand-in answers submitit from scontrol).
# Debian bookworm packages: slurm-wlm 22.05, munge 0.5.
#
#   slurm/local-cluster.sh install   apt-get install slurm-wlm munge (if missing)
#   slurm/local-cluster.sh start     start the daemons, wait until the node is idle
#   slurm/local-cluster.sh stop      cancel the jobs, stop the daemons
#   slurm/local-cluster.sh env       the export line client commands need
# Knobs: CLT_SLURM_BASE (/tmp/clt-slurm), CLT_SLURM_PORT (6917: slurmctld, +1: slurmd)
set -euo pipefail

BASE=${CLT_SLURM_BASE:-/tmp/clt-slurm}
CTLD_PORT=${CLT_SLURM_PORT:-6917}
D_PORT=$((CTLD_PORT + 1))
HOST=$(hostname -s)
export SLURM_CONF=$BASE/etc/slurm.conf
SOCK=$BASE/run/munge.socket
log() { echo "[clt-slurm] $*"; }
die() { echo "[clt-slurm] error: $*" >&2; exit 1; }
alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null || true); [[ -n $st && $st != Z* ]]; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return
  fi
  [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
  log "installing slurm-wlm + munge"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
}

write_config() {
  mkdir -p "$BASE"/{etc,run,log,munge,spool/ctld,spool/d,bin}
  chmod 700 "$BASE/munge"; chmod 755 "$BASE/run"
  local probe cpus mem
  probe=$(slurmd -C | head -1)   # the node as the hardware probe sees it: never INVAL/DRAIN
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$probe")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$probe")
  cat > "$SLURM_CONF" <<CONF
ClusterName=clt
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${D_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${SOCK}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
MinJobAge=3600
KillWait=5
InactiveLimit=0
StateSaveLocation=${BASE}/spool/ctld
SlurmdSpoolDir=${BASE}/spool/d
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  # submitit polls `sacct -o JobID,State,... --parsable2 -j IDS`; without slurmdbd, answer from scontrol
  cat > "$BASE/bin/sacct" <<'PY'
#!/usr/bin/env python3
import subprocess, sys
args, ids, fields, i = sys.argv[1:], [], ["JobID", "State", "NodeList"], 0
while i < len(args):
    a = args[i]
    if a in ("-j", "--jobs"):
        ids += args[i + 1].split(","); i += 2; continue
    if a in ("-o", "--format"):
        fields = args[i + 1].split(","); i += 2; continue
    if a.startswith("--jobs="):
        ids += a.split("=", 1)[1].split(",")
    elif a.startswith("--format="):
        fields = a.split("=", 1)[1].split(",")
    i += 1
print("|".join(fields))
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    for line in out.splitlines():
        kv = {}
        for tok in line.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                kv.setdefault(k, v)
        if "ArrayTaskId" in kv:
            t = kv["ArrayTaskId"].split("%")[0]
            jobid = f'{kv["ArrayJobId"]}_' + (f"[{t}]" if ("-" in t or "," in t) else t)
        else:
            jobid = kv.get("JobId", jid)
        row = {"JobID": jobid, "State": kv.get("JobState", ""), "NodeList": kv.get("NodeList", ""),
               "ExitCode": kv.get("ExitCode", ""), "JobName": kv.get("JobName", "")}
        print("|".join(row.get(f, "") for f in fields))
PY
  chmod +x "$BASE/bin/sacct"
}

start() {
  install
  for d in munged slurmctld slurmd; do
    if [[ -f $BASE/run/$d.bgpid ]] && alive "$(cat "$BASE/run/$d.bgpid")"; then
      die "$d already running (pid $(cat "$BASE/run/$d.bgpid")); run '$0 stop' first"
    fi
  done
  rm -rf "$BASE/spool" "$BASE/log"
  write_config
  [[ -f $BASE/munge/munge.key ]] || mungekey -c -k "$BASE/munge/munge.key"
  rm -f "$SOCK" "$SOCK.lock"
  munged -F --force -S "$SOCK" --key-file="$BASE/munge/munge.key" --log-file="$BASE/log/munged.log" \
    --pid-file="$BASE/run/munged.pid" --seed-file="$BASE/munge/munged.seed" </dev/null >"$BASE/log/munged.out" 2>&1 &
  echo $! > "$BASE/run/munged.bgpid"
  for _ in $(seq 50); do [[ -S $SOCK ]] && break; sleep 0.1; done
  munge -S "$SOCK" -n | unmunge -S "$SOCK" >/dev/null || die "munge round-trip failed"
  slurmctld -D -f "$SLURM_CONF" </dev/null >"$BASE/log/slurmctld.out" 2>&1 &
  echo $! > "$BASE/run/slurmctld.bgpid"
  slurmd -D -f "$SLURM_CONF" </dev/null >"$BASE/log/slurmd.out" 2>&1 &
  echo $! > "$BASE/run/slurmd.bgpid"
  local st=""
  for _ in $(seq 120); do
    st=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
    [[ $st == idle ]] && break
    for d in slurmctld slurmd; do
      alive "$(cat "$BASE/run/$d.bgpid")" || { tail -20 "$BASE/log/$d.out"; die "$d died"; }
    done
    sleep 0.5
  done
  [[ $st == idle ]] || die "node not idle (state '$st'); see $BASE/log"
  log "up: $(sinfo -h -o '%P %D %c %t' | head -1)"
}

stop() {
  if [[ -f $BASE/run/slurmctld.bgpid ]] && alive "$(cat "$BASE/run/slurmctld.bgpid")"; then
    scancel --full -p debug 2>/dev/null || true
    for _ in $(seq 20); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  for d in slurmd slurmctld munged; do
    local f=$BASE/run/$d.bgpid p
    [[ -f $f ]] || continue
    p=$(cat "$f")
    if alive "$p"; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 60); do alive "$p" || break; sleep 0.25; done
      alive "$p" && kill -KILL "$p" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  log "stopped"
}

case ${1:-} in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$SLURM_CONF PATH=$BASE/bin:\$PATH" ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
