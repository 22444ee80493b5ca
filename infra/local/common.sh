# Shared by up.sh / down.sh / env.sh: where the local stack lives and which loopback ports it uses.
# Every setting can be overridden from the environment, so two stacks (or a test) never collide.
# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this file

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STACK_DIR=${LOCAL_STACK_DIR:-$REPO_ROOT/.local-stack}
VENV_BIN=${LOCAL_STACK_VENV_BIN:-$REPO_ROOT/.venv/bin}

RAY_GCS_PORT=${LOCAL_STACK_RAY_PORT:-6379}
RAY_DASHBOARD_PORT=${LOCAL_STACK_DASHBOARD_PORT:-8265}
RAY_CLIENT_PORT=${LOCAL_STACK_RAY_CLIENT_PORT:-10001}
RAY_AGENT_PORT=${LOCAL_STACK_DASHBOARD_AGENT_PORT:-52365}
MLFLOW_PORT=${LOCAL_STACK_MLFLOW_PORT:-5000}
S3_PORT=${LOCAL_STACK_S3_PORT:-5001}
# 1: a moto S3 endpoint on loopback holds MLflow's artifacts; 0: a local folder does.
WITH_S3=${LOCAL_STACK_S3:-1}
S3_BUCKET=${LOCAL_STACK_S3_BUCKET:-local-stack}
# auto: basic-auth when Flask-WTF (mlflow[auth]) is installed; 1: require it; 0: off (loopback only).
MLFLOW_AUTH=${LOCAL_STACK_MLFLOW_AUTH:-auto}

# Ray's sockets live under its temp dir, and a unix socket path must stay under 108 bytes, so the
# temp dir is short and outside the checkout; logs are linked back into $STACK_DIR/logs.
# RAY_TMP is ours, mode 0700; Ray's --temp-dir is a folder inside it, because Ray makes its temp,
# session and log folders 0777 (ray/_common/utils.py try_make_directory_shared) whatever the umask.
RAY_TMP=${LOCAL_STACK_RAY_TMP:-/tmp/ray-stack-$(id -u)-$RAY_GCS_PORT}
RAY_TEMP_DIR=$RAY_TMP/ray

RAY_TOKEN=$STACK_DIR/ray/auth_token
MLFLOW_PASSWORD_FILE=$STACK_DIR/mlflow/admin_password
ENV_FILE=$STACK_DIR/env.sh

# A private folder: created 0700, or an existing one of ours made 0700; someone else's is an error.
private_dir() {  # path...
  local d
  for d in "$@"; do
    mkdir -p "$d"
    [ -O "$d" ] || { echo "local stack: $d belongs to another user; set LOCAL_STACK_DIR / LOCAL_STACK_RAY_TMP" >&2; return 1; }
    chmod 700 "$d"
  done
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# How long each service may take to come up; generous, a loaded 2-core machine needs minutes.
STARTUP_TIMEOUT=${LOCAL_STACK_TIMEOUT:-300}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {  # port, what
  local deadline=$((SECONDS + STARTUP_TIMEOUT))
  until port_open "$1"; do
    if ((SECONDS > deadline)); then
      echo "local stack: $2 did not open 127.0.0.1:$1 within $STARTUP_TIMEOUT s (logs: $STACK_DIR/logs)" >&2
      return 1
    fi
    sleep 0.5
  done
}
