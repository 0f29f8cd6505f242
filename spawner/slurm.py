"""Pure builders and parsers for SLURM: no I/O here, everything unit-tested.

The job script is assembled from validated values only; every value that is not a
fixed string of ours goes through :func:`shlex.quote`.  Its text is the template
``templates/job.sh.j2``, which :func:`render_job_script` fills in; it carries the text of
the job agent (:mod:`.jobagent`) for the job's own Python.  Secrets never appear in it:
SLURM stores job scripts, and anyone with ``scontrol write batch_script`` rights can
read them.  The hub delivers the environment and the tunnel key as 0600 files over
SFTP instead, and the script reads them at run time.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

import jinja2

from . import sandbox as sb
from . import validate as v

#: states in which a job is still (or about to be) alive
ALIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "RESIZING",
        "SUSPENDED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)

#: id, state, nodes, reason, expected start, owner, time left, time limit, comment (last:
#: it may hold anything); time left and limit are durations (no clock, no time zone)
SQUEUE_FORMAT = "%i|%T|%N|%r|%S|%u|%L|%l|%k"
COMMENT_PREFIX = "xsedehub:"

#: the ids the spawner gives its spawns: ``u<hub user id>-<12 hex>`` for a user's default
#: server, ``u<hub user id>-<server name>-<12 hex>`` for a named one (:func:`new_spawn_id`)
SPAWN_ID_FORMAT = re.compile(
    r"^u(?P<uid>[0-9]+)-(?:(?P<server>[A-Za-z0-9][A-Za-z0-9_.-]{0,29})-)?[0-9a-f]{12}$"
)


def new_spawn_id(user_id: int, server_name: str = "") -> str:
    """A new spawn's id: it names the job's comment (``xsedehub:<id>``), its folder and
    its tunnel key, so that each server of a user has its own, and the server's name
    can be read back from any of them (:func:`server_of`)."""
    server = v.server_name(server_name)
    middle = f"{server}-" if server else ""
    return f"u{int(user_id)}-{middle}{secrets.token_hex(6)}"


def server_of(spawn_id: str) -> str | None:
    """The server name a spawn id carries: "" for a default server, None for an id
    xsedehub's spawner did not make (``check-...``, a hand-made comment)."""
    m = SPAWN_ID_FORMAT.match(spawn_id)
    if m is None:
        return None
    return m["server"] or ""


@dataclass(frozen=True)
class JobResources:
    """What the job asks SLURM for (all validated on construction)."""

    partition: str
    walltime_minutes: int
    cpus: int = 1
    memory_mb: int = 1024
    gpus: int = 0
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None

    def __post_init__(self) -> None:
        v.slurm_name(self.partition, "partition")
        v.walltime_minutes(self.walltime_minutes)
        v.positive_int(self.cpus, "cores")
        v.memory_mb(self.memory_mb)
        v.positive_int(self.gpus, "gpus", low=0, high=64)
        for name in ("account", "qos", "reservation"):
            val = getattr(self, name)
            if val is not None:
                v.slurm_name(val, name)


@dataclass(frozen=True)
class Tunnel:
    """Where and how the compute node opens the reverse tunnel back to the hub."""

    host: str
    port: int
    user: str
    hub_port: int  # the port the hub listens on (hub-side loopback), one per server
    api_host: str  # hub API as seen from the hub's sshd
    api_port: int

    def __post_init__(self) -> None:
        v.host(self.host, "tunnel host")
        v.host(self.api_host, "hub API host")
        v.posix_username(self.user, "tunnel user")
        for name in ("port", "hub_port", "api_port"):
            v.positive_int(getattr(self, name), name, high=65535)


