"""mode=gateway end to end against the real local cluster: provider login, real hub and
proxy, real sbatch, real tunnel, real JupyterLab on a compute node."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from xsedehub.spawner.tunnel import TunnelKeys

from xsedehub.testbed import localcluster, localhub
from xsedehub.testbed.netns import nsenter_argv

from .audit import ArgvScanner, audit, server_env
from .conftest import PROVIDER, listening, make_hub, stop_hub_and_proxy
from .hubclient import LoginRefused

pytestmark = pytest.mark.cluster

POLL = 5  # the hub's poll interval in these tests (seconds)


@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    # the attendee sandbox off, as on a site without user namespaces that chose so: these
    # tests show what holds without it (tests/test_sandbox.py runs the same flow in it)
    h = make_hub(
        tmp_path_factory.mktemp("gwhub"),
        cluster,
        provider,
        poll_interval=POLL,
        extra='c.SlurmSSHSpawner.sandbox = "none"',
    )
    yield h
    stop_hub_and_proxy(h)


def in_cluster_root(argv: list[str]) -> str:
    return subprocess.run(
        [*nsenter_argv("xh-cluster"), *argv], capture_output=True, text=True, check=False
    ).stdout


def job_id_of(hub, name: str) -> str:
    # the spawner's state is not in the REST model; find the job by name in squeue
    out = in_cluster_root(["squeue", "-h", "-u", "gateway", "-n", f"jupyter-{name}", "-o", "%i %T"])
    ids = [line.split()[0] for line in out.splitlines() if "RUNNING" in line]
    assert len(ids) == 1, out
    return ids[0]


# --------------------------------------------------------------------------- the flow
async def test_two_attendees_at_once(hub, cluster):
    c = hub.client
    for sub in ("ada", "grace"):
        c.login(sub)
    names = ["ada-l", "grace"]  # GitHub logins, lowercased by the hub
    # each login made a hub user named after the GitHub login, bound to the numeric id
    for name, gh_id in zip(names, (1001, 1002), strict=True):
        assert c.get(f"/users/{name}").json()["auth_state"]["github_user"]["id"] == gh_id
    sshd_log = Path(cluster.root) / "log" / "sshd_login.log"
    logins_before = sshd_log.read_text().count("Accepted publickey for gateway")
    with ArgvScanner() as scan:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            for r in ex.map(c.start, names):
                assert r.status_code in (201, 202), r.text
            list(ex.map(c.wait_ready, names))
    jobs = {}
    for name in names:
        tok = c.user_token(name)
        r = c.server_api(name, tok, "/contents/workshop")
        assert r.status_code == 200, r.text
        files = {x["name"] for x in r.json()["content"]}
        assert {"01-where-am-i.ipynb", "02-cores.ipynb"} <= files
        out = await c.execute(
            name,
            tok,
            "import os; e = os.environ; print(e['SLURM_JOB_ID'], e['SLURMD_NODENAME'], os.getcwd())",  # noqa: E501
        )
        job, node, cwd = out.split()
        assert node in cluster.nodes
        assert cwd == f"/home/gateway/workshop/{name}"
        jobs[name] = job
        assert in_cluster_root(["squeue", "-h", "-j", job, "-o", "%T %N"]).split() == [
            "RUNNING",
            node,
        ]
    assert jobs["ada-l"] != jobs["grace"]
    # one SSH connection served both spawns and every poll since (at most one handshake)
    assert sshd_log.read_text().count("Accepted publickey for gateway") - logins_before <= 1

    # the secrets audit: argv on both sides, hub log at DEBUG, daemon logs, job logs,
    # SLURM's stored job scripts, file modes of the job directories
    checked = audit(scan, list(jobs.values()), hub.log)
    assert checked >= 6
    for job in jobs.values():
        assert server_env(job)["JUPYTERHUB_API_URL"].startswith("http://127.0.0.1:")

    # stop removes the jobs from the queue
    for name in names:
        c.stop(name)
    for job in jobs.values():
        state = in_cluster_root(["squeue", "-h", "-j", job, "-o", "%T"]).strip()
        assert state in ("", "CANCELLED", "COMPLETING", "COMPLETED"), state
    # and the per-job tunnel keys are gone from the tunnel account (their ports are held
    # by comments until the keys would have expired: no key line is left)
    keys = Path(cluster.tunnel_authorized_keys).read_text().splitlines()
    assert not [ln for ln in keys if " xsedehub:" in ln and not ln.startswith("#")], keys


async def test_edits_survive_a_restart_of_the_server(hub):
    c = hub.client
    c.login("grace")
    c.start("grace")
    c.wait_ready("grace")
    tok = c.user_token("grace")
    path = "/contents/workshop/01-where-am-i.ipynb"
    nb = c.server_api("grace", tok, path).json()
    nb["content"]["cells"].append(
        {"cell_type": "markdown", "metadata": {}, "source": "my own note", "id": "mine"}
    )
    r = c.server_api("grace", tok, path, "PUT", json={"type": "notebook", "content": nb["content"]})
    assert r.status_code == 200, r.text
    c.stop("grace")
    c.start("grace")  # nbgitpuller runs again on this start
    c.wait_ready("grace")
    nb = c.server_api("grace", c.user_token("grace"), path).json()
    assert nb["content"]["cells"][-1]["source"] == "my own note"
    c.stop("grace")


def test_renamed_login_cannot_take_over_a_folder(hub):
    """Someone who registers a login another attendee used gets a clear error."""
    c = hub.client
    localhub.put_user(PROVIDER, "impostor", {"login": "Ada-L", "id": 666, "email": "x@example.org"})
    c.login("ada")  # the real one first (folder bound to id 1001)
    c.start("ada-l")
    c.wait_ready("ada-l")
    c.stop("ada-l")
    c.login("impostor")
    r = c.start("ada-l")
    deadline = time.monotonic() + 60
    while r.status_code == 202 and time.monotonic() < deadline:
        if not c.user("ada-l").get("pending"):
            break
        time.sleep(0.5)
    assert not c.user("ada-l")["servers"], "the impostor got a server"
    assert "belongs to another GitHub account" in hub.log
    owner = Path("/home/gateway/workshop/ada-l/.xsedehub-owner").read_text().strip()
    assert owner == "1001"
    c.login("ada")  # give the folder's real owner back their auth_state


@pytest.mark.parametrize("login", ["rm -rf ~", "a;id", "../etc", "-oProxyCommand=x", "x" * 60, "é"])
def test_hostile_github_logins_are_refused(hub, login):
    c = hub.client
    sub = "hostile-" + str(abs(hash(login)))
    localhub.put_user(PROVIDER, sub, {"login": login, "id": 4242, "email": "h@example.org"})
    with pytest.raises(LoginRefused) as e:
        c.login(sub)
    assert e.value.status == 403
    assert "cannot use the workshop hub" in e.value.body


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text()


def _ssh_login(cluster, key: Path) -> subprocess.CompletedProcess[str]:
    """Log in to the login node as the gateway account with ``key``, from the hub."""
    return subprocess.run(
        [
            "ssh",
            *("-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"),
            *("-o", f"UserKnownHostsFile={cluster.known_hosts}", "-F", "/dev/null"),
            *("-p", str(cluster.login_port), f"{cluster.gateway_user}@{cluster.login_ip}"),
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_an_attendee_cannot_steer_the_hubs_commands(hub, cluster, tmp_path):
    """Attendees share the gateway account.  One of them plants a fake squeue in ~/bin, a
    .bashrc that puts it first and shadows SLURM's commands by name and by absolute path,
    and a key of their own in ~/.ssh/authorized_keys.  None of it reaches the hub's
    commands: the other attendee's server keeps running and is still seen as running, the
    real squeue keeps answering, and the planted key logs nobody in."""
    c = hub.client
    for sub in ("ada", "grace"):
        c.login(sub)
    names = ["ada-l", "grace"]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        for r in ex.map(c.start, names):
            assert r.status_code in (201, 202), r.text
        list(ex.map(c.wait_ready, names))
    home = Path(f"/home/{cluster.gateway_user}")
    # what the attendee will change, as it was (None: not there), to put back afterwards
    touched = [home / "bin", home / "bin" / "squeue", home / ".ssh"]
    touched += [home / ".ssh" / "authorized_keys", home / ".bashrc"]
    saved = {p: (p.read_bytes() if p.is_file() else p.is_dir() or None) for p in touched}
    key = tmp_path / "attendee_key"
    pub = _keygen(key)
    code = f"""
