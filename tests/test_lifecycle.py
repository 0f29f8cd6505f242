"""`down` stops exactly what `up` started; `up` again brings it all back.

Marked ``takes_cluster_down``: conftest runs it after every other test, whatever the
order of the modules, since it takes the cluster away under them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xsedehub.testbed import netns
from xsedehub.testbed.localcluster import ClusterInfo

pytestmark = pytest.mark.takes_cluster_down


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xsedehub.cli", "cluster", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _alive(pid_file: str) -> bool:
    try:
        pid = int(Path(pid_file).read_text().split()[0])
        return Path(f"/proc/{pid}").exists()
    except (OSError, ValueError, IndexError):
        return False


def test_down_then_up(cluster):
    pids = {}
    for name, f in cluster.pid_files.items():
        pids[name] = int(Path(f).read_text().split()[0])
    r = _cli("down")
    assert r.returncode == 0, r.stderr
    for name, pid in pids.items():
        assert (
            not Path(f"/proc/{pid}").exists()
            or Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
        ), f"{name} still runs"
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert cluster.hub_netns not in ns and cluster.cluster_netns not in ns
    assert not Path("/etc/netns/" + cluster.hub_netns).exists()
    st = _cli("status")
    assert st.returncode == 3 and json.loads(st.stdout)["healthy"] is False

    r = _cli("up")
    assert r.returncode == 0, r.stderr
    again = _cli("up")  # idempotent: a second up changes nothing
    assert again.returncode == 0 and "already up" in again.stderr
    info = ClusterInfo.load()
    assert all(_alive(f) for f in info.pid_files.values())
    netns.enter(info.hub_netns)  # this process follows the hub side into its new namespace
    assert os.path.exists(netns.netns_path(info.hub_netns))
