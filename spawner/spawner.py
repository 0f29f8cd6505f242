"""The spawner: a credential in, a SLURM job and a tunnel out.

:class:`SlurmSSHSpawner` holds the options, the saved state and the lifecycle JupyterHub
drives (``start``, ``poll``, ``stop``).  What it puts together lives next to it: the SSH
identity (:mod:`.identity`), what the hub process's spawners share (:mod:`.services`:
connection pool with the shared :mod:`.squeue`, spawn registry, caches), the tunnel key
(:mod:`.tunnel`), the job's script, files, submission and cancellation (:mod:`.job`,
:mod:`.slurm`), the waits until the server answers (:mod:`.follow`), the spawn page's
events (:mod:`.progress`), and the form with its one validation gate (:mod:`.form`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any
from urllib.parse import urlparse

import jupyterhub
from jupyterhub.spawner import Spawner
from sqlalchemy.orm import object_session
from tornado import web
from traitlets import (
    Bool,
    CaselessStrEnum,
    Dict,
    Float,
    Integer,
    List,
    TraitError,
    Tuple,
    Unicode,
    default,
    validate,
)

from . import clusters as clusters_mod
from . import follow, form, identity, job, metrics, pending_cancel, slurm, versions, walltime
from . import profiles as profiles_mod
from . import sandbox as sandbox_mod
from . import validate as v
from .errors import ClusterUnreachable, CredentialExpired, SpawnError
from .progress import Progress
from .services import HubServices
from .squeue import SqueueCache
from .ssh import Connection, LoginNode, SSHIdentity
from .tunnel import TunnelKeys

__all__ = ["CredentialExpired", "SlurmSSHSpawner", "SpawnError"]

#: 2: the state names its cluster (``cluster``); a state without it is the first cluster's
STATE_VERSION = 2
#: where a job runs, in its state: the cluster, its login node, its tunnel key's file
_PLACE = ("cluster", "login_host", "login_port", "tunnel_authorized_keys")
#: the least time between two walltime extensions asked for one server (seconds)
EXTEND_INTERVAL = 30.0


def _commit(orm: Any) -> None:
    """Commit a change to the spawner's row through the session that row belongs to.
    JupyterHub's ``Spawner.db`` accessor is deprecated (it warned at every spawn); the
    row, ``orm_spawner``, is what JupyterHub hands every spawner."""
    session = object_session(orm)
    if session is not None:
        session.commit()


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
    slurm_bin_dir = Unicode(
        "/usr/bin",
        config=True,
        help="""Absolute directory of SLURM's commands (sbatch, squeue, scancel, sacct) on
        the login node.  The hub runs them by this path, never through the account's
        ``PATH``: in gateway mode every attendee can write the shared account's files.""",
    )
    ssh_max_sessions = Integer(
        8,
        config=True,
        help="""Channels open at once on one SSH connection.  Keep it below the login node's
        sshd ``MaxSessions`` (OpenSSH default 10).""",
    )

    ssh_idle_timeout = Float(
        600.0,
        config=True,
        help="""Seconds after which a connection that ran no command is closed (it is
        opened again on the next use).  A connection that watches running servers is
        never idle.  0 keeps connections open for as long as the hub runs.""",
    )
    site_user = Unicode(
        "",
        config=True,
        help="""xsede mode, optional: a site account the hub may use to watch and cancel
        a user's jobs once their certificate has expired with no live connection left
        (after a hub restart, say), so that such servers are still seen to end and can
        be stopped.  It runs only ``squeue``/``sacct``/``scancel`` for those jobs, so
        ``scancel`` needs it to be a SLURM operator (or coordinator of the users'
        accounts).  Empty: no such account.""",
    )
    site_key = Unicode(
        "",
        config=True,
        help="Path on the hub of the private key that logs in as :attr:`site_user`.",
    )
    pending_cancel_file = Unicode(
        "xsedehub_pending_cancels.json",
        config=True,
        help="""Where the hub records jobs it could not cancel at stop (the cluster
        unreachable, or a certificate expired); later polls and starts over the same
        account, and ``xsedehub orphans``, cancel them.  Relative paths are from the hub's
        working directory, like ``jupyterhub.sqlite``.""",
    )

    clusters = Dict(
        config=True,
        help="""The clusters users' servers run on, by name, each with its own login node,
        partitions, accounts, tunnel, job directories and identity, e.g. ``{"expanse":
        {"display_name": "Expanse (SDSC)", "login_host": "login.expanse.example.org",
        "known_hosts": "/etc/xsedehub/expanse_known_hosts", "partitions": {"shared":
        {"max_cores": 16}, "gpu-shared": {"max_gpus": 1}}, "accounts": ["abc123"]},
        "delta": {"login_host": "login.delta.example.org", "known_hosts":
        "/etc/xsedehub/delta_known_hosts", "tunnel_port_range": [30000, 39999],
        "tunnel_authorized_keys": "/etc/xsedehub/delta_tunnel_keys"}}``.  A cluster's
        keys are the settings of the same name (login_host, login_port, known_hosts,
        slurm_bin_dir, partition, partitions, accounts, account, qos, tunnel_host,
        tunnel_port, tunnel_known_hosts, tunnel_authorized_keys, tunnel_port_range,
        cmd, gitpuller, walltime_extend_command, job_python, job_dir_root,
        gateway_workdir_root, xsede_workdir, gateway_user, gateway_key, site_user,
        site_key), and each one left out is that top-level
        setting; besides them ``display_name``, ``description`` and (xsede mode)
        ``issuer_url`` with ``issuer_secret_file``: the certificate issuer that gives a
        user's certificate for this cluster, with their account name there, or
        ``login_certificate: True``: the certificate of their login (one of the two is
        required).  With several clusters users choose through
        :attr:`profiles`, each of which names its ``cluster`` (default: the first).
        Problems stop the hub at start-up, each named with its path
        (``clusters.expanse.partitions.gpu.max_gpus``); values' own problems come
        first, those between clusters once the values are right.  Empty: one cluster, the
        top-level settings.  See docs/howto/clusters.md.""",
    )

    # ----------------------------------------------------------------- batch job
    partition = Unicode("compute", config=True, help="Default SLURM partition.")
    walltime = Unicode(
        "01:00:00", config=True, help="Default walltime, ``[D-]HH:MM[:SS]`` or minutes."
    )
    walltime_warnings = List(
        Integer(min=1),
        [600, 120],
        config=True,
        help="""Seconds before a job's walltime at which JupyterLab warns its user (a
        notification telling them to save), with the time left counting down in the
        status bar (the job environment needs ``xsedehub-jobext``, see
        docs/howto/walltime.md).  Empty: the countdown without warnings.""",
    )
    walltime_extend_command = List(
        Unicode(),
        [],
        config=True,
        help="""Lets users extend their running job from JupyterLab (off when empty, the
        default).  The command (an argv) runs on the login node as the job's account,
        followed by the job id and the new time limit in minutes, e.g. ``["sudo", "-n",
        "/usr/local/sbin/xsedehub-extend-walltime"]``: SLURM lets users only shorten
        their jobs, so the site provides a command that may lengthen them (see
        docs/howto/walltime.md).  Each extension adds
        :attr:`walltime_extend_minutes`, up to the partition's ``max_walltime``.""",
    )
    walltime_extend_minutes = Integer(
        30,
        min=1,
        config=True,
        help="Minutes one extension adds to a job's time limit (see walltime_extend_command).",
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
    profiles = Dict(
        config=True,
        help="""Named choices users pick from on the form (or with ``{"profile": NAME}``
        in the REST API's options), each a partition of :attr:`partitions` with its own
        defaults and limits (within the partition's), a software environment, a SLURM
        reservation, and who may use it, e.g. ``{"gpu-workshop": {"display_name": "GPU
        workshop", "description": "reserved nodes, Tuesday", "partition": "gpu",
        "default_walltime": "01:00:00", "max_walltime": "02:00:00", "default_gpus": 1,
        "max_gpus": 1, "max_cores": 8, "max_memory": "32G", "environment": {"source":
        ["/etc/profile.d/lmod.sh"], "modules": ["cuda/12.2"], "conda": "pytorch",
        "venv": "/opt/envs/ml", "container": ["apptainer", "exec", "--nv",
        "/images/pytorch.sif"]}, "reservation": "workshop-tue", "groups": ["workshop"],
        "users": []}}``.  Every key but ``partition`` (default: :attr:`partition`) is
        optional; ``groups`` (JupyterHub groups) and ``users`` (hub user names) say who
        may use it, neither: everyone.  Users see, and may start, only their profiles;
        the first one open to them is the default.  Problems stop the hub at start-up,
        each named with its path (``profiles.gpu-workshop.max_gpus``).  Empty: users
        choose among the partitions.  See docs/howto/profiles.md.""",
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
        True,
        config=True,
        help="""Show live idle cores per partition (from sinfo) on the form.  The form waits
        at most 4 s for them: when the login node does not answer it shows none, and does
        not ask again for 20 s.""",
    )
    extra_sbatch = Dict(
        config=True,
        help="""Further ``#SBATCH`` options for every job, as ``{"constraint": "haswell"}``.
        Values are validated like partition names.""",
    )
    job_python = Unicode(
        "python3",
        config=True,
        help="""A Python 3 (3.8 or newer) on the compute nodes: it runs the job agent, which
        holds the node's end of the hub API forward and keeps the job's SSH connections.
        The environment that has ``jupyterhub-singleuser`` is a good choice.""",
    )
    job_dir_root = Unicode(
        ".xsedehub/jobs",
        config=True,
        help="""Where, relative to the cluster account's home, each job keeps its files
        (0600 environment and tunnel key, its log, the server's socket).  The folders of
        it the hub creates are made 0700; a folder that already exists (the account's
        own, say) keeps its mode.""",
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

    # ----------------------------------------------------------------- the server in the job
    server_idle_timeout = Integer(
        3600,
        min=0,
        config=True,
        help="""Seconds without activity (no kernel, no terminal, no request) after which
        the server in the job shuts itself down, which ends the job and gives its
        allocation back even when the hub cannot be reached (jupyter-server's
        ``ServerApp.shutdown_no_activity_timeout``; it checks once a minute).  The hub's
        idle culler (``jupyterhub-idle-culler``, which ``xsedehub.config.idle_culler``
        and the TLJH plugin configure) does the same from the hub side.  0: never.""",
    )
    kernel_idle_timeout = Integer(
        3600,
        min=0,
        config=True,
        help="""Seconds a kernel may run nothing before the server shuts it down, even
        with its notebook open (``MappingKernelManager.cull_idle_timeout``, with
        ``cull_connected``); a kernel that is computing is never idle.  Without kernels
        the server can then end itself (:attr:`server_idle_timeout`).  0: never.""",
    )
    lab_disabled_plugins = List(
        Unicode(),
        default_value=["@jupyterlab/apputils-extension:announcements"],
        config=True,
        help="""JupyterLab plugins the job's server leaves off, for a quiet first start
        in a workshop.  The default turns off the "get notified about official Jupyter
        news?" pop-up (which also means no news is fetched).  Set through a page config
        in the job's own folder, first on ``JUPYTER_CONFIG_PATH``: nothing is written to
        the user's ``~/.jupyter``, whose own settings still count.  Empty: JupyterLab
        as it comes.""",
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

    # ----------------------------------------------------------------- sandbox
    sandbox = CaselessStrEnum(
        ["bubblewrap", "apptainer", "none"],
        default_value="bubblewrap",
        config=True,
        help="""Gateway mode: the runtime that walls each attendee's server (and its
        kernels and terminals) off from the others inside the shared account, with
        unprivileged user namespaces.  Inside, only the attendee's own folder is visible
        (as their home); the account's home, the other folders, the job directories and the
        other jobs' processes are not.  ``bubblewrap``: the ``bwrap`` command on the compute
        nodes.  ``apptainer``: ``apptainer exec --containall`` with
        :attr:`sandbox_image`.  ``none``: no sandbox; attendees can then read each other's
        folders and signal each other's processes.  Where the sandbox cannot start, the
        spawn fails with a message saying so, never an unsandboxed server;
        ``xsedehub check`` tries it on the login node and on a compute node.  xsede mode
        (each user's own account) never uses it.""",
    )
    sandbox_command = Unicode(
        "",
        config=True,
        help="""The sandbox runtime's executable on the compute nodes (a name on the job's
        PATH or an absolute path).  Empty: ``bwrap`` or ``apptainer``.""",
    )
    sandbox_image = Unicode(
        "",
        config=True,
        help="""``sandbox = "apptainer"``: absolute path on the compute nodes of the image
        the server runs in (a ``.sif`` file or a sandbox directory).""",
    )
    sandbox_hide = List(
        Unicode(),
        default_value=list(sandbox_mod.DEFAULT_HIDE),
        config=True,
        help="""``sandbox = "bubblewrap"``: absolute paths that are empty, private folders
        inside the sandbox (those that exist on the node; the account's home always is).
        ``/run/munge`` (munge's socket) keeps SLURM commands from working inside, so that
        no attendee can ``scancel`` or signal another's job; with SLURM's own
        authentication (``auth/slurm``), add ``/run/slurm``.  Add the shared account's
        other folders, e.g. its scratch or project space, which would otherwise be
        readable by every attendee.""",
    )
    sandbox_ro_binds = List(
        Unicode(),
        config=True,
        help="""Absolute paths bound read-only into the sandbox at the same path: the job
        environment if it lives under a hidden path (apptainer: the job environment and
        everything else the server needs from the host), shared data sets.""",
    )
    sandbox_binds = List(
        Unicode(),
        config=True,
        help="""Absolute paths bound writable into the sandbox at the same path, e.g. a
        scratch space the site lists.  Every attendee's sandbox sees the same folder:
        what one writes there, all can read.""",
    )
    sandbox_devices = List(
        Unicode(),
        config=True,
        help="""Device nodes bound into the sandbox (its ``/dev`` is private otherwise),
        e.g. ``["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"]`` for GPU jobs.""",
    )

    def sandbox_settings(self) -> sandbox_mod.Sandbox | None:
        """The attendee sandbox of this spawner's jobs (validated), or None: xsede mode,
        or ``sandbox = "none"``."""
        if self.mode != "gateway" or self.sandbox == "none":
            return None
        return sandbox_mod.Sandbox(
            runtime=self.sandbox,
            command=self.sandbox_command,
            image=self.sandbox_image,
            hide=tuple(self.sandbox_hide),
            ro_binds=tuple(self.sandbox_ro_binds),
            binds=tuple(self.sandbox_binds),
            devices=tuple(self.sandbox_devices),
        )

    # ----------------------------------------------------------------- the form
    def partition_specs(self) -> list[form.PartitionSpec]:
        return form.partition_specs(self)

    def validate_options(self, options: dict) -> slurm.JobResources:
        """The gate for every spawn's options (form, URL query or REST API).  On a hub
        with several clusters the profile chosen also chooses the cluster."""
        self._use_cluster_of(options)
        return form.validate_for(self, options)

    def profile(self) -> profiles_mod.Profile | None:
        """The profile of this spawn's options (None on a hub without profiles)."""
        return form.choose_for(self, self.user_options or {}).profile

    @default("options_from_form")
    def _options_from_form_default(self):
        def options_from_form(formdata):
            if formdata.get(form.RELAUNCH_FIELD):  # the home page's "start again"
                try:
                    return form.relaunch_options(self, self.last_options())
                except v.InvalidValue as e:
                    raise web.HTTPError(400, e.message) from None
            opts = form.options_from_form(formdata)
            try:
                self.validate_options(opts)
            except v.InvalidValue as e:
                metrics.refused(self)
                raise web.HTTPError(400, f"{e.field}: {e.message}") from None
            return opts

        return options_from_form

    def last_options(self) -> dict:
        """The options this server was last started with (JupyterHub keeps them with the
        server; a start they failed validation for does not: see start())."""
        orm = getattr(self, "orm_spawner", None)
        return dict((orm.user_options if orm is not None else None) or self.user_options or {})

    @default("options_form")
    def _options_form_default(self):
        return _render_options_form

    async def availability(self) -> dict[str, form.Availability]:
        if not self.show_availability:
            return {}
        try:
            # a hub with one named cluster: that cluster's (its settings may not be applied yet)
            if self.clusters:
                conn = await self._availability_connection(self.cluster())
                if conn is None:
                    return {}
            else:
                conn = await self.connection()
            return await self.services.availability.get(conn)
        except (SpawnError, ClusterUnreachable, OSError, CredentialExpired) as e:
            self.log.info("no availability for the form: %s", e)
            return {}

    def _my_clusters(self) -> set[str]:
        """The clusters of the profiles open to this user (by name)."""
        try:
            profiles = form.profile_list(self, [])
        except v.InvalidValue:
            return set()
        user, groups = form.user_of(self)
        first = self.cluster_list()[0].name
        return {p.cluster or first for p in profiles_mod.allowed(profiles, user, groups)}

    async def _availability_connection(self, c: clusters_mod.ClusterSpec) -> Connection | None:
        """A connection to ask ``c`` for the form's availability, or None: a cluster with
        its own certificate issuer is asked as its site account only (showing the form
        sends the user's login token to no issuer)."""
        if self.mode == "xsede" and c.issuer_url:
            if not (c.site_user and c.site_key):
                return None
            ident = identity.site_identity(self.services.key_files, c.site_key, c.site_user)
            return self.services.pool.get(
                self.login_node(c), ident, max_sessions=self.ssh_max_sessions
            )
        return await self.connection(c)

    async def cluster_status(self) -> list[form.ClusterStatus]:
        """Each cluster's availability for the form, asked of all at once (each within
        the form's wait, each cached on its own): one that does not answer is shown
        unavailable and holds up no other.  Only the clusters of the user's profiles are
        asked (no other has a card for them)."""
        mine = self._my_clusters()

        async def one(c: clusters_mod.ClusterSpec) -> form.ClusterStatus:
            status = partial(form.ClusterStatus, c.name, c.display_name, c.description)
            if not self.show_availability or c.name not in mine:
                return status(availability={})
            try:
                conn = await self._availability_connection(c)
                if conn is None:
                    return status(availability={})
                return status(availability=await self.services.availability.get(conn))
            except (SpawnError, ClusterUnreachable, OSError, CredentialExpired) as e:
                self.log.info("no availability from cluster %s for the form: %s", c.name, e)
                return status(availability=None, note=f"its login node does not answer ({e})")

        return list(await asyncio.gather(*(one(c) for c in self.cluster_list())))

    @validate("slurm_bin_dir")
    def _valid_slurm_bin_dir(self, proposal: dict) -> str:
        try:
            return v.absolute_path(proposal["value"], "slurm_bin_dir")
        except v.InvalidValue as e:
            raise TraitError(f"SlurmSSHSpawner.{e}") from e

    @validate("server_idle_timeout", "kernel_idle_timeout")
    def _valid_idle_timeout(self, proposal: dict) -> int:
        name = proposal["trait"].name
        try:
            return v.positive_int(proposal["value"], name, low=0, high=10**7)
        except v.InvalidValue as e:
            raise TraitError(f"SlurmSSHSpawner.{e}") from e

    @validate("lab_disabled_plugins")
    def _valid_lab_plugins(self, proposal: dict) -> list[str]:
        try:
            return [v.lab_plugin_id(p, "lab_disabled_plugins") for p in proposal["value"]]
        except v.InvalidValue as e:
            raise TraitError(f"SlurmSSHSpawner.{e}") from e

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
        return urlparse(self.hub.api_url).hostname or "127.0.0.1"

    # ----------------------------------------------------------------- state
    job_id = Unicode("")
    hub_port = Integer(0)
    spawn_id = Unicode("")
    ssh_user = Unicode("")
    #: the cluster the job runs on ("" on a hub with one cluster)
    cluster_name = Unicode("")
    _base_settings: dict[str, Any] | None = None  # the top-level cluster settings
    _lost_cluster = ""  # the state's cluster, no longer configured
    _lost_state: dict[str, Any] = {}
    #: why the last job ended, when the hub page should say (it reached its walltime)
    end_note = Unicode("")
    _submitted_at = 0.0
    _extending = False  # a walltime extension is being asked for
    _last_extend: float | None = None  # when the last one was (time.monotonic())
    _start_cancelled = False  # a start was cancelled and its stop has not run yet
    _job_cache: SqueueCache | None = None  # the shared squeue that follows the job
    _last_end: walltime.TimeLeft | None = None  # the job's end, as last seen running

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._events = Progress()

    @property
    def services(self) -> HubServices:
        """What this spawner shares with the others of the hub process."""
        return HubServices.shared()

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        if state.get("version", 0) > STATE_VERSION:
            self.log.warning("state of %s from a newer xsedehub: %s", self._log_name, state)
        self.job_id = state.get("job_id", "")
        self.hub_port = int(state.get("hub_port", 0))
        self.spawn_id = state.get("spawn_id", "")
        self.ssh_user = state.get("ssh_user", "")
        self.end_note = state.get("end_note", "")
        if self.job_id:
            self._find_cluster_of(state)

    def _find_cluster_of(self, state: dict[str, Any]) -> None:
        """The cluster the state's job runs on, or, when no configured cluster is sure to
        be it, :attr:`_lost_cluster` (the job is then never polled nor cancelled on
        another cluster's login node, where the same job id is someone else's job).

        * a state naming a cluster: that cluster, if it is configured and (a state that
          recorded it) still has the login node the job was submitted on;
        * a state naming none (a hub without ``clusters``, or from before them): the
          cluster whose login node is the one recorded, or, for a state that recorded
          none (version 1), the top-level ``login_host``/``login_port``'s."""
        name = state.get("cluster") or ""
        recorded = state.get("login_host"), state.get("login_port")
        if not recorded[0]:
            recorded = None
        if not self.multi_cluster():
            here = (self.login_host, self.login_port)
            if name or (recorded is not None and tuple(recorded) != here):
                where = name or f"{recorded[0]}:{recorded[1]}"  # type: ignore[index]
                self._lose(where, state)
            return
        found = self.cluster_list()
        if name:
            spec = next((c for c in found if c.name == name), None)
        else:
            if recorded is None:  # version 1: the job ran on the top-level login node
                base = self._base_settings or self._settings_now()
                recorded = base["login_host"], base["login_port"]
                state = {**state, "login_host": recorded[0], "login_port": recorded[1]}
            node = tuple(recorded)
            spec = next((c for c in found if (c.login_host, c.login_port) == node), None)
            name = f"{node[0]}:{node[1]}"
        if spec is None or (
            recorded is not None and (spec.login_host, spec.login_port) != tuple(recorded)
        ):
            self._lose(name, state)
            return
        self.use_cluster(spec.name)

    def _lose(self, where: str, state: dict[str, Any]) -> None:
        self._lost_cluster = where
        self._lost_state = {k: state[k] for k in _PLACE if state.get(k)}
        self.log.error(
            "%s: job %s runs on cluster %r, which is no longer configured",
            self._log_name,
            self.job_id,
            where,
        )

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.job_id:
            state.update(
                version=STATE_VERSION,
                job_id=self.job_id,
                hub_port=self.hub_port,
                spawn_id=self.spawn_id,
                ssh_user=self.ssh_user,
                # the login node the job was submitted on: checked at load_state
                login_host=self.login_host,
                login_port=self.login_port,
                # where its tunnel key is: revoked there even if the cluster is removed
                tunnel_authorized_keys=self.tunnel_authorized_keys,
            )
            if self._lost_cluster:  # kept as loaded: where the job really runs
                for key in _PLACE:
                    state.pop(key, None)
                state.update(self._lost_state)
            elif self.cluster_name:
                state["cluster"] = self.cluster_name
        if self.end_note:  # kept after the job (clear_state leaves it) until a new start
            state["end_note"] = self.end_note
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = self.spawn_id = self.ssh_user = ""
        self.hub_port = 0

    # ----------------------------------------------------------------- progress
    def _progress(self, message: str, pct: int | None = None) -> None:
        self.log.info("%s: %s", self._log_name, message)
        self._events.add(message, pct)

    def progress(self) -> AsyncIterator[dict[str, Any]]:
        # an async generator, as JupyterHub wants: the events until the start has ended
        return self._events.follow(
            lambda: self._spawn_future is not None and self._spawn_future.done()
        )

    # ----------------------------------------------------------------- clusters
    def multi_cluster(self) -> bool:
        """Whether :attr:`clusters` is configured (one cluster or more, by name)."""
        return bool(self.clusters)

    def cluster_list(self) -> list[clusters_mod.ClusterSpec]:
        """The hub's clusters (checked; the first is the default), or, without
        :attr:`clusters`, the one the top-level settings describe."""
        if not self.clusters:
            return [clusters_mod.parse_clusters({}, self._settings_now(), self.mode)[0]]
        if self._base_settings is None:  # before any cluster's settings are applied
            self._base_settings = self._settings_now()
        return clusters_mod.parse_clusters(self.clusters, self._base_settings, self.mode)

    def _settings_now(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in clusters_mod.SETTINGS}

    def cluster(self) -> clusters_mod.ClusterSpec:
        """The cluster this server runs on (or would, started now)."""
        found = self.cluster_list()
        return clusters_mod.by_name(found, self.cluster_name) if self.cluster_name else found[0]

    def use_cluster(self, name: str) -> clusters_mod.ClusterSpec:
        """Run this server on cluster ``name``: its settings become the spawner's (the
        login node, partitions, tunnel, directories, identity); every piece that reads
        them then works on that cluster.  :class:`~.validate.InvalidValue` if there is
        no such cluster."""
        spec = clusters_mod.by_name(self.cluster_list(), name)
        if self.multi_cluster():
            for key, value in spec.settings().items():
                setattr(self, key, value)
            self.cluster_name = spec.name
        return spec

    def _use_cluster_of(self, options: dict) -> None:
        """Before a spawn: the cluster of the profile ``options`` name (or of the first
        one open to the user).  A server with a job stays on its state's cluster."""
        if not self.multi_cluster() or self.job_id:
            return
        try:
            profiles = form.profile_list(self, [])
        except v.InvalidValue:
            self.use_cluster("")  # the gate reports it
            return
        user, groups = form.user_of(self)
        mine = profiles_mod.allowed(profiles, user, groups)
        name = options.get("profile") if isinstance(options, dict) else None
        chosen = next((p for p in mine if p.name == name), None)
        if chosen is None and name in ("", None) and mine:
            chosen = mine[0]
        # nothing chosen (no profiles, or a name the gate refuses): the first cluster,
        # never the top-level settings, which are no cluster's
        self.use_cluster(chosen.cluster if chosen is not None else "")

    def _on_a_cluster(self) -> None:
        """On a hub with ``clusters``, the spawner's settings are a cluster's (the first
        when none was chosen), never the top-level ones; a lost job's stay untouched."""
        if self.multi_cluster() and not self.cluster_name and not self._lost_cluster:
            self.use_cluster("")

    # ----------------------------------------------------------------- identity
    def login_node(self, cluster: clusters_mod.ClusterSpec | None = None) -> LoginNode:
        """The login node of ``cluster`` (default: this server's)."""
        if cluster is None:
            return identity.login_node(
                self.login_host, self.login_port, self.known_hosts, self.slurm_bin_dir
            )
        return identity.login_node(
            cluster.login_host, cluster.login_port, cluster.known_hosts, cluster.slurm_bin_dir
        )

    async def ssh_identity(self, cluster: clusters_mod.ClusterSpec | None = None) -> SSHIdentity:
        """The identity this user's jobs are submitted with on ``cluster`` (default: this
        server's); override to change how."""
        if cluster is None:
            self._on_a_cluster()
        if self.mode == "gateway":
            if cluster is None:
                return identity.gateway_identity(
                    self.services.key_files, self.gateway_key, self.gateway_user
                )
            return identity.gateway_identity(
                self.services.key_files, cluster.gateway_key, cluster.gateway_user
            )
        # the identity and the login node always of the same cluster
        issuer = cluster if cluster is not None else self.cluster() if self.clusters else None
        if issuer is not None and issuer.issuer_url:
            return await identity.cluster_certificate_identity(self.user, issuer, self.log)
        if issuer is not None and not issuer.login_certificate:
            raise SpawnError(
                f"cluster {issuer.name} has no certificate issuer (clusters.{issuer.name}."
                "issuer_url) and does not take the login's certificate"
            )
        return await identity.certificate_identity(self.user)

    async def connection(self, cluster: clusters_mod.ClusterSpec | None = None) -> Connection:
        """The connection to ``cluster``'s login node (default: this server's)."""
        pool = self.services.pool
        pool.idle_timeout = self.ssh_idle_timeout
        if cluster is None:
            self._on_a_cluster()
        if cluster is not None:  # another cluster (the form's availability)
            ident = await self.ssh_identity(cluster)
            return pool.get(self.login_node(cluster), ident, max_sessions=self.ssh_max_sessions)
        try:
            ident = await self.ssh_identity()
        except CredentialExpired:
            # a connection opened while the certificate was valid stays usable after it
            # expires (sshd checks certificates at login): poll and stop go on working
            live = pool.live(self.login_node(), self.ssh_user) if self.ssh_user else None
            if live is not None:
                return live
            site = self._site_connection()
            if site is not None:
                return site
            raise
        self.ssh_user = ident.username
        return pool.get(self.login_node(), ident, max_sessions=self.ssh_max_sessions)

    def _site_connection(self) -> Connection | None:
        """The site account's connection (xsede mode, when configured), for a job whose
        owner's certificate has expired."""
        if self.mode != "xsede" or not (self.site_user and self.site_key and self.job_id):
            return None
        ident = identity.site_identity(self.services.key_files, self.site_key, self.site_user)
        return self.services.pool.get(self.login_node(), ident, max_sessions=self.ssh_max_sessions)

    def _is_own(self, conn: Connection) -> bool:
        """``conn`` logs in as the job's owner (not as the site account)."""
        return not self.ssh_user or conn.ident.username == self.ssh_user

    def tunnel_keys(self) -> TunnelKeys:
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

    def work_dir(self) -> str:
        """Where JupyterLab starts, relative to the account's home."""
        return job.work_dir(self)

    def node_env(self) -> dict[str, str]:
        """What the single-user server gets (see :func:`.job.server_env`)."""
        return job.server_env(self)

    def job_script(self, job_dir: str, hub_port: int) -> str:
        return job.script(self, job_dir, hub_port)

    def _forget_rejected_options(self) -> None:
        """JupyterHub stores a spawn's options before start() and reuses them for a later
        Start without options: refused options must not stick."""
        self.user_options = {}
        orm = getattr(self, "orm_spawner", None)
        if orm is not None:
            orm.user_options = {}
            _commit(orm)

    # ----------------------------------------------------------------- spawner API
    def _job_files(self, conn: Connection, job_dir: str) -> job.JobFiles:
        return job.JobFiles(conn, job_dir, self.log, self._log_name)

    @metrics.count_spawn
    async def start(self) -> tuple[str, int]:
        self._start_cancelled = False
        try:
            return await self._start()
        except asyncio.CancelledError:
            # Stop on the progress page (or a start timeout) cancels the start; stop()
            # follows a moment later and cancels the job.  Until then the server is not
            # ready: JupyterHub's progress stream would otherwise tell the page "ready"
            # (the server has its address already) and send the browser into a loop.
            self._start_cancelled = True
            raise

    @property
    def ready(self) -> bool:
        """JupyterHub's ``ready``, but never between a cancelled start and its stop."""
        return not self._start_cancelled and super().ready

    async def _start(self) -> tuple[str, int]:
        self._events.clear()
        self.end_note = ""
        self._last_end = None
        try:  # validate before anything is written or submitted anywhere
            v.server_name(self.name)
            resources = self.resources()
        except v.InvalidValue as e:
            self._forget_rejected_options()
            raise web.HTTPError(400, f"Invalid {e.field}: {e.message}") from None
        try:
            self.sandbox_settings()
        except v.InvalidValue as e:
            raise SpawnError(f"xsedehub is misconfigured: {e.field}: {e.message}") from None
        self._progress("Preparing the batch job", 5)
        await self._reconcile_tunnel_keys()
        retry = partial(follow.retrying, within=self.cluster_retry_seconds, report=self._progress)
        conn = await retry("connecting", self.connection)
        self._compare_versions_once(conn)
        keys = self.tunnel_keys()
        # one id per spawn, with the server's name: its own job, folder, port and key
        self.spawn_id = slurm.new_spawn_id(self.user.id, self.name)
        job_dir = (
            f"{v.relative_path(self.job_dir_root, 'job_dir_root', hidden=True)}/{self.spawn_id}"
        )
        files = self._job_files(conn, job_dir)
        lifetime = self.start_timeout + resources.walltime_minutes * 60 + 600
        grant = await keys.grant(self.spawn_id, lifetime)
        self.services.spawns.started(self.spawn_id)
        self.hub_port = grant.port
        submitting = False  # from here a job may exist (an sbatch that timed out, say)
        try:
            # inside: a script that cannot be built must not leave the key granted
            script = self.job_script(job_dir, grant.port)
            await self._retry_pending_cancels(conn, force=True)
            contents = partial(job.file_contents, self, grant)
            await retry("writing job files", files.create, contents, *job.claims(self))
            # never sbatch twice: a retry first looks the spawn up by its comment
            submission = job.Submission(conn, script, self.spawn_id)
            submitting = True
            self.job_id = await retry("submitting", submission)
        except BaseException:
            # no job, no connection that could have logged in with the key: its port
            # need not be held
            await keys.revoke(self.spawn_id, hold=submitting)
            self.services.spawns.ended(self.spawn_id)
            await files.remove_secrets()
            self.clear_state()
            raise
        self._submitted_at = time.monotonic()
        self._persist_early()
        self._progress(f"Submitted batch job {self.job_id} to partition {resources.partition}", 15)
        try:
            await follow.wait_running(conn, self.job_id, files, self._submitted_at, self._progress)
            running_at = metrics.queue_wait(self, resources.partition, self._submitted_at)
            await follow.wait_server(
                conn,
                self.job_id,
                files,
                hub_port=self.hub_port,
                timeout=self.http_timeout,
                report=self._progress,
            )
            metrics.startup(self, resources.partition, running_at)
            conn.status.watch(self.job_id, self, self._status_interval)
            self._job_cache = conn.status
        except asyncio.CancelledError:
            # A timeout or a Stop makes JupyterHub call stop(), which cancels the job; a
            # hub that is shutting down does not: the job and its saved state then
            # survive, and the restarted hub re-attaches to them.
            raise
        except BaseException:
            await self._end_job(conn, job_dir)
            raise
        return ("127.0.0.1", self.hub_port)

    def _compare_versions_once(self, conn: Connection) -> None:
        """At the first start of each job environment in this hub process, compare its
        JupyterHub with the hub's, beside the spawn (it waits for nothing), and log a
        warning that explains a difference (:mod:`.versions`)."""
        key = (conn.node, tuple(self.cmd))
        if key in self.services.versions_checked:
            return
        self.services.versions_checked.add(key)
        task = asyncio.ensure_future(
            versions.warn_if_mismatched(conn, list(self.cmd), jupyterhub.__version__, self.log)
        )
        self.services.background.add(task)
        task.add_done_callback(self.services.background.discard)

    def _persist_early(self) -> None:
        """Save the job's state and hub-side address before the job runs, so that a hub
        restarted while the job is queued finds it (JupyterHub saves state only once
        start() returns)."""
        orm = getattr(self, "orm_spawner", None)
        if orm is None:
            return
        if self.server is not None:
            self.server.ip = "127.0.0.1"
            self.server.port = self.hub_port
        orm.state = self.get_state()
        _commit(orm)

    async def _end_job(
        self, conn: Connection | None, job_dir: str | None = None, *, attempts: int = 4
    ) -> bool:
        """End the job: first what the hub holds (its watch, its tunnel key), which needs
        no cluster; then ``scancel`` (tried ``attempts`` times).  A job that could not be
        cancelled goes on the durable pending-cancel list, for a later poll, start or
        ``xsedehub orphans``.  True if SLURM took the cancel."""
        if self.job_id:
            # job ids are per cluster: another cluster's job of the same id stays watched
            try:
                node = self.login_node()
            except (SpawnError, v.InvalidValue):
                node = None
            self.services.pool.unwatch(self.job_id, node)
        if self.spawn_id:
            try:
                await self.tunnel_keys().revoke(self.spawn_id)
            except (OSError, ValueError) as e:
                self.log.error("%s: could not revoke the tunnel key: %s", self._log_name, e)
            self.services.spawns.ended(self.spawn_id)
        if not self.job_id:
            return True
        error = ""
        if conn is None:
            try:
                conn = await self.connection()
            except Exception as e:  # an expired certificate, no cluster, a bad key file
                error = str(e)
        delay = 1.0
        for attempt in range(attempts if conn is not None else 0):
            try:
                # only the job of this spawn: a job id from a state (a restart, a
                # changed configuration) may be another job on this login node
                await job.cancel_if_ours(conn, self.job_id, self.spawn_id)
                break
            except (ClusterUnreachable, OSError) as e:
                error = str(e)
                if attempt + 1 < attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        else:
            self._record_pending_cancel(error, attempts if conn is not None else 0)
            return False
        if conn is not None and self.spawn_id and self._is_own(conn):
            files_dir = job_dir or f"{self.job_dir_root}/{self.spawn_id}"
            await self._job_files(conn, files_dir).remove_secrets()
        return True

    def _record_pending_cancel(self, error: str, attempts: int) -> None:
        entry = pending_cancel.PendingCancel(
            job_id=self.job_id,
            login_host=self.login_host,
            login_port=self.login_port,
            ssh_user=self.ssh_user,
            spawn_id=self.spawn_id,
            user=self.user.name,
            attempts=attempts,
            error=error[:300],
        )
        try:
            pending_cancel.add(self.pending_cancel_file, entry)
        except OSError as e:
            self.log.error(
                "%s: could not cancel job %s (%s) nor record it in %s (%s): cancel it by hand",
                self._log_name,
                self.job_id,
                error,
                self.pending_cancel_file,
                e,
            )
            return
        self.log.error(
            "%s: could not cancel job %s (%s); its tunnel key is revoked, and the cancel "
            "will be retried (recorded in %s)",
            self._log_name,
            self.job_id,
            error,
            self.pending_cancel_file,
        )

    async def _retry_pending_cancels(self, conn: Connection, *, force: bool = False) -> None:
        """Cancel the recorded jobs of ``conn``'s account on its login node (at most once
        per status interval unless ``force``); never raises."""
        key = (self.pending_cancel_file, conn.node, conn.ident.username)
        now = time.monotonic()
        checked = self.services.pending_checked
        if not force and now - checked.get(key, -1e9) < self._status_interval:
            return
        checked[key] = now
        try:
            pending = [
                j
                for j in pending_cancel.read(self.pending_cancel_file)
                if (j.login_host, j.login_port, j.ssh_user)
                == (self.login_host, self.login_port, conn.ident.username)
            ]
        except OSError as e:
            self.log.warning("%s", e)
            return
        done, failed = [], []
        for j in pending:
            try:
                await job.cancel_if_ours(conn, j.job_id, j.spawn_id)
                done.append(j)
                self.log.info(
                    "cancelled job %s of %s (a stop had failed to: %s)", j.job_id, j.user, j.error
                )
            except (ClusterUnreachable, OSError) as e:
                failed.append(replace(j, attempts=1, error=str(e)[:300]))
                self.log.warning("job %s of %s: cancel failed again: %s", j.job_id, j.user, e)
        try:
            pending_cancel.remove(self.pending_cancel_file, done)
            for j in failed:
                pending_cancel.add(self.pending_cancel_file, j)
        except OSError as e:
            self.log.warning("could not update %s: %s", self.pending_cancel_file, e)

    @property
    def _status_interval(self) -> float:
        return self.status_interval or float(self.poll_interval) or 30.0

    async def poll(self) -> int | None:
        """None while the job may run; 1 only once SLURM says it has ended.  Anything else
        that fails (the cluster unreachable, an unreadable key, an expired certificate,
        a write error) is logged and answered "still running": at the hub's start-up, a
        "gone" would stop a healthy server."""
        try:
            await self._reconcile_tunnel_keys()
        except Exception as e:
            self.log.warning("%s: could not reconcile tunnel keys: %s", self._log_name, e)
        if not self.job_id:
            return 0
        if self._lost_cluster:  # keep it: its tunnel may still serve it
            self.log.error(
                "%s: cannot poll job %s: its cluster %r is no longer configured",
                self._log_name,
                self.job_id,
                self._lost_cluster,
            )
            return None
        try:
            conn = await self.connection()
            await self._retry_pending_cancels(conn)
            st = await self._job_status(conn)
        except Exception as e:
            # not "job gone": keep the server and ask again at the next poll
            self.log.warning(
                "%s: poll could not reach the cluster (%s: %s); keeping the server",
                self._log_name,
                type(e).__name__,
                e,
            )
            return None
        if st is not None and st.alive:
            if not st.running:
                # still queued (e.g. the hub restarted while it waited): give the hub's
                # "is it up?" check the time the queue may take
                self.http_timeout = max(self.http_timeout, self.start_timeout)
            elif not self._start_pending and self._is_own(conn):
                conn.status.watch(self.job_id, self, self._status_interval)
                self._job_cache = conn.status
            self._last_end = walltime.time_left(st) or self._last_end
            return None
        self.log.info(
            "%s: job %s is %s", self._log_name, self.job_id, st.state if st else "gone from SLURM"
        )
        if st is not None and walltime.reached(st.state, self.walltime_left(), time.time()):
            self.end_note = walltime.timeout_message(self.job_id, self._time_limit(st))
        try:
            await self.tunnel_keys().revoke(self.spawn_id)
        except (OSError, ValueError) as e:
            self.log.error("%s: could not revoke the tunnel key: %s", self._log_name, e)
        self.services.spawns.ended(self.spawn_id)
        # a job killed outright (SIGKILL, node failure) never ran its cleanup
        await self._job_files(conn, f"{self.job_dir_root}/{self.spawn_id}").remove_secrets()
        return 1

    def walltime_left(self) -> walltime.TimeLeft | None:
        """The running job's end, from the shared squeue's last answer (no I/O), or None."""
        if self.job_id and self._job_cache is not None:
            left = walltime.time_left(self._job_cache.jobs.get(self.job_id))
            if left is not None and left.job_id == self.job_id:
                self._last_end = left
        last = self._last_end
        return last if last is not None and last.job_id == self.job_id else None

    def _extension(self) -> int | None:
        """The time limit (minutes) the next extension asks for, or None (not allowed)."""
        last = self.walltime_left()
        if not self.walltime_extend_command or last is None:
            return None
        try:  # the limit of the profile chosen, or of the partition
            spec = form.choose_for(self, self.user_options or {}).spec
        except v.InvalidValue:
            return None
        return walltime.extended_limit(last.limit, self.walltime_extend_minutes, spec.max_walltime)

    def walltime_status(self) -> dict[str, Any]:
        """What the hub's walltime API answers (see :class:`.walltime.WalltimeAPIHandler`)."""
        last = self.walltime_left()
        new = self._extension()
        return {
            "job_id": self.job_id,
            "seconds_left": round(last.seconds_left(), 1) if last else None,
            "limit_seconds": last.limit if last else None,
            "warnings": list(self.walltime_warnings),
            "extend": new - last.limit // 60 if new and last and last.limit else 0,
        }

    async def extend_walltime(self) -> dict[str, Any]:
        """Ask for more time (:attr:`walltime_extend_command`) and report the answer."""
        if not self.walltime_extend_command:
            return {
                **self.walltime_status(),
                "ok": False,
                "message": "This site does not allow extending jobs.",
            }
        if self.walltime_left() is None:
            return {
                **self.walltime_status(),
                "ok": False,
                "message": "The hub has not seen this job running yet; try again shortly.",
            }
        new = self._extension()
        if new is None:
            return {
                **self.walltime_status(),
                "ok": False,
                "message": "The job is at its partition's time limit already.",
            }
        if not (self.job_id.isascii() and self.job_id.isdigit()):
            return {**self.walltime_status(), "ok": False, "message": "No job to extend."}
        # one attempt at a time, and not more often than EXTEND_INTERVAL: each runs a
        # site command on the login node (through the connection every attendee shares,
        # in gateway mode), and a refused one would be offered again at once
        last = self._last_extend
        wait = 0.0 if last is None else last + EXTEND_INTERVAL - time.monotonic()
        if self._extending or wait > 0:
            return {
                **self.walltime_status(),
                "ok": False,
                "message": "An extension was asked for just now; "
                f"try again in {max(wait, 1):.0f} s.",
            }
        self._extending = True
        self._last_extend = time.monotonic()
        try:
            return await self._extend_to(new)
        finally:
            self._extending = False

    async def _extend_to(self, new: int) -> dict[str, Any]:
        argv = [*self.walltime_extend_command, self.job_id, str(new)]
        try:
            conn = await self.connection()
            if not self._is_own(conn):
                # xsede mode with the owner's certificate expired: the site account's
                # connection must never run the owner's extension
                return {
                    **self.walltime_status(),
                    "ok": False,
                    "message": "Your cluster credential has expired: log in again to extend.",
                }
            r = await conn.run(argv, timeout=60)
            answer = (str(r.stdout).strip() + "\n" + str(r.stderr).strip()).strip()
            ok = r.exit_status == 0
            # the new limit, as SLURM tells it (the shared squeue, asked now)
            await conn.status.get(self.job_id, max_age=0, not_before=time.monotonic())
        except Exception as e:  # the cluster unreachable, an expired certificate...
            self.log.warning("%s: extending job %s failed: %s", self._log_name, self.job_id, e)
            answer, ok = f"The cluster did not answer: {e}", False
        self.log.info(
            "%s: extend job %s to %s min: %s (%s)",
            self._log_name,
            self.job_id,
            new,
            "done" if ok else "refused",
            answer[:300],
        )
        return {**self.walltime_status(), "ok": ok, "message": answer[:500]}

    def _time_limit(self, st: slurm.JobStatus) -> int | None:
        """The ended job's time limit: SLURM's word, else the walltime it was given."""
        limit = walltime.parse_duration(st.time_limit)
        if limit is None and self._last_end is not None:
            limit = self._last_end.limit
        if limit is None:
            try:
                limit = self.resources().walltime_minutes * 60
            except v.InvalidValue:
                return None
        return limit

    async def _job_status(self, conn: Connection) -> slurm.JobStatus | None:
        """The job's status; None only when SLURM confirms it knows no such job."""
        if not self._is_own(conn):  # the site account: its squeue is not the owner's
            return await conn.status.confirm(self.job_id)
        # the refresher keeps the shared result fresh (and wakes us if the job
        # ends); a poll only queries itself if the refresher has stalled
        st = await conn.status.get(
            self.job_id, max_age=1.5 * self._status_interval, not_before=self._submitted_at
        )
        if st is None:
            # missing from the account's squeue: a hiccup must not read as "job gone"
            st = await conn.status.confirm(self.job_id)
        return st

    async def _reconcile_tunnel_keys(self) -> None:
        """Once per hub process: drop tunnel keys of spawns the hub no longer knows (a job
        stopped, or a record lost, while the hub was down)."""
        orm = getattr(self, "orm_spawner", None)
        db = object_session(orm) if orm is not None else None
        if db is None or not self.services.spawns.first_look(self.tunnel_authorized_keys):
            return
        gone = await self.services.spawns.reconcile(self.tunnel_keys(), db)
        if gone:
            self.log.info("removed tunnel keys of %d spawns the hub no longer knows", len(gone))

    async def _revoke_everywhere(self) -> None:
        """A lost job's tunnel key, revoked in the file its state recorded and in every
        configured one (top level and each cluster's): its job can no longer tunnel."""
        if not self.spawn_id:
            return
        files = [self._lost_state.get("tunnel_authorized_keys", "")]
        files.append((self._base_settings or self._settings_now())["tunnel_authorized_keys"])
        if self.multi_cluster():
            try:
                files += [c.tunnel_authorized_keys for c in self.cluster_list()]
            except v.InvalidValue:
                pass
        for path in dict.fromkeys(f for f in files if f):
            keys = TunnelKeys._instances.get(path) or TunnelKeys(path, (1024, 1024), "127.0.0.1", 0)
            try:
                if keys.path.exists() and await keys.revoke(self.spawn_id):
                    self.log.info("%s: revoked its tunnel key in %s", self._log_name, path)
            except (OSError, ValueError) as e:
                self.log.error(
                    "%s: could not revoke the tunnel key in %s: %s", self._log_name, path, e
                )
        self.services.spawns.ended(self.spawn_id)

    async def stop(self, now: bool = False) -> None:
        """Revoke the job's tunnel key, then cancel the job.  JupyterHub forgets the
        server whatever happens here, so a cancel that fails is not raised: the job goes
        on the durable pending-cancel list (:attr:`pending_cancel_file`) and is retried."""
        self._start_cancelled = False  # JupyterHub marks the stop pending meanwhile
        if not self.job_id:
            return
        if self._lost_cluster:
            await self._revoke_everywhere()
            self.log.error(
                "%s: job %s on cluster %r, which is no longer configured, was not "
                "cancelled: cancel it there by hand",
                self._log_name,
                self.job_id,
                self._lost_cluster,
            )
            self.clear_state()
            self._lost_cluster = ""
            return
        if await self._end_job(None):
            self.log.info("%s: cancelled job %s", self._log_name, self.job_id)
        self.clear_state()


async def _render_options_form(spawner: SlurmSSHSpawner) -> str:
    """The form, or "" (no form) when there is nothing to choose."""
    if not form.offers_choice(spawner):
        return ""
    if len(spawner.clusters) > 1:
        status = await spawner.cluster_status()
        return form.form_for(spawner, {}, spawner.last_options(), status)
    return form.form_for(spawner, await spawner.availability(), spawner.last_options())
