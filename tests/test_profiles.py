"""Profiles against the real local cluster: who may use which (form and REST), a
reservation profile's job on its reservation, and a profile's environment (a
``module``-like shell function and a real venv standing for Lmod and conda) set up in the
job before the server.

One hub for the module (the other modules' hubs offer partitions, not profiles: adding
profiles there would change what their tests see), in gateway mode with the attendee
sandbox (bubblewrap), so the environment is shown to reach a sandboxed server."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from xsedehub.testbed.netns import nsenter_argv

from .audit import job_dir, server_env
from .conftest import make_hub, stop_hub_and_proxy
from .test_gateway import in_cluster_root, job_id_of

pytestmark = pytest.mark.cluster

RESERVATION = "xh-profile-resv"
#: a stand-in for Lmod's ``module``: a shell function (what Lmod's set-up file defines)
MODULE_SH = """\
module() {
    [ "$1" = load ] || { echo "module: only 'load' here" >&2; return 1; }
    shift
    for m in "$@"; do
        case "$m" in
            xhtest/1.0) export XH_TEST_MODULE="$m"
                        export LOADEDMODULES="${LOADEDMODULES:+$LOADEDMODULES:}$m" ;;
            *) echo "module: $m not found" >&2; return 1 ;;
        esac
    done
}
# what a careless site file does: LD_LIBRARY_PATH is unset here, so this leaves an empty
# entry (the current folder); and tracing left on
export LD_LIBRARY_PATH=/opt/xhtest/lib:$LD_LIBRARY_PATH
export PATH=$PATH:relative/bin:
set -x
"""


@pytest.fixture(scope="module")
def envdir(cluster):
    """A world-readable folder outside /tmp and /home (the sandbox hides those) with the
    ``module`` function's file and a real venv made by the job environment's Python."""
    root = Path(tempfile.mkdtemp(prefix="xh-profiles-", dir=Path(cluster.root).parent))
    root.chmod(0o755)
    (root / "module.sh").write_text(MODULE_SH)
    (root / "module.sh").chmod(0o644)
    subprocess.run(
        [f"{cluster.job_env}/bin/python", "-m", "venv", "--without-pip", str(root / "venv")],
        check=True,
    )
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def hub(cluster, provider, envdir, tmp_path_factory):
    profiles = {
        "everyone": {
            "display_name": "Python with the test module",
            "description": "a module and a venv",
            "partition": "compute",
            "default_walltime": "00:10:00",
            "max_walltime": "00:30:00",
            "max_cores": 2,
            "environment": {
                "source": [str(envdir / "module.sh")],
                "modules": ["xhtest/1.0"],
                "venv": str(envdir / "venv"),
            },
        },
        "workshop": {
            "display_name": "Workshop (reserved node)",
            "partition": "debug",
            "default_walltime": "00:10:00",
            "reservation": RESERVATION,
            "groups": ["workshop"],
        },
    }
    extra = (
        'c.JupyterHub.load_groups = {"workshop": {"users": ["ada-l"]}}\n'
        f"c.SlurmSSHSpawner.profiles = {profiles!r}\n"
    )
    h = make_hub(
        tmp_path_factory.mktemp("profilehub"), cluster, provider, poll_interval=5, extra=extra
    )
    h.client.login("ada")
    h.client.login("grace")
    yield h
    stop_hub_and_proxy(h)


def _xsrf(s) -> str:
    return s.cookies.get("_xsrf", path="/hub/") or s.cookies.get("_xsrf")


def test_a_group_profile_is_shown_to_and_refused_to_others(hub):
    c = hub.client
    ada, grace = c.login("ada"), c.login("grace")
    page = ada.get(f"{c.url}/hub/spawn", timeout=30).text
    assert 'name="profile" value="everyone"' in page
    assert 'name="profile" value="workshop"' in page and f"reservation {RESERVATION}" in page
    page = grace.get(f"{c.url}/hub/spawn", timeout=30).text
    assert 'name="profile" value="everyone"' in page
    assert 'value="workshop"' not in page and "reserved node" not in page
    assert RESERVATION not in page
    # the form, posted by hand
    r = grace.post(
        f"{c.url}/hub/spawn",
        data={"profile": "workshop", "walltime": "00:10:00", "_xsrf": _xsrf(grace)},
        timeout=30,
    )
    assert r.status_code == 400, r.text[:300]
    assert "profile: " in r.text and "is not one of your profiles" in r.text
    # the REST API, the same gate
    r = c.start("grace", {"profile": "workshop"})
    assert r.status_code == 400, r.text
    assert "'workshop' is not one of your profiles (['everyone'])" in r.json()["message"]
    r = c.start("grace", {"profile": "everyone", "walltime": "01:00:00"})
    assert r.status_code == 400, r.text
    assert "walltime: at most 00:30:00 in profile everyone" in r.json()["message"]
    assert not c.user("grace")["servers"]


@pytest.fixture
def reservation(cluster):
    node = cluster.nodes[0]
    in_cluster_root(["scontrol", "delete", f"ReservationName={RESERVATION}"])
    out = subprocess.run(
        [
            *nsenter_argv("xh-cluster"),
            "scontrol",
            "create",
            "reservation",
            f"ReservationName={RESERVATION}",
            f"Users={cluster.gateway_user}",
            "StartTime=now",
            "Duration=30",
            f"Nodes={node}",
            "Flags=IGNORE_JOBS",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    yield node
    in_cluster_root(["scontrol", "delete", f"ReservationName={RESERVATION}"])


def test_a_reservation_profile_runs_on_its_reservation(hub, reservation):
    c = hub.client
    r = c.start("ada-l", {"profile": "workshop"})  # ada's hub name: her GitHub login
    assert r.status_code in (201, 202), r.text
    c.wait_ready("ada-l")
    job = job_id_of(hub, "ada-l")
    script = in_cluster_root(["scontrol", "write", "batch_script", job, "-"])
    assert f"#SBATCH --reservation={RESERVATION}" in script.splitlines()
    out = in_cluster_root(["squeue", "-h", "-j", job, "-o", "%v %N %P"]).split()
    assert out == [RESERVATION, reservation, "debug"]
    c.stop("ada-l")


def test_a_profiles_environment_reaches_the_server(hub, envdir):
    c = hub.client
    r = c.start("grace", {"profile": "everyone"})
    assert r.status_code in (201, 202), r.text
    c.wait_ready("grace")
    job = job_id_of(hub, "grace")
    env = server_env(job)
    assert env["XH_TEST_MODULE"] == "xhtest/1.0"
    assert env["LOADEDMODULES"] == "xhtest/1.0"
    assert env["VIRTUAL_ENV"] == str(envdir / "venv")
    assert env["PATH"].startswith(f"{envdir}/venv/bin:")
    # only absolute entries are left: no command outside the sandbox (bwrap, mkdir) can
    # load a library or run a program from the attendee's folder
    assert env["LD_LIBRARY_PATH"] == "/opt/xhtest/lib"
    assert all(p.startswith("/") for p in env["PATH"].split(":")), env["PATH"]
    # the tracing the site file turned on was off before the environment file was read
    log = (job_dir(job) / "job.log").read_text(errors="replace")
    assert env["JUPYTERHUB_API_TOKEN"] not in log
    assert "+ export JUPYTERHUB" not in log and "JUPYTERHUB_API_TOKEN" not in log, log
    c.stop("grace")
