#!/usr/bin/env bash
# Install everything xsedehub's demo and tests need, on Debian 12 / Ubuntu, as root.
# Idempotent: a second run checks each piece and installs only what is missing.
# Runs in the host's network namespace, where the package registries are reachable;
# nothing is downloaded later (the demo and the tests run inside namespaces with no
# route out, and stop at once, naming the missing piece, if something is not here).
#   Debian packages     python3-venv, git, iproute2, chromium, nodejs/npm, SLURM, munge, OpenSSH,
#                       bubblewrap
#   $PREFIX/hub-env     the hub's Python environment (system Python, world-readable),
#                       with this package editable and its test and docs extras
#   $PREFIX/chp         configurable-http-proxy (npm, pinned)
#   $PREFIX/job-env     the environment batch jobs run (jupyterhub = the hub's, jupyterlab,
#                       nbgitpuller, xsedehub-jobext), built by `xsedehub cluster install`
#   $PREFIX/wheels/jobext  the xsedehub-jobext wheel (scripts/build-jobext.sh: npm registry,
#                       skipped when built for the same sources), installed into job-env
#   $PREFIX/wheels/tljh The Littlest JupyterHub (from its source snapshot, default
#                       ../shared/vendor/the-littlest-jupyterhub-*.tar.gz, or
#                       $XSEDEHUB_TLJH_SOURCE), its hub environment and xsedehub's
#                       requirements as wheels, for the TLJH test's offline install; and
#                       $PREFIX/job-env-tljh, a job environment with TLJH's JupyterHub.
#                       Only when the snapshot is there (python -m xsedehub.testbed.localtljh)
# With CI=true (or XSEDEHUB_CLEAN=1) everything under $PREFIX is removed first, so a run
# cannot pass on what an earlier run or a hand install left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
PREFIX=${XSEDEHUB_PREFIX:-/opt/xsedehub}
ENV=${XSEDEHUB_HUB_ENV:-$PREFIX/hub-env}
CHP_VERSION=4.6.3   # configurable-http-proxy; 4.6 runs on Debian 12's Node.js 18 and on 20+
export DEBIAN_FRONTEND=noninteractive
t0=$(date +%s)

if [ "${CI:-}" = true ] || [ "${XSEDEHUB_CLEAN:-}" = 1 ]; then
    echo "[install] clean state: removing $PREFIX and the local cluster's state"
    if [ -x "$ENV/bin/xsedehub" ]; then "$ENV/bin/xsedehub" cluster down >/dev/null 2>&1 || true; fi
    # what `cluster down` could not stop (its environment no longer runs: an editable
    # install whose checkout is gone): the daemons named by the pid files of the state
    # about to go, each checked to be one of the cluster's daemons before it is ended
    if [ -d /var/lib/xsedehub ]; then
        while IFS= read -r f; do
            pid=$(head -c 16 "$f" | tr -dc 0-9)
            [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || continue
            if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE '(^|/| )(slurmctld|slurmd|munged|sshd)( |:|$)'; then
                kill "$pid" 2>/dev/null || true
            fi
        done < <(find /var/lib/xsedehub -name '*.pid' -type f 2>/dev/null)
        sleep 1
    fi
    for ns in xh-hub xh-cluster xh-cluster2; do ip netns del "$ns" 2>/dev/null || true; done
    # the second cluster's mount namespace (a bind mount on a file in a private mount)
    umount /run/xsedehub-mntns/xh-cluster2 2>/dev/null || true
    umount /run/xsedehub-mntns 2>/dev/null || true
    rm -rf "$PREFIX" /var/lib/xsedehub
fi

pkgs=(python3 python3-venv python3-dev git iproute2 util-linux procps ca-certificates curl)
command -v npm >/dev/null || pkgs+=(nodejs npm)
pkgs+=(chromium)   # the browser tests drive Debian's chromium (no browser download)
# the local cluster (xsedehub/localcluster.py APT_PACKAGES checks the same list)
pkgs+=(slurm-wlm munge openssh-server openssh-client)
pkgs+=(bubblewrap)  # the attendee sandbox of gateway-mode jobs (SlurmSSHSpawner.sandbox)
pkgs+=(sudo)  # the local cluster's site command extending a job's walltime
pkgs+=(postgresql)  # benchmarks/scale.py starts its own PostgreSQL for the hub's database
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
trap 'rm -f "$log"' EXIT
pipi() { "$ENV/bin/python" -m pip install -q "$@" >"$log" 2>&1 || { cat "$log"; exit 1; }; }
pipi --upgrade pip
echo "[install] pip install -e .[test,docs,bench] into $ENV"
pipi -e ".[test,docs,bench]"
"$ENV/bin/python" -c "import xsedehub.spawner.spawner, xsedehub.auth.github"

chp_have=$(cat "$PREFIX/chp/node_modules/configurable-http-proxy/package.json" 2>/dev/null \
    | "$ENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["version"])' 2>/dev/null || true)
if [ "$chp_have" != "$CHP_VERSION" ]; then
    echo "[install] npm install configurable-http-proxy@$CHP_VERSION into $PREFIX/chp"
    mkdir -p "$PREFIX/chp"
    npm install --silent --no-audit --no-fund --prefix "$PREFIX/chp" \
        "configurable-http-proxy@$CHP_VERSION" >"$log" 2>&1 || { cat "$log"; exit 1; }
fi
"$PREFIX/chp/node_modules/.bin/configurable-http-proxy" --version >/dev/null

# the cluster's own pieces (same checks `xsedehub cluster up` makes before it starts)
XSEDEHUB_JOB_ENV=${XSEDEHUB_JOB_ENV:-$PREFIX/job-env} "$ENV/bin/xsedehub" cluster install
# The Littlest JupyterHub's pieces for tests/test_tljh.py (skipped there without the source)
"$ENV/bin/python" -m xsedehub.testbed.localtljh install >"$log" 2>&1 || { cat "$log"; exit 1; }
grep '^\[' "$log" || true
chmod -R a+rX "$PREFIX"
echo "[install] done in $(( $(date +%s) - t0 ))s"
