"""Idle servers give their allocation back, from both ends, with short timeouts.

One hub runs jupyterhub-idle-culler as ``xsedehub.config.idle_culler`` configures it
(10 s, checked every 2 s).  The culler is frozen (SIGSTOP) before any server starts, so
its 10 s cannot run out while the servers start.  Two servers start together: grace's
server has a 5 s ``server_idle_timeout`` (a pre-spawn hook), Ada's the default.  Right
after both are ready the hub is frozen too, as a hub that cannot be reached: grace's
server still ends itself (jupyter-server checks once a minute), so its job leaves the
queue while the hub is away.  The hub, thawed (the culler still frozen), sees the job's
end in its next poll: at most two shared squeues after it was thawed, by the hub's own
count of them (``xsedehub_squeue_seconds_count``).  Then the culler, thawed, stops Ada's
idle server and its job is cancelled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import make_hub, stop_hub_and_proxy
from .test_faults import wait_for
from .test_gateway import in_cluster_root
from .test_spawn_options import scrape

POLL = 3

SHORT_IDLE = """
def _short_idle(spawner):
    if spawner.user.name == "grace":
        spawner.server_idle_timeout = 5

c.Spawner.pre_spawn_hook = _short_idle
"""


@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    h = make_hub(
        tmp_path_factory.mktemp("idlehub"),
        cluster,
        provider,
        poll_interval=POLL,
        idle_culler=(10, 2),
        extra=SHORT_IDLE,
    )
    for sub in ("ada", "grace"):
        h.client.login(sub)
    yield h
    stop_hub_and_proxy(h)


def _culler_pid(hub_pid: int) -> int:
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == hub_pid and b"xsedehub.idleculler" in cmd:
            return int(d.name)
    raise AssertionError("the hub runs no jupyterhub-idle-culler")


def _job_alive(job: str) -> bool:
    out = in_cluster_root(["squeue", "-h", "-j", job, "-o", "%T"]).split()
    return bool(out) and out[0] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")


def test_idle_servers_give_the_allocation_back(hub, cluster):
    culler = _culler_pid(hub.proc.pid)
    # frozen before the servers start: its 10 s must not run out before the hub is frozen
    os.kill(culler, signal.SIGSTOP)
    try:
        _give_back(hub, cluster, culler)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(culler, signal.SIGCONT)  # a no-op if the test thawed it already


def _squeues(c, cluster) -> float:
    """The shared squeues the hub has run so far (a Prometheus histogram's count)."""
    key = ("xsedehub_squeue_seconds_count", frozenset({("cluster", cluster.login_ip)}))
    return scrape(c).get(key, 0.0)


def _give_back(hub, cluster, culler: int) -> None:
    c = hub.client
    for user in ("ada-l", "grace"):
        r = c.start(user)
        assert r.status_code in (201, 202), r.text
    for user in ("ada-l", "grace"):
        c.wait_ready(user)
    jobs = {u: c.user(u)["servers"][""]["state"]["job_id"] for u in ("ada-l", "grace")}
    # the hub cannot be reached from now on (its culler is frozen already); a frozen hub
    # runs no squeue, so this count is still the count when it is thawed
    squeues = _squeues(c, cluster)
    hub.proc.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        # grace's server ends itself, and with it the job: the allocation is free
        took = wait_for(lambda: not _job_alive(jobs["grace"]), 150, "grace's job to end")
        print(f"grace's job ended {took:.1f} s after the hub froze")
        assert _job_alive(jobs["ada-l"]), "Ada's server (default idle limit) ended too"
    finally:
        hub.proc.send_signal(signal.SIGCONT)
    thawed = time.monotonic()
    noticed = wait_for(lambda: not c.user("grace")["servers"], 60, "the hub to notice")
    ran = _squeues(c, cluster) - squeues
    print(
        f"the hub noticed grace's job had ended {noticed:.1f} s after it was thawed, "
        f"after {ran:.0f} shared squeues (poll interval {POLL} s; frozen for "
        f"{thawed - frozen:.1f} s)"
    )
    # within one poll interval: the first squeue after the thaw (one more if a squeue
    # was under way when the hub was frozen, its answer older than the job's end)
    assert 1 <= ran <= 2, f"the hub ran {ran:.0f} squeues before it noticed the job's end"
    log = hub.log
    assert f"job {jobs['grace']} is" in log  # the poll saw the job end: no stop was needed
    assert f"cancelled job {jobs['grace']}" not in log
    # now the culler: Ada's server has been idle for longer than its 10 s
    os.kill(culler, signal.SIGCONT)
    culled = wait_for(lambda: not c.user("ada-l")["servers"], 60, "the culler to stop Ada's server")
    print(f"the culler stopped Ada's idle server {culled:.1f} s after it was thawed")
    # cancelled: SLURM may still show it COMPLETING for a moment
    wait_for(lambda: not _job_alive(jobs["ada-l"]), 30, "Ada's cancelled job to leave the queue")
    assert f"cancelled job {jobs['ada-l']}" in hub.log
