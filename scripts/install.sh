#!/usr/bin/env bash
# Install what xsedehub's demo and tests need on Debian 12 / Ubuntu, as root. Idempotent.
#   /opt/xsedehub/hub-env   the hub's Python environment (system Python, world-readable)
# The local cluster (`xsedehub cluster up`) installs SLURM, munge and OpenSSH itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ENV=${XSEDEHUB_HUB_ENV:-/opt/xsedehub/hub-env}
export DEBIAN_FRONTEND=noninteractive

pkgs=(python3 python3-venv python3-dev git iproute2 util-linux procps ca-certificates curl)
command -v npm >/dev/null || pkgs+=(nodejs npm)
pkgs+=(chromium)   # the browser tests drive Debian's chromium (no browser download)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[install] apt-get install ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$ENV/bin/python" ]; then
    echo "[install] creating $ENV"
    mkdir -p "$(dirname "$ENV")"
    /usr/bin/python3 -m venv "$ENV"
fi
log=$(mktemp)
pipi() { "$ENV/bin/python" -m pip install -q "$@" >"$log" 2>&1 || { cat "$log"; exit 1; }; }
pipi --upgrade pip
echo "[install] pip install -e .[test,docs] into $ENV"
pipi -e ".[test,docs]"
rm -f "$log"
"$ENV/bin/python" -c "import xsedehub.spawner.spawner, xsedehub.auth.github"
chmod -R a+rX "$(dirname "$ENV")"
