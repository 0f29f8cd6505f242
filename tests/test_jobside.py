"""The job's own side on the real local cluster, without a hub: the batch script and its
agent under real SLURM, real ssh to the hub side's real sshd, a stand-in server.  Every
way a job ends leaves nothing behind: no secret file, no ssh, no agent, no server, no
port.  (A hub's stop also removes the secret files: none runs here, so what is checked
is the job's own doing.)"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path

import asyncssh
import pytest
from xsedehub.spawner import slurm
from xsedehub.spawner.tunnel import TunnelKeys, port_free

from .audit import cmdlines
from .conftest import in_cluster

pytestmark = pytest.mark.cluster

#: a server stand-in: listens on its socket, answers "ok", ends when told "exit"
STAND_IN = (
    "import socket, sys\n"
    "path = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--ServerApp.sock=')][0]\n"
    "s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    try:\n"
    "        data = c.recv(100); c.sendall(b'ok')\n"
    "    except OSError:\n"
    "        data = b''\n"
    "    c.close()\n"
    "    if data == b'exit': break\n"
)

#: the same, but it binds its socket only once told to: ``<socket>.go`` appears
LATE_STAND_IN = (
    "import os, sys, time\n"
    "path = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--ServerApp.sock=')][0]\n"
    "while not os.path.exists(path + '.go'):\n"
    "    time.sleep(0.1)\n"
) + STAND_IN


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def job_processes(job_dir: Path) -> dict[int, str]:
    """Processes that name the job's directory: its ssh children, agent and server."""
    return {pid: cmd for pid, cmd in cmdlines().items() if str(job_dir) in cmd}


class Job:
    def __init__(self, cluster, job_id: str, job_dir: Path, hub_port: int, key: str):
        self.cluster, self.id, self.dir, self.hub_port = cluster, job_id, job_dir, hub_port
        self.key_fingerprint = asyncssh.import_private_key(key).get_fingerprint()

    def handshakes(self) -> int:
        """Connections the hub side's sshd accepted with this job's key."""
        log = Path(self.cluster.root, "log", "sshd_hub.log").read_text(errors="replace")
        return sum(
            1
            for line in log.splitlines()
            if "Accepted publickey" in line and self.key_fingerprint in line
        )

    @property
    def log(self) -> str:
        try:
            return (self.dir / "job.log").read_text(errors="replace")
        except OSError:
            return ""

    def state(self) -> str:
        return in_cluster(self.cluster, "squeue", "-h", "-j", self.id, "-o", "%T").stdout.strip()

    def wait_serving(self) -> None:
        """The server answers and the reverse tunnel listens on the hub side."""
        wait_for(
            lambda: (
                "server listening on its socket" in self.log
                or self.state() not in ("PENDING", "RUNNING")
            ),
            90,
            f"job {self.id} to start its server",
        )
        assert "server listening on its socket" in self.log, self.log
        # the forward is added on the open reverse tunnel (ssh -O forward, which has
        # ended when the agent says so)
        wait_for(lambda: "now leads to the server" in self.log, 30, "the reverse forward")
        assert not port_free(self.hub_port)
        # the forward may open last: the script waits for it before it watches the
        # server and the agent (a test that ends the job earlier tests something else)
        wait_for(lambda: "hub API forwarded to local port" in self.log, 30, "the forward")

    def wait_ended(self, last_line: str = "job ended") -> None:
        """Until the job's last line is logged and nothing of it runs.  "job ended" is
        the script's last line, "job agent ended" the agent's (the script's own end
        waits for it)."""
        wait_for(
            lambda: last_line in self.log and not job_processes(self.dir),
            60,
            f"job {self.id} to end and leave nothing running: {job_processes(self.dir)}",
        )

    def batch_shell(self) -> int:
        """The batch script's bash (not a subshell of it, which has the same argv)."""
        marker = f"job{int(self.id):05d}/slurm_script"
        shells = [
            p for p, cmd in cmdlines().items() if cmd.startswith("/bin/bash ") and marker in cmd
        ]
        (pid,) = [p for p in shells if _parent(p) not in shells]
        return pid


@pytest.fixture
def keys(cluster):
    return TunnelKeys.for_file(
        cluster.tunnel_authorized_keys, (20000, 29999), cluster.hub_api_ip, cluster.hub_api_port
    )