import pathlib
home = pathlib.Path.home()
(home / "bin").mkdir(exist_ok=True)
fake = home / "bin" / "squeue"
fake.write_text("#!/bin/sh\\nexit 0\\n")  # squeue that lists no job: all servers "gone"
fake.chmod(0o755)
rc = home / ".bashrc"  # on top: Debian's own .bashrc returns early when not interactive
rc.write_text(
    'export PATH="$HOME/bin:$PATH"\\n'
    "squeue() {{ :; }}\\nfunction {cluster.slurm_bin}/squeue {{ :; }}\\n" + rc.read_text()
)
(home / ".ssh").mkdir(mode=0o700, exist_ok=True)
with open(home / ".ssh" / "authorized_keys", "a") as f:
    f.write({pub!r})
print("planted in", home)
"""
    try:
        out = await c.execute("ada-l", c.user_token("ada-l"), code)
        assert f"planted in {home}" in out
        t0, log_at = time.time(), len(hub.log)

        # until the hub's shared squeue ran twice since, and JupyterHub polled both servers
        # (at most four poll intervals: with a faked squeue, the real one never runs)
        def squeues() -> int:
            return localcluster.command_counts(Path(cluster.root), since=t0)["squeue"]

        while time.time() - t0 < 4 * POLL and not (squeues() >= 2 and time.time() - t0 > 2 * POLL):
            time.sleep(1)
        for name in names:
            assert c.user(name)["servers"].get("", {}).get("ready"), f"{name} seen as stopped"
            assert c.server_api(name, c.user_token(name), "/status").status_code == 200
        assert "gone from" not in hub.log[log_at:]  # "gone from SLURM"
        counts = localcluster.command_counts(Path(cluster.root), since=t0)
        assert counts["squeue"] >= 2, counts  # the real squeue, by its configured path
        r = _ssh_login(cluster, key)
        assert r.returncode == 255 and "Permission denied" in r.stderr, (r.returncode, r.stderr)
    finally:
        for path, was in reversed(saved.items()):
            if isinstance(was, bytes):
                path.write_bytes(was)
            elif was is None and path.is_dir():
                shutil.rmtree(path)
            elif was is None:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- faults
def test_job_cancelled_outside_is_noticed(hub):
    c = hub.client
    c.login("ada")
    c.start("ada-l")
    c.wait_ready("ada-l")
    job = job_id_of(hub, "ada-l")
    in_cluster_root(["scancel", job])
    t0 = time.monotonic()
    c.wait_stopped("ada-l", timeout=3 * POLL + 10)
    took = time.monotonic() - t0
    print(f"noticed an outside scancel after {took:.1f}s (poll interval {POLL}s)")
    assert took <= POLL + POLL + 5  # one poll interval (+ the shared squeue's age + slack)


def test_server_survives_hub_restart_and_login_node_outage(hub, cluster):
    c = hub.client
    c.login("grace")
    c.start("grace")
    c.wait_ready("grace")
    tok = c.user_token("grace")
    job = job_id_of(hub, "grace")

    hub.restart()
    assert c.user("grace")["servers"][""]["ready"]
    r = c.server_api("grace", tok, "/status")
    assert r.status_code == 200, r.text

    # the login node's sshd goes away for 30 s: polls fail, the server stays
    localcluster.stop_daemon("sshd_login")
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            assert c.user("grace")["servers"].get(""), (
                "server removed while the login node was down"
            )
            assert c.server_api("grace", tok, "/status").status_code == 200
            time.sleep(2)
        assert "poll could not reach the cluster" in hub.log
    finally:
        localcluster.up()
    assert in_cluster_root(["squeue", "-h", "-j", job, "-o", "%T"]).strip() == "RUNNING"
    c.stop("grace")
    assert in_cluster_root(["squeue", "-h", "-j", job, "-o", "%T"]).strip() in (
        "",
        "CANCELLED",
        "COMPLETING",
    )


# --------------------------------------------------------------------------- tunnelbot
def tunnel_ssh_argv(cluster, key: Path, *args: str) -> list[str]:
    """ssh as the tunnel account from the cluster side, with ``key``."""
    return [
        *nsenter_argv(cluster.cluster_netns),
        *["ssh", "-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes"],
        *["-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={cluster.known_hosts}"],
        *["-o", "StrictHostKeyChecking=yes", "-o", "ExitOnForwardFailure=yes"],
        *["-p", str(cluster.hub_ssh_port), *args, f"{cluster.tunnel_user}@{cluster.hub_ip}"],
    ]


def _tunnel_ssh(cluster, key: Path, *args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(
        tunnel_ssh_argv(cluster, key, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_tunnelbot_is_confined(hub, cluster, tmp_path):
    keys = TunnelKeys.for_file(
        cluster.tunnel_authorized_keys, (20000, 29999), cluster.hub_api_ip, cluster.hub_api_port
    )
    grant = await keys.grant("u0-confinement-test", 300)
    key = tmp_path / "key"
    key.write_text(grant.private_key)
    key.chmod(0o600)
    try:
        # no shell, no command
        r = _tunnel_ssh(cluster, key, "-T", "--", "id")
        assert "uid=" not in r.stdout
        assert r.returncode != 0
        # -L to the hub API works ...
        api_ok, _ = _forward_get(
            cluster, key, f"{cluster.hub_api_ip}:{cluster.hub_api_port}", "/hub/api/"
        )
        assert api_ok.startswith("HTTP/1.1 200"), api_ok
        # ... to anything else on the hub does not (the proxy, the provider, sshd itself):
        # sshd refuses the channel, and ssh says so
        for target in ("127.0.0.1:8000", "127.0.0.1:9400", f"{cluster.hub_ip}:22"):
            data, ssh_err = _forward_get(cluster, key, target, "/")
            assert data == "", target
            assert "open failed: administratively prohibited" in ssh_err, (target, ssh_err)
        # -R on its own port works (the hub side then listens on loopback) ...
        own = subprocess.Popen(
            tunnel_ssh_argv(cluster, key, "-N", "-R", f"127.0.0.1:{grant.port}:127.0.0.1:9"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not listening(grant.port) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert listening(grant.port)
        finally:
            own.terminate()
            own.wait(5)
        # ... not on another port, not on a public address
        # (ssh's own words for a refused forward, after a successful login)
        other = _tunnel_ssh(cluster, key, "-N", "-R", f"127.0.0.1:{grant.port + 1}:127.0.0.1:9")
        assert other.returncode == 255
        assert f"remote port forwarding failed for listen port {grant.port + 1}" in other.stderr
        public = _tunnel_ssh(cluster, key, "-N", "-R", f"{cluster.hub_ip}:{grant.port}:127.0.0.1:9")
        assert public.returncode == 255
        assert f"remote port forwarding failed for listen port {grant.port}" in public.stderr
    finally:
        await keys.revoke("u0-confinement-test")
    # a revoked key no longer logs in at all
    r = _tunnel_ssh(cluster, key, "-N", "-R", f"127.0.0.1:{grant.port}:127.0.0.1:9")
    assert r.returncode == 255 and "permission denied" in r.stderr.lower()


def _forward_get(cluster, key: Path, target: str, path: str) -> tuple[str, str]:
    """Open ``-L`` to ``target`` from the cluster side and send one HTTP request; return
    what came back and what ssh said on stderr."""
    port = 39000 + (hash(target) % 500)
    proc = subprocess.Popen(
        tunnel_ssh_argv(cluster, key, "-N", "-L", f"127.0.0.1:{port}:{target}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        script = (
            "import socket,sys,time\n"
            "for _ in range(100):\n"
            "    try:\n"
            f"        s=socket.create_connection(('127.0.0.1',{port}),2); break\n"
            "    except OSError: time.sleep(0.1)\n"
            f"s.sendall(b'GET {path} HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n'); s.settimeout(5)\n"
            "data=b''\n"
            "try:\n"
            "    while (chunk := s.recv(4096)): data += chunk\n"
            "except OSError: pass\n"
            "sys.stdout.write(data.decode(errors='replace')[:200])\n"
        )
        r = subprocess.run(
            [*nsenter_argv(cluster.cluster_netns), "python3", "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        proc.terminate()
        _, ssh_err = proc.communicate(timeout=5)
    return r.stdout, ssh_err
