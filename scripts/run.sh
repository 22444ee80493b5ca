#!/usr/bin/env bash
# The main job on the embedded default, from nothing: sets up ./.venv, writes the bundled demo shards,
# starts a private local Ray cluster (loopback only, token auth on, free ports), submits the six-model
# ensemble with `ray job submit`, which trains, evaluates, registers and batch-evaluates it, stops the
# cluster and says where to look.
# Extra arguments go to the ensemble command (e.g. scripts/run.sh train.schedule.epochs=2).
# RAY_ADDRESS=http://HOST:8265 submits to that cluster instead of starting one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
t0=$(date +%s)
bash scripts/bootstrap.sh
export PATH="$ROOT/.venv/bin:$PATH"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}
DATA=${DATA:-$ROOT/data/digits}
STORAGE=${STORAGE:-$ROOT/runs}
t1=$(date +%s)

# 1. The bundled demo data: scikit-learn's 1,797 real 8x8 digits as WebDataset shards (skipped if present).
if [ ! -f "$DATA/manifest.json" ]; then
  python -m pipelines.shards write --source digits --out "$DATA"
fi

# 2. A private local Ray cluster on 127.0.0.1 and free ports: never another cluster's, never a fixed port
#    that something else holds. `ray start --head` turns token authentication on; the token
#    (~/.ray/auth_token, 0600 in a 0700 folder) is created when missing. All of it stops when this script
#    ends, fails, or gets Ctrl-C or SIGTERM (the traps), and when it is killed (--watch-pid: a watchdog).
OWN_CLUSTER=
if [ -z "${RAY_ADDRESS:-}" ]; then
  OWN_CLUSTER=1
  STATE=$(mktemp /tmp/resnet-ray-XXXXXX.json)
  SUBMIT_PID=
  stop_ray() {
    if [ -n "$SUBMIT_PID" ]; then kill "$SUBMIT_PID" 2>/dev/null || true; fi
    echo "run: stopping the local Ray cluster"
    python -m orchestrator.local_cluster stop --state "$STATE" || true
  }
  trap stop_ray EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  echo "run: starting a local Ray cluster"
  python -m orchestrator.local_cluster start --state "$STATE" --watch-pid $$ ${RAY_NUM_CPUS:+--num-cpus "$RAY_NUM_CPUS"}
  RAY_ADDRESS="http://127.0.0.1:$(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["dashboard_port"])' "$STATE")"
  export RAY_ADDRESS
fi
export RAY_AUTH_MODE=token

# 3. The job: the code travels to the cluster (not the venv, data or outputs); paths stay the user's.
#    With our own cluster the submission waits in the background: a signal to this script then stops the
#    cluster at once, instead of after the job (bash runs a trap only once its foreground command ends).
submit=(python -m orchestrator.submit -- ensemble "train.data.url=$DATA" "$@" --storage "$STORAGE")
if [ -n "$OWN_CLUSTER" ]; then
  "${submit[@]}" &
  SUBMIT_PID=$!
  wait "$SUBMIT_PID"
  SUBMIT_PID=
else
  "${submit[@]}"
fi
t2=$(date +%s)

echo
echo "run: set-up $((t1 - t0)) s, job $((t2 - t1)) s"
echo "Runs, metrics and the registered model 'resnet-ensemble' are in MLflow:"
echo "  $ROOT/.venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --port 5000   # then open http://127.0.0.1:5000"
echo "Checkpoints and test predictions (Parquet): $STORAGE"
