"""The Littlest JupyterHub for the local cluster's tests: its pieces, fetched ahead.

TLJH is not on PyPI; a source snapshot of it is in ``shared/vendor`` next to the
repository (``XSEDEHUB_TLJH_SOURCE`` names another).  ``scripts/install.sh`` runs
``python -m xsedehub.testbed.localtljh install`` in the host's namespace, where PyPI is
reachable: it builds a wheelhouse with TLJH's package, the hub environment TLJH's
installer would install (``tljh/requirements-hub-env.txt``), xsedehub's requirements and
the build tools, and a job environment with TLJH's JupyterHub version.  The TLJH test
then installs everything from that wheelhouse with ``pip --no-index``: nothing is
downloaded at test time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from .clusterconf import PREFIX
from .localcluster import INSTALL_HINT, ensure_job_env, job_env_problem

REPO = Path(__file__).resolve().parents[2]  # xsedehub/testbed/ -> the repository
SNAPSHOT_NAME = "the-littlest-jupyterhub-84ed38fd1f7c.tar.gz"
WHEELHOUSE = PREFIX / "wheels" / "tljh"
JOB_ENV = PREFIX / "job-env-tljh"
#: how to get TLJH's source where it is missing (README, skip reasons)
SOURCE_HINT = (
    "TLJH is not on PyPI: put its source snapshot at ../shared/vendor/"
    f"{SNAPSHOT_NAME} next to the repository, or a tarball of "
    "https://github.com/jupyterhub/the-littlest-jupyterhub (git archive --format=tar.gz "
    "--prefix=the-littlest-jupyterhub/ 84ed38fd1f7c) anywhere with XSEDEHUB_TLJH_SOURCE "
    "naming it, then run scripts/install.sh"
)


def source() -> Path:
    """TLJH's source snapshot (it may not exist)."""
    env = os.environ.get("XSEDEHUB_TLJH_SOURCE")
    return Path(env) if env else REPO.parent / "shared" / "vendor" / SNAPSHOT_NAME


def _member(snapshot: Path, name: str) -> str:
    with tarfile.open(snapshot) as tar:
        for m in tar.getmembers():
            if m.name.endswith(f"/{name}") and m.name.count("/") == name.count("/") + 1:
                f = tar.extractfile(m)
                if f is not None:
                    return f.read().decode()
    raise FileNotFoundError(f"{snapshot} has no {name}")


def hub_requirements(snapshot: Path) -> list[str]:
    """What TLJH's installer pip-installs into its hub environment."""
    text = _member(snapshot, "tljh/requirements-hub-env.txt")
    return [ln.split("#")[0].strip() for ln in text.splitlines() if ln.split("#")[0].strip()]


def plugin_requirements() -> list[str]:
    """xsedehub's own requirements (the plugin's tljh_extra_hub_pip_packages and more)."""
    return [r for r in metadata.requires("xsedehub") or [] if "extra ==" not in r]


#: to build TLJH's sdist and xsedehub offline (PEP 639 license needs setuptools 77)
BUILD_TOOLS = ["setuptools>=77", "wheel"]


def _stamp(snapshot: Path) -> str:
    h = hashlib.sha256(snapshot.read_bytes())
    for r in [*hub_requirements(snapshot), *plugin_requirements(), *BUILD_TOOLS]:
        h.update(r.encode())
    h.update(sys.version.encode())
    return h.hexdigest()


def wheelhouse_problem(snapshot: Path | None = None) -> str | None:
    """Why the wheelhouse cannot serve an offline TLJH install of ``snapshot``, or None."""
    snapshot = snapshot or source()
    stamp = WHEELHOUSE / ".stamp"
    if not stamp.exists():
        return f"the TLJH wheelhouse {WHEELHOUSE} does not exist"
    if stamp.read_text().strip() != _stamp(snapshot):
        return f"the TLJH wheelhouse {WHEELHOUSE} was built for another snapshot or Python"
    return None


def jupyterhub_version() -> str:
    """The JupyterHub that TLJH's hub environment gets from the wheelhouse."""
    versions = [
        m.group(1)
        for w in WHEELHOUSE.glob("jupyterhub-*.whl")
        if (m := re.match(r"jupyterhub-([^-]+)-", w.name))
    ]
    if len(versions) != 1:
        raise FileNotFoundError(f"{WHEELHOUSE} holds jupyterhub {versions or 'not at all'}")
    return versions[0]


def missing_pieces(snapshot: Path | None = None) -> list[str]:
    """What ``install`` would still have to do (empty: the TLJH test can run)."""
    problem = wheelhouse_problem(snapshot)
    if problem:
        return [problem]
    problem = job_env_problem(JOB_ENV, jupyterhub_version())
    return [problem] if problem else []


def install() -> None:
    """Build the wheelhouse (needs PyPI) and the job environment, unless up to date."""
    snapshot = source()
    if not snapshot.exists():
        print(
            f"[tljh] no TLJH source at {snapshot}: "
            "the TLJH tests will fail in CI and be skipped elsewhere"
        )
        return
    if wheelhouse_problem(snapshot):
        print(f"[tljh] pip wheel TLJH ({snapshot.name}) and its hub environment into {WHEELHOUSE}")
        WHEELHOUSE.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=WHEELHOUSE.parent) as tmp:
            reqs = Path(tmp) / "requirements-hub-env.txt"
            reqs.write_text("\n".join(hub_requirements(snapshot)) + "\n")
            out = Path(tmp) / "wheels"
            # one resolution of everything together: TLJH's pins and ours agree
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--prefer-binary"]
                + ["-w", str(out), str(snapshot)]
                + ["-r", str(reqs), *plugin_requirements(), *BUILD_TOOLS],
                check=True,
            )
            (out / ".stamp").write_text(_stamp(snapshot) + "\n")
            if WHEELHOUSE.exists():
                shutil.rmtree(WHEELHOUSE)
            out.rename(WHEELHOUSE)
        os.chmod(WHEELHOUSE, 0o755)  # noqa: S103 (wheels, no secrets: the tests read them)
    ensure_job_env(JOB_ENV, jupyterhub_version())


def main(argv: list[str]) -> int:
    if argv == ["install"]:
        install()
        return 0
    if argv == ["check"]:
        missing = missing_pieces()
        for m in missing:
            print(f"{m}: {INSTALL_HINT}", file=sys.stderr)
        return 1 if missing else 0
    print("usage: python -m xsedehub.testbed.localtljh install|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
