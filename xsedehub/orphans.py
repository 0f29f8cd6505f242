"""``xsedehub orphans``: batch jobs the hub no longer knows about.

A job is xsedehub's when its SLURM comment is ``xsedehub:<spawn id>``; it is an orphan
when no server in the hub's database holds that job id (read through the hub's REST
API with a token that has the ``admin:server_state`` and ``read:users`` scopes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import requests

from .check import Checker, Report, load_config
from .spawner import slurm


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
    hub_url: str,
    token: str,
    *,
    cancel: bool = False,
    certificate: tuple[str, str] | None = None,
    out: Callable[[str], None] = print,
) -> list[slurm.JobStatus]:
    known = hub_job_ids(hub_url, token)
    checker = Checker(load_config(config_file), Report(out=lambda s: None), certificate=certificate)
    orphans = asyncio.run(_orphans(checker, known, cancel))
    for j in orphans:
        out(
            f"{j.job_id}\t{j.user}\t{j.state}\t{j.nodes or '-'}\t{j.spawn_id}"
            + ("\tcancelled" if cancel else "")
        )
    if not orphans:
        out("no orphaned jobs")
    return orphans
