#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: install, lint, real
# local cluster, every test.  Safe to run again on the same machine.
# With CI=true (as .ci/run is run) the install starts from a clean state of everything
# the project owns (scripts/install.sh removes /opt/xsedehub and /var/lib/xsedehub).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not cluster"`.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
bash scripts/install.sh
PREFIX=${XSEDEHUB_PREFIX:-/opt/xsedehub}
ENV=${XSEDEHUB_HUB_ENV:-$PREFIX/hub-env}
export XSEDEHUB_PREFIX=$PREFIX
echo "[test] ruff"
"$ENV/bin/ruff" check .
"$ENV/bin/ruff" format --check .
echo "[test] local cluster"
"$ENV/bin/xsedehub" cluster up
trap '"$ENV/bin/xsedehub" cluster down' EXIT
echo "[test] pytest"
"$ENV/bin/python" -m pytest -q -p no:cacheprovider -rfE --durations=25 "$@"
echo "[test] install, lint and tests took $(( $(date +%s) - t0 ))s"
