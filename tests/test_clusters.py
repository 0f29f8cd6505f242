"""One hub, two clusters (issue 16), against the test ground's real pair: the
mini-Comet and minidelta (each its own SLURM, munge, login sshd and host key).

One hub for the module, in gateway mode with named servers, configured with both
clusters from cluster.json and a profile on each.  One test, to spend one pair of
spawns: a user's two named servers run at once, one on each cluster; then the
mini-Comet's login node goes down, and meanwhile the form shows the mini-Comet
unavailable and minidelta available, and a spawn on minidelta succeeds, while the
server on the mini-Comet stays listed.  On the way: ``xsedehub orphans`` per cluster,
and a hub restart that finds each server again on its own cluster.  Then, without a
hub, a cluster with its own certificate issuer (xsede mode)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from xsedehub.orphans import find_orphans
from xsedehub.testbed import localcluster, localhub

from .conftest import make_hub, stop_all_servers, stop_hub_and_proxy
from .test_named_servers import servers, wait_server

pytestmark = pytest.mark.cluster

USER = "ada-l"  # ada's hub name (her GitHub login)


@pytest.fixture(scope="module")
def sites(cluster):
    return cluster.site("minicomet"), cluster.site("minidelta")


@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    # the demo's: the mini-Comet (first) and minidelta, profiles comet-compute,
    # comet-debug and delta-shared
    extra = (
        "c.JupyterHub.allow_named_servers = True\nc.JupyterHub.named_server_limit_per_user = 3\n"
    ) + localhub.two_clusters_config(cluster)
    h = make_hub(
        tmp_path_factory.mktemp("clustershub"), cluster, provider, poll_interval=5, extra=extra
    )
    yield h
    stop_all_servers(h)
    stop_hub_and_proxy(h)


def _queue(site) -> dict[str, str]:
    """job id -> name, of the cluster's live jobs, as root on that cluster sees them."""
    argv = site.run_argv("squeue", "-h", "-o", "%i|%j|%T")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {
        i: name
        for i, name, state in (ln.strip().split("|") for ln in out.splitlines() if ln.strip())
        if state in ("PENDING", "RUNNING", "CONFIGURING")
    }


