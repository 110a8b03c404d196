#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, every server on 127.0.0.1: a head and N worker nodes (each its
# own raylet), so jobs see several nodes (placement, spilling, a node going away) without a cloud account.
#
#   cluster/local.sh start [--workers N] [--port P] [--dashboard-port D] [--client-port C]
#                          [--cpus-per-node K] [--timeout S] [--state-dir DIR]
#   cluster/local.sh stop [--state-dir DIR]
#
# `start` runs cluster/local_cluster.py (ray.cluster_utils.Cluster; see there why not `ray start`) in the
# background, in its own process group, returns once every node is alive, and prints on stdout the
# environment a driver needs, so that
#   eval "$(cluster/local.sh start --workers 2)"
#   clipline run jobs/demo.yaml --set ray.address=auto
#   clipline submit jobs/demo.yaml
# work. Defaults: --workers 2, --port 6380 (GCS), --dashboard-port 8266, no Ray client server unless
# --client-port, --cpus-per-node 1, --timeout 120 (seconds each node may take to join), --state-dir
# $CLIPLINE_LOCAL_CLUSTER or /tmp/clipline-local-cluster. PYTHON=... picks another interpreter than
# .venv/bin/python.
# `stop` signals exactly that process group (never `ray stop`, which stops every Ray instance of this
# user on the machine): SIGTERM, which the holder answers by shutting the nodes down in order, then
# SIGKILL for whatever is left after 30 s.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
STATE_DIR="${CLIPLINE_LOCAL_CLUSTER:-/tmp/clipline-local-cluster}"
WORKERS=2
NODE_TIMEOUT=120
STOP_TIMEOUT=30

usage() { sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "cluster/local.sh: $*" >&2; exit 1; }

cmd="${1:-}"; [ -n "$cmd" ] || usage; shift
ARGS=()  # everything but --state-dir goes to local_cluster.py, which checks it
while [ $# -gt 0 ]; do
  case "$1" in
    --state-dir) [ $# -ge 2 ] || die "--state-dir expects a directory"; STATE_DIR="$2"; shift 2 ;;
    -h|--help) usage ;;
    --workers|--port|--dashboard-port|--client-port|--cpus-per-node|--timeout)
      [ $# -ge 2 ] || die "$1 expects a value"
      [ "$1" = --workers ] && WORKERS="$2"
      [ "$1" = --timeout ] && NODE_TIMEOUT="$2"
      ARGS+=("$1" "$2"); shift 2 ;;
    *) echo "cluster/local.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[ "$cmd" = start ] || [ ${#ARGS[@]} -eq 0 ] || die "'$cmd' takes only --state-dir"

PID_FILE="$STATE_DIR/local_cluster.pid"
STATE_FILE="$STATE_DIR/state.json"
LOG="$STATE_DIR/local_cluster.log"

# a process that has exited but is not yet reaped (a zombie, until init collects it) counts as gone
alive() { kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" != Z ]; }
# the live members of process group $1 (zombies left out)
members() { ps -eo pid=,pgid=,stat= | awk -v g="$1" '$2 == g && $3 !~ /^Z/ {print $1}'; }

stop() {
  [ -f "$PID_FILE" ] || { echo "cluster/local.sh: nothing to stop (no $PID_FILE)"; return 0; }
  local pid; pid="$(cat "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || die "$PID_FILE holds '$pid', not a process id"
  if [ -z "$(members "$pid")" ]; then
    rm -f "$PID_FILE" "$STATE_FILE"
    echo "cluster/local.sh: the cluster of $STATE_DIR had already exited"; return 0
  fi
  # the group is the holder's own (setsid made it a leader), so its pgid is its pid: only the cluster's
  # processes are in it. SIGTERM to the holder alone: it shuts the nodes down in order (workers, then head)
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
  else
    # the holder was killed: its direct children die with it (Ray ties them to it), but the nodes' agents
    # outlive it and, their raylet gone, do not answer SIGTERM; nothing is left to shut down in order
    echo "cluster/local.sh: the holder $pid is gone; killing what is left of its process group" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while [ -n "$(members "$pid")" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  if [ -n "$(members "$pid")" ]; then
    echo "cluster/local.sh: still running after ${STOP_TIMEOUT}s; killing process group $pid" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [ -n "$(members "$pid")" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    [ -z "$(members "$pid")" ] || die "process group $pid survived SIGKILL: $(members "$pid" | xargs)"
  fi
  rm -f "$PID_FILE" "$STATE_FILE"
  echo "cluster/local.sh: stopped the cluster of $STATE_DIR (process group $pid); logs in $STATE_DIR"
}

start() {
  [ -x "$PYTHON" ] || die "no python at $PYTHON (run 'make install', or set PYTHON=/path/to/python)"
  if [ -f "$PID_FILE" ] && [ -n "$(members "$(cat "$PID_FILE")")" ]; then
    die "a cluster from $STATE_DIR is running (process group $(cat "$PID_FILE")); run" \
      "'$0 stop --state-dir $STATE_DIR' first"
  fi
  mkdir -p "$STATE_DIR"
  rm -f "$STATE_FILE"
  # setsid: a process group of its own, which `stop` signals and nothing else shares
  setsid "$PYTHON" "$REPO/cluster/local_cluster.py" --state-dir "$STATE_DIR" "${ARGS[@]}" \
    >"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PID_FILE"
  # the holder bounds each node's start-up by --timeout; this bound is a backstop above it
  local nodes=3 per=120
  [[ "$WORKERS" =~ ^[0-9]+$ ]] && nodes=$((WORKERS + 1))
  [[ "$NODE_TIMEOUT" =~ ^[0-9]+$ ]] && per="$NODE_TIMEOUT"
  local deadline=$((SECONDS + per * (nodes + 1) + 30))
  until [ -f "$STATE_FILE" ]; do
    if ! alive "$pid"; then
      rm -f "$PID_FILE"
      # an argument error or a node that would not start: the holder's own words
      die "the cluster did not start: $(grep -E 'error:|Error|Exception' "$LOG" | tail -3 || true)
  (full log: $LOG)"
    fi
    if [ $SECONDS -ge $deadline ]; then
      STOP_TIMEOUT=10 stop >/dev/null 2>&1 || true
      die "no cluster after $((per * (nodes + 1) + 30))s; see $LOG"
    fi
    sleep 0.5
  done
  "$PYTHON" - "$STATE_FILE" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"export RAY_ADDRESS={s['address']}")
# a driver given an address turns token auth on only when told to (ray.init never guesses it then)
print(f"export RAY_AUTH_MODE={s['auth_mode']}")
# 0 keeps the driver on 127.0.0.1 like the nodes; with 1 (Linux's default) Ray swaps a loopback address
# for the machine's own and the driver looks for the GCS there
print("export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
print(f"export RAY_API_SERVER_ADDRESS={s['dashboard']}")  # the dashboard: Jobs API, clipline submit
if s["client"]:
    print(f"# Ray client: {s['client']}")
print(f"cluster/local.sh: {s['nodes']} nodes ({s['cpus_per_node']} CPU each) on 127.0.0.1, "
      f"dashboard {s['dashboard']}, auth {s['auth_mode']}", file=sys.stderr)
print(f"cluster/local.sh: nodes and submitted jobs run {s['python']}", file=sys.stderr)
EOF
  echo "cluster/local.sh: logs in $STATE_DIR; stop with: $0 stop --state-dir $STATE_DIR" >&2
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
