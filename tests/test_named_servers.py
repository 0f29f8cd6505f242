"""Several servers per user, and "start again as last time", on the local cluster: two
named servers of one user at once (their own job, folder, hub-side port and tunnel key;
stopping one leaves the other; the job name and ``xsedehub orphans`` say which server a
job is for), and the form's pre-fill and the home page's relaunch in a real headless
Chromium.  One hub for the module (gateway mode, named servers on)."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from xsedehub.spawner import slurm

from xsedehub.orphans import find_orphans

from .conftest import make_hub, stop_hub_and_proxy
from .test_admin import _lost_job
from .test_browser import ARGS, ARTIFACTS, CHROMIUM, HUB
from .test_gateway import in_cluster_root

pytestmark = pytest.mark.cluster

POLL = 5


@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    h = make_hub(
        tmp_path_factory.mktemp("namedhub"),
        cluster,
        provider,
        poll_interval=POLL,
        extra="c.JupyterHub.allow_named_servers = True\n"
        "c.JupyterHub.named_server_limit_per_user = 3",
    )
    yield h
    stop_hub_and_proxy(h)


def servers(hub, user: str) -> dict:
    return hub.client.user(user)["servers"]


def wait_server(hub, user: str, server: str, *, ready: bool, timeout: float = 240) -> dict:
    """Until ``user``'s ``server`` is ready (``ready``) or gone (not ``ready``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        srv = servers(hub, user).get(server)
        if ready and srv and srv.get("ready"):
            return srv
        if not ready and srv is None:
            return {}
        if ready and srv is None:
            raise RuntimeError(f"{user}/{server} is gone: {hub.log[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"{user}/{server}: not {'ready' if ready else 'gone'} in {timeout}s")


def queue(user: str = "gateway") -> dict[str, dict[str, str]]:
    """The account's live jobs: id -> name, comment, partition, time limit, CPUs, state."""
    out = in_cluster_root(["squeue", "-h", "-u", user, "-o", "%i|%j|%k|%P|%l|%C|%T"])
    jobs = {}
    for line in out.splitlines():
        i, name, comment, part, limit, cpus, state = line.strip().split("|")
        if state in ("PENDING", "RUNNING", "CONFIGURING"):
            jobs[i] = dict(name=name, comment=comment, partition=part, limit=limit, cpus=cpus)
    return jobs


async def test_named_servers_and_start_again_as_last_time(hub, cluster):
    """Item 3 with the REST API, then item 4 in the browser with the servers item 3 left
    (one test: each spawn costs the suite's time)."""
    st = two_named_servers_of_one_user_at_once(hub, cluster)
    await form_prefill_and_start_again_in_a_browser(hub, st)


def two_named_servers_of_one_user_at_once(hub, cluster) -> dict:
    """Two named servers of ada at once: each its own job, folder, port and key; the
    job name and ``xsedehub orphans`` name the server; stopping one (gpu) leaves the
    other (cpu) running.  Returns their saved states."""
    c = hub.client
    c.login("ada")
    user = "ada-l"
    r1 = c.post(f"/users/{user}/servers/cpu", json={"partition": "compute", "cores": "2"})
    r2 = c.post(
        f"/users/{user}/servers/gpu", json={"partition": "debug", "walltime": "20", "cores": "2"}
    )
    assert r1.status_code in (201, 202) and r2.status_code in (201, 202), (r1.text, r2.text)
    # a server name that cannot reach a job name, a folder or a comment is refused
    bad = c.post(f"/users/{user}/servers/a..b", json={})
    assert bad.status_code == 400, bad.text
    wait_server(hub, user, "cpu", ready=True)
    wait_server(hub, user, "gpu", ready=True)
    st = {name: srv["state"] for name, srv in servers(hub, user).items()}
    assert set(st) == {"cpu", "gpu"}
    # each its own job, spawn (comment, folder, key) and hub-side port
    assert st["cpu"]["job_id"] != st["gpu"]["job_id"]
    assert st["cpu"]["hub_port"] != st["gpu"]["hub_port"]
    assert st["cpu"]["spawn_id"] != st["gpu"]["spawn_id"]
    jobs = queue()
    keys = Path(cluster.tunnel_authorized_keys).read_text()
    home = Path(f"/home/{cluster.gateway_user}/.xsedehub/jobs")
    for name, part in (("cpu", "compute"), ("gpu", "debug")):
        s = st[name]
        assert slurm.server_of(s["spawn_id"]) == name
        j = jobs[s["job_id"]]
        assert j["name"] == f"jupyter-{user}-{name}", j
        assert j["comment"] == f"xsedehub:{s['spawn_id']}" and j["partition"] == part, j
        key = [ln for ln in keys.splitlines() if ln.endswith(f" xsedehub:{s['spawn_id']}")]
        assert len(key) == 1 and f'permitlisten="127.0.0.1:{s["hub_port"]}"' in key[0], key
        assert (home / s["spawn_id"] / "env").exists()
    assert jobs[st["gpu"]["job_id"]]["limit"] == "20:00"
    assert jobs[st["cpu"]["job_id"]]["cpus"] == "2"
    token = c.user_token(user)
    for name in ("cpu", "gpu"):
        assert c.server_api(f"{user}/{name}", token, "/status").status_code == 200

    # orphans: the servers the hub knows are left out; a lost job says whose server it was
    lost = _lost_job("u99-gpu-0123456789ab")
    try:
        lines: list[str] = []
        cfg = str(hub.workdir / "jupyterhub_config.py")
        svc = (hub.workdir / "service_token").read_text().strip()
        # in a thread of its own: it runs its own event loop (this test runs in one)
        with ThreadPoolExecutor(1) as ex:
            run = ex.submit(find_orphans, cfg, c.url, svc, min_age=0, out=lines.append)
            found = {j.job_id for j in run.result()}
        print("\n".join(lines))
        assert lost in found and not found & {st["cpu"]["job_id"], st["gpu"]["job_id"]}
        line = next(ln for ln in lines if ln.startswith(f"{lost}\t"))
        assert line.split("\t")[4:6] == ["u99-gpu-0123456789ab", "server gpu"], line
    finally:
        in_cluster_root(["scancel", lost])

    # stopping one leaves the other
    r = c.delete(f"/users/{user}/servers/gpu")
    assert r.status_code in (202, 204), r.text
    wait_server(hub, user, "gpu", ready=False, timeout=120)
    gpu = st["gpu"]
    assert gpu["job_id"] not in queue()
    assert f"xsedehub:{gpu['spawn_id']}" not in Path(cluster.tunnel_authorized_keys).read_text()
    assert not (home / gpu["spawn_id"] / "env").exists()
    assert not (home / gpu["spawn_id"] / "tunnel_key").exists()
    assert st["cpu"]["job_id"] in queue()
    assert f"xsedehub:{st['cpu']['spawn_id']}" in Path(cluster.tunnel_authorized_keys).read_text()
    assert (home / st["cpu"]["spawn_id"] / "env").exists()
    assert c.server_api(f"{user}/cpu", token, "/status").status_code == 200
    assert set(servers(hub, user)) == {"cpu"}
    return st


def _job_of(user: str, server: str) -> dict[str, str] | None:
    mine = [j for j in queue().values() if j["name"] == f"jupyter-{user}-{server}"]
    assert len(mine) <= 1, mine
    return mine[0] if mine else None


async def form_prefill_and_start_again_in_a_browser(hub, st: dict) -> None:
    """ada's gpu server, stopped, was last started with debug, 20 minutes, 2 cores: its
    form is filled in with them; the home page's "Start again as last time" starts it
    with them in one click; once the admin has lowered the partition's walltime, the
    same click submits nothing and shows the form, with the value that no longer fits
    replaced by today's default and a note saying why."""
    from playwright.async_api import async_playwright, expect

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (scripts/install.sh installs it)")
    user, server = "ada-l", "gpu"
    token = hub.client.user_token(user)
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
        page = await ctx.new_page()
        page.set_default_timeout(60_000)
        try:
            await page.goto(f"{HUB}/hub/login")
            await page.get_by_text("Sign in with GitHub").click()
            await page.fill('input[name="sub"]', "ada")
            await page.get_by_role("button", name="Authorize").click()
            await page.wait_for_url(re.compile(r"/hub/(spawn|home)"))
            # a server never started: the hub's defaults, nothing "remembered"
            await page.goto(f"{HUB}/hub/spawn/{user}/fresh")
            await expect(page.locator("#xh-walltime")).to_have_value("01:00:00")
            await expect(page.locator(".xh-prefill")).to_have_count(0)

            # gpu's form: filled in with its last choices (the walltime given as "20")
            await page.goto(f"{HUB}/hub/spawn/{user}/{server}")
            await expect(page.locator(".xh-prefill")).to_contain_text("your last choices")
            await expect(page.locator('input[name="partition"][value="debug"]')).to_be_checked()
            await expect(page.locator("#xh-walltime")).to_have_value("00:20:00")
            await expect(page.locator("#xh-cores")).to_have_value("2")
            await page.screenshot(path=ARTIFACTS / "named-form-prefilled.png")

            # the home page: the running cpu server is not offered; one click starts gpu
            await page.goto(f"{HUB}/hub/home")
            await expect(page.locator("#xh-relaunch-cpu")).to_have_count(0)
            row = page.locator(f'.xh-relaunch-row[data-server-name="{server}"]')
            await expect(row.locator(".xh-last-options")).to_contain_text(
                "partition debug, walltime 20, cores 2"
            )
            await page.screenshot(path=ARTIFACTS / "named-home-relaunch.png")
            await page.locator(f"#xh-relaunch-{server}").click()
            await page.wait_for_url(re.compile(rf"/user/{user}/{server}/"), timeout=180_000)
            job = _job_of(user, server)
            assert job and (job["partition"], job["limit"], job["cpus"]) == ("debug", "20:00", "2")
            again = servers(hub, user)[server]["state"]
            assert again["spawn_id"] != st[server]["spawn_id"]  # a new spawn of its own
            hub.client.delete(f"/users/{user}/servers/{server}")
            wait_server(hub, user, server, ready=False, timeout=120)

            # the admin lowers the debug partition's walltime; the hub restarts (cpu's
            # job keeps running and is still reached)
            cfg = hub.workdir / "jupyterhub_config.py"
            cfg.write_text(
                cfg.read_text()
                + '\nc.SlurmSSHSpawner.partitions["debug"].update('
                + 'max_walltime="00:10:00", default_walltime="00:05:00")\n'
            )
            hub.restart()
            assert hub.client.server_api(f"{user}/cpu", token, "/status").status_code == 200
            await page.goto(f"{HUB}/hub/home")
            await page.locator(f"#xh-relaunch-{server}").click()
            # nothing submitted: gpu's form, with what no longer fits replaced and said
            await expect(page.locator(".xh-prefill-notes")).to_contain_text(
                "walltime '00:20:00': at most 00:10:00 in partition debug"
            )
            await expect(page.locator('input[name="partition"][value="debug"]')).to_be_checked()
            await expect(page.locator("#xh-walltime")).to_have_value("00:05:00")
            await expect(page.locator("#xh-cores")).to_have_value("2")
            await page.screenshot(path=ARTIFACTS / "named-relaunch-refused.png")
            assert _job_of(user, server) is None
            assert server not in servers(hub, user)
        except Exception:
            await page.screenshot(path=ARTIFACTS / "named-failure.png")
            raise
        finally:
            await browser.close()
