"""The test ground's second cluster (minidelta) is independent of the mini-Comet.

Its own SLURM (jobs on one are invisible to the other), munge key, host key, homes and
login node; its jobs reach the hub's tunnel sshd as the mini-Comet's do."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import asyncssh
import pytest

from xsedehub.testbed import localcluster, minidelta
from xsedehub.testbed.localcluster import SiteInfo

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def sites(cluster) -> tuple[SiteInfo, SiteInfo]:
    return cluster.site("minicomet"), cluster.site("minidelta")


async def _gateway(site: SiteInfo, known_hosts: str | None = None) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        site.login_ip,
        site.login_port,
        username=site.gateway_user,
        client_keys=[site.gateway_key],
        known_hosts=known_hosts or site.known_hosts,
        agent_path=None,
        config=None,
        connect_timeout=10,
    )


async def _run(conn: asyncssh.SSHClientConnection, cmd: str) -> str:
    return (await conn.run(cmd, check=True, timeout=20)).stdout


def _host_key(conn: asyncssh.SSHClientConnection) -> bytes:
    key = conn.get_server_host_key()
    return getattr(key, "key", key).public_data  # a certificate's subject key


async def test_each_login_node_is_its_own_cluster(sites):
    """As the gateway account, with the testbed's key and verified host keys: two
    clusters with their own name, partitions, host key and home directory."""
    comet, delta = sites
    async with await _gateway(comet) as c1, await _gateway(delta) as c2:
        names = [
            (await _run(c, "scontrol show config | grep '^ClusterName'")).split()[-1]
            for c in (c1, c2)
        ]
        assert names == ["minicomet", "minidelta"]
        assert (await _run(c2, "echo $SLURM_CONF")).strip() == delta.slurm_conf
        assert (await _run(c2, "command -v sbatch")).strip() == f"{delta.slurm_bin}/sbatch"
        parts = [set((await _run(c, "sinfo -h -o %R")).split()) for c in (c1, c2)]
        assert parts == [set(comet.partitions), set(delta.partitions)]
        # the host keys differ, and each known_hosts vouches for its own cluster only
        assert _host_key(c1) != _host_key(c2)
        assert Path(delta.host_key).read_text().split()[1] in Path(delta.known_hosts).read_text()
        # the homes: the same account, two directories that share nothing
        marker = f"xh-two-{uuid.uuid4().hex[:8]}"
        assert (await _run(c2, f"pwd; echo delta > {marker}")).strip() == "/home/gateway"
        assert (await c1.run(f"test -e {marker}", timeout=10)).exit_status == 1
        on_host = Path(delta.home_root) / delta.gateway_user / marker
        assert on_host.read_text() == "delta\n"
        on_host.unlink()
        # munge's default socket there is minidelta's own, not the mini-Comet's
        ino = (await _run(c2, "stat -c %i /run/munge/munge.socket.2")).strip()
        assert ino == str(os.stat(delta.munge_socket).st_ino)
        assert ino != str(os.stat(comet.munge_socket).st_ino)
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await _gateway(delta, known_hosts=comet.known_hosts)
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await _gateway(comet, known_hosts=delta.known_hosts)


async def _wait_running(conn, name: str) -> str:
    deadline = time.monotonic() + 30
    out = ""
    while time.monotonic() < deadline:
        out = await _run(conn, f"squeue -h -n {name} -o '%T %N'")
        if out.split()[:1] == ["RUNNING"]:
            return out.split()[1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {name} did not start: {out!r}")


def _root_squeue(site: SiteInfo) -> list[str]:
    """Job names in the queue as root on the cluster's side sees it."""
    argv = site.run_argv("squeue", "-h", "-o", "%j")
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()


async def test_a_job_runs_on_its_own_cluster_only(sites):
    """A job submitted on either login node runs on that cluster's node and is
    invisible to the other cluster's squeue."""
    comet, delta = sites
    tag = uuid.uuid4().hex[:8]
    async with await _gateway(comet) as c1, await _gateway(delta) as c2:
        try:
            for conn, site in ((c1, comet), (c2, delta)):
                await _run(
                    conn,
                    f"sbatch --parsable -J xh-{site.name}-{tag} -t 2 -o /dev/null "
                    "--wrap 'sleep 120'",
                )
            assert await _wait_running(c1, f"xh-minicomet-{tag}") in comet.nodes
            assert await _wait_running(c2, f"xh-minidelta-{tag}") in delta.nodes
            assert await _run(c1, f"squeue -h -n xh-minidelta-{tag}") == ""
            assert await _run(c2, f"squeue -h -n xh-minicomet-{tag}") == ""
            # root on each side sees the same (SiteInfo.run_argv: the compute nodes' view)
            for site, other in ((comet, delta), (delta, comet)):
                q = _root_squeue(site)
                assert f"xh-{site.name}-{tag}" in q and f"xh-{other.name}-{tag}" not in q
        finally:
            await c1.run(f"scancel -n xh-minicomet-{tag}", timeout=10)
            await c2.run(f"scancel -n xh-minidelta-{tag}", timeout=10)


def test_munge_keys_differ(sites):
    """A credential from one cluster's munged is refused by the other's."""
    comet, delta = sites
    for made, read, ok in (
        (comet, comet, True),
        (delta, delta, True),
        (comet, delta, False),
        (delta, comet, False),
    ):
        cred = subprocess.run(
            ["munge", "-n", "-S", made.munge_socket], capture_output=True, text=True, check=True
        ).stdout
        r = subprocess.run(
            ["unmunge", "-S", read.munge_socket], input=cred, capture_output=True, text=True
        )
        assert (r.returncode == 0) == ok, (made.name, read.name, r.stderr)
        if not ok:
            assert "Invalid credential" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:  # the hub side's loopback (the test process is there)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _banner(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), 2) as s:
            return s.recv(64)
    except OSError:
        return b""


