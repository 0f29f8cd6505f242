"""The spawner: a credential in, a SLURM job and a tunnel out.

One spawner serves both modes; only the way it gets an SSH identity differs:

* ``gateway``: the hub's own key, as the shared workshop account; each attendee works
  in ``<gateway_workdir_root>/<github login>`` with the workshop notebooks;
* ``xsede``: the short-lived certificate the authenticator obtained for the user, as
  the user's own cluster account (the certificate's principal).

The flow of :meth:`start`: allocate a hub-side port and a per-job tunnel key; write the
job's environment and key as 0600 files over SFTP; ``sbatch`` a script (no secrets in
it) over the shared SSH connection; follow the job through the queue; wait until the
server answers through the tunnel; return the hub-side address.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import asyncssh
from jupyterhub.spawner import Spawner
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import (
    Bool,
    CaselessStrEnum,
    Dict,
    Float,
    Integer,
    List,
    Tuple,
    Unicode,
    default,
)

from . import form, slurm
from . import validate as v
from .ssh import POOL, ClusterUnreachable, Connection, LoginNode, SSHIdentity
from .tunnel import TunnelKeys

STATE_VERSION = 1
#: spawns of this hub process whose state may not be in the database yet
_ACTIVE_SPAWNS: set[str] = set()
#: tunnel key files already reconciled with the database by this process
_RECONCILED: set[str] = set()


class SpawnError(RuntimeError):
    """A failure with a message meant for the user on the spawn page."""


class CredentialExpired(SpawnError):
    """The user's certificate has expired (a new login renews it)."""


