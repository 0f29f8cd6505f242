"""The hub's SSH connections and shared squeue against the real login node and SLURM,
without a hub: certificate renewal, timed-out commands, sbatch retries, a login node blip
while a server starts, jobs missing from squeue, idle connections.

These run below the hub because each fault must hit one precise moment (a renewal, a
command timing out, slurmctld holding an sbatch) that a whole hub cannot be steered to
without sleeps; every part they talk to is the real one (sshd, slurmctld, squeue, sacct).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import asyncssh
import pytest
from xsedehub.spawner import follow, job, slurm
from xsedehub.spawner.errors import ClusterUnreachable, SpawnError, StartTimeout
from xsedehub.spawner.identity import KeyFiles, gateway_identity
from xsedehub.spawner.ssh import Connection, LoginNode, Pool, SSHIdentity

from xsedehub.testbed import localcluster

from .test_gateway import in_cluster_root

pytestmark = pytest.mark.cluster

SLEEPER = (
    "#!/bin/bash\n#SBATCH --job-name=xh-conn-test\n#SBATCH --time=00:05:00\n"
    "#SBATCH --output=/dev/null\n#SBATCH --chdir=/tmp\n"
    "#SBATCH --comment=xsedehub:{spawn}\nsleep 300\n"
)


def node(cluster) -> LoginNode:
    return LoginNode(cluster.login_ip, cluster.login_port, cluster.known_hosts)


def gateway(cluster) -> SSHIdentity:
    return gateway_identity(KeyFiles(), cluster.gateway_key, cluster.gateway_user)


def certificate(cluster, user: str, lifetime: float = 600) -> SSHIdentity:
    now = time.time()
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert = asyncssh.read_private_key(cluster.user_ca_key).generate_user_certificate(
        key, f"test-{user}", principals=[user], valid_after=now - 60, valid_before=now + lifetime
    )
    return SSHIdentity(user, key, cert, label="certificate")


def jobs_with_comment(spawn_id: str) -> list[str]:
    out = in_cluster_root(["squeue", "-h", "-t", "all", "-o", "%i|%k|%T"])
    return [
        ln.split("|")[0]
        for ln in out.splitlines()
        if ln.split("|")[1] == f"xsedehub:{spawn_id}" and ln.split("|")[2] != "CANCELLED"
    ]


async def until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


async def submit_sleeper(conn: Connection, spawn: str) -> str:
    r = await conn.run(slurm.sbatch_argv(), input=SLEEPER.format(spawn=spawn))
    assert r.exit_status == 0, r.stderr
    return slurm.parse_sbatch(str(r.stdout))


class Watcher:
    """Stands in for a spawner the refresher may wake (a JupyterHub spawner in the hub)."""

    def __init__(self) -> None:
        self.woken = 0

    async def poll_and_notify(self) -> int | None:
        self.woken += 1
        return None


async def free_hub_port() -> int:
    """A loopback port nothing listens on (a spawn's hub port before its forward)."""
    probe = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    return port


# ---------------------------------------------------------------- 1. certificate renewal
async def test_renewed_certificate_moves_watched_jobs_and_ends_the_old_refresher(cluster):
    pool = Pool()
    old = new = pool.get(node(cluster), certificate(cluster, "alice"))
    job_id = await submit_sleeper(old, "u0-renewal")
    try:
        watcher = Watcher()
        old.status.watch(job_id, watcher, 0.3)
        await until(lambda: old.status.fetched_at > 0, 10, "a refresh on the old connection")
        new = pool.get(node(cluster), certificate(cluster, "alice"))  # the renewal
        assert new is not old and not old.is_open
        assert new.status.watching and not old.status.watching
        # two refreshes on the new connection: the old one stayed closed meanwhile
        t0 = new.status.fetched_at
        await until(lambda: new.status.fetched_at > t0, 10, "a refresh on the new connection")
        t1 = new.status.fetched_at
        await until(lambda: new.status.fetched_at > t1, 10, "another refresh")
        assert not old.is_open, "the old refresher logged in again with the old certificate"
        assert watcher.woken == 0  # the job runs: nobody was told otherwise
    finally:
        in_cluster_root(["scancel", job_id])
        for conn in (old, new):
            conn.status.close()
            conn.close()


# ---------------------------------------------------------------- 3. sbatch and timeouts
async def test_timed_out_commands_do_not_pile_up_to_max_sessions(cluster):
    """sshd allows 10 sessions per connection (MaxSessions): twelve commands that time
    out must not leave their channels open, nor make the connection be dropped (under
    every other command on it) when the next channel cannot be opened."""
    conn = Connection(node(cluster), gateway(cluster))
    try:
        for _ in range(12):
            with pytest.raises(ClusterUnreachable, match="timed out"):
                await conn.run(["sleep", "30"], timeout=0.3)
        r = await conn.run(["true"], timeout=10)
        assert r.exit_status == 0
        assert conn.counters.handshakes == 1, "the connection was dropped and opened again"
    finally:
        conn.close()


async def test_sbatch_that_timed_out_but_succeeded_is_not_submitted_again(cluster):
    """slurmctld holds the sbatch (SIGSTOP) past the hub's timeout, then takes it: the
    retry finds the job by its comment instead of submitting a second one."""
    conn = Connection(node(cluster), gateway(cluster))
    spawn = f"u0-twice{os.getpid()}"
    pid = int(Path(cluster.pid_files["slurmctld"]).read_text().split()[0])
    submission = job.Submission(conn, SLEEPER.format(spawn=spawn), spawn, timeout=2)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(ClusterUnreachable, match="timed out"):
                await submission()
        finally:
            os.kill(pid, signal.SIGCONT)
        # the held sbatch went through after all
        await until(lambda: jobs_with_comment(spawn), 30, "the held submission in SLURM")
        first = jobs_with_comment(spawn)
        job_id = await follow.retrying(
            "submitting", submission, within=30, report=lambda *a, **k: None
        )
        assert [job_id] == first == jobs_with_comment(spawn), "submitted twice"
    finally:
        os.kill(pid, signal.SIGCONT)
        for j in jobs_with_comment(spawn):
            in_cluster_root(["scancel", j])
        conn.close()


# ---------------------------------------------------------------- 5. a blip while starting
async def test_a_login_node_blip_while_the_server_starts_is_not_fatal(cluster, tmp_path):
    conn = Connection(node(cluster), gateway(cluster))
    job_id = await submit_sleeper(conn, "u0-blip")
    reports: list[str] = []
    files = job.JobFiles(conn, ".xsedehub/jobs/u0-blip", logging.getLogger("test"), "test")
    port = await free_hub_port()
    server = None
    task = asyncio.ensure_future(
        follow.wait_server(
            conn,
            job_id,
            files,
            hub_port=port,
            timeout=120,
            report=lambda m, pct=None: reports.append(m),
        )
    )
    try:
        conn.close()
        localcluster.stop_daemon("sshd_login")
        try:
            await until(
                lambda: task.done() or any("unreachable" in m for m in reports),
                30,
                "the job check during the blip",
            )
            assert not task.done(), f"the spawn failed on a blip: {task.exception()!r}"
        finally:
            localcluster.up()

        # the port accepts: the job's agent adds the forward once the server listens
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        await asyncio.wait_for(task, 60)
        assert "The server listens and the tunnel to the compute node is up" in reports
    finally:
        task.cancel()
        if server is not None:
            server.close()
        in_cluster_root(["scancel", job_id])
        conn.close()


async def test_a_port_that_listens_while_squeue_hangs_is_seen_at_once(cluster):
    """The look at the job (the shared squeue, every 5 s) runs beside the watch of the
    port, not instead of it: with slurmctld held (SIGSTOP), squeue hangs (SLURM's own
    timeout is 10 s, the spawner's 30 s), and a port that listens meanwhile ends the
    wait within the watch's next looks, not after the squeue (slurmctld is let go in the
    end: if this test dies in between, `xsedehub cluster down` and up again)."""
    conn = Connection(node(cluster), gateway(cluster))
    job_id = await submit_sleeper(conn, "u0-hung")
    files = job.JobFiles(conn, ".xsedehub/jobs/u0-hung", logging.getLogger("test"), "test")
    port = await free_hub_port()
    slurmctld = int(Path(cluster.pid_files["slurmctld"]).read_text().split()[0])
    server = None
    task = asyncio.ensure_future(
        follow.wait_server(
            conn, job_id, files, hub_port=port, timeout=120, report=lambda m, pct=None: None
        )
    )
    try:
        await asyncio.sleep(1)
        os.kill(slurmctld, signal.SIGSTOP)
        await asyncio.sleep(follow.JOB_CHECK_EVERY + 1.5)  # the job's look is under way
        assert not task.done()
        inflight = conn.status._inflight
        assert inflight is not None and not inflight.done(), "no job check under way"
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        await asyncio.wait_for(task, 2)  # the hung squeue holds on for 10 s (MessageTimeout)
        assert not inflight.done(), "the job check ended first: this showed nothing"
    finally:
        os.kill(slurmctld, signal.SIGCONT)
        task.cancel()
        if server is not None:
            server.close()
        in_cluster_root(["scancel", job_id])
        conn.close()


async def test_a_server_that_never_listens_times_out_and_a_job_that_ends_is_seen(cluster):
    """The wait for the hub port ends with StartTimeout once its time is up (not
    before), and with "ended while the server was starting" when the job goes."""
    conn = Connection(node(cluster), gateway(cluster))
    job_id = await submit_sleeper(conn, "u0-never")
    files = job.JobFiles(conn, ".xsedehub/jobs/u0-never", logging.getLogger("test"), "test")
    port = await free_hub_port()
    quiet = lambda m, pct=None: None  # noqa: E731
    try:
        began = time.monotonic()
        with pytest.raises(StartTimeout, match="did not answer within 7"):
            await follow.wait_server(conn, job_id, files, hub_port=port, timeout=7, report=quiet)
        assert time.monotonic() - began >= 7
        in_cluster_root(["scancel", job_id])
        with pytest.raises(SpawnError, match="ended while the server was starting"):
            await asyncio.wait_for(
                follow.wait_server(conn, job_id, files, hub_port=port, timeout=300, report=quiet),
                60,
            )
    finally:
        in_cluster_root(["scancel", job_id])
        conn.close()


# ---------------------------------------------------------------- 6. missing from squeue
async def test_a_job_missing_from_squeue_is_confirmed_with_slurm(cluster):
    """The local cluster keeps no accounting (no slurmdbd): sacct says so, the cache
    remembers it, and squeue --jobs answers instead."""
    conn = Connection(node(cluster), gateway(cluster))
    job_id = await submit_sleeper(conn, "u0-confirm")
    try:
        st = await conn.status.confirm(job_id)
        assert conn.status.sacct_available is False
        assert st is not None and st.alive and st.spawn_id == "u0-confirm"
        assert await conn.status.confirm("99999999") is None  # SLURM knows no such job
        assert conn.counters.commands.get("sacct") == 1  # asked once, then remembered
    finally:
        in_cluster_root(["scancel", job_id])
        conn.close()


async def test_a_pending_cancel_never_cancels_another_job_with_the_same_id(cluster):
    conn = Connection(node(cluster), gateway(cluster))
    job_id = await submit_sleeper(conn, "u0-someone-else")
    try:
        await job.cancel_if_ours(conn, job_id, "u0-recorded")  # another spawn's record
        st = await conn.status.confirm(job_id)
        assert st is not None and st.alive
        await job.cancel_if_ours(conn, job_id, "u0-someone-else")
        # a cancelled job may show COMPLETING (alive) for a moment before it is gone
        deadline = time.monotonic() + 30
        while (st := await conn.status.confirm(job_id)) is not None and st.alive:
            assert time.monotonic() < deadline, f"job {job_id} still {st.state} after scancel"
            await asyncio.sleep(0.5)
        await job.cancel_if_ours(conn, "99999999", "u0-gone")  # purged: nothing to do
    finally:
        in_cluster_root(["scancel", job_id])
        conn.close()


# ---------------------------------------------------------------- 9. idle connections
async def test_an_idle_connection_is_closed_and_reopened_on_use(cluster):
    conn = Connection(node(cluster), gateway(cluster), idle_timeout=0.5)
    try:
        assert (await conn.run(["true"])).exit_status == 0
        assert conn.is_open
        await until(lambda: not conn.is_open, 10, "the idle connection to be closed")
        assert (await conn.run(["true"])).exit_status == 0
        assert conn.counters.handshakes == 2
    finally:
        conn.close()


async def test_a_connection_watching_jobs_is_never_idle(cluster):
    conn = Connection(node(cluster), gateway(cluster), idle_timeout=0.5)
    job_id = await submit_sleeper(conn, "u0-watched")
    try:
        conn.status.watch(job_id, Watcher(), 0.2)
        t0 = time.monotonic()
        await until(lambda: time.monotonic() - t0 > 2, 5, "two idle timeouts")
        assert conn.is_open and conn.counters.handshakes == 1
    finally:
        conn.status.close()
        in_cluster_root(["scancel", job_id])
        conn.close()


async def test_slurm_commands_run_from_the_configured_directory(cluster):
    """The hub runs SLURM's commands by the absolute path of the login node's
    ``slurm_bin``, never through the account's PATH (which puts the real squeue first)."""
    import shutil

    from xsedehub.spawner import slurm

    bindir = Path(cluster.root) / "bin-marked"  # root-owned, as sshd's sessions see it
    bindir.mkdir(mode=0o755, exist_ok=True)
    marked = bindir / "squeue"
    marked.write_text("#!/bin/sh\necho 'marked squeue ran'\n")
    marked.chmod(0o755)
    node = LoginNode(cluster.login_ip, cluster.login_port, cluster.known_hosts, str(bindir))
    conn = Connection(node, gateway(cluster))
    try:
        r = await conn.run(slurm.squeue_argv(cluster.gateway_user), timeout=30)
        assert str(r.stdout).strip() == "marked squeue ran", (r.stdout, r.stderr)
    finally:
        conn.close()
        shutil.rmtree(bindir)