async def test_a_minidelta_job_reaches_the_hub_sshd(cluster, sites):
    """What the reverse tunnel needs: a job on minidelta's node opens an SSH connection
    (host key verified) to the hub side's sshd as the tunnel account and forwards a
    hub-side port back into minidelta (here: to its login sshd)."""
    _, delta = sites
    work = Path(delta.home_root) / delta.gateway_user / f"xh-reach-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    key = work / "key"
    private = asyncssh.generate_private_key("ssh-ed25519")
    private.write_private_key(str(key))
    key.chmod(0o600)
    shutil.chown(work, delta.gateway_user)
    shutil.chown(key, delta.gateway_user)
    tak = Path(cluster.tunnel_authorized_keys)
    before = tak.read_text()
    port = _free_port()
    inside = f"/home/{delta.gateway_user}/{work.name}"
    ssh = (
        f"ssh -F /dev/null -i {inside}/key -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={cluster.known_hosts} "
        f"-o ExitOnForwardFailure=yes -N -R 127.0.0.1:{port}:{delta.login_ip}:22 "
        f"{cluster.tunnel_user}@{delta.hub_ip}"
    )
    job = f"xh-reach-{port}"
    log_from = Path(cluster.root, "log", "sshd_hub.log").stat().st_size
    async with await _gateway(delta) as conn:
        try:
            pub = private.export_public_key().decode()
            sep = "\n" if before and not before.endswith("\n") else ""
            tak.write_text(f"{before}{sep}restrict,port-forwarding {pub}")
            await _run(conn, f"sbatch -J {job} -t 2 -o {inside}/out --wrap '{ssh}'")
            deadline = time.monotonic() + 30
            while not (banner := _banner(port)).startswith(b"SSH-2.0-"):
                assert time.monotonic() < deadline, (work / "out").read_text(errors="replace")
                await asyncio.sleep(0.2)
            assert banner.startswith(b"SSH-2.0-OpenSSH")
            hub_log = Path(cluster.root, "log", "sshd_hub.log").read_bytes()[log_from:].decode()
            assert f"Accepted publickey for {cluster.tunnel_user} from {delta.login_ip}" in hub_log
        finally:
            await conn.run(f"scancel -n {job}", timeout=10)
            tak.write_text(before)
            shutil.rmtree(work)


@pytest.mark.parametrize("stopped", ["minicomet", "minidelta"])
async def test_one_login_node_down_leaves_the_other_usable(sites, stopped):
    comet, delta = sites
    down_site, other = (comet, delta) if stopped == "minicomet" else (delta, comet)
    name = "sshd_login" if stopped == "minicomet" else "minidelta:sshd_login"
    localcluster.stop_daemon(name)
    try:
        with pytest.raises(ConnectionRefusedError):  # not a timeout: nothing listens
            await _gateway(down_site)
        async with await _gateway(other) as conn:
            assert await _run(conn, "squeue -h -u nobody") == ""
    finally:
        localcluster.up()
    async with await _gateway(down_site) as conn:
        assert (await _run(conn, "id -un")).strip() == down_site.gateway_user


def test_up_completes_a_partly_running_pair(sites):
    """``up`` starts again what of minidelta stopped and leaves the rest alone."""
    comet, delta = sites

    def pids() -> dict[str, str]:
        return {
            k: Path(p).read_text().split()[0]
            for k, p in {**comet.pid_files, **delta.pid_files}.items()
        }

    before = pids()
    # (not slurmctld: it takes seconds to stop; test_faults restarts the mini-Comet's)
    localcluster.stop_daemon("minidelta:munged")
    localcluster.stop_daemon("minidelta:sshd_login")
    assert localcluster.status()["healthy"] is False
    localcluster.up()
    st = localcluster.status()
    assert st["healthy"] is True and all(st["daemons"].values())
    after = pids()
    restarted = {k for k in before if before[k] != after[k]}
    # the rest untouched; but if slurmctld pinged the node while munge was down, up
    # rightly restarts that node's slurmd (it would not answer for up to 100 s)
    revived = {f"minidelta:slurmd_{n}" for n in minidelta.NODES}
    assert restarted - revived == {"minidelta:munged", "minidelta:sshd_login"}
    munge_ok = subprocess.run(
        delta.run_argv("sh", "-c", "munge -n | unmunge"), capture_output=True, check=False
    )
    assert munge_ok.returncode == 0, munge_ok.stderr
    assert st["namespaces"][delta.mount_ns] is True


def _mount_points_under(top: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [p for p in (ln.split()[4] for ln in lines) if p == str(top) or p.startswith(f"{top}/")]


def test_setting_up_the_mount_namespace_again_stacks_nothing(cluster, sites):
    """The private directory bound onto itself and the namespace's file: one mount each,
    however often ``up`` sets them up (a directory bound onto itself is the same device,
    so a check by device alone took it for unmounted and stacked another bind, which
    hid the namespace's file and left ``down`` a stack it could not undo)."""
    before = _mount_points_under(minidelta.MNT_DIR)
    assert sorted(before) == sorted([str(minidelta.MNT_DIR), str(minidelta.MNT_NS)]), before
    minidelta.setup_mount_ns(Path(cluster.root))
    minidelta.setup_mount_ns(Path(cluster.root))
    assert _mount_points_under(minidelta.MNT_DIR) == before
    assert minidelta.mounted()