@dataclass(frozen=True)
class JobScript:
    """Everything the batch script needs.  Paths are relative to the account's home."""

    job_name: str
    resources: JobResources
    job_dir: str  # holds env, tunnel key, known_hosts, log and the server socket
    work_dir: str  # where JupyterLab starts
    singleuser: list[str]  # argv of jupyterhub-singleuser on the compute node
    tunnel: Tunnel
    python: str  # a python3 (3.8 or newer) on the compute node: runs the job agent
    prologue: list[list[str]] = field(default_factory=list)  # argv lists run before the server
    #: argv lists run in the job's own shell before the prologue and outside the sandbox
    #: (a profile's environment: ``.`` a file, ``module load``, ``conda activate``); the
    #: job ends with a message if one fails
    environment: list[list[str]] = field(default_factory=list)
    #: argv the server's command is appended to (a profile's container command)
    server_prefix: list[str] = field(default_factory=list)
    extra_directives: Mapping[str, str] = field(default_factory=dict)
    spawn_id: str = ""  # goes into --comment=xsedehub:<spawn_id> (finds orphans)
    sandbox: sb.Sandbox | None = None  # gateway mode: the attendee's sandbox (sandbox.py)
    api_timeout: int = 120  # seconds the hub API forward may take to open, else the job fails
    #: JupyterLab plugins this job's server leaves off (page_config ``disabledExtensions``
    #: in a folder of the job on ``JUPYTER_CONFIG_PATH``; the user's own settings stay)
    lab_disabled_plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        v.job_name(self.job_name, "job name")
        for plugin in self.lab_disabled_plugins:
            v.lab_plugin_id(plugin, "lab_disabled_plugins")
        if self.spawn_id:
            v.slurm_name(self.spawn_id, "spawn id")
        v.relative_path(self.job_dir, "job directory", hidden=True)
        if self.work_dir != ".":
            v.relative_path(self.work_dir, "work directory", hidden=True)
        if not self.singleuser:
            raise v.InvalidValue("singleuser command", "must not be empty")
        if self.sandbox is not None:
            if self.work_dir == ".":
                raise v.InvalidValue("sandbox", "needs a work directory below the home folder")
            if f"{self.work_dir}/".startswith(f"{self.job_dir}/"):
                # the socket folder is bound over the job directory's path: it would hide it
                raise v.InvalidValue("sandbox", "the work directory is inside the job directory")
            jobs_root = self.job_dir.rsplit("/", 1)[0] if "/" in self.job_dir else ""
            if f"{jobs_root}/".startswith(f"{self.work_dir}/"):
                # the attendee's folder, bound writable, would hold every job's directory
                raise v.InvalidValue("sandbox", "the job directories are inside the work directory")
        v.positive_int(self.api_timeout, "hub API forward timeout", high=3600)
        for key, val in self.extra_directives.items():
            if not key.replace("-", "").isalnum():
                raise v.InvalidValue("extra directive", f"{key!r} is not an sbatch option name")
            v.slurm_name(val, f"--{key}")


#: how long before the walltime the batch script is sent SIGTERM (a clean end: the
#: server stops, the secret files go), for jobs of four minutes or more
SIGNAL_LEAD_SECONDS = 60


def signal_lead(walltime_minutes: int) -> int:
    """Seconds before the walltime for ``--signal=B:TERM@``: a minute, or a quarter of a
    shorter walltime.  SLURM checks time limits about every 30 s and may send the signal
    that much early: a one-minute job warned 60 s ahead was ended at its first check,
    often before its server had started."""
    return min(SIGNAL_LEAD_SECONDS, walltime_minutes * 60 // 4)


def sbatch_directives(job: JobScript) -> list[str]:
    r = job.resources
    lines = [
        f"--job-name={job.job_name}",
        f"--partition={r.partition}",
        f"--time={v.format_walltime(r.walltime_minutes)}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={r.cpus}",
        f"--mem={r.memory_mb}M",
        f"--output={job.job_dir}/job.log",
        "--open-mode=append",
        f"--signal=B:TERM@{signal_lead(r.walltime_minutes)}",
    ]
    if job.spawn_id:
        lines.append(f"--comment={COMMENT_PREFIX}{job.spawn_id}")
    if r.gpus:
        lines.append(f"--gpus={r.gpus}")
    for name in ("account", "qos", "reservation"):
        val = getattr(r, name)
        if val:
            lines.append(f"--{name}={val}")
    lines += [f"--{k}={val}" for k, val in job.extra_directives.items()]
    for line in lines:  # belt and braces: nothing that could end a directive line
        if any(c in line for c in "\n\r\0 \t;`$"):
            raise v.InvalidValue("sbatch directive", f"{line!r} contains unsafe characters")
    return ["#SBATCH " + line for line in lines]


class Verbatim(str):
    """Shell text the job script template inserts as it is: built here from quoted parts
    and validated values.  Any other value is shell-quoted as it is inserted."""


def _shell_quoted(value: object) -> str:
    return value if isinstance(value, Verbatim) else shlex.quote(str(value))


@functools.cache
def _job_template() -> jinja2.Template:
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 (a shell script, not HTML: finalize shell-quotes)
        finalize=_shell_quoted,
    )
    text = resources.files(__package__).joinpath("templates", "job.sh.j2").read_text("utf-8")
    return env.from_string(text)


