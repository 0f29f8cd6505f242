#!/usr/bin/env bash
# The product on its built-in local cluster, on a fresh Debian 12 machine as root:
# installs what it needs, brings up the cluster and a hub (gateway mode, or
# `--mode xsede`), prints the URL; Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PREFIX=${XSEDEHUB_PREFIX:-/opt/xsedehub}
export XSEDEHUB_PREFIX=$PREFIX
exec "${XSEDEHUB_HUB_ENV:-$PREFIX/hub-env}/bin/xsedehub" demo "$@"
