#!/usr/bin/env bash
# The shared MLflow tracking server for alexnet-ray: runs, metrics and (proxied) artifacts.
#
#   infra/mlflow/serve.sh                       # 127.0.0.1:5000, SQLite + ./mlartifacts
#   set -a; . /etc/alexnet-ray/mlflow.env; set +a   # MLFLOW_BACKEND_STORE_URI=postgresql://... (mode 600)
#   MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/mlflow infra/mlflow/serve.sh
#
# The backend URI may hold a password: it stays in the environment, where `mlflow server` reads it
# (MLFLOW_BACKEND_STORE_URI), and never goes on a command line that `ps` shows to every user.
#
# Bound to loopback by default: nothing but this machine (or an SSH tunnel) reaches it. Binding any
# other address needs MLFLOW_ALLOWED_HOSTS (the Host headers the server answers, against DNS
# rebinding) and either MLFLOW_AUTH=basic (MLflow's basic-auth app, `pip install 'mlflow[auth]'`)
# or MLFLOW_NO_AUTH_I_AM_ON_A_PRIVATE_NETWORK=1. See infra/mlflow/README.md.
# Extra arguments go to `mlflow server` unchanged.
set -euo pipefail

host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow-server.db}"
export MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
workers="${MLFLOW_WORKERS:-2}"
args=(--host "$host" --port "$port" --serve-artifacts --workers "$workers")

# loopback means an IP literal in 127.0.0.0/8 or ::1; a name (even `localhost` or 127.example.com)
# resolves to whatever DNS or /etc/hosts says, so it counts as exposed
octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
if [[ "$host" =~ ^127\.$octet\.$octet\.$octet$ || "$host" == "::1" ]]; then
  :
else
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
fi
if [[ "${MLFLOW_AUTH:-}" == "basic" ]]; then
  # the auth app creates its admin from MLFLOW_AUTH_ADMIN_PASSWORD on first start; never a known one
  case "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" in
    "")
      echo "error: MLFLOW_AUTH=basic needs MLFLOW_AUTH_ADMIN_PASSWORD (from a secret, in the environment)" >&2
      exit 2 ;;
    password1234|password|admin|changeme)
      echo "error: MLFLOW_AUTH_ADMIN_PASSWORD is a well-known default; choose another one" >&2
      exit 2 ;;
  esac
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then  # CSRF protection of the auth app: one key for all workers
    echo "error: MLFLOW_AUTH=basic needs MLFLOW_FLASK_SERVER_SECRET_KEY (a random secret, from a secret store)" >&2
    exit 2
  fi
  # its user store: MLFLOW_AUTH_DATABASE_URI (a database URI may hold a password too, so it goes into a
  # config file only this user reads, named by MLFLOW_AUTH_CONFIG_PATH), default ./basic_auth.db
  conf="$(umask 077 && mktemp -d)/basic_auth.ini"
  (umask 077 && printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = %s\n%s\n' \
     "${MLFLOW_AUTH_DATABASE_URI:-sqlite:///basic_auth.db}" "${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" \
     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth" > "$conf")
  export MLFLOW_AUTH_CONFIG_PATH="$conf"
  args+=(--app-name basic-auth)
fi

# name only the backend's scheme: the URI may hold a password
echo "mlflow server on http://$host:$port (backend ${MLFLOW_BACKEND_STORE_URI%%:*}," \
     "artifacts $MLFLOW_ARTIFACTS_DESTINATION)" >&2
exec "${MLFLOW:-mlflow}" server "${args[@]}" "$@"