def render_job_script(**values: object) -> str:
    """``templates/job.sh.j2`` with ``values``: each one shell-quoted unless it is
    :class:`Verbatim`; a value the template names but ``values`` lacks is an error."""
    return _job_template().render(**values)


#: the line that ends the job agent's text in the script (a quoted here-document)
AGENT_END = "XH_JOBAGENT"


@functools.cache
def agent_program() -> str:
    """The job agent's program text (:mod:`.jobagent`, which the job's Python runs)."""
    text = resources.files(__package__).joinpath("jobagent.py").read_text("utf-8").rstrip()
    if AGENT_END in text.splitlines():
        raise ValueError(f"the job agent's text holds the line {AGENT_END!r}")
    return text


def idle_args(server_idle_timeout: int, kernel_idle_timeout: int) -> list[str]:
    """The single-user server's own idle limits, as its command-line options: with no
    kernel, no terminal and no request for ``server_idle_timeout`` seconds the server
    exits (jupyter-server checks once a minute), which ends the job and frees the
    allocation even when the hub cannot be reached; kernels that ran nothing for
    ``kernel_idle_timeout`` seconds are shut down, open notebook or not.  0 turns
    either off."""
    server = v.positive_int(server_idle_timeout, "server_idle_timeout", low=0, high=10**7)
    kernel = v.positive_int(kernel_idle_timeout, "kernel_idle_timeout", low=0, high=10**7)
    args = []
    if server:
        args.append(f"--ServerApp.shutdown_no_activity_timeout={server}")
    if kernel:
        args += [
            f"--MappingKernelManager.cull_idle_timeout={kernel}",
            f"--MappingKernelManager.cull_interval={max(1, min(300, kernel // 2))}",
            "--MappingKernelManager.cull_connected=True",
        ]
    return args


def lab_config_lines(job: JobScript) -> list[str]:
    """Job-script lines that give the server a JupyterLab page config of its own (the
    plugins of :attr:`JobScript.lab_disabled_plugins` off), in a folder of the job
    directory put first on ``JUPYTER_CONFIG_PATH``: nothing is written to the user's
    ``~/.jupyter``, and the user's own page config still counts.  In the sandbox the
    job directory's path shows its ``sock`` folder, so the file goes there."""
    if not job.lab_disabled_plugins:
        return []
    page_config = json.dumps(
        {"disabledExtensions": dict.fromkeys(job.lab_disabled_plugins, True)}, sort_keys=True
    )
    outside = '"$XH_DIR/sock/jupyter"' if job.sandbox is not None else '"$XH_DIR/jupyter"'
    lines = [
        f"mkdir -p -m 0700 {outside}/labconfig && printf '%s\\n' {shlex.quote(page_config)} "
        f"> {outside}/labconfig/page_config.json || exit 2",
        'export JUPYTER_CONFIG_PATH="$XH_DIR/jupyter${JUPYTER_CONFIG_PATH:+:$JUPYTER_CONFIG_PATH}"',
    ]
    if job.sandbox is not None and job.sandbox.runtime == "apptainer":
        lines.append('export APPTAINERENV_JUPYTER_CONFIG_PATH="$JUPYTER_CONFIG_PATH"')
    return lines