def submit(
    cluster, keys, *, granted: bool = True, api_timeout: int = 120, server: str = STAND_IN
) -> Job:
    """Write a job directory as the hub would, then sbatch the script as ``gateway``."""
    user = pwd.getpwnam(cluster.gateway_user)
    spawn_id = f"u0-{secrets.token_hex(6)}"
    grant = asyncio.run(keys.grant(spawn_id, 600))
    key = grant.private_key
    if not granted:  # a key the hub's sshd does not know: the forward cannot open
        asyncio.run(keys.revoke(spawn_id))
        key = asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
    rel = f".xsedehub/jobs/{spawn_id}"
    job_dir = Path(user.pw_dir) / rel
    job_dir.mkdir(parents=True, mode=0o700)
    files = {
        "env": slurm.env_file(
            {"JUPYTERHUB_API_URL": f"http://127.0.0.1:{cluster.hub_api_port}/hub/api"},
            f"http://127.0.0.1:{cluster.hub_api_port}",
        ),
        "tunnel_key": key,
        "known_hosts": Path(cluster.known_hosts).read_text(),
    }
    for name, text in files.items():
        fd = os.open(job_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    for path in (job_dir.parent.parent, job_dir.parent, job_dir, *job_dir.iterdir()):
        os.chown(path, user.pw_uid, user.pw_gid)
    for path in (job_dir.parent.parent, job_dir.parent):  # as the hub makes them
        path.chmod(0o700)
    python = f"{cluster.job_env}/bin/python"
    script = slurm.build_job_script(
        slurm.JobScript(
            job_name="xh-jobside",
            resources=slurm.JobResources(partition="debug", walltime_minutes=10, memory_mb=256),
            job_dir=rel,
            work_dir=".",
            singleuser=[python, "-c", server],
            tunnel=slurm.Tunnel(
                host=cluster.hub_ip,
                port=cluster.hub_ssh_port,
                user=cluster.tunnel_user,
                hub_port=grant.port,
                api_host=cluster.hub_api_ip,
                api_port=cluster.hub_api_port,
            ),
            python=python,
            spawn_id=spawn_id,
            api_timeout=api_timeout,
        )
    )
    r = in_cluster(
        cluster,
        "runuser",
        "-u",
        cluster.gateway_user,
        "--",
        "sbatch",
        "--parsable",
        input=script,
        cwd=user.pw_dir,  # as over ssh: the job's --output is relative to it
    )
    assert r.returncode == 0, r.stderr
    return Job(cluster, slurm.parse_sbatch(r.stdout), job_dir, grant.port, key)


def finish(job: Job, keys) -> None:
    in_cluster(job.cluster, "scancel", job.id)
    asyncio.run(keys.revoke(job.dir.name))
    shutil.rmtree(job.dir, ignore_errors=True)


def assert_nothing_left(job: Job) -> None:
    assert not (job.dir / "env").exists(), "the environment (API token) is left"
    assert not (job.dir / "tunnel_key").exists(), "the tunnel key is left"
    for sock in ("hubapi.sock", "server.sock", "tunnel.ctl"):
        assert not (job.dir / sock).exists(), sock
    assert job_processes(job.dir) == {}
    assert port_free(job.hub_port), "the reverse tunnel is still open"
    forwarded = re.search(r"hub API forwarded to local port (\d+)", job.log)
    assert forwarded, job.log
    assert _node_port_free(job.cluster, int(forwarded.group(1)))


def _node_port_free(cluster, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
    return in_cluster(cluster, "python3", "-c", probe).returncode != 0


def _server_exits(job: Job) -> None:
    with socket.create_connection(("127.0.0.1", job.hub_port), 10) as s:
        s.sendall(b"exit")
        assert s.recv(10) == b"ok"


def _scancel(job: Job) -> None:
    in_cluster(job.cluster, "scancel", job.id)


def _walltime_warning(job: Job) -> None:
    # what --signal=B:TERM@60 sends 60 s before the walltime: SIGTERM to the batch shell only
    in_cluster(job.cluster, "scancel", "--batch", "--signal=TERM", job.id)


def _batch_shell_killed(job: Job) -> None:
    os.kill(job.batch_shell(), signal.SIGKILL)


def _agent_killed(job: Job) -> None:
    # the OOM killer takes the agent: the node port it held is free, so the server (whose
    # API URL names that port) must not go on
    agents = [pid for pid, cmd in job_processes(job.dir).items() if " --ctl-fd " in cmd]
    assert len(agents) == 1, job_processes(job.dir)
    os.kill(agents[0], signal.SIGKILL)


@pytest.mark.parametrize(
    "end",
    [_server_exits, _scancel, _walltime_warning, _batch_shell_killed, _agent_killed],
    ids=["server exits", "scancel", "walltime warning", "batch shell killed", "agent killed"],
)
def test_every_way_a_job_ends_leaves_nothing_behind(cluster, keys, end):
    job = submit(cluster, keys)
    try:
        job.wait_serving()
        running = job_processes(job.dir)
        ssh = [cmd for cmd in running.values() if cmd.startswith("ssh ")]
        assert len(ssh) == 1, running  # one connection: the hub API forward and the tunnel
        end(job)
        killed = end is _batch_shell_killed  # nothing of the script's own runs after it
        job.wait_ended("job agent ended" if killed else "job ended")
        print(job.log)
        assert_nothing_left(job)
        if killed:
            assert "the job script is gone while the server runs: ending the server" in job.log
        if end is _agent_killed:
            assert "the job agent ended while the server ran" in job.log
    finally:
        finish(job, keys)


def test_a_hub_api_forward_that_never_opens_fails_the_job(cluster, keys):
    job = submit(cluster, keys, granted=False, api_timeout=5)
    try:
        wait_for(
            lambda: "job ended" in job.log and not job_processes(job.dir),
            90,
            f"job {job.id} to give up",
        )
        log = job.log
        print(log)
        assert "Permission denied" in log  # ssh's own words for the refused key
        assert "the hub API forward did not open within 5 s" in log
        assert "ending the job: the hub API forward did not open" in log
        # the server did start (it starts while the connections open), and the job ended
        # it: the wait above saw no process left that names the job's directory, and
        # job_processes includes the server (its --ServerApp.sock is in that directory)
        assert "starting the single-user server" in log
        assert not (job.dir / "env").exists() and not (job.dir / "tunnel_key").exists()
        assert job.state() in ("FAILED", ""), job.state()
    finally:
        finish(job, keys)


def test_an_agent_that_dies_before_the_forward_opens_ends_the_job_and_says_so(cluster, keys):
    """The hub's sshd refuses the key, so the forward keeps failing; the agent is killed
    (the OOM killer) while the script waits for it: the job ends, naming what happened,
    and leaves neither secrets nor processes."""
    job = submit(cluster, keys, granted=False, api_timeout=120)
    try:
        wait_for(lambda: "Permission denied" in job.log, 60, f"job {job.id}'s first refusal")
        _agent_killed(job)
        wait_for(
            lambda: "job ended" in job.log and not job_processes(job.dir),
            60,
            f"job {job.id} to end: {job_processes(job.dir)}",
        )
        log = job.log
        print(log)
        assert "ending the job: the job agent ended before the hub API forward opened" in log
        assert "[xsedehub] ending the job: the hub API forward did not open" not in log
        assert not (job.dir / "env").exists() and not (job.dir / "tunnel_key").exists()
    finally:
        finish(job, keys)


def test_the_hubs_port_leads_to_the_server_only_once_it_listens(cluster, keys):
    """The job's one connection opens at its start with the hub API forward, but forwards
    nothing from the hub's port while the server starts: the port refuses on the hub
    itself, so the hub's checks cost ssh on the node nothing (it logs no failed connect).
    When the server listens, the reverse forward is added on the open connection: no
    second handshake."""
    job = submit(cluster, keys, server=LATE_STAND_IN)
    try:
        wait_for(
            lambda: "hub API forwarded to local port" in job.log and job.handshakes() == 1,
            90,
            f"job {job.id}'s connection",
        )
        time.sleep(1)  # an -R given at connect time would be listening by now
        for _ in range(5):  # what the hub's checks meet while the server starts
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", job.hub_port), 5)
            time.sleep(0.2)
        assert "connect to" not in job.log, job.log  # ssh on the node was never asked
        (job.dir / "server.sock.go").touch()
        wait_for(lambda: "now leads to the server" in job.log, 60, "the forward to be added")
        with socket.create_connection(("127.0.0.1", job.hub_port), 10) as s:
            s.sendall(b"hello")
            assert s.recv(10) == b"ok"
        assert job.handshakes() == 1, job.log
    finally:
        finish(job, keys)
