"""The metrics' pure parts, without a cluster: how a start's end is classified, what the
hooks count, and what the gauges read at scrape time.  The same metrics on a real hub,
after real spawns, are in test_spawn_options.py (``test_metrics_move_after_a_spawn``)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import asyncssh
import pytest
from prometheus_client import REGISTRY, generate_latest
from tornado import web
from xsedehub.spawner import metrics, slurm
from xsedehub.spawner.errors import (
    ClusterUnreachable,
    CredentialExpired,
    SpawnError,
    StartTimeout,
)
from xsedehub.spawner.ssh import Connection, LoginNode, SSHIdentity
from xsedehub.spawner.tunnel import TunnelKeys


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def unreachable() -> SpawnError:
    try:
        try:
            raise ClusterUnreachable("cannot reach gateway@login:22")
        except ClusterUnreachable as e:
            raise SpawnError("The cluster's login node cannot be reached") from e
    except SpawnError as e:
        return e


@pytest.mark.parametrize(
    ("exc", "submitted", "timed_out", "outcome"),
    [
        (None, True, False, "started"),
        (web.HTTPError(400, "Invalid partition"), False, False, "refused"),
        (unreachable(), False, False, "unreachable"),
        (unreachable(), True, False, "unreachable"),  # lost while the job was queued
        (CredentialExpired("expired"), False, False, "credential_expired"),
        (SpawnError("Batch job 7 ended before the server started"), True, False, "job_failed"),
        (StartTimeout("did not answer within 90 s"), True, False, "timeout"),
        (asyncio.CancelledError(), True, True, "timeout"),  # JupyterHub's start_timeout
        (asyncio.CancelledError(), True, False, "cancelled"),  # a Stop while pending
        (SpawnError("xsedehub is misconfigured: sandbox_image"), False, False, "error"),
        (web.HTTPError(500), False, False, "error"),
        (RuntimeError("no free hub-side tunnel port"), False, False, "error"),
    ],
)
def test_classify(exc, submitted, timed_out, outcome):
    assert outcome in metrics.OUTCOMES
    assert metrics.classify(exc, submitted=submitted, timed_out=timed_out) == outcome


def spawner(**kw) -> SimpleNamespace:
    """What the decorator reads from a spawner."""
    return SimpleNamespace(login_host="login.test", job_id="", start_timeout=300, **kw)


async def test_count_spawn_counts_each_start_once_by_outcome():
    @metrics.count_spawn
    async def start(sp):
        if sp.fail is not None:
            raise sp.fail
        return ("127.0.0.1", 1)

    def count(outcome: str) -> float:
        return value("xsedehub_spawns_total", cluster="login.test", outcome=outcome)

    before = {o: count(o) for o in metrics.OUTCOMES}
    assert await start(spawner(fail=None)) == ("127.0.0.1", 1)
    with pytest.raises(web.HTTPError):
        await start(spawner(fail=web.HTTPError(400, "Invalid cores")))
    with pytest.raises(SpawnError):
        await start(SimpleNamespace(**{**vars(spawner(fail=SpawnError("ended"))), "job_id": "9"}))
    with pytest.raises(asyncio.CancelledError):
        await start(spawner(fail=asyncio.CancelledError()))
    moved = {o: count(o) - before[o] for o in metrics.OUTCOMES}
    assert moved == {
        **dict.fromkeys(metrics.OUTCOMES, 0.0),
        "started": 1.0,
        "refused": 1.0,
        "job_failed": 1.0,
        "cancelled": 1.0,
    }


def test_queue_wait_and_startup_land_in_their_buckets():
    sp = spawner()
    labels = {"cluster": "login.test", "partition": "debug"}
    n = value("xsedehub_queue_wait_seconds_count", **labels)
    in_2h = value("xsedehub_queue_wait_seconds_bucket", le="7200.0", **labels)
    under_1h = value("xsedehub_queue_wait_seconds_bucket", le="3600.0", **labels)
    running_at = metrics.queue_wait(sp, "debug", time.monotonic() - 5400)  # 1.5 h queued
    assert value("xsedehub_queue_wait_seconds_count", **labels) == n + 1
    assert value("xsedehub_queue_wait_seconds_bucket", le="7200.0", **labels) == in_2h + 1
    assert value("xsedehub_queue_wait_seconds_bucket", le="3600.0", **labels) == under_1h
    s = value("xsedehub_startup_seconds_count", **labels)
    in_2s = value("xsedehub_startup_seconds_bucket", le="2.0", **labels)
    metrics.startup(sp, "debug", running_at)  # answers at once
    assert value("xsedehub_startup_seconds_count", **labels) == s + 1
    assert value("xsedehub_startup_seconds_bucket", le="2.0", **labels) == in_2s + 1


def connection(host: str) -> Connection:
    ident = SSHIdentity("gateway", asyncssh.generate_private_key("ssh-ed25519"))
    return Connection(LoginNode(host, 22, "/nonexistent/known_hosts"), ident)


def test_ssh_handshakes_first_then_reopen():
    conn = connection("ssh.test")
    first = value("xsedehub_ssh_connects_total", cluster="ssh.test", kind="first")
    again = value("xsedehub_ssh_connects_total", cluster="ssh.test", kind="reopen")
    failed = value("xsedehub_ssh_connect_failures_total", cluster="ssh.test")
    metrics.ssh_connected(conn)
    metrics.ssh_connected(conn)
    metrics.ssh_connected(conn)
    metrics.ssh_connect_failed(conn)
    assert value("xsedehub_ssh_connects_total", cluster="ssh.test", kind="first") == first + 1
    assert value("xsedehub_ssh_connects_total", cluster="ssh.test", kind="reopen") == again + 2
    assert value("xsedehub_ssh_connect_failures_total", cluster="ssh.test") == failed + 1
    # never logged in for real: not open
    assert value("xsedehub_ssh_connections_open", cluster="ssh.test") == 0


async def test_squeue_round_trip_and_failures():
    conn = connection("sq.test")
    n = value("xsedehub_squeue_seconds_count", cluster="sq.test")
    failed = value("xsedehub_squeue_failures_total", cluster="sq.test")
    loop = asyncio.get_running_loop()
    ok, bad, gone = loop.create_future(), loop.create_future(), loop.create_future()
    ok.set_result({})
    bad.set_exception(ClusterUnreachable("squeue failed (1)"))
    gone.cancel()
    for fut in (ok, bad, gone):
        metrics.squeue_done(conn, time.monotonic() - 0.3, fut)
    assert value("xsedehub_squeue_seconds_count", cluster="sq.test") == n + 1
    assert value("xsedehub_squeue_seconds_sum", cluster="sq.test") >= 0.3
    assert value("xsedehub_squeue_failures_total", cluster="sq.test") == failed + 1


class Sleeper:
    async def poll_and_notify(self) -> None:
        return None


async def test_gauges_read_the_watched_jobs_and_the_squeue_result():
    conn = connection("watch.test")
    metrics.ssh_connected(conn)
    cache = conn.status
    try:
        cache.watch("101", Sleeper(), 3600)
        cache.watch("102", Sleeper(), 3600)
        cache.jobs = slurm.parse_squeue(
            "101|RUNNING|c1|None|N/A|gateway|xsedehub:u1-aaaaaaaaaaaa\n"
            "103|RUNNING|c2|None|N/A|gateway|xsedehub:u2-bbbbbbbbbbbb\n"  # not watched
            "104|PENDING||Resources|N/A|gateway|xsedehub:u3-cccccccccccc\n"  # queued
            "105|RUNNING|c1|None|N/A|gateway|\n"  # not xsedehub's
        )
        cache.fetched_at = time.monotonic() - 42
        assert value("xsedehub_jobs_believed_running", cluster="watch.test") == 2
        assert value("xsedehub_jobs_in_squeue", cluster="watch.test") == 2
        assert 42 <= value("xsedehub_squeue_result_age_seconds", cluster="watch.test") < 60
        cache.unwatch("101")
        cache.unwatch("102")
        # nothing watched: no refresher, so no result to rely on and none counted
        assert value("xsedehub_jobs_believed_running", cluster="watch.test") == 0
        assert value("xsedehub_jobs_in_squeue", cluster="watch.test") == 0
        assert (
            REGISTRY.get_sample_value(
                "xsedehub_squeue_result_age_seconds", {"cluster": "watch.test"}
            )
            is None
        )
    finally:
        cache.close()


async def test_tunnel_keys_live_counts_unexpired_keys(tmp_path):
    path = str(tmp_path / "authorized_keys")
    keys = TunnelKeys.for_file(path, (41000, 41999), "127.0.0.1", 8081)
    try:
        base = value("xsedehub_tunnel_keys_live")
        await keys.grant("u1-aaaaaaaaaaaa", 600)
        await keys.grant("u2-bbbbbbbbbbbb", 600)
        assert value("xsedehub_tunnel_keys_live") == base + 2
        await keys.revoke("u1-aaaaaaaaaaaa")
        assert value("xsedehub_tunnel_keys_live") == base + 1
        await keys.grant("u3-cccccccccccc", -5)  # expired: sshd no longer accepts it
        assert value("xsedehub_tunnel_keys_live") == base + 1
    finally:
        TunnelKeys._instances.pop(path, None)


def test_names_and_labels_are_bounded():
    names = {m.name for m in REGISTRY.collect()}
    assert {
        "xsedehub_queue_wait_seconds",
        "xsedehub_startup_seconds",
        "xsedehub_spawns",
        "xsedehub_squeue_seconds",
        "xsedehub_squeue_failures",
        "xsedehub_ssh_connects",
        "xsedehub_ssh_connect_failures",
        "xsedehub_ssh_connections_open",
        "xsedehub_jobs_believed_running",
        "xsedehub_jobs_in_squeue",
        "xsedehub_squeue_result_age_seconds",
        "xsedehub_tunnel_keys_live",
    } <= names
    for metric in REGISTRY.collect():
        if metric.name.startswith("xsedehub"):
            for sample in metric.samples:
                assert set(sample.labels) <= {"cluster", "partition", "outcome", "kind", "le"}
    # what JupyterHub's /metrics handler writes, ours included
    assert "xsedehub_spawns_total{" in generate_latest(REGISTRY).decode()


@pytest.mark.cluster
async def test_real_logins_and_squeues_move_the_metrics(cluster):
    """Against the real login node: a handshake, a shared squeue, an idle close and the
    re-open, a refused login, a squeue that fails."""
    from .test_connections import gateway, node, until

    host = cluster.login_ip

    def snapshot() -> dict[str, float]:
        return {
            "first": value("xsedehub_ssh_connects_total", cluster=host, kind="first"),
            "reopen": value("xsedehub_ssh_connects_total", cluster=host, kind="reopen"),
            "failed": value("xsedehub_ssh_connect_failures_total", cluster=host),
            "squeues": value("xsedehub_squeue_seconds_count", cluster=host),
            "squeue_failures": value("xsedehub_squeue_failures_total", cluster=host),
        }

    before = snapshot()
    conn = Connection(node(cluster), gateway(cluster), idle_timeout=0.5)
    try:
        assert await conn.status.get("1", max_age=0) is None  # one real shared squeue
        assert value("xsedehub_ssh_connections_open", cluster=host) == 1
        await until(lambda: not conn.is_open, 10, "the idle connection to be closed")
        assert value("xsedehub_ssh_connections_open", cluster=host) == 0
        assert (await conn.run(["true"])).exit_status == 0  # re-opened
    finally:
        conn.close()
    nobody = Connection(LoginNode(host, 1, cluster.known_hosts), gateway(cluster))
    with pytest.raises(ClusterUnreachable):
        await nobody.run(["true"])  # nothing listens on port 1
    broken = Connection(
        LoginNode(host, cluster.login_port, cluster.known_hosts, "/nonexistent"), gateway(cluster)
    )
    try:
        with pytest.raises(ClusterUnreachable, match="squeue failed"):
            await broken.status.get("1", max_age=0)
    finally:
        broken.close()
    after = snapshot()
    assert {k: after[k] - before[k] for k in after} == {
        "first": 2,  # conn, broken
        "reopen": 1,
        "failed": 1,
        "squeues": 1,
        "squeue_failures": 1,
    }
