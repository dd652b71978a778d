#!/usr/bin/env bash
# deploy/down.sh: stop what deploy/up.sh started, as recorded in its state dir, and nothing else.
#
#   1. the osd Serve app: `serve shutdown` on the Ray head up.sh started (replicas and the
#      trainer exit cleanly and flush their records), or, when up.sh joined an existing
#      cluster, only the osd application is deleted from it;
#   2. the Ray head, only if up.sh started it: the processes of the session up.sh created for
#      `ray start` (raylet first, then the rest, the GCS last; SIGTERM, SIGKILL after a grace
#      period), never `ray stop`, which kills every Ray process on the machine;
#   3. the embedded redis-server, by its recorded pid: SHUTDOWN (fsyncs the AOF), then signals.
#
# Idempotent: with nothing recorded it says so and exits 0. Logs, the Redis data dir and the
# draft registry stay in the state dir.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY="$REPO/deploy"
STATE_DIR="${OSD_STATE_DIR:-$REPO/.osd/run}"
GRACE=10  # seconds per stage before SIGKILL

while [[ $# -gt 0 ]]; do
  case "$1" in
    --state-dir) [[ $# -ge 2 ]] || { echo "down.sh: --state-dir needs a value" >&2; exit 2; }; STATE_DIR="$2"; shift 2 ;;
    --grace)     [[ $# -ge 2 ]] || { echo "down.sh: --grace needs a value" >&2; exit 2; }; GRACE="$2"; shift 2 ;;
    -h|--help)
      echo "usage: deploy/down.sh [--state-dir DIR (default .osd/run)] [--grace SECONDS per stage (default 10)]"
      exit 0 ;;
    *) echo "down.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

RECORD="$STATE_DIR/up.env"
if [[ ! -f "$RECORD" ]]; then
  echo "down.sh: nothing recorded in $STATE_DIR: nothing to stop."
  exit 0
fi
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
RECORD="$STATE_DIR/up.env"
exec 9>"$STATE_DIR/.lock"
flock -w 30 9 || { echo "down.sh: another up.sh or down.sh holds $STATE_DIR/.lock" >&2; exit 1; }

BIN="${OSD_BIN:-}"
if [[ -z "$BIN" && -x "$REPO/.venv/bin/python" ]]; then BIN="$REPO/.venv/bin"; fi
tool() { if [[ -n "$BIN" ]]; then echo "$BIN/$1"; else command -v "$1" || echo "$1"; fi; }
PY="$(tool python)"; SERVE="$(tool serve)"
helper() { "$PY" "$DEPLOY/helpers.py" "$@"; }

# The records: shell-quoted KEY=VALUE lines written by up.sh (and only by it).
STARTED_RAY=0; RAY_SID=""; RAY_TEMP_DIR=""; DASHBOARD_URL=""; JOIN_ADDRESS=""
APP_NAME=""; SERVE_DEPLOYED=0; REDIS_STARTED=0; REDIS_PID=""; REDIS_PID_START=""; REDIS_PORT=""
_state_dir="$STATE_DIR"
# shellcheck disable=SC1090
source "$RECORD"
STATE_DIR="$_state_dir"
# The Ray CLI must send the token up.sh's head was started with (see up.sh).
RAY_AUTH_MODE="${RAY_AUTH_MODE:-}"; RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-}"
[[ -n "$RAY_AUTH_MODE" ]] && export RAY_AUTH_MODE
[[ -n "$RAY_AUTH_TOKEN_PATH" ]] && export RAY_AUTH_TOKEN_PATH

# -- process helpers ---------------------------------------------------------------------------

starttime() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'; }
# Running = exists and is not a zombie waiting to be reaped.
running() {
  local state
  state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [[ -n "$state" && "$state" != Z ]]
}
# Is pid $1 still the process that started at clock tick $2?
same_process() { [[ -n "$2" ]] && running "$1" && [[ "$(starttime "$1")" == "$2" ]]; }

# SIGTERM the given pids, wait up to GRACE seconds, SIGKILL what is left. Each pid is
# paired with its start time first, so a pid that exits and is reused meanwhile is never
# signalled again.
term_then_kill() {
  (( $# )) || return 0
  local procs=() p st i
  for p in "$@"; do st="$(starttime "$p")" && [[ -n "$st" ]] && procs+=("$p:$st"); done
  (( ${#procs[@]} )) || return 0
  for p in "${procs[@]}"; do kill -TERM "${p%%:*}" 2>/dev/null || true; done
  for (( i = 0; i < GRACE * 5; i++ )); do
    local still=()
    for p in "${procs[@]}"; do same_process "${p%%:*}" "${p##*:}" && still+=("$p"); done
    (( ${#still[@]} )) || return 0
    procs=("${still[@]}")
    sleep 0.2
  done
  echo "  SIGKILL after ${GRACE}s: ${procs[*]%%:*}"
  for p in "${procs[@]}"; do same_process "${p%%:*}" "${p##*:}" && { kill -KILL "${p%%:*}" 2>/dev/null || true; }; done
  sleep 0.5
}

# -- 1. the Serve app --------------------------------------------------------------------------

# Processes of the Ray session up.sh created: "pid comm" lines.
session_members() { ps -eo pid=,sid=,comm= | awk -v s="$RAY_SID" '$2 == s {print $1, $3}'; }

# The session is ours while a head process recorded by up.sh is still that process, or a
# member's command line names our Ray temp dir (covers a start that failed before the
# recording). A session id cannot be reused while any of its processes lives, so then every
# member descends from our `ray start`.
ray_session_is_ours() {
  [[ "$STARTED_RAY" == 1 && -n "$RAY_SID" ]] || return 1
  if [[ -f "$STATE_DIR/ray.pids" ]]; then
    local pid st comm
    while read -r pid st comm; do
      same_process "$pid" "$st" && return 0
    done <"$STATE_DIR/ray.pids"
  fi
  if [[ -n "$RAY_TEMP_DIR" ]]; then
    local pid comm
    while read -r pid comm; do
      tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$RAY_TEMP_DIR" && return 0
    done < <(session_members)
  fi
  return 1
}

if [[ "$SERVE_DEPLOYED" == 1 && -n "$APP_NAME" ]]; then
  if [[ "$STARTED_RAY" == 1 ]]; then
    if ray_session_is_ours && helper dashboard-wait "$DASHBOARD_URL" --timeout 3; then
      echo "Serve: shutting down on our Ray head ($DASHBOARD_URL)"
      if timeout 90 "$SERVE" shutdown -y --address "$DASHBOARD_URL" >"$STATE_DIR/logs/serve-shutdown.log" 2>&1; then
        # `serve shutdown` only asks; give the replicas and the trainer (actors in our
        # session) time to run their shutdown (records flushed to Redis or the spool).
        for (( i = 0; i < 60; i++ )); do
          grep -qE ' ray::(Serve|Proxy|Trainer)' <<<"$(session_members)" || break
          sleep 0.5
        done
      else
        echo "  serve shutdown failed (see $STATE_DIR/logs/serve-shutdown.log); the Ray session is stopped below anyway"
      fi
    fi
  elif [[ -n "$JOIN_ADDRESS" ]]; then
    # Not our cluster: remove only our application, leave Serve and everything else running.
    echo "Serve: deleting application '$APP_NAME' from the cluster at $JOIN_ADDRESS"
    timeout 90 "$PY" "$DEPLOY/helpers.py" serve-delete "$JOIN_ADDRESS" "$APP_NAME" \
      >"$STATE_DIR/logs/serve-delete.log" 2>&1 \
      || echo "  could not delete '$APP_NAME' (see $STATE_DIR/logs/serve-delete.log)"
  fi
fi

# -- 2. the Ray head ---------------------------------------------------------------------------

FAILED=0
if [[ "$STARTED_RAY" == 1 ]]; then
  if ray_session_is_ours; then
    echo "Ray: stopping the head up.sh started (session $RAY_SID: $(session_members | wc -l) processes)"
    # Ray's own order (as `ray stop`): the raylet first (it takes its workers with it), then
    # the dashboard, agents and monitors, the GCS last so the others don't see it vanish.
    # shellcheck disable=SC2046
    term_then_kill $(session_members | awk '$2 == "raylet" {print $1}')
    # shellcheck disable=SC2046
    term_then_kill $(session_members | awk '$2 != "gcs_server" {print $1}')
    # shellcheck disable=SC2046
    term_then_kill $(session_members | awk '{print $1}')
    left="$(session_members | awk '{print $1}' | while read -r p; do running "$p" && echo "$p"; done || true)"
    if [[ -n "$left" ]]; then
      echo "  still running in session $RAY_SID: $(echo $left)" >&2
      FAILED=1
    fi
  else
    echo "Ray: the head up.sh started (session $RAY_SID) is already gone"
  fi
elif [[ -n "$JOIN_ADDRESS" ]]; then
  echo "Ray: the cluster at $JOIN_ADDRESS was not started by up.sh; left running"
fi

# -- 3. the embedded Redis ---------------------------------------------------------------------

if [[ "$REDIS_STARTED" == 1 && -n "$REDIS_PID" ]]; then
  is_our_redis() {
    running "$REDIS_PID" || return 1
    [[ -z "$REDIS_PID_START" || "$(starttime "$REDIS_PID")" == "$REDIS_PID_START" ]] || return 1
    tr '\0' ' ' <"/proc/$REDIS_PID/cmdline" 2>/dev/null | grep -q "redis-server.*:$REDIS_PORT"
  }
  if is_our_redis; then
    echo "Redis: SHUTDOWN of the embedded redis-server (pid $REDIS_PID, port $REDIS_PORT)"
    timeout 20 "$PY" "$DEPLOY/helpers.py" redis-shutdown "$REDIS_PORT" || true
    for (( i = 0; i < 50; i++ )); do is_our_redis || break; sleep 0.2; done
    if is_our_redis; then
      echo "  still running after SHUTDOWN: SIGTERM"
      term_then_kill "$REDIS_PID"
    fi
    if is_our_redis; then echo "  redis-server $REDIS_PID is still running" >&2; FAILED=1; fi
  else
    echo "Redis: the embedded redis-server (pid $REDIS_PID) is already gone"
  fi
fi

# -- done --------------------------------------------------------------------------------------

if [[ $FAILED == 1 ]]; then
  echo "down.sh: some processes did not stop; records kept in $RECORD (run down.sh again)" >&2
  exit 1
fi
mkdir -p "$STATE_DIR/logs"
mv -f "$RECORD" "$STATE_DIR/logs/last-up.env"
[[ -f "$STATE_DIR/ray.pids" ]] && mv -f "$STATE_DIR/ray.pids" "$STATE_DIR/logs/last-ray.pids"
rm -f "$STATE_DIR/redis.pid"
echo "down.sh: stopped. Logs, Redis data and the draft registry remain in $STATE_DIR."
