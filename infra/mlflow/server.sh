#!/usr/bin/env bash
# Start a shared MLflow tracking server (runs, registry, proxied artifacts) for the whole team or cluster.
#
#   infra/mlflow/server.sh                                       # sqlite + local artifacts, 127.0.0.1:5000
#   MLFLOW_AUTH=1 MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... \
#   MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@DB/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/mlflow \
#   MLFLOW_HOST=0.0.0.0 MLFLOW_SERVER_ALLOWED_HOSTS=mlflow.example.org infra/mlflow/server.sh
#
# Closed by default: a bind address other than loopback (127.0.0.0/8, ::1, localhost) needs MLFLOW_AUTH=1, because
# an open tracking server lets anyone on the network read, overwrite and delete runs, models and artifacts. The
# explicit opt-out SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW=1 starts it anyway, with a warning (e.g. behind an
# authenticating reverse proxy that is the only thing able to reach the port).
#
# Clients: MLFLOW_TRACKING_URI=http://HOST:PORT (with auth also MLFLOW_TRACKING_USERNAME/PASSWORD).
#
# Environment:
#   MLFLOW_BACKEND_STORE_URI      database of runs and models (default sqlite:///mlflow-server/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  artifact store behind the server's proxy (default ./mlflow-server/artifacts)
#   MLFLOW_HOST, MLFLOW_PORT      bind address (default 127.0.0.1 and 5000); MLFLOW_WORKERS (default 4)
#   MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_SERVER_CORS_ALLOWED_ORIGINS   read by mlflow itself: set them when the
#                                 server is reached under a public name (its default accepts localhost and
#                                 private addresses only)
#   MLFLOW_AUTH=1                 basic authentication (mlflow's basic-auth app; needs the mlflow[auth] extra). Then:
#     MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password (>= 12 characters), used when the user store is created
#     MLFLOW_FLASK_SERVER_SECRET_KEY  a static secret (CSRF protection), the same on every server replica
#     MLFLOW_AUTH_DATABASE_URI        user database (default sqlite:///mlflow-server/basic_auth.db)
#     MLFLOW_AUTH_CONFIG_PATH         use this ini file as it is instead of infra/mlflow/basic_auth.ini
#   MLFLOW_SERVER_DIR             where the defaults above and the rendered auth ini live (default ./mlflow-server)
#   SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW=1   serve a non-loopback address without authentication (warns)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
host=${MLFLOW_HOST:-127.0.0.1}

is_loopback() {
    case $1 in
        localhost | ::1 | \[::1\] | 127.*) return 0 ;;
    esac
    return 1
}
if ! is_loopback "$host" && [[ ${MLFLOW_AUTH:-0} != 1 ]]; then
    if [[ ${SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW:-0} != 1 ]]; then
        cat >&2 <<EOF
server.sh: refusing to serve MLFLOW_HOST=$host without authentication: anyone who reaches the port could read,
change and delete every run, model and artifact. Set MLFLOW_AUTH=1 (with MLFLOW_AUTH_ADMIN_PASSWORD and
MLFLOW_FLASK_SERVER_SECRET_KEY), or bind to 127.0.0.1, or, if something else authenticates every request in front
of this port, set SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW=1.
EOF
        exit 2
    fi
    echo "server.sh: WARNING: serving MLFLOW_HOST=$host WITHOUT AUTHENTICATION (SSLAM_ALLOW_UNAUTHENTICATED_MLFLOW=1):" \
        "anyone who reaches the port can read, change and delete every run, model and artifact" >&2
fi
server_dir=${MLFLOW_SERVER_DIR:-./mlflow-server}
backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///${server_dir#./}/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$server_dir/artifacts}

# Local stores need their folders; remote ones (postgresql://, s3://, ...) are left to the server.
sqlite_parent() {
    case $1 in
        sqlite:///*) dirname "${1#sqlite:///}" ;;
    esac
}
mkdir -p "$server_dir"
db_dir=$(sqlite_parent "$backend")
if [[ -n $db_dir ]]; then mkdir -p "$db_dir"; fi
if [[ $artifacts != *://* ]]; then mkdir -p "$artifacts"; fi

args=(
    server
    --backend-store-uri "$backend"
    --artifacts-destination "$artifacts"
    --serve-artifacts
    --host "$host"
    --port "${MLFLOW_PORT:-5000}"
    --workers "${MLFLOW_WORKERS:-4}"
)

if [[ ${MLFLOW_AUTH:-0} == 1 ]]; then
    admin_password=${MLFLOW_AUTH_ADMIN_PASSWORD:-}
    if (( ${#admin_password} < 12 )); then
        echo "server.sh: MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD (at least 12 characters)" >&2
        exit 2
    fi
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?MLFLOW_AUTH=1 needs MLFLOW_FLASK_SERVER_SECRET_KEY (a static random string)}"
    if [[ -z ${MLFLOW_AUTH_CONFIG_PATH:-} ]]; then
        # configparser does not expand variables: render the committed ini with the chosen user database.
        auth_database=${MLFLOW_AUTH_DATABASE_URI:-sqlite:///${server_dir#./}/basic_auth.db}
        rendered="$server_dir/basic_auth.ini"
        (umask 077 && AUTH_DATABASE_URI=$auth_database awk '
            /^database_uri *=/ { print "database_uri = " ENVIRON["AUTH_DATABASE_URI"]; next }
            { print }' "$here/basic_auth.ini" >"$rendered")
        auth_db_dir=$(sqlite_parent "$auth_database")
        if [[ -n $auth_db_dir ]]; then mkdir -p "$auth_db_dir"; fi
        export MLFLOW_AUTH_CONFIG_PATH=$rendered
    fi
    args+=(--app-name basic-auth)
fi

exec "${MLFLOW_BIN:-mlflow}" "${args[@]}"
