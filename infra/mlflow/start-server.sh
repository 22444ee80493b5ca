#!/bin/sh
# Container entrypoint of the team MLflow server (Kubernetes and docker-compose).
# Every secret arrives as an environment variable (from a Secret or an env-file) and never touches
# the command line, where `ps` would show it:
#   MLFLOW_BACKEND_STORE_URI         postgresql://USER:PASSWORD@HOST:5432/mlflow  (read by `mlflow server`)
#   MLFLOW_AUTH_DATABASE_URI         the users/permissions database (same server, its own database)
#   MLFLOW_AUTH_ADMIN_PASSWORD       the admin's password on first start (ignored once the admin exists)
#   MLFLOW_FLASK_SERVER_SECRET_KEY   CSRF key, identical on every replica
# and the settings: MLFLOW_ARTIFACTS_DESTINATION (s3://BUCKET/prefix), MLFLOW_ALLOWED_HOSTS.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?}" "${MLFLOW_AUTH_DATABASE_URI:?}" "${MLFLOW_AUTH_ADMIN_PASSWORD:?}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}" "${MLFLOW_ARTIFACTS_DESTINATION:?}" "${MLFLOW_ALLOWED_HOSTS:?}"
umask 077
ini=$(mktemp)
cat >"$ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$ini"
exec mlflow server \
  --host "${MLFLOW_BIND_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --app-name basic-auth --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
