"""``xsedehub demo``: the product, running on the built-in local cluster.

Brings up the local mini-Comet, a local OpenID Connect provider standing in for GitHub,
and a hub in gateway mode with a small workshop repository; prints the URL.  The hub
lives in the hub-side network namespace; two small bridges make its proxy and the
provider's login page reachable on this machine's 127.0.0.1.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from . import localcluster, localhub, netns

ATTENDEES = {
    "attendee1": {"login": "attendee1", "id": 5001, "email": "attendee1@example.org"},
    "attendee2": {"login": "attendee2", "id": 5002, "email": "attendee2@example.org"},
    "attendee3": {"login": "attendee3", "id": 5003, "email": "attendee3@example.org"},
}


def stop_servers(workdir: Path, timeout: float = 60) -> None:
    """Stop every running server through the hub's API (so no job outlives the demo)."""
    import json
    import urllib.request

    token_file = workdir / "service_token"
    if not token_file.exists():
        return
    headers = {"Authorization": f"token {token_file.read_text().strip()}"}
    api = "http://127.0.0.1:8000/hub/api"

    def call(method: str, path: str):
        req = urllib.request.Request(api + path, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body else None

    try:
        users = call("GET", "/users") or []
        for u in users:
            if u["servers"]:
                call("DELETE", f"/users/{u['name']}/server")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(u["servers"] for u in call("GET", "/users") or []):
                break
            time.sleep(1)
    except OSError as e:
        print(f"could not stop the servers through the hub: {e}", file=sys.stderr)


def run(
    port: int = 8000,
    provider_port: int = 9400,
    workdir: Path = Path("/var/lib/xsedehub/demo"),
    keep_cluster: bool = False,
    once: bool = False,
) -> int:
    info = localcluster.up()
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def cleanup(*_: object) -> None:
        stop_servers(workdir)
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        localhub.stop_proxy(workdir)
        if not keep_cluster:
            localcluster.down()

    # bridges first: they must be started from the host's namespace
    for public, target in ((port, 8000), (provider_port, 9400)):
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
                ]
            )
        )
    netns.enter(info.hub_netns)
    try:
        procs.append(localhub.start_provider(workdir, 9400, users=tuple(ATTENDEES)))
        for sub, claims in ATTENDEES.items():
            localhub.put_user("http://127.0.0.1:9400", sub, claims)
        localhub.write_config(
            workdir,
            info,
            mode="gateway",
            provider_url=f"http://127.0.0.1:{provider_port}",
            public_port=8000,
            poll_interval=30,
        )
        if port != 8000:
            cfg = workdir / "jupyterhub_config.py"
            cfg.write_text(
                cfg.read_text().replace(
                    'oauth_callback_url = "http://127.0.0.1:8000/',
                    f'oauth_callback_url = "http://127.0.0.1:{port}/',
                )
            )
        procs.append(localhub.start_hub(workdir, debug=False))
    except BaseException:
        cleanup()
        raise
    print(
        f"\nxsedehub demo (gateway mode) is up: http://127.0.0.1:{port}/\n"
        f"  Log in with one of: {', '.join(ATTENDEES)} (the local provider stands in for GitHub),\n"
        "  press Start: the server is a SLURM job on a compute node of the local cluster,\n"
        "  reached through a reverse SSH tunnel; the workshop notebooks are in ./workshop.\n"
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
