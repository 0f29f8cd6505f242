"""The whole path in a real headless Chromium (Debian's package, driven by Playwright;
no browser download), in each mode, and a start cancelled while its job is queued.
Screenshots land in test-artifacts/; the docs show some of them (docs/_static/shots)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from xsedehub.testbed import localcluster

from .conftest import fill_nodes, make_hub, stop_hub_and_proxy

pytestmark = pytest.mark.cluster

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"
HUB = "http://127.0.0.1:8000"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

WARNINGS = [1500, 120]


async def _open_browser(p):
    browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await ctx.new_page()
    page.set_default_timeout(60_000)
    return browser, page


async def _log_in(page, mode: str, sub: str) -> None:
    """Through the local provider's page, as GitHub's or CILogon's would be."""
    await page.goto(f"{HUB}/hub/login")
    service = "GitHub" if mode == "gateway" else "CILogon"
    await page.get_by_text(f"Sign in with {service}").click()
    await page.fill('input[name="sub"]', sub)
    await page.get_by_role("button", name="Authorize").click()
    await page.wait_for_url(re.compile(r"/hub/spawn"))


CASES = {
    # mode: (provider identity, hub user, how to get a notebook, code to run)
    "gateway": ("ada", "ada-l", "workshop"),
    "xsede": ("cilogon-alice", "alice", "new"),
}


