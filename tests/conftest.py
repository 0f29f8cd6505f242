"""Shared fixtures: the real local cluster, brought up once per test session.

The test process plays the hub machine: after ``xsedehub cluster up`` (which needs the
host's namespace for apt), it moves itself into the hub network namespace, so that
everything it starts (hubs, proxies, browsers) and every connection it opens leaves
from the hub side, exactly as on a real hub VM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xsedehub import netns
from xsedehub.localcluster import ClusterInfo

HERE = Path(__file__).parent


def _cluster_available() -> str | None:
    if os.geteuid() != 0:
        return "the local cluster needs root"
    if not Path("/etc/debian_version").exists():
        return "the local cluster needs Debian/Ubuntu"
    return None


@pytest.fixture(scope="session")
def cluster() -> ClusterInfo:
    why = _cluster_available()
    if why:
        pytest.skip(why)
    r = subprocess.run(
        [sys.executable, "-m", "xsedehub.cli", "cluster", "up"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        pytest.fail(f"xsedehub cluster up failed:\n{r.stdout}\n{r.stderr}")
    info = ClusterInfo.load()
    here = os.readlink("/proc/thread-self/ns/net")
    hub = os.stat(netns.netns_path(info.hub_netns))
    if os.stat("/proc/thread-self/ns/net").st_ino != hub.st_ino:
        netns.enter(info.hub_netns)
    assert os.readlink("/proc/thread-self/ns/net") != here or here.endswith(f"[{hub.st_ino}]")
    return info


def in_cluster(info: ClusterInfo, *argv: str, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command on the cluster side (login/compute nodes share the cluster namespace)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("check", False)
    return subprocess.run([*netns.nsenter_argv(info.cluster_netns), *argv], **kw)
