#!/usr/bin/env bash
# The shared MLflow tracking server for alexnet-ray: runs, metrics and (proxied) artifacts.
#
#   infra/mlflow/serve.sh                       # 127.0.0.1:5000, SQLite + ./mlartifacts
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASS@db:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow infra/mlflow/serve.sh
#
# Bound to loopback by default: nothing but this machine (or an SSH tunnel) reaches it. Binding any
# other address needs MLFLOW_ALLOWED_HOSTS (the Host headers the server answers, against DNS
# rebinding) and either MLFLOW_AUTH=basic (MLflow's basic-auth app, `pip install 'mlflow[auth]'`)
# or MLFLOW_NO_AUTH_I_AM_ON_A_PRIVATE_NETWORK=1. See infra/mlflow/README.md.
# Extra arguments go to `mlflow server` unchanged.
set -euo pipefail

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow-server.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
workers="${MLFLOW_WORKERS:-2}"
args=(--host "$host" --port "$port" --backend-store-uri "$backend"
      --serve-artifacts --artifacts-destination "$artifacts" --workers "$workers")

case "$host" in
  127.*|localhost|::1) ;;
  *)
    if [[ -z "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
      echo "error: MLFLOW_HOST=$host exposes the server beyond this machine; set MLFLOW_ALLOWED_HOSTS" \
           "(comma-separated host names clients use) as well (infra/mlflow/README.md)" >&2
      exit 2
    fi
    if [[ "${MLFLOW_AUTH:-}" != "basic" && "${MLFLOW_NO_AUTH_I_AM_ON_A_PRIVATE_NETWORK:-}" != "1" ]]; then
      echo "error: MLFLOW_HOST=$host without authentication; set MLFLOW_AUTH=basic, or" \
           "MLFLOW_NO_AUTH_I_AM_ON_A_PRIVATE_NETWORK=1 if only a private network reaches it" >&2
      exit 2
    fi
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
    ;;
esac
if [[ "${MLFLOW_AUTH:-}" == "basic" ]]; then
  args+=(--app-name basic-auth)
fi

# the backend URI may hold a password: name only its scheme
echo "mlflow server on http://$host:$port (backend ${backend%%:*}, artifacts $artifacts)" >&2
exec "${MLFLOW:-mlflow}" server "${args[@]}" "$@"
