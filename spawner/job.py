"""One batch job on the cluster: what the spawner's settings make of it (its script, the
server's environment, its folders), its files, its submission, its cancellation.

The job directory (``0700``, under the account's home) holds what the batch script reads
at run time: the server's environment (API token included) and the job's tunnel key,
each created ``0600`` before a byte is written, and the hub's known_hosts; the job's log
and the server's socket land there too.  Everything goes over the connection's one SFTP
session; nothing secret is ever on a command line.  Gateway mode also claims the
attendee's folder for their GitHub id (:func:`claim_folder`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import asyncssh

from . import slurm
from . import validate as v
from .errors import ClusterUnreachable, SpawnError
from .remotefile import NotARegularFile, make_private_dirs, read_capped
from .ssh import Connection
from .tunnel import TunnelGrant

if TYPE_CHECKING:
    from .spawner import SlurmSSHSpawner

#: a step run alongside the writing of the job's files, over the same SFTP session
SFTPStep = Callable[[asyncssh.SFTPClient], Awaitable[None]]

#: files that hold secrets (the script removes them at exit; so does the hub at stop)
SECRET_FILES = ("env", "tunnel_key")


# ---------------------------------------------------------------- from the spawner's settings
def work_dir(sp: SlurmSSHSpawner) -> str:
    """Where JupyterLab starts, relative to the account's home: the attendee's folder
    (gateway mode) or :attr:`~.SlurmSSHSpawner.xsede_workdir`."""
    if sp.mode == "gateway":
        root = v.relative_path(sp.gateway_workdir_root, "gateway_workdir_root", hidden=True)
        return f"{root}/{v.github_login(sp.user.name, 'GitHub login')}"
    return (
        "."
        if sp.xsede_workdir in ("", ".")
        else v.relative_path(sp.xsede_workdir, "xsede_workdir", hidden=True)
    )


def checkout_name(sp: SlurmSSHSpawner) -> str:
    if sp.workshop_checkout:
        return v.path_part(sp.workshop_checkout, "workshop_checkout")
    base = sp.workshop_repo.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    return v.path_part(base or "workshop", "workshop checkout")


def server_env(sp: SlurmSSHSpawner) -> dict[str, str]:
    """What the single-user server gets: everything from the spawner's ``get_env``, with
    the service URL pointing at the node side of the tunnel."""
    env = sp.get_env()
    env["JUPYTERHUB_SERVICE_URL"] = "http://127.0.0.1:8888" + sp.server.base_url
    # the server listens on a unix socket; jupyter-server only accepts --sock when
    # the port is its default (8888), hence the service URL above.
    if sp.mode == "gateway":
        env["JUPYTERHUB_ROOT_DIR"] = "."
    return env


def job_name(sp: SlurmSSHSpawner) -> str:
    """The job's name: ``jupyter-<login>`` (gateway mode: the attendees share one account)
    or ``jupyterhub`` (xsede mode), with ``-<server name>`` for a named server."""
    base = f"jupyter-{sp.user.name}"[:60] if sp.mode == "gateway" else "jupyterhub"
    server = v.server_name(sp.name)
    return f"{base}-{server}" if server else base


def script(sp: SlurmSSHSpawner, job_dir: str, hub_port: int) -> str:
    """The batch script of this spawn (built by :func:`.slurm.build_job_script`)."""
    api = urlparse(sp.hub.api_url)
    prologue: list[list[str]] = []
    if sp.mode == "gateway" and sp.workshop_repo:
        prologue.append([sp.gitpuller, sp.workshop_repo, sp.workshop_branch, checkout_name(sp)])
    profile = sp.profile()
    environment = profile.environment if profile else None
    job = slurm.JobScript(
        job_name=job_name(sp),
        resources=sp.resources(),
        job_dir=job_dir,
        work_dir=sp.work_dir(),
        singleuser=[
            *sp.cmd,
            *sp.get_args(),
            *slurm.idle_args(sp.server_idle_timeout, sp.kernel_idle_timeout),
        ],
        tunnel=slurm.Tunnel(
            host=sp.tunnel_host,
            port=sp.tunnel_port,
            user=sp.tunnel_user,
            hub_port=hub_port,
            api_host=sp.hub_api_host,
            api_port=api.port or 80,
        ),
        python=sp.job_python,
        prologue=prologue,
        environment=environment.prologue() if environment else [],
        server_prefix=list(environment.container) if environment else [],
        extra_directives=sp.extra_sbatch,
        spawn_id=sp.spawn_id,
        sandbox=sp.sandbox_settings(),
        lab_disabled_plugins=tuple(sp.lab_disabled_plugins),
    )
    return slurm.build_job_script(job)


def file_contents(sp: SlurmSSHSpawner, grant: TunnelGrant) -> dict[str, str]:
    """The job directory's files: the server's environment, the tunnel key, and the
    known_hosts that vouches for the hub's sshd."""
    text = Path(sp.tunnel_known_hosts).read_text() if sp.tunnel_known_hosts else ""
    if not text.strip():
        raise SpawnError("xsedehub is not configured: SlurmSSHSpawner.tunnel_known_hosts is empty")
    api = urlparse(sp.hub.api_url)
    return {
        "env": slurm.env_file(sp.node_env(), f"{api.scheme}://{api.netloc}"),
        "tunnel_key": grant.private_key,
        "known_hosts": text,
    }


