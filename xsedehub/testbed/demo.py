"""``xsedehub demo``: the product, running on the built-in local cluster.

Brings up the local mini-Comet, a local OpenID Connect provider standing in for GitHub
(gateway mode) or CILogon (xsede mode, with the reference certificate issuer), and a hub
in that mode; prints the URL.  The hub lives in the hub-side network namespace; two
small bridges make its proxy and the provider's login page reachable on this machine's
127.0.0.1.

Every process the demo starts runs in a session of its own, so a Ctrl-C in the terminal
reaches only the demo, which then stops the servers through the (still running) hub,
cancels any job left in the queue, and stops the hub, proxy, provider, issuer, bridges
and (unless ``keep_cluster``) the cluster.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .. import config
from . import localcluster, localhub, netns

#: gateway mode: GitHub-like identities (login, numeric id)
ATTENDEES = {
    "attendee1": {"login": "attendee1", "id": 5001, "email": "attendee1@example.org"},
    "attendee2": {"login": "attendee2", "id": 5002, "email": "attendee2@example.org"},
    "attendee3": {"login": "attendee3", "id": 5003, "email": "attendee3@example.org"},
}
#: xsede mode: CILogon-like identities from the ACCESS IdP; the issuer maps each to the
#: local cluster account of the same name (alice, bob)
RESEARCHERS = {
    name: {
        "idp": localhub.ACCESS_IDP,
        "eppn": f"{name}@access-ci.org",
        "email": f"{name}@uni.example",
    }
    for name in localcluster.RESEARCHERS
}
HUB_PORT = 8000  # inside the hub's namespace; the bridge maps the public port to it


def _api(workdir: Path, method: str, path: str):
    token = (workdir / "service_token").read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{HUB_PORT}/hub/api{path}",
        method=method,
        headers={"Authorization": f"token {token}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if body else None


def stop_servers(workdir: Path, timeout: float = 90) -> bool:
    """Stop every server (named ones too) through the hub's API; True when none is left."""
    if not (workdir / "service_token").exists():
        return True
    try:
        for u in _api(workdir, "GET", "/users") or []:
            for server in u["servers"]:
                path = f"/users/{u['name']}/servers/{server}" if server else ""
                _api(workdir, "DELETE", path or f"/users/{u['name']}/server")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(u["servers"] for u in _api(workdir, "GET", "/users") or []):
                return True
            time.sleep(1)
    except OSError as e:
        print(f"xsedehub demo: could not stop the servers through the hub: {e}", file=sys.stderr)
    return False


def cancel_leftover_jobs(info: localcluster.ClusterInfo, accounts: list[str]) -> list[str]:
    """scancel every job of ``accounts`` that xsedehub submitted (``--comment=xsedehub:``)
    and that is still in the queue, on each local cluster: nothing the demo started
    outlives it."""
    jobs = []
    for name in info.clusters:
        jobs += _cancel_leftover_jobs(info.site(name).run_argv, accounts)
    return jobs


def _cancel_leftover_jobs(inside: Callable[..., list[str]], accounts: list[str]) -> list[str]:
    r = subprocess.run(
        inside(
            "squeue",
            "-h",
            "-u",
            ",".join(accounts),
            "-t",
            "PENDING,RUNNING,CONFIGURING,SUSPENDED",  # not those already ending
            "-o",
            "%i %k",
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    jobs = []
    for line in r.stdout.splitlines():
        job, _, comment = line.strip().partition(" ")
        if comment.startswith("xsedehub:"):
            jobs.append(job)
    if jobs:
        subprocess.run(
            inside("scancel", *jobs),
            capture_output=True,
            check=False,
        )
    return jobs


def run(
    port: int = 8000,
    provider_port: int = 9400,
    workdir: Path = Path("/var/lib/xsedehub/demo"),
    keep_cluster: bool = False,
    once: bool = False,
    mode: str = "gateway",
    issuer_port: int = 8700,
) -> int:
    if mode not in ("gateway", "xsede"):
        raise localcluster.ClusterError(f"mode {mode!r}: choose gateway or xsede")
    info = localcluster.up()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    procs: list[subprocess.Popen] = []
    hub: list[subprocess.Popen] = []
    users = ATTENDEES if mode == "gateway" else RESEARCHERS
    accounts = [info.gateway_user] if mode == "gateway" else list(info.researchers)
    provider = f"http://127.0.0.1:{provider_port}"

    def cleanup() -> None:
        # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if hub and hub[0].poll() is None:
            stop_servers(workdir)
        cancelled = cancel_leftover_jobs(info, accounts)
        if cancelled:
            print(f"xsedehub demo: cancelled leftover jobs {' '.join(cancelled)}", flush=True)
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        localhub.stop_proxy(workdir)
        if not keep_cluster:
            localcluster.down()
        print("xsedehub demo: stopped", flush=True)

    # bridges first: they must be started from the host's namespace
    for public, target in ((port, HUB_PORT), (provider_port, provider_port)):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "xsedehub.cli",
                    "bridge",
                    "--port",
                    str(public),
                    "--netns",
                    info.hub_netns,
                    "--target",
                    f"127.0.0.1:{target}",
                ],
                start_new_session=True,
            )
        )
    netns.enter(info.hub_netns)
    try:
        procs.append(localhub.start_provider(workdir, provider_port, users=tuple(users)))
        for sub, claims in users.items():
            localhub.put_user(provider, sub, claims)
        issuer_url = f"http://127.0.0.1:{issuer_port}/v1/certificate"
        if mode == "xsede":
            procs.append(
                localhub.start_issuer(workdir, info, port=issuer_port, provider_url=provider)
            )
        localhub.write_config(
            workdir,
            info,
            mode=mode,
            provider_url=provider,
            public_port=HUB_PORT,
            callback_port=port,
            poll_interval=30,
            issuer_url=issuer_url,
            # idle servers give their allocation back, as xsedehub's defaults say
            idle_culler=(config.IDLE_CULLER_TIMEOUT, config.IDLE_CULLER_EVERY),
            # both local clusters, a profile on each (the mini-Comet's first: the default)
            extra=localhub.two_clusters_config(info, login_certificate=mode == "xsede"),
        )
        hub.append(localhub.start_hub(workdir, debug=False))
        procs.append(hub[0])
    except BaseException:
        cleanup()
        raise
    if mode == "gateway":
        what = (
            f"  Log in with one of: {', '.join(users)} (the local provider stands in for GitHub),\n"
            "  choose a profile on either cluster (the mini-Comet or minidelta) and\n"
            "  press Start: the server is a SLURM job on a compute node of that cluster,\n"
            "  running as the shared gateway account, reached through a reverse SSH tunnel;\n"
            "  the workshop notebooks are in ./workshop.\n"
        )
    else:
        what = (
            f"  Log in as one of: {', '.join(users)} (the local provider stands in for CILogon),\n"
            "  the hub obtains a short-lived SSH certificate for you from the reference issuer;\n"
            "  choose a profile on either cluster (the mini-Comet or minidelta) and\n"
            "  press Start: the server is a SLURM job running as your own cluster account.\n"
        )
    print(
        f"\nxsedehub demo ({mode} mode) is up: http://127.0.0.1:{port}/\n"
        f"{what}"
        f"  Hub log: {workdir}/hub.log.  Ctrl-C stops the demo.\n",
        flush=True,
    )
    if once:
        cleanup()
        return 0
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop and all(p.poll() is None for p in procs):
        time.sleep(0.5)
    cleanup()
    return 0