#: colon-separated search lists a profile's environment may set; after it, only their
#: absolute entries are kept (an empty or relative entry means "the current folder")
SEARCH_LISTS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PERL5LIB", "MANPATH")


def environment_lines(environment: list[list[str]]) -> list[str]:
    """Job-script lines that set up a profile's environment in the script's own shell
    (so the server inherits it), each argv quoted; the first one that fails ends the job
    with a message naming it.  ``set -u`` is off meanwhile: site shell set-ups (Lmod's,
    conda's) read unset variables.

    The template runs them before the server's environment (the API token) is read and
    before the script enters the work folder (an attendee's, in gateway mode).  After
    them, shell tracing is off again (a sourced file's ``set -x`` would print the
    environment file's lines), and the search lists keep only absolute entries: a site
    file's ``export LD_LIBRARY_PATH=/opt/x/lib:$LD_LIBRARY_PATH`` leaves an empty entry,
    which would make the commands run outside the sandbox (``bwrap`` itself) load
    libraries from the attendee's folder.  ``LD_PRELOAD`` keeps only absolute entries
    too."""
    if not environment:
        return []
    lines = ["set +u"]
    for argv in environment:
        text = " ".join(shlex.quote(a) for a in argv)
        why = shlex.quote(f"the profile's environment failed at: {text}")
        lines.append(f"{text} || {{ {{ set +x +v; }} 2>/dev/null; set -u; log {why}; exit 2; }}")
    lines += [
        "{ set +x +v; } 2>/dev/null",
        "set -u",
        f"xh_absolute_only : {' '.join(SEARCH_LISTS)}",
        "xh_absolute_only ': ' LD_PRELOAD",
        'log "profile environment ready"',
    ]
    return lines


def build_job_script(job: JobScript) -> str:
    """The batch script.  No secret and no user-chosen text except validated values."""
    q = shlex.quote
    t = job.tunnel
    agent_args = [
        "--dir",
        "$XH_DIR",
        "--ctl-fd",
        "3",
        "--ssh-target",
        f"{t.user}@{t.host}",
        "--ssh-port",
        str(t.port),
        "--api-host",
        t.api_host,
        "--api-port",
        str(t.api_port),
        "--hub-port",
        str(t.hub_port),
        "--api-timeout",
        str(job.api_timeout),
    ]

    def words(argv: list[str]) -> str:
        return " ".join(q(a) for a in argv)

    prologue = [words(argv) for argv in job.prologue]
    singleuser = words([*job.server_prefix, *job.singleuser])
    if job.sandbox is not None:
        # the sandbox's folders and trial run first; then the prologue (the workshop
        # checkout) and the server run in it: the checkout's .git is the attendee's to
        # write (hooks, config), so git must never run on it outside the sandbox
        inside = sb.words(sb.argv(job.sandbox)) + " "
        prologue = sb.setup_lines(job.sandbox) + [inside + line for line in prologue]
        singleuser = inside + singleuser
    prologue += lab_config_lines(job)

    return render_job_script(
        directives=Verbatim("\n".join(sbatch_directives(job))),
        job_dir=job.job_dir,
        work_dir=job.work_dir,
        python=job.python,
        # $XH_DIR is ours (set in the script from a quoted constant): keep it expandable
        agent_args=Verbatim(" ".join('"$XH_DIR"' if a == "$XH_DIR" else q(a) for a in agent_args)),
        agent=Verbatim(agent_program()),
        environment=Verbatim("\n".join(environment_lines(job.environment))),
        prologue=Verbatim("\n".join(prologue)),
        singleuser=Verbatim(singleuser),
    )