def _lost_job(site, spawn_id: str) -> str:
    """A job of the gateway account on ``site`` with xsedehub's comment that no server
    holds."""
    argv = site.run_argv(
        "sbatch",
        "--parsable",
        f"--uid={site.gateway_user}",
        f"--gid={site.gateway_user}",
        f"--comment=xsedehub:{spawn_id}",
        "--time=5",
        "--chdir=/tmp",
        "--output=/dev/null",
        "--wrap",
        "sleep 300",
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    assert out.isdigit(), out
    return out


def test_a_server_on_each_cluster_and_one_cluster_down(hub, sites):
    comet, delta = sites
    c = hub.client
    ada = c.login("ada")
    t0 = time.monotonic()
    # two named servers at once, one on each cluster
    for name, profile in (("c", "comet-compute"), ("d", "delta-shared")):
        r = c.post(f"/users/{USER}/servers/{name}", json={"profile": profile})
        assert r.status_code in (201, 202), r.text
    wait_server(hub, USER, "c", ready=True)
    wait_server(hub, USER, "d", ready=True)
    both = time.monotonic() - t0
    st = {name: srv["state"] for name, srv in servers(hub, USER).items()}
    assert (st["c"]["cluster"], st["d"]["cluster"]) == ("minicomet", "minidelta"), st
    on_comet, on_delta = _queue(comet), _queue(delta)
    assert on_comet.get(st["c"]["job_id"]) == f"jupyter-{USER}-c", on_comet
    assert on_delta.get(st["d"]["job_id"]) == f"jupyter-{USER}-d", on_delta
    assert st["c"]["hub_port"] != st["d"]["hub_port"]
    token = c.user_token(USER)
    for name in ("c", "d"):
        assert c.server_api(f"{USER}/{name}", token, "/status").status_code == 200

    # orphans, per cluster: a lost job on minidelta is one, the servers' jobs are not
    lost = _lost_job(delta, "u99-x-0123456789ab")
    try:
        lines: list[str] = []
        svc = (hub.workdir / "service_token").read_text().strip()
        cfg = str(hub.workdir / "jupyterhub_config.py")
        find_orphans(cfg, c.url, svc, min_age=0, out=lines.append)
        print("\n".join(lines))
        found, where = set(), ""
        for line in lines:
            if line.startswith("cluster "):
                where = line.split()[1].rstrip(":")
            elif line.split("\t")[0].isdigit():
                found.add((where, line.split("\t")[0]))
        assert ("minidelta", lost) in found, lines
        assert ("minicomet", st["c"]["job_id"]) not in found, lines
        assert ("minidelta", st["d"]["job_id"]) not in found, lines
    finally:
        subprocess.run(delta.run_argv("scancel", lost), check=True)

    # a hub restart: each server is found again on its own cluster (the hub polls them
    # at start-up: a poll of minidelta's job on the mini-Comet would end the server)
    hub.restart()
    for name in ("c", "d"):
        assert servers(hub, USER)[name]["ready"], servers(hub, USER)
        assert c.server_api(f"{USER}/{name}", token, "/status").status_code == 200
    assert set(servers(hub, USER)) == {"c", "d"}

    # the mini-Comet's login node goes down: minidelta goes on
    localcluster.stop_daemon("sshd_login")
    try:
        t1 = time.monotonic()
        page = ada.get(f"{c.url}/hub/spawn/{USER}/e", timeout=30).text
        form_s = time.monotonic() - t1
        assert 'data-cluster="minicomet" data-available="no"' in page, page[-3000:]
        assert 'data-cluster="minidelta" data-available="yes"' in page, page[-3000:]
        t2 = time.monotonic()
        r = c.post(f"/users/{USER}/servers/e", json={"profile": "delta-shared"})
        assert r.status_code in (201, 202), r.text
        wait_server(hub, USER, "e", ready=True, timeout=120)
        spawn_s = time.monotonic() - t2
        assert c.server_api(f"{USER}/e", token, "/status").status_code == 200
        # the server on the mini-Comet is kept (its poll cannot reach its cluster)
        assert "c" in servers(hub, USER)
    finally:
        localcluster.up()
    print(
        f"two servers, one per cluster, ready in {both:.1f} s; with the mini-Comet down: "
        f"form in {form_s:.1f} s, a minidelta spawn ready in {spawn_s:.1f} s"
    )
    # stopping the minidelta servers cancels their jobs there, the mini-Comet's stays
    for name in ("d", "e"):
        c.delete(f"/users/{USER}/servers/{name}")
    for name in ("d", "e"):
        wait_server(hub, USER, name, ready=False, timeout=120)
    assert st["d"]["job_id"] not in _queue(delta)
    assert st["c"]["job_id"] in _queue(comet)
    c.delete(f"/users/{USER}/servers/c")
    wait_server(hub, USER, "c", ready=False, timeout=120)
    assert st["c"]["job_id"] not in _queue(comet)


async def test_a_clusters_own_issuer_gives_the_persons_account_there(cluster, provider, tmp_path):
    """xsede mode: minidelta has its own certificate issuer, where alice's account is
    ``bob`` (a person's account name differs between sites).  Her certificate for that
    cluster comes from it, with her login's ID token, is kept in her auth_state (and
    used again while valid), and logs her in to minidelta as that account."""
    import json

    import asyncssh
    from xsedehub.spawner import clusters as cl
    from xsedehub.spawner import identity
    from xsedehub.spawner.spawner import SlurmSSHSpawner

    from .conftest import hub_id_token

    delta = cluster.site("minidelta")
    (tmp_path / "map.json").write_text(
        json.dumps({localhub.ACCESS_IDP: {"alice@access-ci.org": "bob"}})
    )
    proc = localhub.start_issuer(
        tmp_path,
        cluster,
        port=8704,
        provider_url=provider,
        extra_args=("--map", str(tmp_path / "map.json")),
    )
    try:
        # the top-level settings: the spawner's defaults, with the hub's tunnel
        defaults = SlurmSSHSpawner()
        base = {k: getattr(defaults, k) for k in cl.SETTINGS}
        base.update(
            tunnel_host=delta.hub_ip,
            tunnel_known_hosts=cluster.known_hosts,
            tunnel_authorized_keys=cluster.tunnel_authorized_keys,
            partition=delta.default_partition,
        )
        (spec,) = cl.parse_clusters(
            {
                "minidelta": {
                    "login_host": delta.login_ip,
                    "login_port": delta.login_port,
                    "known_hosts": delta.known_hosts,
                    "slurm_bin_dir": delta.slurm_bin,
                    "issuer_url": "http://127.0.0.1:8704/v1/certificate",
                    "issuer_secret_file": localhub.hub_secret_file(cluster),
                }
            },
            base,
            "xsede",
        )

        class User:  # what the spawner reads of a JupyterHub user
            name = "alice"
            state = {"id_token": hub_id_token("cilogon-alice")}

            async def get_auth_state(self):
                return dict(self.state)

            async def save_auth_state(self, state):
                self.state = state

        user = User()
        ident = await identity.cluster_certificate_identity(user, spec)
        assert ident.username == "bob"
        kept = user.state[identity.CLUSTER_STATE_KEY]["minidelta"]
        again = await identity.cluster_certificate_identity(user, spec)
        assert again.certificate.export_certificate() == ident.certificate.export_certificate()
        assert user.state[identity.CLUSTER_STATE_KEY]["minidelta"] == kept
        async with asyncssh.connect(
            delta.login_ip,
            delta.login_port,
            username=ident.username,
            client_keys=[(ident.key, ident.certificate)],
            known_hosts=delta.known_hosts,
            agent_path=None,
            config=None,
            connect_timeout=10,
        ) as conn:
            assert (await conn.run("id -un", check=True)).stdout.strip() == "bob"
    finally:
        proc.terminate()
        proc.wait(10)


def test_check_walks_both_clusters(cluster, tmp_path):
    """``xsedehub check`` on a hub configured with both clusters: every step, the test
    job and its tunnel back to the hub included, on each cluster, under its name."""
    from xsedehub.check import run_check

    cfg = localhub.write_config(tmp_path, cluster, extra=localhub.two_clusters_config(cluster))
    lines: list[str] = []
    report = run_check(str(cfg), out=lines.append, job_timeout=60)
    text = "\n".join(lines)
    print(text)
    assert report.failed == [], text
    comet, delta = text.index("cluster minicomet:"), text.index("cluster minidelta:")
    for part in (text[comet:delta], text[delta:]):
        assert "opened the tunnel back to the hub" in part, part
    delta_site = cluster.site("minidelta")
    assert f"login node {delta_site.login_ip}:{delta_site.login_port} reachable" in text[delta:]


async def test_a_stop_cancels_a_job_of_its_id_only_if_it_is_its_spawns(sites, tmp_path):
    """A state's job id may be another job on the login node it is polled on (a job of
    another cluster, ids reset): stop cancels only the job whose comment is its spawn's."""
    from types import SimpleNamespace

    from traitlets.config import Config
    from xsedehub.spawner.spawner import SlurmSSHSpawner

    comet, _ = sites
    other = await asyncio.to_thread(_lost_job, comet, "u9-0123456789ab")  # another server's
    try:
        c = Config()
        for k, val in {
            "login_host": comet.login_ip,
            "login_port": comet.login_port,
            "known_hosts": comet.known_hosts,
            "slurm_bin_dir": comet.slurm_bin,
            "gateway_user": comet.gateway_user,
            "gateway_key": comet.gateway_key,
            "tunnel_authorized_keys": str(tmp_path / "tunnel_keys"),
            "pending_cancel_file": str(tmp_path / "pending.json"),
        }.items():
            setattr(c.SlurmSSHSpawner, k, val)
        sp = SlurmSSHSpawner(
            config=c,
            user=SimpleNamespace(name="ada", id=7, groups=[], url="/user/ada/"),
            hub=SimpleNamespace(api_url="http://127.0.0.1:8081/hub/api"),
        )
        sp.load_state({"version": 1, "job_id": other, "spawn_id": "u7-000000000000"})
        await sp.stop()
        assert other in await asyncio.to_thread(_queue, comet)
        assert not (tmp_path / "pending.json").exists()
    finally:
        await asyncio.to_thread(subprocess.run, comet.run_argv("scancel", other), check=True)
