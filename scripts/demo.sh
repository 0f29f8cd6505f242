#!/usr/bin/env bash
# The product on its built-in local cluster, on a fresh Debian 12 machine as root:
# installs what it needs, brings up the cluster and a hub in gateway mode, prints the URL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${XSEDEHUB_HUB_ENV:-/opt/xsedehub/hub-env}/bin/xsedehub" demo "$@"