def claims(sp: SlurmSSHSpawner) -> list[SFTPStep]:
    """Gateway mode: the claim of the attendee's folder; nothing otherwise."""
    if sp.mode != "gateway":
        return []
    claim = partial(
        claim_folder, folder=sp.work_dir(), user=sp.user, require_github_id=sp.require_github_id
    )
    return [claim]


# ---------------------------------------------------------------- on the cluster


class JobFiles:
    """The directory of one job on the login node."""

    def __init__(self, conn: Connection, job_dir: str, log: logging.Logger, name: str):
        self.conn, self.dir = conn, job_dir
        self.log, self.name = log, name

    async def create(
        self,
        contents: Callable[[], Mapping[str, str]],
        *also: SFTPStep,
    ) -> None:
        """Make the directory (``0700``), then write ``contents()`` into it, each file
        ``0600`` from its creation; ``also`` run alongside over the same SFTP session."""
        sftp = await self.conn.sftp()
        # 0700 for the folders made here; a folder that was there (the account's own
        # folder that job_dir_root may start with) keeps its mode
        await make_private_dirs(sftp, self.dir)
        files = contents()

        async def write(name: str, content: str) -> None:
            # created 0600 before a byte is written
            async with sftp.open(
                f"{self.dir}/{name}", "w", attrs=asyncssh.SFTPAttrs(permissions=0o600)
            ) as f:
                await f.write(content)

        # independent requests: SFTP pipelines them over the one connection
        steps: list[Awaitable[None]] = [sftp.chmod(self.dir, 0o700)]
        steps += [write(name, content) for name, content in files.items()]
        steps += [step(sftp) for step in also]
        await asyncio.gather(*steps)

    async def remove_secrets(self) -> None:
        """Remove the secret files (logged, not raised, when the cluster is unreachable)."""
        try:
            sftp = await self.conn.sftp()
            for name in SECRET_FILES:
                try:
                    await sftp.remove(f"{self.dir}/{name}")
                except asyncssh.SFTPNoSuchFile:
                    pass
        except (ClusterUnreachable, asyncssh.Error, OSError) as e:
            self.log.warning("%s: could not remove job files: %s", self.name, e)

    async def log_tail(self, lines: int = 20) -> str:
        """The last lines of the job's log ("" when it cannot be read): read from its
        last 64 KiB only, never through a symlink, undecodable bytes replaced."""
        try:
            sftp = await self.conn.sftp()
            text = await read_capped(sftp, f"{self.dir}/job.log", tail=True)
            return "\n".join(text.splitlines()[-lines:])
        except (ClusterUnreachable, asyncssh.Error, OSError):
            return ""


