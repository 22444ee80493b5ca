#!/usr/bin/env bash
# Stops the local stack started by infra/local/up.sh: only its own processes (each service runs in
# its own session, recorded in .local-stack/pids/), never `ray stop`, which would also stop every
# other Ray cluster of this user on the machine. Data (MLflow database, tokens) stays; pass
# --purge to delete .local-stack/ as well. Safe to run when nothing is up.
set -euo pipefail
# shellcheck source=infra/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# All processes whose session id is $1 (the leader and everything it started that kept the session).
session_pids() { ps -eo pid=,sid= | awk -v s="$1" '$2 == s { print $1 }'; }
signal_session() {  # signal, sid
  local pid
  for pid in $(session_pids "$2"); do kill "-$1" "$pid" 2>/dev/null || true; done
}

stop_session() {  # name
  local pidfile=$STACK_DIR/pids/$1 sid pids start=$SECONDS termed=0 killed=0
  [ -f "$pidfile" ] || return 0
  sid=$(cat "$pidfile")
  # SIGTERM to the leader first: `ray start --block` then shuts its own node down in order.
  kill -TERM "$sid" 2>/dev/null || true
  # after 10 s, ask the whole session; after 30 s, insist; after 60 s, give up and say so.
  while [ -n "$(session_pids "$sid")" ] && ((SECONDS - start < 60)); do
    sleep 0.5
    if ((!termed && SECONDS - start >= 10)); then termed=1; signal_session TERM "$sid"; fi
    if ((!killed && SECONDS - start >= 30)); then killed=1; signal_session KILL "$sid"; fi
  done
  pids=$(session_pids "$sid")
  if [ -n "$pids" ]; then
    echo "local stack: $1 left processes: $pids" >&2
    return 1
  fi
  rm -f "$pidfile"
  echo "stopped $1"
}

rc=0
stop_session ray || rc=1
stop_session mlflow || rc=1
stop_session s3 || rc=1
# Ray's workers may leave their session; any process still holding the head's temp dir is ours.
if [ -d "$RAY_TMP" ]; then
  for pid in $(pgrep -f -- "$RAY_TMP/" || true); do kill -KILL "$pid" 2>/dev/null || true; done
fi
rm -f "$STACK_DIR/env.sh"
if [ "${1:-}" = --purge ]; then
  rm -rf "$STACK_DIR" "$RAY_TMP"
  echo "removed $STACK_DIR"
fi
exit "$rc"
