#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: install, lint, real
# local cluster, every test.  Safe to run again on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
ENV=${XSEDEHUB_HUB_ENV:-/opt/xsedehub/hub-env}
echo "[test] ruff"
"$ENV/bin/ruff" check .
"$ENV/bin/ruff" format --check .
echo "[test] local cluster"
"$ENV/bin/xsedehub" cluster up
trap '"$ENV/bin/xsedehub" cluster down' EXIT
echo "[test] pytest"
"$ENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