class SlurmSSHSpawner(Spawner):
    """Start each user's server as a SLURM batch job over SSH, reached through a tunnel."""

    # ----------------------------------------------------------------- mode & identity
    mode = CaselessStrEnum(
        ["gateway", "xsede"],
        default_value="gateway",
        config=True,
        help="""How the hub logs in to the cluster.

        ``gateway``: every job runs under one shared account (:attr:`gateway_user`) reached
        with the hub's key (:attr:`gateway_key`); attendees get a folder each.
        ``xsede``: each user's own account, with the short-lived SSH certificate the
        authenticator put in their auth_state.
        """,
    )
    login_host = Unicode(
        config=True, help="Host name or address of the cluster's login node, as the hub reaches it."
    )
    login_port = Integer(22, config=True, help="SSH port of the login node.")
    known_hosts = Unicode(
        config=True,
        help="""known_hosts file that vouches for the login node's host key (a plain key line
        or an ``@cert-authority`` line).  Required: host keys are always verified.""",
    )
    gateway_user = Unicode(
        "gateway", config=True, help="The shared cluster account (gateway mode)."
    )
    gateway_key = Unicode(
        config=True,
        help="""Path on the hub of the private key that logs in as :attr:`gateway_user`
        (gateway mode).""",
    )
    ssh_max_sessions = Integer(
        8,
        config=True,
        help="""Channels open at once on one SSH connection.  Keep it below the login node's
        sshd ``MaxSessions`` (OpenSSH default 10).""",
    )

    # ----------------------------------------------------------------- batch job
    partition = Unicode("compute", config=True, help="Default SLURM partition.")
    walltime = Unicode(
        "01:00:00", config=True, help="Default walltime, ``[D-]HH:MM[:SS]`` or minutes."
    )
    cores = Integer(1, config=True, help="Default CPU cores per server (``--cpus-per-task``).")
    memory = Unicode("2G", config=True, help="Default memory per server (``--mem``), e.g. ``2G``.")
    gpus = Integer(0, config=True, help="Default number of GPUs (``--gpus``), 0 for none.")
    account = Unicode(
        "",
        config=True,
        help="Default SLURM account (allocation) to charge; empty for the user's default.",
    )
    qos = Unicode("", config=True, help="SLURM QOS for every job; empty for none.")
    partitions = Dict(
        config=True,
        help="""Partitions users may choose, with limits and form defaults, e.g.
        ``{"compute": {"description": "CPU nodes", "max_walltime": "08:00:00",
        "max_cores": 16, "max_memory": "64G", "max_gpus": 0, "default_walltime": "01:00:00",
        "default_cores": 1, "default_memory": "2G"}}``.  Empty: only :attr:`partition`, with
        the defaults above as the only choice (and no form).""",
    )
    accounts = List(
        Unicode(),
        config=True,
        help="""Allocation accounts users may charge (xsede mode); empty lets users type any
        account name, which SLURM then checks.""",
    )
    allow_account_choice = Bool(
        None,
        allow_none=True,
        config=True,
        help="Let users choose the account on the form (default: in xsede mode only).",
    )
    show_availability = Bool(
        True, config=True, help="Show live idle cores per partition (from sinfo) on the form."
    )
    extra_sbatch = Dict(
        config=True,
        help="""Further ``#SBATCH`` options for every job, as ``{"constraint": "haswell"}``.
        Values are validated like partition names.""",
    )
    job_python = Unicode(
        "python3",
        config=True,
        help="""A Python 3 on the compute nodes, used by the job script to pick a free local
        port.  The environment that has ``jupyterhub-singleuser`` is a good choice.""",
    )
    job_dir_root = Unicode(
        ".xsedehub/jobs",
        config=True,
        help="""Where, relative to the cluster account's home, each job keeps its files
        (0600 environment and tunnel key, its log, the server's socket).""",
    )
    status_interval = Float(
        0.0,
        config=True,
        help="""Seconds between the shared ``squeue`` runs that watch running servers (one
        per interval for all servers that share an SSH identity, however many; jitter
        makes an interval up to 10% longer, never shorter).  A server whose job ended is
        stopped after the next run.  0: the poll interval.""",
    )
    cluster_retry_seconds = Float(
        120.0,
        config=True,
        help="""During a spawn, how long to keep retrying when the login node cannot be
        reached before failing with a clear message.""",
    )

    # ----------------------------------------------------------------- tunnel
    tunnel_host = Unicode(
        config=True, help="The hub's sshd as the compute nodes reach it (host name or address)."
    )
    tunnel_port = Integer(22, config=True, help="Port of the hub's sshd.")
    tunnel_user = Unicode("tunnelbot", config=True, help="The no-shell account jobs tunnel in as.")
    tunnel_known_hosts = Unicode(
        config=True,
        help="""known_hosts file (on the hub) that vouches for the hub sshd's host key; it is
        copied into each job's directory so the compute node verifies the hub.""",
    )
    tunnel_authorized_keys = Unicode(
        "/etc/xsedehub/tunnelbot_authorized_keys",
        config=True,
        help="""The tunnel account's authorized_keys file, which the hub manages: one line per
        running job, restricted to that job's port, expiring, removed at stop.  Point the
        sshd ``Match User`` block's ``AuthorizedKeysFile`` at it.""",
    )
    tunnel_port_range = Tuple(
        Integer(),
        Integer(),
        default_value=(20000, 29999),
        config=True,
        help="Hub-side loopback ports handed out to tunnels, inclusive.",
    )
    hub_api_host = Unicode(
        "",
        config=True,
        help="""The hub API's host as the hub's sshd reaches it (what jobs forward to).
        Default: the host of the hub's API URL.""",
    )

    # ----------------------------------------------------------------- work folder
    gateway_workdir_root = Unicode(
        "workshop",
        config=True,
        help="""Gateway mode: attendees' folders live in ``<this>/<github login>``, relative
        to the gateway account's home.""",
    )
    workshop_repo = Unicode(
        "",
        config=True,
        help="""Gateway mode: git repository of the workshop notebooks, checked out into
        each attendee's folder with nbgitpuller on every start (never overwriting edits).
        Empty for none.""",
    )
    workshop_branch = Unicode("main", config=True, help="Branch of :attr:`workshop_repo`.")
    workshop_checkout = Unicode(
        "",
        config=True,
        help="""Folder name of the checkout inside the attendee's folder; default: the
        repository's name.""",
    )
    gitpuller = Unicode(
        "gitpuller",
        config=True,
        help="The nbgitpuller command on the compute nodes (from the job's Python environment).",
    )
    require_github_id = Bool(
        True,
        config=True,
        help="""Gateway mode: refuse to start unless auth_state holds the numeric GitHub id,
        which guards each folder against renamed or re-registered logins.""",
    )
    xsede_workdir = Unicode(
        ".",
        config=True,
        help="xsede mode: the folder JupyterLab starts in, relative to the user's home.",
    )

    # ----------------------------------------------------------------- the form
    def partition_specs(self) -> list[form.PartitionSpec]:
        if self.partitions:
            return [form.PartitionSpec.from_config(n, s) for n, s in self.partitions.items()]
        wall = v.walltime_minutes(self.walltime)
        mem = v.memory_mb(self.memory)
        return [
            form.PartitionSpec(
                name=v.slurm_name(self.partition, "partition"),
                max_walltime=wall,
                max_cores=self.cores,
                max_memory=mem,
                max_gpus=self.gpus,
                default_walltime=wall,
                default_cores=self.cores,
                default_memory=mem,
            )
        ]

    def _account_choice(self) -> bool:
        if self.allow_account_choice is None:
            return self.mode == "xsede"
        return self.allow_account_choice

    def validate_options(self, options: dict) -> slurm.JobResources:
        """The gate for every spawn's options (form, URL query or REST API)."""
        specs = self.partition_specs()
        default = self.partition if any(p.name == self.partition for p in specs) else specs[0].name
        return form.validate_options(
            options,
            specs,
            default_partition=default,
            accounts=self.accounts,
            allow_account=self._account_choice(),
            default_account=self.account or None,
            qos=self.qos or None,
        )

    @default("options_from_form")
    def _options_from_form_default(self):
        def options_from_form(formdata):
            opts = form.options_from_form(formdata)
            try:
                self.validate_options(opts)
            except v.InvalidValue as e:
                raise web.HTTPError(400, f"{e.field}: {e.message}") from None
            return opts

        return options_from_form

    @default("options_form")
    def _options_form_default(self):
        return _render_options_form

    _sinfo_cache: dict[tuple, tuple[float, dict]] = {}

    async def availability(self) -> dict[str, form.Availability]:
        if not self.show_availability:
            return {}
        try:
            conn = await self.connection()
        except (SpawnError, ClusterUnreachable, OSError) as e:
            self.log.info("no availability for the form: %s", e)
            return {}
        key = (conn.node, conn.ident.username)
        cached = self._sinfo_cache.get(key)
        if cached and time.monotonic() - cached[0] < 30:
            return cached[1]
        try:
            r = await conn.run(form.SINFO_ARGV, timeout=15)
        except ClusterUnreachable as e:
            self.log.info("no availability for the form: %s", e)
            return {}
        data = form.parse_sinfo(str(r.stdout)) if r.exit_status == 0 else {}
        self._sinfo_cache[key] = (time.monotonic(), data)
        return data

    # ----------------------------------------------------------------- jupyterhub defaults
    @default("env_keep")
    def _env_keep_default(self) -> list[str]:
        # the hub's PATH, PYTHONPATH... mean nothing on a compute node
        return ["LANG", "LC_ALL"]

    @default("start_timeout")
    def _start_timeout_default(self) -> int:
        return 900  # includes the time in the queue

    @default("http_timeout")
    def _http_timeout_default(self) -> int:
        return 120

    @default("poll_interval")
    def _poll_interval_default(self) -> int:
        return 30

    @default("hub_api_host")
    def _hub_api_host_default(self) -> str:
        from urllib.parse import urlparse

        return urlparse(self.hub.api_url).hostname or "127.0.0.1"

    # ----------------------------------------------------------------- state
    job_id = Unicode("")
    hub_port = Integer(0)
    spawn_id = Unicode("")
    ssh_user = Unicode("")
    _submitted_at = 0.0

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if state.get("version", 0) > STATE_VERSION:
            self.log.warning("state of %s from a newer xsedehub: %s", self._log_name, state)
        self.job_id = state.get("job_id", "")
        self.hub_port = int(state.get("hub_port", 0))
        self.spawn_id = state.get("spawn_id", "")
        self.ssh_user = state.get("ssh_user", "")

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.job_id:
            state.update(
                version=STATE_VERSION,
                job_id=self.job_id,
                hub_port=self.hub_port,
                spawn_id=self.spawn_id,
                ssh_user=self.ssh_user,
            )
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = self.spawn_id = self.ssh_user = ""
        self.hub_port = 0

    # ----------------------------------------------------------------- progress
    def _progress(self, message: str, pct: int | None = None) -> None:
        self.log.info("%s: %s", self._log_name, message)
        ev: dict[str, Any] = {"message": message}
        if pct is not None:
            ev["progress"] = pct
        self._events.append(ev)
        self._events_changed.set()

    @property
    def _events(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_event_list"):
            self._event_list: list[dict[str, Any]] = []
            self._event_flag = asyncio.Event()
        return self._event_list

    @property
    def _events_changed(self) -> asyncio.Event:
        self._events  # noqa: B018 (initialise)
        return self._event_flag

    async def progress(self):
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            if self._spawn_future is not None and self._spawn_future.done():
                break
            self._events_changed.clear()
            try:
                await asyncio.wait_for(self._events_changed.wait(), 1)
            except TimeoutError:
                pass

    # ----------------------------------------------------------------- identity
    def login_node(self) -> LoginNode:
        if not self.login_host:
            raise SpawnError("xsedehub is not configured: SlurmSSHSpawner.login_host is empty")
        if not self.known_hosts:
            raise SpawnError("xsedehub is not configured: SlurmSSHSpawner.known_hosts is empty")
        return LoginNode(v.host(self.login_host, "login_host"), self.login_port, self.known_hosts)

    _key_cache: dict[str, tuple[float, asyncssh.SSHKey]] = {}

    def _gateway_identity(self) -> SSHIdentity:
        if not self.gateway_key:
            raise SpawnError("xsedehub is not configured: SlurmSSHSpawner.gateway_key is empty")
        mtime = Path(self.gateway_key).stat().st_mtime
        cached = self._key_cache.get(self.gateway_key)
        if cached is None or cached[0] != mtime:
            cached = (mtime, asyncssh.read_private_key(self.gateway_key))
            self._key_cache[self.gateway_key] = cached
        return SSHIdentity(
            v.posix_username(self.gateway_user, "gateway_user"), cached[1], label="gateway"
        )

    async def ssh_identity(self) -> SSHIdentity:
        """The identity this user's jobs are submitted with (override to change how)."""
        if self.mode == "gateway":
            return self._gateway_identity()
        return await self._certificate_identity()

    async def _certificate_identity(self) -> SSHIdentity:
        from xsedehub.auth.cilogon import STATE_KEY
        from xsedehub.auth.issuer import Credential

        auth_state = await self.user.get_auth_state() or {}
        cred = Credential.from_state(auth_state.get(STATE_KEY))
        if cred is None:
            raise SpawnError(
                "No cluster credential for this login: log out and log in again to get one."
            )
        if cred.valid_before <= time.time():
            raise CredentialExpired(
                "Your cluster certificate has expired: log out and log in again."
            )
        return SSHIdentity(
            v.posix_username(cred.principal, "certificate principal"),
            asyncssh.import_private_key(cred.private_key),
            asyncssh.import_certificate(cred.certificate),
            label="certificate",
        )

    async def connection(self) -> Connection:
        try:
            ident = await self.ssh_identity()
        except CredentialExpired:
            # a connection opened while the certificate was valid stays usable after it
            # expires (sshd checks certificates at login): poll and stop go on working
            live = POOL.live(self.login_node(), self.ssh_user) if self.ssh_user else None
            if live is not None:
                return live
            raise
        self.ssh_user = ident.username
        return POOL.get(self.login_node(), ident, max_sessions=self.ssh_max_sessions)

    def tunnel_keys(self) -> TunnelKeys:
        from urllib.parse import urlparse

        api = urlparse(self.hub.api_url)
        return TunnelKeys.for_file(
            self.tunnel_authorized_keys,
            tuple(self.tunnel_port_range),
            self.hub_api_host,
            api.port or 80,
        )

    # ----------------------------------------------------------------- job pieces
    def resources(self) -> slurm.JobResources:
        """Defaults from config, overridden by validated ``user_options``."""
        return self.validate_options(self.user_options or {})

    def attendee_login(self) -> str:
        return v.github_login(self.user.name, "GitHub login")

    def work_dir(self) -> str:
        if self.mode == "gateway":
            root = v.relative_path(self.gateway_workdir_root, "gateway_workdir_root", hidden=True)
            return f"{root}/{self.attendee_login()}"
        return (
            "."
            if self.xsede_workdir in ("", ".")
            else v.relative_path(self.xsede_workdir, "xsede_workdir", hidden=True)
        )

    def checkout_name(self) -> str:
        if self.workshop_checkout:
            return v.path_part(self.workshop_checkout, "workshop_checkout")
        base = self.workshop_repo.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        return v.path_part(base or "workshop", "workshop checkout")

    def node_env(self) -> dict[str, str]:
        """What the single-user server gets: everything from :meth:`get_env`, with the
        service URL pointing at the node side of the tunnel."""
        env = self.get_env()
        env["JUPYTERHUB_SERVICE_URL"] = "http://127.0.0.1:8888" + self.server.base_url
        # the server listens on a unix socket; jupyter-server only accepts --sock when
        # the port is its default (8888), hence the service URL above.
        if self.mode == "gateway":
            env["JUPYTERHUB_ROOT_DIR"] = "."
        return env

    def job_script(self, job_dir: str, hub_port: int) -> str:
        from urllib.parse import urlparse

        api = urlparse(self.hub.api_url)
        prologue: list[list[str]] = []
        if self.mode == "gateway" and self.workshop_repo:
            prologue.append(
                [self.gitpuller, self.workshop_repo, self.workshop_branch, self.checkout_name()]
            )
        job = slurm.JobScript(
            job_name=f"jupyter-{self.user.name}"[:60] if self.mode == "gateway" else "jupyterhub",
            resources=self.resources(),
            job_dir=job_dir,
            work_dir=self.work_dir(),
            singleuser=[*self.cmd, *self.get_args()],
            tunnel=slurm.Tunnel(
                host=self.tunnel_host,
                port=self.tunnel_port,
                user=self.tunnel_user,
                hub_port=hub_port,
                api_host=self.hub_api_host,
                api_port=api.port or 80,
            ),
            python=self.job_python,
            prologue=prologue,
            extra_directives=self.extra_sbatch,
            spawn_id=self.spawn_id,
        )
        return slurm.build_job_script(job)

    def _api_origin(self) -> str:
        from urllib.parse import urlparse

        api = urlparse(self.hub.api_url)
        return f"{api.scheme}://{api.netloc}"

    def _forget_rejected_options(self) -> None:
        """JupyterHub stores a spawn's options before start() and reuses them for a later
        Start without options: refused options must not stick."""
        self.user_options = {}
        orm = getattr(self, "orm_spawner", None)
        if orm is not None and getattr(self, "db", None) is not None:
            orm.user_options = {}
            self.db.commit()

    # ----------------------------------------------------------------- cluster I/O
    async def _retrying(self, what: str, fn, *args, **kw):
        """Run ``fn`` and retry with backoff while the login node is unreachable."""
        deadline = time.monotonic() + self.cluster_retry_seconds
        delay = 1.0
        while True:
            try:
                return await fn(*args, **kw)
            except ClusterUnreachable as e:
                if time.monotonic() + delay > deadline:
                    raise SpawnError(
                        f"The cluster's login node cannot be reached ({what}): {e}. "
                        "Try again later; if it persists, tell the hub's administrators."
                    ) from e
                self._progress(f"Login node unreachable ({what}); retrying in {delay:.0f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15)

    async def _claim_folder(self, sftp: asyncssh.SFTPClient, folder: str) -> None:
        """Gateway mode: create the attendee's folder and bind it to their GitHub id."""
        auth_state = await self.user.get_auth_state() or {}
        gh_id = str((auth_state.get("github_user") or {}).get("id") or "")
        if not gh_id.isdigit():
            if self.require_github_id:
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
        async with sftp.open(owner, "r") as f:
            recorded = (await f.read()).strip()
        if gh_id and recorded and recorded != gh_id:
            raise SpawnError(
                f"The folder for GitHub login {self.user.name!r} belongs to another GitHub "
                "account (the login was renamed or re-registered).  Ask the workshop's "
                "organisers to move or remove the old folder."
            )

    def _tunnel_known_hosts_text(self) -> str:
        text = Path(self.tunnel_known_hosts).read_text() if self.tunnel_known_hosts else ""
        if not text.strip():
            raise SpawnError(
                "xsedehub is not configured: SlurmSSHSpawner.tunnel_known_hosts is empty"
            )
        return text

    async def _write_job_files(self, conn: Connection, job_dir: str, grant) -> None:
        sftp = await conn.sftp()
        await sftp.makedirs(job_dir, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
        known_hosts = self._tunnel_known_hosts_text()
        files = {
            "env": slurm.env_file(self.node_env(), self._api_origin()),
            "tunnel_key": grant.private_key,
            "known_hosts": known_hosts,
        }

        async def write(name: str, content: str) -> None:
            # created 0600 before a byte is written
            async with sftp.open(
                f"{job_dir}/{name}", "w", attrs=asyncssh.SFTPAttrs(permissions=0o600)
            ) as f:
                await f.write(content)

        # independent requests: SFTP pipelines them over the one connection
        steps = [sftp.chmod(job_dir.split("/")[0], 0o700), sftp.chmod(job_dir, 0o700)]
        steps += [write(name, content) for name, content in files.items()]
        if self.mode == "gateway":
            steps.append(self._claim_folder(sftp, self.work_dir()))
        await asyncio.gather(*steps)

    async def _remove_job_files(self, conn: Connection, job_dir: str) -> None:
        try:
            sftp = await conn.sftp()
            for name in ("env", "tunnel_key"):
                try:
                    await sftp.remove(f"{job_dir}/{name}")
                except asyncssh.SFTPNoSuchFile:
                    pass
        except (ClusterUnreachable, asyncssh.Error, OSError) as e:
            self.log.warning("%s: could not remove job files: %s", self._log_name, e)

    async def _sbatch(self, conn: Connection, script: str) -> str:
        r = await conn.run(slurm.sbatch_argv(), input=script, timeout=60)
        if r.exit_status != 0:
            raise SpawnError(f"The cluster refused the job: {str(r.stderr).strip()[:500]}")
        return slurm.parse_sbatch(str(r.stdout))

    async def _scancel(self, conn: Connection, job_id: str) -> None:
        r = await conn.run(slurm.scancel_argv(job_id), timeout=30)
        if r.exit_status != 0 and "Invalid job id" not in str(r.stderr):
            raise ClusterUnreachable(f"scancel {job_id}: {str(r.stderr).strip()[:300]}")

    async def _job_log_tail(self, conn: Connection, job_dir: str, lines: int = 20) -> str:
        try:
            sftp = await conn.sftp()
            async with sftp.open(f"{job_dir}/job.log", "r") as f:
                text = await f.read()
            return "\n".join(text.splitlines()[-lines:])
        except (ClusterUnreachable, asyncssh.Error, OSError):
            return ""

    # ----------------------------------------------------------------- spawner API
    async def start(self) -> tuple[str, int]:
        self._events.clear()
        try:  # validate before anything is written or submitted anywhere
            resources = self.resources()
        except v.InvalidValue as e:
            self._forget_rejected_options()
            raise web.HTTPError(400, f"Invalid {e.field}: {e.message}") from None
        self._progress("Preparing the batch job", 5)
        await self._reconcile_tunnel_keys()
        conn = await self._retrying("connecting", self.connection)
        keys = self.tunnel_keys()
        self.spawn_id = f"u{self.user.id}-{secrets.token_hex(6)}"
        job_dir = (
            f"{v.relative_path(self.job_dir_root, 'job_dir_root', hidden=True)}/{self.spawn_id}"
        )
        lifetime = self.start_timeout + resources.walltime_minutes * 60 + 600
        grant = await keys.grant(self.spawn_id, lifetime)
        _ACTIVE_SPAWNS.add(self.spawn_id)
        self.hub_port = grant.port
        script = self.job_script(job_dir, grant.port)
        try:
            await self._retrying("writing job files", self._write_job_files, conn, job_dir, grant)
            self.job_id = await self._retrying("submitting", self._sbatch, conn, script)
        except BaseException:
            await keys.revoke(self.spawn_id)
            _ACTIVE_SPAWNS.discard(self.spawn_id)
            await self._remove_job_files(conn, job_dir)
            self.clear_state()
            raise
        self._submitted_at = time.monotonic()
        self._persist_early()
        self._progress(f"Submitted batch job {self.job_id} to partition {resources.partition}", 15)
        try:
            await self._wait_running(conn, job_dir)
            await self._wait_server(conn, job_dir)
            conn.status.watch(self.job_id, self, self._status_interval)
        except asyncio.CancelledError:
            # A timeout or a Stop makes JupyterHub call stop(), which cancels the job; a
            # hub that is shutting down does not: the job and its saved state then
            # survive, and the restarted hub re-attaches to them.
            raise
        except BaseException:
            await self._cleanup(conn, job_dir)
            raise
        return ("127.0.0.1", self.hub_port)

    def _persist_early(self) -> None:
        """Save the job's state and hub-side address before the job runs, so that a hub
        restarted while the job is queued finds it (JupyterHub saves state only once
        start() returns)."""
        orm = getattr(self, "orm_spawner", None)
        if orm is None or getattr(self, "db", None) is None:
            return
        if self.server is not None:
            self.server.ip = "127.0.0.1"
            self.server.port = self.hub_port
        orm.state = self.get_state()
        self.db.commit()

    async def _wait_running(self, conn: Connection, job_dir: str) -> None:
        last = ""
        while True:
            try:
                st = await conn.status.get(self.job_id, max_age=1.0, not_before=self._submitted_at)
            except ClusterUnreachable as e:
                self._progress(
                    f"Login node unreachable while job {self.job_id} is queued ({e}); retrying"
                )
                await asyncio.sleep(5)
                continue
            if st is None and time.monotonic() - self._submitted_at < 15:
                await asyncio.sleep(1)  # not visible yet: ask again rather than give up
                continue
            if st is None or not st.alive:
                tail = await self._job_log_tail(conn, job_dir)
                state = st.state if st else "gone from the queue"
                raise SpawnError(
                    f"Batch job {self.job_id} ended before the server started ({state})."
                    + (f"\nLast lines of its log:\n{tail}" if tail else "")
                )
            if st.running:
                self._progress(f"Job {self.job_id} running on {st.nodes}; opening the tunnel", 50)
                return
            msg = f"Job {self.job_id} is {st.state.lower()}"
            if st.reason and st.reason != "None":
                msg += f" ({st.reason})"
            if st.start and st.start not in ("N/A", "Unknown"):
                msg += f", expected to start {st.start}"
            if msg != last:
                self._progress(msg, 30)
                last = msg
            await asyncio.sleep(1)

    async def _wait_server(self, conn: Connection, job_dir: str) -> None:
        """Until the server answers through the tunnel (checked often at first, then
        every half second), watching that the job is still alive."""
        url = f"http://127.0.0.1:{self.hub_port}{self.server.base_url}api"
        client = AsyncHTTPClient()
        tunnel_seen = False
        deadline = time.monotonic() + self.http_timeout
        next_job_check = time.monotonic() + 5
        delay = 0.05
        while time.monotonic() < deadline:
            if not tunnel_seen:
                tunnel_seen = await _port_open(self.hub_port)
                if tunnel_seen:
                    self._progress("Server listening; tunnel to the compute node is up", 80)
            if tunnel_seen:
                try:
                    await client.fetch(HTTPRequest(url, request_timeout=5, follow_redirects=False))
                    self._progress("Server is ready", 95)
                    return
                except HTTPClientError as e:
                    if e.code != 599:  # any HTTP answer means the server is there
                        self._progress("Server is ready", 95)
                        return
                except OSError:
                    pass
            if time.monotonic() >= next_job_check:
                next_job_check = time.monotonic() + 5
                st = await conn.status.get(self.job_id, max_age=2.0)
                if st is None or not st.alive:
                    tail = await self._job_log_tail(conn, job_dir)
                    raise SpawnError(
                        f"Batch job {self.job_id} ended while the server was starting."
                        + (f"\nLast lines of its log:\n{tail}" if tail else "")
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        tail = await self._job_log_tail(conn, job_dir)
        raise SpawnError(
            f"The server in job {self.job_id} did not answer within {self.http_timeout} s."
            + (f"\nLast lines of its log:\n{tail}" if tail else "")
        )

    async def _cleanup(self, conn: Connection | None, job_dir: str | None = None) -> None:
        if conn is not None and self.job_id:
            try:
                await self._scancel(conn, self.job_id)
            except ClusterUnreachable as e:
                self.log.error("%s: could not cancel job %s: %s", self._log_name, self.job_id, e)
                raise
        if conn is not None and self.job_id:
            conn.status.unwatch(self.job_id)
        if self.spawn_id:
            await self.tunnel_keys().revoke(self.spawn_id)
            _ACTIVE_SPAWNS.discard(self.spawn_id)
            if conn is not None:
                await self._remove_job_files(
                    conn, job_dir or f"{self.job_dir_root}/{self.spawn_id}"
                )

    @property
    def _status_interval(self) -> float:
        return self.status_interval or float(self.poll_interval) or 30.0

    async def poll(self) -> int | None:
        await self._reconcile_tunnel_keys()
        if not self.job_id:
            return 0
        try:
            conn = await self.connection()
            # the refresher keeps the shared result fresh (and wakes us if the job
            # ends); a poll only queries itself if the refresher has stalled
            st = await conn.status.get(
                self.job_id, max_age=1.5 * self._status_interval, not_before=self._submitted_at
            )
        except (ClusterUnreachable, SpawnError) as e:
            # not "job gone": keep the server and ask again at the next poll
            self.log.warning("%s: poll could not reach the cluster: %s", self._log_name, e)
            return None
        if st is not None and st.alive:
            if not st.running:
                # still queued (e.g. the hub restarted while it waited): give the hub's
                # "is it up?" check the time the queue may take
                self.http_timeout = max(self.http_timeout, self.start_timeout)
            elif not self._start_pending:
                conn.status.watch(self.job_id, self, self._status_interval)
            return None
        self.log.info(
            "%s: job %s is %s", self._log_name, self.job_id, st.state if st else "gone from squeue"
        )
        await self.tunnel_keys().revoke(self.spawn_id)
        _ACTIVE_SPAWNS.discard(self.spawn_id)
        return 1

    async def _reconcile_tunnel_keys(self) -> None:
        """Once per hub process: drop tunnel keys of spawns the hub no longer knows (a job
        stopped, or a record lost, while the hub was down)."""
        keys_file = self.tunnel_authorized_keys
        if keys_file in _RECONCILED or getattr(self, "db", None) is None:
            return
        _RECONCILED.add(keys_file)
        from jupyterhub import orm

        known = set(_ACTIVE_SPAWNS)
        for row in self.db.query(orm.Spawner).filter(orm.Spawner.server_id.isnot(None)):
            spawn_id = (row.state or {}).get("spawn_id")
            if spawn_id:
                known.add(spawn_id)
        gone = await self.tunnel_keys().retain(known)
        if gone:
            self.log.info("removed tunnel keys of %d spawns the hub no longer knows", len(gone))

    async def stop(self, now: bool = False) -> None:
        if not self.job_id:
            return
        conn = await self.connection()
        delay = 1.0
        for attempt in range(4):
            try:
                await self._cleanup(conn)
                break
            except ClusterUnreachable:
                if attempt == 3:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        self.log.info("%s: cancelled job %s", self._log_name, self.job_id)
        self.clear_state()


async def _render_options_form(spawner: SlurmSSHSpawner) -> str:
    """The form, or "" (no form) when there is nothing to choose."""
    specs = spawner.partition_specs()
    choice = (
        len(specs) > 1
        or spawner._account_choice()
        or any(
            p.max_walltime > p.default_walltime
            or p.max_cores > p.default_cores
            or p.max_memory > p.default_memory
            or p.max_gpus
            for p in specs
        )
    )
    if not choice:
        return ""
    names = [p.name for p in specs]
    default = spawner.partition if spawner.partition in names else names[0]
    return form.render_form(
        specs,
        default_partition=default,
        availability=await spawner.availability(),
        accounts=spawner.accounts,
        allow_account=spawner._account_choice(),
        default_account=spawner.account,
    )


async def _port_open(port: int) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (TimeoutError, OSError):
        return False
    w.close()
    return True
