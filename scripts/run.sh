#!/usr/bin/env bash
# The main job on the embedded default, from nothing: sets up ./.venv, writes the bundled demo shards,
# starts a local Ray cluster (token auth on), submits the six-model ensemble with `ray job submit`,
# which trains, evaluates, registers and batch-evaluates it, then says where to look.
# Extra arguments go to the ensemble command (e.g. scripts/run.sh train.schedule.epochs=2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
bash scripts/bootstrap.sh
export PATH="$ROOT/.venv/bin:$PATH"

RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
export RAY_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
export RAY_AUTH_MODE=token  # `ray start --head` turns token auth on; clients present ~/.ray/auth_token
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}
DATA="$ROOT/data/digits"
STORAGE=${STORAGE:-$ROOT/runs}

# 1. The bundled demo data: scikit-learn's 1,797 real 8x8 digits as WebDataset shards (skipped if present).
if [ ! -f "$DATA/manifest.json" ]; then
  python -m pipelines.shards write --source digits --out "$DATA"
fi

# 2. A local Ray cluster, unless one already answers on this port (then it is reused and left running).
started=0
if ! ray job list >/dev/null 2>&1; then
  echo "run: starting a local Ray cluster (dashboard on 127.0.0.1:$DASHBOARD_PORT)"
  ray start --head --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --include-dashboard=true --disable-usage-stats >/dev/null
  started=1
  for _ in $(seq 60); do ray job list >/dev/null 2>&1 && break; sleep 1; done
fi
stop_ray() { if [ "$started" = 1 ]; then echo "run: stopping the local Ray cluster"; ray stop >/dev/null 2>&1 || true; fi; }
trap stop_ray EXIT

# 3. The job: the working folder travels to the cluster, without the venv, data and outputs.
RUNTIME_ENV=$(cat <<JSON
{"excludes": [".venv", ".git", "data", "runs", "mlruns", "mlartifacts", "mlflow.db", ".local-stack", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"],
 "env_vars": {"MLFLOW_TRACKING_URI": "$MLFLOW_TRACKING_URI"}}
JSON
)
ray job submit --working-dir . --runtime-env-json "$RUNTIME_ENV" -- \
  python -m orchestrator.run ensemble "train.data.url=$DATA" "$@" --storage "$STORAGE"

echo
echo "Runs, metrics and the registered model 'resnet-ensemble' are in MLflow:"
echo "  $ROOT/.venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --port 5000   # then open http://127.0.0.1:5000"
echo "Checkpoints and test predictions (Parquet): $STORAGE"
