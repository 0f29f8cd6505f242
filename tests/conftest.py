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

from xsedehub.testbed import netns
from xsedehub.testbed.localcluster import ClusterInfo

HERE = Path(__file__).parent


def _cluster_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the local cluster needs root"
    if not Path("/etc/debian_version").exists():
        return "the local cluster needs Debian/Ubuntu"
    return None


def pytest_collection_modifyitems(config, items):
    """Every test that uses the cluster (directly or through a hub) is marked ``cluster``,
    so ``-m "not cluster"`` selects exactly the tests that run without it; a test that
    takes the cluster down runs after all others, whatever the order of the modules."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
    items.sort(key=lambda item: item.get_closest_marker("takes_cluster_down") is not None)


@pytest.fixture(scope="session")
def cluster() -> ClusterInfo:
    why = _cluster_unavailable()
    if why:
        pytest.fail(
            f"{why}: run the suite as root on Debian (bash scripts/test.sh), "
            'or only the tests that need no cluster: pytest -m "not cluster"',
            pytrace=False,
        )
    r = subprocess.run(
        [sys.executable, "-m", "xsedehub.cli", "cluster", "up"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        pytest.fail(f"xsedehub cluster up failed:\n{r.stdout}\n{r.stderr}", pytrace=False)
    info = ClusterInfo.load()
    # kept open: tests that must start something from the host's namespace, as the
    # README's commands are started, enter it again through this file (host_netns_path)
    HOST_NETNS.setdefault("fd", os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    here = os.readlink("/proc/thread-self/ns/net")
    hub = os.stat(netns.netns_path(info.hub_netns))
    if os.stat("/proc/thread-self/ns/net").st_ino != hub.st_ino:
        netns.enter(info.hub_netns)
    assert os.readlink("/proc/thread-self/ns/net") != here or here.endswith(f"[{hub.st_ino}]")
    return info


HOST_NETNS: dict[str, int] = {}


def host_netns_path() -> str:
    """A path to the network namespace the test process started in (the host's)."""
    return f"/proc/{os.getpid()}/fd/{HOST_NETNS['fd']}"


def listening(port: int) -> bool:
    """Something accepts connections on the hub side's 127.0.0.1:``port``."""

    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def fill_nodes(info: ClusterInfo) -> list[str]:
    """Jobs (as bob) that take every idle core of every node: the queue is busy until
    they are cancelled.  Returns their job ids, once they run."""
    import time

    fillers = []
    # one line per node and partition: the same node shows up once per partition
    lines = in_cluster(info, "sinfo", "-h", "-N", "-o", "%N %C").stdout.splitlines()
    idle_cpus = {ln.split()[0]: int(ln.split()[1].split("/")[1]) for ln in lines}  # A/I/O/T
    for node, idle in sorted(idle_cpus.items()):
        if node not in info.nodes or idle == 0:
            continue
        out = in_cluster(
            info,
            "sbatch",
            "--parsable",
            "--uid=bob",
            "--gid=bob",
            "-w",
            node,
            "-c",
            str(idle),
            "--time=10",
            "--chdir=/tmp",
            "--output=/dev/null",
            "--wrap",
            "sleep 600",
        ).stdout
        fillers.append(out.strip())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = in_cluster(info, "squeue", "-h", "-j", ",".join(fillers), "-o", "%T").stdout
        if states.split() == ["RUNNING"] * len(fillers):
            return fillers
        time.sleep(0.2)
    in_cluster(info, "scancel", *fillers)  # never leave a busy queue behind
    raise AssertionError(f"filler jobs {fillers} did not start")


#: injected commands in hostile input ``touch`` files that start with this
CANARY = "/tmp/xh-canary"


def canaries() -> list[str]:
    """Files an injected ``touch`` made: on the cluster's side /tmp and homes are this
    machine's (namespaces share the filesystem); a relative touch lands in a home."""
    import glob

    found = glob.glob(CANARY + "*")
    found += subprocess.run(
        ["find", "/home", "/root", "-maxdepth", "4", "-name", "xh-canary*"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return found


def remove_canaries() -> None:
    for f in canaries():
        os.unlink(f)


def in_cluster(info: ClusterInfo, *argv: str, **kw) -> subprocess.CompletedProcess[str]:
    """Run a command on the cluster side (login/compute nodes share the cluster namespace)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("check", False)
    return subprocess.run([*netns.nsenter_argv(info.cluster_netns), *argv], **kw)


# --------------------------------------------------------------------------- hubs
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

from xsedehub.spawner.tunnel import port_free  # noqa: E402

from xsedehub.testbed import localhub  # noqa: E402

from .hubclient import Hub  # noqa: E402

PROVIDER = "http://127.0.0.1:9400"

#: identities at the local provider: sub -> claims (GitHub-like and CILogon-like)
IDENTITIES = {
    "ada": {"login": "Ada-L", "id": 1001, "email": "ada@example.org"},
    "grace": {"login": "grace", "id": 1002, "email": "grace@example.org"},
    "admin": {"login": "admin", "id": 1, "email": "admin@example.org"},
    # CILogon-like identities from the ACCESS IdP (xsede mode)
    "cilogon-alice": {
        "idp": localhub.ACCESS_IDP,
        "eppn": "alice@access-ci.org",
        "email": "alice@uni.example",
    },
    "cilogon-bob": {
        "idp": localhub.ACCESS_IDP,
        "eppn": "bob@access-ci.org",
        "email": "bob@uni.example",
    },
    "cilogon-mallory": {
        "idp": localhub.ACCESS_IDP,
        "eppn": "mallory@elsewhere.example",
        "email": "mallory@elsewhere.example",
    },
}


@pytest.fixture(scope="session")
def provider(cluster, tmp_path_factory):
    """oidc-provider-mock on the hub side's loopback, standing in for GitHub/CILogon."""
    if not port_free(9400):
        pytest.fail("port 9400 is taken on the hub side")
    proc = localhub.start_provider(tmp_path_factory.mktemp("provider"))
    for sub, claims in IDENTITIES.items():
        localhub.put_user(PROVIDER, sub, claims)
    yield PROVIDER
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def issuer(cluster, provider, tmp_path_factory):
    """The reference certificate issuer, signing with the local cluster's user CA."""
    wd = tmp_path_factory.mktemp("issuer")
    proc = localhub.start_issuer(wd, cluster, provider_url=provider, lifetime="1h")
    ISSUER["proc"] = proc
    yield wd
    proc.terminate()
    proc.wait(10)


ISSUER: dict = {}  # the session issuer's process (fault tests pause it)


def provider_tokens(sub: str, client_id: str = "t") -> dict:
    """The provider's token response (access, refresh and ID token) for ``sub`` logging
    in at the client ``client_id`` (authorization code flow)."""
    import re
    from urllib.parse import parse_qs, urlparse

    import requests

    cb = "http://127.0.0.1:1/cb"
    r = requests.post(
        f"{PROVIDER}/oauth2/authorize",
        params={
            "client_id": client_id,
            "redirect_uri": cb,
            "response_type": "code",
            "scope": "openid email org.cilogon.userinfo",
        },
        data={"sub": sub},
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code == 302, r.text
    code = parse_qs(urlparse(r.headers["Location"]).query)["code"][0]
    r = requests.post(
        f"{PROVIDER}/oauth2/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": cb,
            "client_id": client_id,
            "client_secret": "s",
        },
        timeout=10,
    )
    r.raise_for_status()
    tokens = r.json()
    assert re.match(r"^[\w.~+/=-]+$", tokens["access_token"])
    return tokens


def provider_token(sub: str) -> str:
    """An access token for ``sub`` straight from the provider (authorization code flow)."""
    return provider_tokens(sub)["access_token"]


def hub_id_token(sub: str) -> str:
    """An ID token for ``sub`` as the local hub gets it at login (audience: the hub's
    client id): what the hub hands the issuer."""
    return provider_tokens(sub, localhub.HUB_CLIENT_ID)["id_token"]


def hub_secret(info: ClusterInfo) -> str:
    """The secret the local hubs authenticate to the local issuers with."""
    return Path(localhub.hub_secret_file(info)).read_text().strip()


class RunningHub:
    def __init__(self, workdir, proc, client: Hub):
        self.workdir, self.proc, self.client = workdir, proc, client

    @property
    def log(self) -> str:
        return (self.workdir / "hub.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def restart(self) -> None:
        self.stop()
        self.proc = localhub.start_hub(self.workdir)

    def kill_and_start(self) -> None:
        """SIGKILL the hub (no shutdown code runs, as in a crash or OOM kill), then start it."""
        self.proc.kill()
        self.proc.wait(10)
        self.proc = localhub.start_hub(self.workdir)


def make_hub(workdir, cluster, provider, **kw) -> RunningHub:
    busy = [p for p in (8000, 8001, cluster.hub_api_port) if not port_free(p)]
    if busy:
        pytest.fail(f"ports {busy} are taken on the hub side (a hub left from an earlier run?)")
    localhub.write_config(workdir, cluster, provider_url=provider, **kw)
    proc = localhub.start_hub(workdir)
    token = (workdir / "service_token").read_text().strip()
    return RunningHub(workdir, proc, Hub("http://127.0.0.1:8000", token, provider))


def stop_all_servers(hub: RunningHub, timeout: float = 60) -> None:
    """Stop every server of every user of ``hub`` (named ones too) and wait for it."""
    users = hub.client.get("/users").json()
    for u in users:
        for server in u["servers"]:
            path = (
                f"/users/{u['name']}/servers/{server}" if server else f"/users/{u['name']}/server"
            )
            hub.client.delete(path)
    for u in users:
        if u["servers"]:
            try:
                hub.client.wait_stopped(u["name"], timeout)
            except TimeoutError:
                print(f"{u['name']}'s server did not stop within {timeout}s")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test on a hub carries the last lines of that hub's log in its report,
    so a failure seen only in CI can be understood from CI's output alone."""
    report = yield
    hub = getattr(item, "funcargs", {}).get("hub")
    if report.failed and isinstance(hub, RunningHub):
        try:
            tail = "\n".join(hub.log.splitlines()[-80:])
        except OSError as e:
            tail = f"(hub log unreadable: {e})"
        report.sections.append((f"hub log, last 80 lines ({call.when})", tail))
    return report


@pytest.fixture(autouse=True)
def _servers_stopped_after_each_test(request):
    """Whatever happened in a test, the servers it started on its module's hub are
    stopped before the next test starts (a failed test must not fail the next ones)."""
    yield
    hub = request.node.funcargs.get("hub")
    if isinstance(hub, RunningHub) and hub.proc.poll() is None:
        try:
            stop_all_servers(hub)
        except Exception as e:  # report, but let the test's own outcome stand
            print(f"stopping the servers after {request.node.name} failed: {e}")


def stop_hub_and_proxy(hub: RunningHub) -> None:
    """Stop every server, the hub and the (hub-independent) proxy."""
    try:
        stop_all_servers(hub)
    except Exception as e:  # the hub may be what failed: still stop everything
        print(f"stopping servers failed: {e}")
    hub.stop()
    localhub.stop_proxy(hub.workdir)
    deadline = time.monotonic() + 15
    while not all(port_free(p) for p in (8000, 8001)) and time.monotonic() < deadline:
        time.sleep(0.1)
