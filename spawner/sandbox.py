"""The attendee's sandbox (gateway mode): a pure builder of the command that wraps the
single-user server, and of the job-script lines that prepare it.  No I/O here.

In gateway mode every attendee's job runs as the same Unix account.  The sandbox gives
each job's server (and so its kernels and terminals) a private view made with
unprivileged user namespaces, without root on the cluster:

- the account's home, ``/home`` and the other paths of :attr:`Sandbox.hide` are empty,
  private folders; only the attendee's own folder is bound back in, writable, at its
  own path, and it is ``$HOME`` inside;
- a new PID namespace (with its own ``/proc``): other jobs' processes are neither
  visible nor reachable by a signal; a new IPC namespace, a private ``/dev`` (its own
  ``/dev/pts`` and ``/dev/shm``);
- everything else of the node's filesystem is read-only (bubblewrap) or the image's
  (Apptainer), with the site's paths bound as configured;
- the network namespace is the job's: the server reaches the hub API through the job's
  forward on the node's loopback.

The job's plumbing stays outside: the tunnels, the env file and the tunnel key.  The
server creates its socket in a ``0700`` folder of its own (``$XH_DIR/sock``), which is
all of the job directory the sandbox sees (bound at the job directory's path, so the
server's ``--ServerApp.sock="$XH_DIR/server.sock"`` lands in it); outside, a symlink
at ``$XH_DIR/server.sock`` points at it, for the tunnel and the job script's wait.

Two runtimes: ``bubblewrap`` (``bwrap``, Debian/Ubuntu/RHEL package ``bubblewrap``) and
``apptainer`` (Apptainer >= 1.1 or SingularityCE, with an image the site provides).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from . import validate as v

RUNTIMES = ("bubblewrap", "apptainer")

#: what the job log says (and the hub shows) when the sandbox cannot start on a node
UNAVAILABLE = "the attendee sandbox ({runtime}) cannot start on this node"


class Expand(str):
    """A word of the command that the job script expands: one of the script's own
    variables (``$HOME``, ``$XH_WORK``, ``$XH_DIR``), maybe with a fixed suffix; it is
    written between double quotes.  Any other word is shell-quoted."""


DEFAULT_HIDE = ("/home", "/tmp", "/var/tmp", "/run/munge")

HOME = Expand("$HOME")
#: the ``--tmpfs PATH`` pairs of the hidden paths that exist on the node (see hide_line)
HIDDEN = Expand("${XH_HIDE[@]}")
WORK = Expand("$XH_WORK")
JOB_DIR = Expand("$XH_DIR")
SOCK_DIR = Expand("$XH_DIR/sock")


@dataclass(frozen=True)
class Sandbox:
    """Validated settings of the attendee sandbox."""

    runtime: str = "bubblewrap"
    command: str = ""  # the runtime's executable; default: bwrap / apptainer
    image: str = ""  # apptainer: the image (a .sif file or a directory) the server runs in
    #: bubblewrap: made empty, private folders (those that exist on the node); munge's
    #: socket folder too: no SLURM command from inside, so no scancel of another's job
    hide: tuple[str, ...] = DEFAULT_HIDE
    ro_binds: tuple[str, ...] = ()  # bound read-only at the same path
    binds: tuple[str, ...] = ()  # bound read-write at the same path (shared by all!)
    devices: tuple[str, ...] = ()  # device nodes bound in (GPUs: /dev/nvidia0 ...)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise v.InvalidValue(
                "sandbox", f"{self.runtime!r} is not one of {', '.join(RUNTIMES)} (or none)"
            )
        if self.command:
            cmd = self.command
            if "/" in cmd:
                v.absolute_path(cmd, "sandbox_command")
            else:
                v.path_part(cmd, "sandbox_command")
        if self.runtime == "apptainer":
            if not self.image:
                raise v.InvalidValue(
                    "sandbox_image", "the apptainer sandbox needs an image (a .sif file)"
                )
            v.absolute_path(self.image, "sandbox_image")
        for name in ("hide", "ro_binds", "binds", "devices"):
            for path in getattr(self, name):
                v.absolute_path(path, f"sandbox_{name}")
                if path == "/":
                    raise v.InvalidValue(f"sandbox_{name}", "'/' itself cannot be listed")
        for path in self.devices:
            if not path.startswith("/dev/"):
                raise v.InvalidValue("sandbox_devices", f"{path!r} is not under /dev")

    @property
    def executable(self) -> str:
        return self.command or ("bwrap" if self.runtime == "bubblewrap" else "apptainer")


def bwrap_argv(sb: Sandbox) -> list[str]:
    """``bwrap`` with the attendee's view; the server's argv follows it."""
    argv = [
        sb.executable,
        "--die-with-parent",  # the job script gone: the sandbox goes too
        "--new-session",  # no ioctl on a terminal outside (TIOCSTI)
        "--unshare-user",  # unprivileged: a user namespace, no capabilities outside
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        # not --unshare-net: the server reaches the hub API on the job's loopback forward
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
    ]
    argv.append(HIDDEN)  # --tmpfs for each path of sb.hide that exists (hide_line)
    argv += ["--tmpfs", HOME]  # the account's home, wherever it is: dotfiles, .ssh, jobs
    for path in sb.ro_binds:
        argv += ["--ro-bind", path, path]
    for path in sb.binds:
        argv += ["--bind", path, path]
    for path in sb.devices:
        argv += ["--dev-bind", path, path]
    argv += [
        "--bind",
        WORK,
        WORK,
        "--bind",
        SOCK_DIR,
        JOB_DIR,
        "--setenv",
        "HOME",
        WORK,
        "--chdir",
        WORK,
        "--",
    ]
    return argv


def apptainer_argv(sb: Sandbox) -> list[str]:
    """``apptainer exec --containall`` with the attendee's folder as home; the server's
    argv follows it.  The job environment and anything else the server needs from the
    host must be in :attr:`Sandbox.ro_binds` (or in the image)."""
    argv = [
        sb.executable,
        "exec",
        "--containall",  # --contain --cleanenv --ipc --pid: private /tmp, /home, /dev
        "--no-mount",
        "hostfs,bind-paths,cwd",  # not the site's own bind paths (often /home, scratch)
        "--home",
        Expand("$XH_WORK:$XH_WORK"),
        "--pwd",
        WORK,
        "--bind",
        Expand("$XH_DIR/sock:$XH_DIR"),
    ]
    for path in sb.ro_binds:
        argv += ["--bind", f"{path}:{path}:ro"]
    for path in sb.binds:
        argv += ["--bind", f"{path}:{path}"]
    for path in sb.devices:
        argv += ["--bind", f"{path}:{path}"]
    argv.append(sb.image)
    return argv


def argv(sb: Sandbox) -> list[str]:
    """The command prefix that runs the server in the sandbox."""
    return bwrap_argv(sb) if sb.runtime == "bubblewrap" else apptainer_argv(sb)


def words(argv: list[str]) -> str:
    """Shell text of ``argv``: :class:`Expand` words double-quoted, the rest quoted."""
    return " ".join(f'"{a}"' if isinstance(a, Expand) else shlex.quote(a) for a in argv)


#: apptainer --cleanenv keeps only APPTAINERENV_* variables: pass the names the env
#: file exports (validated identifiers, see slurm.env_file) that way
_APPTAINER_ENV = (
    "for _n in $(sed -n 's/^export \\([A-Za-z_][A-Za-z0-9_]*\\)=.*/\\1/p' \"$XH_DIR/env\"); "
    'do export "APPTAINERENV_$_n=${!_n}"; done'
)


def hide_line(sb: Sandbox) -> str:
    """Shell line that sets ``XH_HIDE`` to ``--tmpfs PATH`` for each hidden path that
    exists on this node (bwrap cannot make a mount point in the read-only root)."""
    # each by its real path too: a hidden folder (or the home, hidden after these) that is
    # a link would leave its target in view under the read-only root
    paths = " ".join(shlex.quote(p) for p in sb.hide)
    return (
        f'XH_HIDE=(); for _p in {paths} "$HOME"; do [ -d "$_p" ] || continue; '
        '[ "$_p" = "$HOME" ] || XH_HIDE+=(--tmpfs "$_p"); _r=$(readlink -f "$_p"); '
        '[ -n "$_r" ] && [ "$_r" != "$_p" ] && XH_HIDE+=(--tmpfs "$_r"); done'
    )


def setup_lines(sb: Sandbox) -> list[str]:
    """Job-script lines run before the server starts (in the attendee's folder): the
    socket folder and its link, the environment for apptainer, and a trial run of the
    sandbox that ends the job with a clear message when the node cannot make one
    (no unprivileged user namespaces, runtime missing): never an unsandboxed server."""
    prefix = words(argv(sb))
    why = UNAVAILABLE.format(runtime=sb.runtime)
    lines = [
        'mkdir -p -m 0700 "$XH_DIR/sock" && chmod 0700 "$XH_DIR/sock" || exit 2',
        'ln -sfn sock/server.sock "$XH_DIR/server.sock" || exit 2',
    ]
    if sb.runtime == "apptainer":
        lines.append(_APPTAINER_ENV)
    else:
        lines.append(hide_line(sb))
    lines += [
        f"if ! XH_SANDBOX_ERR=$({prefix} true 2>&1 </dev/null); then",
        f'    log {shlex.quote(why + ":")} "$XH_SANDBOX_ERR"',
        "    log 'xsedehub will not start the server without its sandbox; the administrators "
        "can check the nodes with: xsedehub check'",
        "    exit 3",
        "fi",
        f"log {shlex.quote(f'server sandboxed ({sb.runtime}): only ')}\"$XH_WORK\"' is visible'",
    ]
    return lines
