#!/bin/sh
# Start `mlflow server "$@"` after writing its basic-auth config.
#
# MLflow reads the auth database URI only from an ini file, and that URI carries the database
# password, so the ini is rendered from the environment at start instead of being baked into
# the image. server/stack.py renders the same template the same way (string.Template).
set -eu
umask 077
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/basic_auth.ini}"
template="${MLFLOW_AUTH_CONFIG_TEMPLATE:-/etc/mlflow/basic_auth.ini.template}"
python - "$template" "$MLFLOW_AUTH_CONFIG_PATH" <<'PY'
import os, string, sys
src, dst = sys.argv[1:3]
with open(src) as f:
    text = string.Template(f.read()).substitute(os.environ)
with open(dst, "w") as f:
    f.write(text)
PY
exec mlflow server "$@"
