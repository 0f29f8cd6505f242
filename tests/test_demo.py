"""The README's demo command, in both modes: it comes up, a server runs as it should, and
a Ctrl-C (SIGINT) or SIGTERM stops everything it started, without an error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .audit import cmdlines
from .conftest import host_netns_path, port_free
from .hubclient import Hub
from .test_gateway import in_cluster_root

# The public ports equal the ones inside the hub's namespace (as in the README's demo),
# so the OAuth redirects the browser follows work from this process too, which lives in
# the hub's namespace; the provider and issuer ports stay clear of the session's own.
PUBLIC, PROVIDER_PORT, ISSUER_PORT = 8000, 19400, 8701


def _demo_processes(workdir: Path) -> list[str]:
    """Processes of a demo in ``workdir``: hub, proxy, provider, issuer, bridges, servers."""
    marks = (
        str(workdir),
        f"--port {PUBLIC} ",
        f"oidc_provider_mock --port {PROVIDER_PORT}",
        f"127.0.0.1:{ISSUER_PORT}",
        "configurable-http-proxy",
        "jupyterhub-singleuser",
    )
    return [f"{pid} {c}" for pid, c in cmdlines().items() if any(m in c for m in marks)]


def _xsedehub_jobs(account: str) -> list[str]:
    """Jobs xsedehub submitted for ``account`` that are queued or running."""
    out = in_cluster_root(
        ["squeue", "-h", "-u", account, "-t", "PENDING,RUNNING", "-o", "%i %T %k"]
    )
    return [ln for ln in out.splitlines() if "xsedehub:" in ln]


@pytest.fixture
def demo(cluster, tmp_path):
    """Start ``xsedehub demo`` from the host's namespace, as the README's command does."""
    procs = []

    def start(mode: str) -> tuple[subprocess.Popen, Hub, Path]:
        busy = [p for p in (8000, 8001, cluster.hub_api_port) if not port_free(p)]
        assert not busy, f"hub ports {busy} taken: another hub is running"
        workdir = tmp_path / f"demo-{mode}"
        argv = [
            "nsenter",
            f"--net={host_netns_path()}",
            "--",
            sys.executable,
            "-m",
            "xsedehub.cli",
            "demo",
            "--mode",
            mode,
            "--port",
            str(PUBLIC),
            "--provider-port",
            str(PROVIDER_PORT),
            "--issuer-port",
            str(ISSUER_PORT),
            "--workdir",
            str(workdir),
            "--keep-cluster",  # the rest of the suite runs on this cluster
        ]
        out = open(tmp_path / f"{mode}.out", "w")
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, text=True
        )
        procs.append((proc, workdir))
        deadline = time.monotonic() + 180
        while "is up: http://127.0.0.1:" not in (tmp_path / f"{mode}.out").read_text():
            assert proc.poll() is None, (tmp_path / f"{mode}.out").read_text()
            assert time.monotonic() < deadline, "the demo did not print its URL"
            time.sleep(0.5)
        token = (workdir / "service_token").read_text().strip()
        hub = Hub("http://127.0.0.1:8000", token, f"http://127.0.0.1:{PROVIDER_PORT}")
        return proc, hub, tmp_path / f"{mode}.out"

    yield start
    for proc, workdir in procs:  # a failed test still leaves nothing behind
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(180)
        _no_demo_processes(workdir)


def _stopped_cleanly(proc, output: Path, workdir: Path, account: str, sig: int) -> None:
    jobs = [ln.split()[0] for ln in _xsedehub_jobs(account)]
    os.kill(proc.pid, sig)
    assert proc.wait(180) == 0
    hub_log = (workdir / "hub.log").read_text()
    for job in jobs:  # the hub stopped the server and cancelled its job
        assert f"cancelled job {job}" in hub_log, hub_log[-2000:]
    text = output.read_text()
    assert "xsedehub demo: stopped" in text
    for bad in ("Traceback", "Error", "could not", "cancelled leftover jobs"):
        assert bad not in text, text  # every server was stopped through the hub
    assert _xsedehub_jobs(account) == []
    _no_demo_processes(workdir)


def _no_demo_processes(workdir: Path) -> None:
    """No process of the demo is left (a job's server may take a moment to exit after
    SLURM's SIGTERM; the wait only guards against a hang)."""
    deadline = time.monotonic() + 60
    while (left := _demo_processes(workdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []


async def test_demo_xsede_mode_runs_as_the_user_and_stops_on_ctrl_c(demo, tmp_path):
    proc, hub, output = demo("xsede")
    hub.login("alice")  # the provider's button for alice; the issuer maps her to alice
    r = hub.start("alice")
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("alice")
    out = await hub.execute(
        "alice",
        hub.user_token("alice"),
        "import subprocess, os\n"
        "print(subprocess.run(['id', '-un'], capture_output=True, text=True).stdout.strip(),"
        " os.environ['SLURM_JOB_ID'])",
    )
    who, job = out.split()
    assert who == "alice"
    assert [ln.split()[:2] for ln in _xsedehub_jobs("alice")] == [[job, "RUNNING"]]
    _stopped_cleanly(proc, output, tmp_path / "demo-xsede", "alice", signal.SIGINT)


async def test_demo_gateway_mode_stops_on_sigterm(demo, tmp_path):
    proc, hub, output = demo("gateway")
    session = hub.login("attendee1")
    # the demo offers both local clusters: the form groups its profiles under each
    page = session.get(f"{hub.url}/hub/spawn", timeout=60).text
    assert "mini-Comet" in page and "minidelta" in page, page[-2000:]
    r = hub.start("attendee1")
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("attendee1")
    out = await hub.execute(
        "attendee1", hub.user_token("attendee1"), "import os; print(os.getcwd())"
    )
    assert out.strip() == "/home/gateway/workshop/attendee1"
    assert len(_xsedehub_jobs("gateway")) == 1
    # the demo's hub runs the idle culler with the documented HPC defaults
    culler = [c for c in cmdlines().values() if "-m xsedehub.idleculler" in c]
    assert len(culler) == 1 and "--timeout=3600 --cull-every=300" in culler[0], culler
    _stopped_cleanly(proc, output, tmp_path / "demo-gateway", "gateway", signal.SIGTERM)
