"""``xsedehub orphans``: batch jobs the hub no longer knows about.

A job is xsedehub's when its SLURM comment is ``xsedehub:<spawn id>``; it is an orphan
when no server in the hub's database holds that job id, read through the hub's REST API
with the token in ``JUPYTERHUB_API_TOKEN`` (scopes ``admin:server_state`` and
``read:users``).  The hub's URL defaults to the hub's own address in its configuration
(:func:`hub_url_from_config`), which serves ``/hub/api`` whatever proxy is in front:
``http://127.0.0.1:8081`` for JupyterHub's defaults, ``http://127.0.0.1:15001`` with TLJH.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlparse

import requests
from traitlets.config import Config

from .check import Checker, Report, load_config
from .spawner import slurm


def hub_url_from_config(cfg: Config) -> str:
    """The hub's own URL (not the proxy's): ``JupyterHub.hub_bind_url`` when set, else
    ``http://<hub_ip>:<hub_port>`` with JupyterHub's defaults (127.0.0.1, 8081); an
    address that means "every interface" is reached on 127.0.0.1."""
    hub = cfg.JupyterHub
    bind = hub.get("hub_bind_url", "")
    if bind:
        u = urlparse(bind)
        return f"{u.scheme}://{u.netloc}"
    ip = hub.get("hub_ip", "") or "127.0.0.1"
    if ip in ("0.0.0.0", "::"):  # noqa: S104 (a bind address read from the config)
        ip = "127.0.0.1"
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{hub.get('hub_port', 8081)}"


def hub_job_ids(hub_url: str, token: str) -> set[str]:
    r = requests.get(
        f"{hub_url.rstrip('/')}/hub/api/users",
        params={"include_stopped_servers": "1"},
        headers={"Authorization": f"token {token}"},
        timeout=30,
    )
    r.raise_for_status()
    ids = set()
    for user in r.json():
        for server in (user.get("servers") or {}).values():
            if "state" not in server:
                raise PermissionError("the token cannot read server state (admin:server_state)")
            state = server["state"] or {}
            if state.get("job_id"):
                ids.add(str(state["job_id"]))
    return ids


async def _orphans(checker: Checker, known: set[str], cancel: bool) -> list[slurm.JobStatus]:
    ident = await checker.identity()
    conn = await checker.connect(ident)
    if conn is None:
        raise RuntimeError("cannot log in to the login node: " + "; ".join(checker.r.failed))
    try:
        r = await conn.run(slurm.squeue_argv(ident.username), timeout=60)
        jobs = slurm.parse_squeue(str(r.stdout))
        orphans = [
            j
            for j in jobs.values()
            if j.spawn_id
            and j.alive
            and j.job_id not in known
            and not j.spawn_id.startswith("check-")
        ]
        if cancel:
            for j in orphans:
                await conn.run(slurm.scancel_argv(j.job_id), timeout=30)
        return orphans
    finally:
        conn.close()


def find_orphans(
    config_file: str,
    hub_url: str | None,
    token: str,
    *,
    cancel: bool = False,
    certificate: tuple[str, str] | None = None,
    out: Callable[[str], None] = print,
) -> list[slurm.JobStatus]:
    cfg = load_config(config_file)
    known = hub_job_ids(hub_url or hub_url_from_config(cfg), token)
    checker = Checker(cfg, Report(out=lambda s: None), certificate=certificate)
    orphans = asyncio.run(_orphans(checker, known, cancel))
    for j in orphans:
        out(
            f"{j.job_id}\t{j.user}\t{j.state}\t{j.nodes or '-'}\t{j.spawn_id}"
            + ("\tcancelled" if cancel else "")
        )
    if not orphans:
        out("no orphaned jobs")
    return orphans
