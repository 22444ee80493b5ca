#!/usr/bin/env bash
# Starts the cluster path on one machine, everything on loopback:
#   - a moto S3 endpoint (the artifact store; LOCAL_STACK_S3=0 keeps artifacts in a local folder),
#   - the MLflow tracking server (basic-auth when mlflow[auth] is installed; artifacts proxied),
#   - a Ray head node with token authentication and its dashboard / job API on 127.0.0.1.
# Idempotent: a service that is already up is left alone. State, secrets and logs: .local-stack/.
# Stop it with infra/local/down.sh. Ports: LOCAL_STACK_*_PORT (see infra/local/common.sh).
#
#   infra/local/up.sh && source .local-stack/env.sh
#   ray job submit --working-dir . -- python -m orchestrator.run --help
set -euo pipefail
# shellcheck source=infra/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

for exe in python ray mlflow; do
  [ -x "$VENV_BIN/$exe" ] || { echo "local stack: $VENV_BIN/$exe missing; run scripts/bootstrap.sh" >&2; exit 1; }
done
umask 077  # tokens, passwords, logs and the env file are readable by this user only
# Folders 0700 and secrets 0600 even when they were left by an older run with other modes.
private_dir "$STACK_DIR" "$STACK_DIR"/{ray,mlflow,s3,logs,pids} "$RAY_TMP"

new_secret() { "$VENV_BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
[ -s "$RAY_TOKEN" ] || new_secret >"$RAY_TOKEN"
chmod 600 "$RAY_TOKEN"

# ---- S3 (moto, in memory: artifacts last as long as the stack) ----
if [ "$WITH_S3" = 1 ]; then
  S3_URL=http://127.0.0.1:$S3_PORT
  # moto accepts any key; these dummies only keep boto3 from looking for real credentials.
  export AWS_ACCESS_KEY_ID=local-stack-dummy AWS_SECRET_ACCESS_KEY=local-stack-dummy
  export AWS_DEFAULT_REGION=us-east-1 AWS_ENDPOINT_URL=$S3_URL
  unset AWS_PROFILE AWS_SESSION_TOKEN
  if ! pid_alive "$STACK_DIR/pids/s3"; then
    setsid "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STACK_DIR/logs/s3.log" 2>&1 &
    echo $! >"$STACK_DIR/pids/s3"
  fi
  wait_for_port "$S3_PORT" "moto S3"
  "$VENV_BIN/python" - "$S3_BUCKET" <<'PY'
import sys, boto3
s3 = boto3.client("s3")
if sys.argv[1] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[1])
PY
  ARTIFACTS=s3://$S3_BUCKET/mlflow-artifacts
else
  ARTIFACTS=$STACK_DIR/mlflow/artifacts
fi

# ---- MLflow ----
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
auth_args=()
case "$MLFLOW_AUTH" in
  1 | auto)
    if "$VENV_BIN/python" -c 'import flask_wtf' 2>/dev/null; then
      MLFLOW_AUTH=1
    elif [ "$MLFLOW_AUTH" = 1 ]; then
      echo "local stack: LOCAL_STACK_MLFLOW_AUTH=1 needs Flask-WTF: pip install 'mlflow[auth]'" >&2; exit 1
    else
      MLFLOW_AUTH=0
      echo "local stack: mlflow[auth] not installed; MLflow runs WITHOUT authentication (loopback only)" >&2
    fi ;;
esac
if [ "$MLFLOW_AUTH" = 1 ]; then
  [ -s "$MLFLOW_PASSWORD_FILE" ] || new_secret >"$MLFLOW_PASSWORD_FILE"
  [ -s "$STACK_DIR/mlflow/flask_secret" ] || new_secret >"$STACK_DIR/mlflow/flask_secret"
  chmod 600 "$MLFLOW_PASSWORD_FILE" "$STACK_DIR/mlflow/flask_secret"
  cat >"$STACK_DIR/mlflow/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$STACK_DIR/mlflow/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  auth_args=(--app-name basic-auth)
fi
if ! pid_alive "$STACK_DIR/pids/mlflow"; then
  (
    if [ "$MLFLOW_AUTH" = 1 ]; then
      export MLFLOW_AUTH_CONFIG_PATH=$STACK_DIR/mlflow/basic_auth.ini
      MLFLOW_AUTH_ADMIN_PASSWORD=$(cat "$MLFLOW_PASSWORD_FILE")
      MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$STACK_DIR/mlflow/flask_secret")
      export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    fi
    exec setsid "$VENV_BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "sqlite:///$STACK_DIR/mlflow/mlflow.db" \
      --artifacts-destination "$ARTIFACTS" --serve-artifacts \
      --allowed-hosts "127.0.0.1:$MLFLOW_PORT,localhost:$MLFLOW_PORT" "${auth_args[@]}"
  ) >"$STACK_DIR/logs/mlflow.log" 2>&1 &
  echo $! >"$STACK_DIR/pids/mlflow"