async def claim_folder(
    sftp: asyncssh.SFTPClient, folder: str, user: Any, *, require_github_id: bool
) -> None:
    """Gateway mode: create the attendee's folder and bind it to their GitHub id
    (``user`` is the JupyterHub user; its auth_state holds the id)."""
    auth_state = await user.get_auth_state() or {}
    gh_id = str((auth_state.get("github_user") or {}).get("id") or "")
    if not gh_id.isdigit():
        if require_github_id:
            raise SpawnError(
                "The hub has no GitHub id for this login (auth_state is off or empty): "
                "log out and in again, or ask the administrators to enable auth_state."
            )
        gh_id = ""
    await sftp.makedirs(folder, exist_ok=True)
    owner = f"{folder}/.xsedehub-owner"
    try:
        async with sftp.open(owner, "x") as f:  # exclusive create: first claim wins
            await f.write(gh_id + "\n")
        return
    except asyncssh.SFTPFailure:
        pass
    except asyncssh.SFTPError as e:
        if getattr(e, "code", None) not in (
            asyncssh.FX_FILE_ALREADY_EXISTS,
            asyncssh.FX_FAILURE,
        ):
            raise
    try:
        recorded = (await read_capped(sftp, owner)).strip()
    except NotARegularFile:
        raise SpawnError(
            f"The folder for GitHub login {user.name!r} has an owner record "
            f"({owner}) that is not a regular file.  Ask the workshop's organisers to "
            "remove it."
        ) from None
    if gh_id and recorded and recorded != gh_id:
        raise SpawnError(
            f"The folder for GitHub login {user.name!r} belongs to another GitHub "
            "account (the login was renamed or re-registered).  Ask the workshop's "
            "organisers to move or remove the old folder."
        )


async def submit(conn: Connection, script: str, *, timeout: float = 60) -> str:
    """``sbatch`` the script (on standard input), once; the job id.  Never retried
    blindly: when the outcome is unknown (connection lost, timeout), this raises
    :class:`ClusterUnreachable` and :class:`Submission` looks the job up first."""
    r = await conn.run(slurm.sbatch_argv(), input=script, timeout=timeout, retry=False)
    if r.exit_status != 0:
        raise SpawnError(f"The cluster refused the job: {str(r.stderr).strip()[:500]}")
    return slurm.parse_sbatch(str(r.stdout))


class Submission:
    """The submission of one spawn's job, safe to call again after a failure.

    The first call runs ``sbatch``.  A call after one that failed with an unknown outcome
    (the login node unreachable, the connection lost, a timeout: ``sbatch`` may have
    succeeded) first looks the spawn up in ``squeue`` by its comment
    (``xsedehub:<spawn id>``) and returns that job if SLURM has it; only when squeue
    answers without it is the job submitted again.  If squeue cannot be asked, the call
    fails again (:class:`ClusterUnreachable`), for the caller's retry.
    """

    def __init__(self, conn: Connection, script: str, spawn_id: str, *, timeout: float = 60):
        self.conn, self.script, self.spawn_id, self.timeout = conn, script, spawn_id, timeout
        self.attempts = 0

    async def __call__(self) -> str:
        if self.attempts:
            found = await self.conn.status.lookup(self.spawn_id)
            if found is not None:
                return found.job_id
        self.attempts += 1
        return await submit(self.conn, self.script, timeout=self.timeout)


async def cancel(conn: Connection, job_id: str) -> None:
    """``scancel`` the job (a job SLURM no longer knows counts as cancelled)."""
    r = await conn.run(slurm.scancel_argv(job_id), timeout=30)
    if r.exit_status != 0 and "Invalid job id" not in str(r.stderr):
        raise ClusterUnreachable(f"scancel {job_id}: {str(r.stderr).strip()[:300]}")


async def cancel_if_ours(conn: Connection, job_id: str, spawn_id: str) -> None:
    """``scancel`` ``job_id`` if SLURM still runs it as the job of ``spawn_id`` (its comment
    ``xsedehub:<spawn id>``): a recorded id never cancels another job that got the same id
    (after the cluster's job ids were reset, say).  Returns once nothing is left to cancel;
    raises :class:`ClusterUnreachable` when SLURM cannot be asked."""
    r = await conn.run(slurm.squeue_argv(conn.ident.username, [job_id]), timeout=30)
    if r.exit_status != 0:
        if "Invalid job id" in str(r.stderr):
            return  # SLURM no longer knows it: ended and purged
        raise ClusterUnreachable(f"squeue --jobs={job_id}: {str(r.stderr).strip()[:300]}")
    st = slurm.parse_squeue(str(r.stdout)).get(job_id)
    if st is None or not st.alive or (spawn_id and st.spawn_id != spawn_id):
        return
    await cancel(conn, job_id)
