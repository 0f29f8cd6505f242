"""``xsedehub orphans``: batch jobs the hub no longer knows about.

A job is xsedehub's when its SLURM comment is ``xsedehub:<spawn id>``; it is an orphan
when no server in the hub's database holds that job id, read through the hub's REST API
with the token in ``JUPYTERHUB_API_TOKEN`` (scopes ``admin:server_state`` and
``read:users``).  The hub's URL defaults to the hub's own address in its configuration
(:func:`hub_url_from_config`), which serves ``/hub/api`` whatever proxy is in front:
``http://127.0.0.1:8081`` for JupyterHub's defaults, ``http://127.0.0.1:15001`` with TLJH.

It never cancels a job the hub may have submitted a moment ago: SLURM is asked before
the hub (a job submitted after that ``squeue`` is not in it), and a job younger than
:data:`MIN_AGE` seconds is listed but left alone.  A failed ``squeue``, login, hub query
or ``scancel`` is an error (exit status 1), never "no orphaned jobs".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import requests
from traitlets.config import Config

from .check import Checker, Report, cluster_choice_problem, load_config
from .spawner import pending_cancel, slurm
from .spawner.ssh import ClusterUnreachable, Connection


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


def hub_job_ids(
    hub_url: str, token: str, cluster: str = "", login_node: tuple[str, int] | None = None
) -> set[str]:
    """The job ids the hub's servers hold; with ``cluster`` (a hub with several), those
    on that cluster only (job ids repeat between clusters; a state that names none is
    any cluster's unless it recorded a login node other than ``login_node``, this
    cluster's: a job the hub may hold is never taken for an orphan)."""
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
            if cluster and not _may_be_on(state, cluster, login_node):
                continue
            if state.get("job_id"):
                ids.add(str(state["job_id"]))
    return ids


def _may_be_on(state: dict, cluster: str, login_node: tuple[str, int] | None) -> bool:
    if state.get("cluster"):
        return state["cluster"] == cluster
    recorded = state.get("login_host"), state.get("login_port")
    return not recorded[0] or login_node is None or tuple(recorded) == tuple(login_node)


class OrphansError(RuntimeError):
    """The sweep could not be done (or not completely): the message says what failed."""


#: jobs younger than this (seconds since submission, by the login node's clock) are left
#: alone: the hub may have submitted them a moment ago and not have saved their id yet
MIN_AGE = 60.0

#: squeue's submission times as seconds since the epoch (SLURM's own command by its
#: absolute path, as Connection.run runs it: never through the account's PATH)
_AGE_ARGV = ["--noheader", "--format=%i|%V"]


def pending_cancels(checker: Checker) -> list[pending_cancel.PendingCancel]:
    """The jobs the hub could not cancel at stop and keeps for a retry
    (``SlurmSSHSpawner.pending_cancel_file``; a relative path is from the current
    directory, so run the command where the hub runs), those of this login node and
    account.  :func:`find_orphans` cancels them along with the orphans, whatever their
    age, and drops them from the list once SLURM has them."""
    sp = checker.sp
    user = sp.gateway_user if sp.mode == "gateway" else None
    return [
        j
        for j in pending_cancel.read(sp.pending_cancel_file)
        if (j.login_host, j.login_port) == (sp.login_host, sp.login_port)
        and (user is None or j.ssh_user == user)
    ]


@dataclass
class Sweep:
    """What one run found: orphans (old enough to act on), jobs left alone because they
    are younger than the minimum age, and the ids whose scancel failed."""

    orphans: list[slurm.JobStatus] = field(default_factory=list)
    young: list[tuple[slurm.JobStatus, float | None]] = field(default_factory=list)
    cancel_failed: dict[str, str] = field(default_factory=dict)


async def _run(conn: Connection, argv: list[str], what: str) -> str:
    r = await conn.run(argv, timeout=60)
    if r.exit_status != 0:
        err = str(r.stderr).strip()[:300] or f"exit status {r.exit_status}"
        raise OrphansError(f"{what} failed on the login node: {err}")
    return str(r.stdout)


async def _ages(conn: Connection, user: str) -> dict[str, float]:
    """Seconds since each job's submission, by the login node's clock."""
    squeue = conn.node.argv(["squeue"])[0]
    argv = ["/usr/bin/env", "SLURM_TIME_FORMAT=%s", squeue, *_AGE_ARGV, f"--user={user}"]
    text = await _run(conn, argv, "squeue (submission times)")
    now = float((await _run(conn, ["/bin/date", "+%s"], "date")).strip())
    ages = {}
    for line in text.splitlines():
        job_id, _, submitted = line.strip().partition("|")
        if job_id.isdigit() and submitted.isdigit():
            ages[job_id] = now - float(submitted)
    return ages


async def _sweep(
    checker: Checker,
    known_job_ids: Callable[[], set[str]],
    *,
    cancel: bool,
    min_age: float,
    pending: dict[str, str],
) -> Sweep:
    ident = await checker.identity()
    conn = await checker.connect(ident) if ident is not None else None
    if conn is None or ident is None:
        raise OrphansError("cannot log in to the login node: " + "; ".join(checker.r.failed))
    try:
        # SLURM first, the hub after: a job submitted after this squeue is not in it, and
        # a job in it was submitted before the hub is asked (and its age is checked too)
        jobs = slurm.parse_squeue(await _run(conn, slurm.squeue_argv(ident.username), "squeue"))
        ages = await _ages(conn, ident.username)
        known = await asyncio.to_thread(known_job_ids)
        sweep = Sweep()
        for j in jobs.values():
            if not (j.spawn_id and j.alive) or j.spawn_id.startswith("check-"):
                continue
            # a job the hub failed to cancel, if it is still that spawn's (ids are reused)
            listed = pending.get(j.job_id) == j.spawn_id
            if j.job_id in known and not listed:
                continue
            age = ages.get(j.job_id)
            if not listed and (age is None or age < min_age):
                sweep.young.append((j, age))
            else:
                sweep.orphans.append(j)
        if cancel:
            for j in sweep.orphans:
                r = await conn.run(slurm.scancel_argv(j.job_id), timeout=30)
                err = str(r.stderr).strip()
                if r.exit_status != 0 and "Invalid job id" not in err:
                    sweep.cancel_failed[j.job_id] = err[:300] or f"exit status {r.exit_status}"
        return sweep
    finally:
        conn.close()


def server_label(j: slurm.JobStatus) -> str:
    """Which of its user's servers a job was for: ``server <name>``, ``default server``,
    or ``-`` when its spawn id does not say (not made by xsedehub's spawner)."""
    server = j.server
    if server is None:
        return "-"
    return f"server {server}" if server else "default server"


def describe(j: slurm.JobStatus) -> str:
    """One job, tab-separated: id, cluster account, state, nodes, spawn id (``u<hub user
    id>-...``) and the server it was for."""
    return f"{j.job_id}\t{j.user}\t{j.state}\t{j.nodes or '-'}\t{j.spawn_id}\t{server_label(j)}"


def find_orphans(
    config_file: str,
    hub_url: str | None,
    token: str,
    *,
    cancel: bool = False,
    min_age: float = MIN_AGE,
    certificate: tuple[str, str] | None = None,
    out: Callable[[str], None] = print,
    cluster: str = "",
) -> list[slurm.JobStatus]:
    """The orphaned jobs (cancelled with ``cancel``), one line each on ``out``.

    Raises :class:`OrphansError` when squeue, the login or a scancel failed, and the
    errors of :func:`hub_job_ids` when the hub could not be asked: never "no orphaned
    jobs" on a failure."""
    cfg = load_config(config_file)
    url = hub_url or hub_url_from_config(cfg)
    checker = Checker(cfg, Report(out=lambda s: None), certificate=certificate)
    if not checker.sp.clusters:
        if cluster:
            raise OrphansError(f"--cluster {cluster}: the hub has no clusters")
        return _find_orphans(checker, url, token, cancel, min_age, out)
    # each cluster in turn, all of them even when one fails (then an error at the end)
    nodes = {c.name: (c.login_host, c.login_port) for c in checker.sp.cluster_list()}
    names = list(nodes)
    problem = cluster_choice_problem(names, cluster, certificate is not None)
    if problem:
        raise OrphansError(problem)
    names = [cluster] if cluster else names
    found: list[slurm.JobStatus] = []
    errors: list[str] = []
    for name in names:
        out(f"cluster {name}:")
        checker = Checker(cfg, Report(out=lambda s: None), certificate=certificate, cluster=name)
        try:
            found += _find_orphans(checker, url, token, cancel, min_age, out, name, nodes[name])
        except (OrphansError, ClusterUnreachable) as e:
            out(f"cluster {name}: {e}")
            errors.append(f"cluster {name}: {e}")
    if errors:
        raise OrphansError("; ".join(errors))
    return found


def _find_orphans(
    checker: Checker,
    url: str,
    token: str,
    cancel: bool,
    min_age: float,
    out: Callable[[str], None],
    cluster: str = "",
    login_node: tuple[str, int] | None = None,
) -> list[slurm.JobStatus]:
    listed = pending_cancels(checker)
    sweep = asyncio.run(
        _sweep(
            checker,
            lambda: hub_job_ids(url, token, cluster, login_node),
            cancel=cancel,
            min_age=min_age,
            pending={j.job_id: j.spawn_id for j in listed},
        )
    )
    if cancel and listed:
        # gone from the queue or cancelled now: the hub need not try again
        done = [j for j in listed if j.job_id not in sweep.cancel_failed]
        pending_cancel.remove(checker.sp.pending_cancel_file, done)
    for j in sweep.orphans:
        status = ""
        if cancel:
            failed = sweep.cancel_failed.get(j.job_id)
            status = f"\tscancel failed: {failed}" if failed else "\tcancelled"
        out(f"{describe(j)}{status}")
    for j, age in sweep.young:
        when = f"submitted {age:.0f} s ago" if age is not None else "just submitted"
        out(f"{describe(j)}\t{when}: left alone (younger than {min_age:.0f} s)")
    if not sweep.orphans:
        out("no orphaned jobs")
    if sweep.cancel_failed:
        raise OrphansError(
            f"scancel failed for {len(sweep.cancel_failed)} job(s): "
            + ", ".join(sorted(sweep.cancel_failed))
        )
    return sweep.orphans