fi

# ---- the environment a client (and every Ray job, which inherits it from the head) needs ----
{
  echo "# Written by infra/local/up.sh: source it to use the local stack."
  echo "export RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT"
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN_PATH=$RAY_TOKEN"
  # Ray turns 127.0.0.1 into the host's routable address unless this is 0 (ray/_private/services.py
  # resolve_ip_for_localhost); a driver that connects by GCS address needs it as the head does.
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
  echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
  if [ "$MLFLOW_AUTH" = 1 ]; then
    echo "export MLFLOW_TRACKING_USERNAME=admin"
    echo "export MLFLOW_TRACKING_PASSWORD=\"\$(cat $MLFLOW_PASSWORD_FILE)\""
  fi
  if [ "$WITH_S3" = 1 ]; then
    echo "export AWS_ENDPOINT_URL=$S3_URL AWS_DEFAULT_REGION=us-east-1"
    echo "export AWS_ACCESS_KEY_ID=local-stack-dummy AWS_SECRET_ACCESS_KEY=local-stack-dummy"
    echo "unset AWS_PROFILE AWS_SESSION_TOKEN"
  fi
} >"$ENV_FILE"

# ---- Ray head ----
# `--block` keeps one parent process that takes the whole head down on SIGTERM; setsid gives the
# head its own session, so down.sh stops exactly these processes and never another Ray on the host.
# Loopback only: `--node-ip-address 127.0.0.1` is kept as 127.0.0.1 only with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (from the env file), and then the GCS, the raylet (node and
# object manager), the dashboard agent (HTTP, gRPC, metrics export), the runtime-env agent, the Ray
# client server, the metrics endpoints of the dashboard and autoscaler, and every worker bind
# 127.0.0.1 (Ray checks is_localhost(node ip)); the side effect is that no other node can join,
# which a one-machine stack never wants. tests/test_infra.py checks every listening socket.
if ! pid_alive "$STACK_DIR/pids/ray"; then
  rm -rf "$STACK_DIR/logs/ray"
  (
    # shellcheck disable=SC1090
    source "$ENV_FILE"
    # Ray's own actors that look the cluster up (Ray Train's placement-group cleaner) must find this
    # one, not whichever other Ray runs on the host: its temp dir is not the default /tmp/ray.
    export RAY_ADDRESS=127.0.0.1:$RAY_GCS_PORT
    export PATH=$VENV_BIN:$PATH  # a job's `python` is the project's virtual environment
    exec setsid "$VENV_BIN/ray" start --head --block --disable-usage-stats \
      --node-ip-address 127.0.0.1 --port "$RAY_GCS_PORT" \
      --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" \
      --dashboard-agent-listen-port "$RAY_AGENT_PORT" --ray-client-server-port "$RAY_CLIENT_PORT" \
      --temp-dir "$RAY_TEMP_DIR"
  ) >"$STACK_DIR/logs/ray-head.log" 2>&1 &
  echo $! >"$STACK_DIR/pids/ray"
fi
# MLflow and Ray start side by side; wait for both.
wait_for_port "$MLFLOW_PORT" "MLflow"
wait_for_port "$RAY_DASHBOARD_PORT" "the Ray dashboard"
ln -sfn "$RAY_TEMP_DIR/session_latest/logs" "$STACK_DIR/logs/ray"
# The job API answers a little after the port opens; wait until it authenticates us.
deadline=$((SECONDS + STARTUP_TIMEOUT))
# shellcheck disable=SC1090
until (source "$ENV_FILE" && "$VENV_BIN/ray" job list >/dev/null 2>&1) || ((SECONDS > deadline)); do
  sleep 1
done
# shellcheck disable=SC1090
(source "$ENV_FILE" && "$VENV_BIN/ray" job list >/dev/null) ||
  { echo "local stack: the Ray job API does not answer (logs: $STACK_DIR/logs)" >&2; exit 1; }

cat <<EOF
local stack is up (state and logs in $STACK_DIR):
  Ray dashboard + jobs  http://127.0.0.1:$RAY_DASHBOARD_PORT   (token auth: $RAY_TOKEN)
  MLflow                $MLFLOW_URL   (auth: $([ "$MLFLOW_AUTH" = 1 ] && echo "admin / $MLFLOW_PASSWORD_FILE" || echo off))
  S3 (moto)             $([ "$WITH_S3" = 1 ] && echo "$S3_URL   bucket s3://$S3_BUCKET" || echo off)
Use it from this shell with:  source $ENV_FILE
EOF
sed -n '2,$p' "$ENV_FILE"