def env_file(env: Mapping[str, str], api_origin: str) -> str:
    """Shell-sourceable ``export`` lines; the hub API origin is rewritten to the node's
    end of the forward (``$XH_API_PORT``: the port the job agent holds), every value
    shell-quoted."""
    lines = []
    for key, value in sorted(env.items()):
        if not key.replace("_", "").isalnum() or key[0].isdigit():
            raise v.InvalidValue("environment", f"{key!r} is not a variable name")
        if any(c in value for c in "\0"):
            raise v.InvalidValue("environment", f"{key} contains NUL")
        if api_origin and value.startswith(api_origin):
            rest = value[len(api_origin) :]
            lines.append(f'export {key}="http://127.0.0.1:$XH_API_PORT"{shlex.quote(rest)}')
        else:
            lines.append(f"export {key}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def sbatch_argv() -> list[str]:
    return ["sbatch", "--parsable"]


def parse_sbatch(stdout: str) -> str:
    """``sbatch --parsable`` prints ``jobid[;cluster]``."""
    line = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    job_id = line.split(";")[0]
    if not job_id.isdigit():
        raise ValueError(f"sbatch printed no job id: {stdout!r}")
    return job_id


def squeue_argv(user: str, job_ids: list[str] | None = None) -> list[str]:
    argv = ["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"]
    if job_ids:
        argv.append("--jobs=" + ",".join(sorted(job_ids, key=int)))
    else:
        argv.append(f"--user={v.posix_username(user)}")
    return argv


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    nodes: str
    reason: str
    start: str
    user: str
    comment: str = ""
    time_left: str = ""  # squeue's %L, e.g. "58:03" (MM:SS), "1-00:00:00", "UNLIMITED"
    time_limit: str = ""  # squeue's %l
    observed_at: float = 0.0  # wall-clock time (epoch) of the squeue that printed it

    @property
    def spawn_id(self) -> str:
        """The spawn this job belongs to, if xsedehub submitted it."""
        return (
            self.comment[len(COMMENT_PREFIX) :] if self.comment.startswith(COMMENT_PREFIX) else ""
        )

    @property
    def server(self) -> str | None:
        """The JupyterHub server the job is for ("" the default one; None: not known)."""
        return server_of(self.spawn_id)

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"


def parse_squeue(text: str, observed_at: float = 0.0) -> dict[str, JobStatus]:
    """Lines of :data:`SQUEUE_FORMAT` (or of the older format without time left and
    limit); ``observed_at`` is when squeue ran (epoch), to turn the time left into an end."""
    out: dict[str, JobStatus] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 6 or not parts[0].isdigit() or not parts[1].strip():
            continue
        if len(parts) >= 9:
            job_id, state, nodes, reason, start, user, left, limit = parts[:8]
            comment = "|".join(parts[8:])
        elif len(parts) in (6, 7):
            job_id, state, nodes, reason, start, user = parts[:6]
            left = limit = ""
            comment = parts[6] if len(parts) == 7 else ""
        else:
            continue
        comment = "" if comment == "(null)" else comment
        state = state.split()[0].rstrip("+")  # "CANCELLED by 1001" -> CANCELLED
        out[job_id] = JobStatus(
            job_id, state, nodes, reason, start, user, comment, left, limit, observed_at
        )
    return out


def scancel_argv(job_id: str) -> list[str]:
    if not job_id.isdigit():
        raise v.InvalidValue("job id", f"{job_id!r} is not a job id")
    return ["scancel", job_id]


def sacct_argv(job_id: str) -> list[str]:
    """``sacct`` for one job's allocation (state, nodes, owner), as ``|``-separated lines."""
    if not job_id.isdigit():
        raise v.InvalidValue("job id", f"{job_id!r} is not a job id")
    return [
        "sacct",
        "--noheader",
        "--parsable2",
        "--allocations",
        f"--jobs={job_id}",
        "--format=JobID,State,NodeList,User",
    ]


def parse_sacct(text: str) -> dict[str, JobStatus]:
    """``sacct --parsable2 --format=JobID,State,NodeList,User`` lines, by job id."""
    out: dict[str, JobStatus] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[1].strip():
            continue
        job_id, state, nodes, user = parts
        state = state.split()[0].rstrip("+")  # "CANCELLED by 1001" -> CANCELLED
        out[job_id] = JobStatus(job_id, state, nodes, "", "", user)
    return out


def sacct_disabled(stderr: str) -> bool:
    """``sacct`` says the cluster keeps no accounting (no slurmdbd): ask squeue instead."""
    text = stderr.lower()
    return "accounting storage is disabled" in text or "accounting_storage/none" in text
