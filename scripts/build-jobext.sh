#!/usr/bin/env bash
# Build the xsedehub-jobext wheel (jobext/): the prebuilt JupyterLab extension (npm
# registry: @jupyterlab/builder, pinned by jobext/js/package-lock.json) and the
# jupyter-server extension, for the job environment whose Python is $1; the wheel lands in
# $2/<source hash>/.  Needs Node.js >= 18 and the registries (npm, PyPI); nothing is built on
# a compute node.  Skips everything when the wheel for the same source and the same
# JupyterLab is there.  Prints the wheel's path.
#   bash scripts/build-jobext.sh /opt/xsedehub/job-env/bin/python /opt/xsedehub/wheels/jobext
set -euo pipefail
[ $# = 2 ] || { echo "usage: build-jobext.sh JOB_ENV_PYTHON OUTDIR" >&2; exit 2; }
py=$1
out=$2
src="$(cd "$(dirname "$0")/../jobext" && pwd)"
lab=$("$py" -c 'import jupyterlab; print(jupyterlab.__version__)')
core=$("$py" -c 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging"))')
# the sources that make the wheel, and the JupyterLab it is built against
hash=$(cd "$src" && { find pyproject.toml README.md jupyter-config xsedehub_jobext js/package.json \
    js/package-lock.json js/src js/style -type f -not -path 'xsedehub_jobext/labextension/*' \
    -not -name '*.pyc' | LC_ALL=C sort | xargs sha256sum; echo "jupyterlab $lab"; } \
    | sha256sum | cut -c1-16)
dest="$out/$hash"
if ls "$dest"/xsedehub_jobext-*.whl >/dev/null 2>&1; then
    ls "$dest"/xsedehub_jobext-*.whl
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# build in a copy: the source tree stays as it is (and may be read-only)
cp -r "$src/." "$work/"
rm -rf "$work/js/node_modules" "$work/xsedehub_jobext/labextension" "$work/build"
log="$work/build.log"
(cd "$work/js" && npm ci --silent --no-audit --no-fund --ignore-scripts \
    && node_modules/.bin/build-labextension --core-path "$core" .) >"$log" 2>&1 \
    || { cat "$log" >&2; exit 1; }
"$py" -m pip wheel -q --no-deps -w "$work/dist" "$work" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
mkdir -p "$dest"
cp "$work"/dist/xsedehub_jobext-*.whl "$dest/"
ls "$dest"/xsedehub_jobext-*.whl