def _as_user(user: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``argv`` as ``user`` on the login node."""
    from .test_gateway import nsenter_argv

    return subprocess.run(
        [*nsenter_argv("xh-cluster"), "runuser", "-u", user, "--", *argv],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def mode_hub(request, cluster, provider, issuer, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (scripts/install.sh installs it)")
    mode = request.param
    h = make_hub(
        tmp_path_factory.mktemp(f"browser-{mode}"),
        cluster,
        provider,
        mode=mode,
        poll_interval=5,
        # a first warning 25 minutes before the walltime: the 20-minute job below is
        # within it as soon as JupyterLab opens (no waiting for the default 10 minutes)
        extra=(
            f"c.SlurmSSHSpawner.walltime_warnings = {WARNINGS}\n"
            # the site command (sudo) that lets users lengthen their own jobs
            "c.SlurmSSHSpawner.walltime_extend_command = "
            f"{localcluster.extend_command(Path(cluster.root))!r}"
        ),
    )
    yield mode, h
    stop_hub_and_proxy(h)


async def test_whole_path_in_a_browser(mode_hub, cluster):
    from playwright.async_api import async_playwright, expect

    mode, hub = mode_hub
    sub, user, notebook = CASES[mode]
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as p:
        browser, page = await _open_browser(p)
        try:
            await _log_in(page, mode, sub)
            # the spawn form: pick the debug partition and a walltime
            await expect(page.locator("text=cores idle on")).to_have_count(2)
            # switching partition puts that partition's defaults and limits in the fields
            # (the form's JSON must reach JSON.parse intact)
            await expect(page.locator("#xh-walltime")).to_have_value("01:00:00")
            await page.check('input[name="partition"][value="debug"]')
            await expect(page.locator("#xh-walltime")).to_have_value("00:15:00")
            await expect(page.locator("#xh-walltime-help")).to_have_text("at most 00:30:00")
            await expect(page.locator("#xh-cores")).to_have_attribute("max", "2")
            await page.screenshot(path=ARTIFACTS / f"{mode}-form.png")
            await page.fill('input[name="walltime"]', "00:20:00")
            await page.get_by_role("button", name="Start").click()
            # the progress page
            await expect(page.locator("#progress-log")).to_contain_text(
                "Submitted batch job", timeout=60_000
            )
            await page.get_by_text("Event log").click()  # unfold the messages for the shot
            await page.screenshot(path=ARTIFACTS / f"{mode}-progress.png")
            log = await page.locator("#progress-log").text_content() or ""
            # JupyterLab
            await page.wait_for_url(re.compile(rf"/user/{user}/lab"), timeout=120_000)
            await page.wait_for_selector(".jp-Launcher, .jp-DirListing", timeout=120_000)
            if notebook == "workshop":
                await page.goto(f"{HUB}/user/{user}/lab/tree/workshop/01-where-am-i.ipynb")
            else:  # a new notebook from the launcher (?reset: a fresh workspace)
                await page.goto(f"{HUB}/user/{user}/lab?reset")
                await page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
            await page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
            # the kernel runs on the compute node: wait until it is there and idle
            await expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(
                timeout=90_000
            )
            cell = page.locator(".jp-Notebook .jp-CodeCell .cm-content").first
            await cell.click()
            if notebook == "new":
                await cell.press_sequentially(
                    "import os, getpass; print('node:', os.environ['SLURMD_NODENAME']); "
                    "print('job:', os.environ['SLURM_JOB_ID']); print('user:', getpass.getuser())",
                    delay=5,
                )
                await expect(cell).to_contain_text("import os, getpass")
            await page.keyboard.press("Shift+Enter")
            out = page.locator(".jp-OutputArea-output").filter(has_text="node:").first
            await expect(out).to_contain_text("job:", timeout=90_000)
            text = await out.inner_text()
            # a quiet first start: JupyterLab asked nothing (SlurmSSHSpawner.lab_disabled_plugins)
            assert await page.get_by_text("official Jupyter news").count() == 0
            await page.screenshot(path=ARTIFACTS / f"{mode}-jupyterlab.png")
            # the job's time left counts down in the status bar (xsedehub-jobext) ...
            left = page.locator("#xh-walltime")
            await expect(left).to_have_text(re.compile(r"^Job ends in 1\d:\d\d$"))
            first = await left.text_content()
            await expect(left).not_to_have_text(first or "", timeout=5_000)
            # ... and the first warning is there: the job is within 25 minutes of its end
            warning = page.locator(".Toastify__toast").filter(has_text="walltime")
            await expect(warning).to_contain_text("Save your work now")
            # the wording, and a time left within the 20-minute walltime (when the toast
            # shows up is the browser's business: no minute is pinned)
            await expect(warning).to_contain_text(re.compile(r"in about \d+ minutes"))
            said = re.search(r"in about (\d+) minutes", await warning.inner_text())
            assert said and int(said.group(1)) <= 20, said
            await page.screenshot(path=ARTIFACTS / f"{mode}-walltime-warning.png")
            # extend: 30 minutes more, capped at the debug partition's 30 minutes: 10 more
            await warning.get_by_role("button", name="Extend by 10 min").click()
            extended = page.locator(".Toastify__toast").filter(has_text="Extended")
            await expect(extended).to_contain_text("time limit now 30 min", timeout=60_000)
            await expect(left).to_have_text(re.compile(r"^Job ends in 2\d:\d\d$"))
            await page.screenshot(path=ARTIFACTS / f"{mode}-walltime-extended.png")
            # the hub's home page: the time left next to the server
            await page.goto(f"{HUB}/hub/home")
            home_left = page.locator(".xh-walltime")
            await expect(home_left).to_contain_text(
                re.compile(r"runs in SLURM job \d+:\s+2\d:\d\d left of its 30 min walltime")
            )
            await page.screenshot(path=ARTIFACTS / f"{mode}-home-walltime.png")
        except Exception:
            await page.screenshot(path=ARTIFACTS / f"{mode}-failure.png")
            raise
        finally:
            await browser.close()
    node = re.search(r"node: (\S+)", text).group(1)
    job = re.search(r"job: (\d+)", text).group(1)
    assert node in cluster.nodes
    assert "Submitted batch job" in log, log
    from .test_gateway import in_cluster_root

    assert in_cluster_root(["squeue", "-h", "-j", job, "-o", "%P %T %l"]).split() == [
        "debug",
        "RUNNING",
        "30:00",
    ]
    # the site command lengthens only the caller's own jobs, within the partition
    cmd = localcluster.extend_command(Path(cluster.root))
    other = "bob" if mode == "xsede" else "alice"
    refused = _as_user(other, [*cmd, job, "30"])
    assert refused.returncode != 0 and f"job {job} is not yours" in refused.stderr
    owner = "alice" if mode == "xsede" else cluster.gateway_user
    too_long = _as_user(owner, [*cmd, job, "31"])
    assert too_long.returncode != 0 and "allows at most 00:30:00" in too_long.stderr
    if mode == "xsede":
        assert "user: alice" in text
    hub.client.stop(user)


#: test_cancel_while_queued's choices on the debug partition (set, never pre-filled)
OPTIONS = {"walltime": "00:10:00", "cores": "1"}


def _alive(job: str) -> str:
    """The job's state while SLURM still lists it (queued, running or ending), else ""."""
    from .test_gateway import in_cluster_root

    return in_cluster_root(["squeue", "-h", "-j", job, "-t", "all", "-o", "%T"]).strip()


async def test_cancel_while_queued(mode_hub, cluster):
    """Stop Server on the progress page while the job waits in the queue (filler jobs
    hold every core): the job is cancelled before the hub answers, its tunnel key and
    secret files are gone, the page says the server stopped, and a new start works."""
    from playwright.async_api import async_playwright, expect

    from .test_gateway import in_cluster_root

    mode, hub = mode_hub
    sub, user, _ = CASES[mode]
    account = cluster.gateway_user if mode == "gateway" else user
    ARTIFACTS.mkdir(exist_ok=True)
    fillers = fill_nodes(cluster)
    try:
        async with async_playwright() as p:
            browser, page = await _open_browser(p)
            try:
                await _log_in(page, mode, sub)
                # this test's own choices: the form is pre-filled with the last accepted
                # options (test_whole_path's, on this module's hub)
                await page.check('input[name="partition"][value="debug"]')
                await page.fill('input[name="walltime"]', OPTIONS["walltime"])
                await page.fill('input[name="cores"]', OPTIONS["cores"])
                await page.get_by_role("button", name="Start").click()
                await expect(page.locator("#progress-log")).to_contain_text(
                    "is pending", timeout=60_000
                )
                st = hub.client.user(user)["servers"][""]["state"]
                job, spawn_id = st["job_id"], st["spawn_id"]
                assert in_cluster_root(["squeue", "-h", "-j", job, "-o", "%T"]).strip() == (
                    "PENDING"
                )
                keys = Path(cluster.tunnel_authorized_keys)
                assert f"xsedehub:{spawn_id}" in keys.read_text()
                job_dir = Path(f"~{account}").expanduser() / ".xsedehub/jobs" / spawn_id
                assert (job_dir / "env").exists()
                await page.get_by_text("Event log").click()
                await page.screenshot(path=ARTIFACTS / f"{mode}-queued.png")
                async with page.expect_response(
                    lambda r: (
                        r.request.method == "DELETE"
                        and urlparse(r.url).path == f"/hub/api/users/{user}/server"
                    )
                ) as answer:
                    t0 = time.monotonic()
                    await page.locator("#stop-server-btn").click()
                response = await answer.value
                took = time.monotonic() - t0
                # the hub's answer: the job is already out of the queue
                state = _alive(job)
                listed = in_cluster_root(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"])
                print(f"{mode}: Stop answered {response.status} in {took:.2f} s; job: {state!r}")
                assert response.status == 204, await response.text()
                assert state in ("", "CANCELLED"), state
                # nor is any other job of this spawn (by its --comment) but a cancelled one
                of_spawn = [
                    line.split("|", 2)
                    for line in listed.splitlines()
                    if f"xsedehub:{spawn_id}" in line.split("|", 2)[-1]
                ]
                assert all(f[1] == "CANCELLED" for f in of_spawn), of_spawn
                await expect(page.locator("#stop-server-status")).to_contain_text("Server stopped")
                await expect(page.locator("#progress-message")).to_contain_text(
                    "cancelled", ignore_case=True
                )
                await page.screenshot(path=ARTIFACTS / f"{mode}-cancelled.png")
            except Exception:
                await page.screenshot(path=ARTIFACTS / f"{mode}-cancel-failure.png")
                raise
            finally:
                await browser.close()
        assert f"xsedehub:{spawn_id}" not in keys.read_text()
        assert not (job_dir / "env").exists() and not (job_dir / "tunnel_key").exists()
        assert not hub.client.user(user)["servers"]
    finally:
        in_cluster_root(["scancel", *fillers])
    # starting again works, with a new job
    r = hub.client.start(user, {"partition": "debug", **OPTIONS})
    assert r.status_code in (201, 202), r.text
    hub.client.wait_ready(user)
    assert hub.client.user(user)["servers"][""]["state"]["job_id"] != job
    hub.client.stop(user)
