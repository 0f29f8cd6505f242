"""One setting chooses the mode; this module wires the hub for it and checks the rest.

In ``jupyterhub_config.py``::

    from xsedehub.config import apply
    c.XSEDEHub.mode = "gateway"          # or "xsede"
    c.SlurmSSHSpawner.login_host = "login.cluster.example.org"
    ...
    apply(c)

:func:`apply` picks the authenticator (GitHub for ``gateway``, CILogon + certificate
issuer for ``xsede``) and the spawner's way of getting an SSH identity, sets the
JupyterHub defaults batch jobs need, and stops the hub at start-up, with a message that
names each setting and its fix, when something is missing or contradictory.
The TLJH plugin (:mod:`xsedehub.tljh`) calls the same function.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from traitlets import TraitError
from traitlets.config import Config

if TYPE_CHECKING:
    from xsedehub.spawner.spawner import SlurmSSHSpawner

MODES = ("gateway", "xsede")
AUTHENTICATORS = {
    "gateway": "xsedehub.auth.github.GatewayGitHubAuthenticator",
    "xsede": "xsedehub.auth.cilogon.XSEDECILogonAuthenticator",
}
AUTH_SECTION = {"gateway": "GatewayGitHubAuthenticator", "xsede": "XSEDECILogonAuthenticator"}
SPAWNER = "xsedehub.spawner.spawner.SlurmSSHSpawner"
#: xsedehub's additions to the hub's pages (the home page's "start again as last time")
HUB_TEMPLATES = str(resources.files("xsedehub.spawner") / "templates" / "hub")
SHORT_NAMES = {
    # entry points (pyproject.toml): authenticator_class / spawner_class short names
    "xsedehub-github": AUTHENTICATORS["gateway"],
    "xsedehub-cilogon": AUTHENTICATORS["xsede"],
    "xsedehub": SPAWNER,
}


#: jupyterhub-idle-culler sized for batch jobs: a server idle for an hour is stopped
#: (its job cancelled, its allocation given back), checked every five minutes.  A cloud
#: hub's ten minutes would cost a researcher their place in the queue for a coffee break.
IDLE_CULLER_TIMEOUT = 3600
IDLE_CULLER_EVERY = 300


def idle_culler(
    c: Config,
    *,
    timeout: int = IDLE_CULLER_TIMEOUT,
    every: int = IDLE_CULLER_EVERY,
    extra_args: tuple[str, ...] = (),
) -> None:
    """Run ``jupyterhub-idle-culler`` as a hub-managed service: servers without activity
    for ``timeout`` seconds are stopped (the spawner cancels their jobs), checked every
    ``every`` seconds.  It runs through :mod:`xsedehub.idleculler`, which keeps its API
    token out of the hub's log and lets the hub stop it at once.  For a hub without TLJH
    (TLJH runs its own culler, which the xsedehub plugin sizes the same way)::

        from xsedehub.config import apply, idle_culler
        idle_culler(c)                     # or idle_culler(c, timeout=7200)
        apply(c)
    """
    for name, value in (("timeout", timeout), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"idle_culler: {name} must be a whole number of seconds >= 1")
    # append, as a site's own config would: to a list set before, or to traitlets'
    # lazy value when the config appended first (or not at all)
    c.JupyterHub.services.append(
        {
            "name": "idle-culler",
            "command": [
                sys.executable,
                "-m",
                "xsedehub.idleculler",  # jupyterhub-idle-culler, token kept out of the log
                f"--timeout={timeout}",
                f"--cull-every={every}",
                *extra_args,
            ],
        }
    )
    c.JupyterHub.load_roles.append(
        {
            "name": "idle-culler",
            "description": "Stop idle servers (their batch jobs are cancelled)",
            "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
            "services": ["idle-culler"],
        }
    )


@dataclass(frozen=True)
class Problem:
    setting: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"  - {self.setting}: {self.message}\n    fix: {self.fix}"


class ConfigError(SystemExit):
    """Raised from jupyterhub_config.py: JupyterHub exits with this message, no traceback."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        text = "xsedehub: the hub cannot start with this configuration:\n" + "\n".join(
            str(p) for p in problems
        )
        super().__init__(text)


def _get(section: Config, name: str, default=None):
    return section[name] if name in section else default


def _class_name(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return SHORT_NAMES.get(value, value)
    return f"{value.__module__}.{value.__qualname__}"


def _file_problem(setting: str, path: str | None, *, secret: bool = False) -> Problem | None:
    if not path:
        return Problem(setting, "is not set", f"set c.{setting} to a file on the hub")
    p = Path(path)
    if not p.is_file():
        return Problem(
            setting, f"{path} does not exist", f"create it, or point c.{setting} elsewhere"
        )
    if secret and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Problem(
            setting,
            f"{path} is readable by others (mode {stat.S_IMODE(p.stat().st_mode):o})",
            f"chmod 600 {path}",
        )
    return None


CRYPT_KEY_FIX = (
    "put a key in a file only root reads: sudo sh -c 'umask 077; openssl rand -hex 32 > "
    "/etc/xsedehub/crypt_key', and set c.XSEDEHub.crypt_key_file to it (TLJH: the plugin's "
    "install makes that file; xsedehub.crypt_key_file names another); or export "
    "JUPYTERHUB_CRYPT_KEY to the hub process and to this command"
)


def read_crypt_key(path: str) -> str:
    """The key in ``path`` (one line: 32 bytes, hex or base64); ValueError if unusable."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path} does not exist")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} is readable by others (mode {stat.S_IMODE(p.stat().st_mode):o})")
    key = p.read_text().strip()
    from jupyterhub.crypto import _validate_key

    try:
        _validate_key(key)
    except ValueError:
        raise ValueError(f"{path} does not hold a 32-byte key (hex or base64)") from None
    return key


def crypt_key_problems(c: Config, env: Mapping[str, str]) -> list[Problem]:
    """auth_state is encrypted: without a key JupyterHub refuses to start.  The key comes
    from ``XSEDEHub.crypt_key_file`` when set, else from JUPYTERHUB_CRYPT_KEY."""
    path = _get(c.XSEDEHub, "crypt_key_file")
    if path:
        try:
            read_crypt_key(path)
        except ValueError as e:
            fix = f"chmod 600 {path}" if "readable by others" in str(e) else CRYPT_KEY_FIX
            return [Problem("XSEDEHub.crypt_key_file", str(e), fix)]
        return []
    if not env.get("JUPYTERHUB_CRYPT_KEY"):
        return [
            Problem(
                "JUPYTERHUB_CRYPT_KEY",
                "is not in the environment and XSEDEHub.crypt_key_file is not set "
                "(auth_state keeps the GitHub id / the user's certificate, encrypted)",
                CRYPT_KEY_FIX,
            )
        ]
    return []


def check(c: Config, mode: str, *, environ: dict[str, str] | None = None) -> list[Problem]:
    """Everything missing or contradictory for ``mode`` (empty list: fine)."""
    env = os.environ if environ is None else environ
    problems: list[Problem] = []
    sp = c.SlurmSSHSpawner
    if mode not in MODES:
        return [
            Problem("XSEDEHub.mode", f"{mode!r} is not a mode", 'set it to "gateway" or "xsede"')
        ]
    spawner_mode = _get(sp, "mode")
    if spawner_mode and spawner_mode != mode:
        problems.append(
            Problem(
                "SlurmSSHSpawner.mode",
                f"is {spawner_mode!r} but XSEDEHub.mode is {mode!r}",
                "remove SlurmSSHSpawner.mode: XSEDEHub.mode sets it",
            )
        )
    auth = _class_name(_get(c.JupyterHub, "authenticator_class"))
    if auth and auth != AUTHENTICATORS[mode] and auth in AUTHENTICATORS.values():
        problems.append(
            Problem(
                "JupyterHub.authenticator_class",
                f"is {auth} but the mode is {mode!r}",
                f"remove the setting (xsedehub picks {AUTHENTICATORS[mode]})",
            )
        )
    # with clusters, each cluster's own (see cluster_problems)
    for name, what in (
        ("login_host", "the login node's host name"),
        ("tunnel_host", "the hub's sshd as compute nodes reach it"),
    ):
        if not _get(sp, name) and not _get(sp, "clusters"):
            problems.append(Problem(f"SlurmSSHSpawner.{name}", "is not set", f"set it to {what}"))
    for name in ("known_hosts", "tunnel_known_hosts"):
        p = _file_problem(f"SlurmSSHSpawner.{name}", _get(sp, name))
        if p and not _get(sp, "clusters"):
            problems.append(p)
    if mode == "gateway":
        p = _file_problem("SlurmSSHSpawner.gateway_key", _get(sp, "gateway_key"), secret=True)
        if p and not _get(sp, "clusters"):
            problems.append(p)
    else:
        a = c[AUTH_SECTION["xsede"]]
        if not _get(a, "issuer_url"):
            problems.append(
                Problem(
                    "XSEDECILogonAuthenticator.issuer_url",
                    "is not set",
                    "set it to the certificate issuer's /v1/certificate URL",
                )
            )
        else:
            from xsedehub.auth.issuer_client import issuer_url_problems

            for why in issuer_url_problems(_get(a, "issuer_url"), _get(a, "issuer_verify", True)):
                problems.append(
                    Problem(
                        "XSEDECILogonAuthenticator.issuer_url",
                        why,
                        "serve the issuer over https with a certificate the hub verifies",
                    )
                )
        p = _file_problem(
            "XSEDECILogonAuthenticator.issuer_secret_file",
            _get(a, "issuer_secret_file"),
            secret=True,
        )
        if p:
            problems.append(p)
        if not _get(a, "idps"):
            problems.append(
                Problem(
                    "XSEDECILogonAuthenticator.idps",
                    "is not set",
                    "configure the identity provider(s) to accept, with username_derivation",
                )
            )
        if _get(a, "enable_auth_state") is False:
            problems.append(
                Problem(
                    "XSEDECILogonAuthenticator.enable_auth_state",
                    "is False",
                    "remove it: the certificate lives in the encrypted auth_state",
                )
            )
    problems += crypt_key_problems(c, env)
    # values of the right type: let the traits themselves judge
    from xsedehub.spawner.spawner import SlurmSSHSpawner

    try:
        spawner = SlurmSSHSpawner(config=c)
    except TraitError as e:
        problems.append(Problem("SlurmSSHSpawner", str(e), "correct the value's type"))
        return problems
    spawner.mode = mode
    login_secret = _get(c[AUTH_SECTION["xsede"]], "issuer_secret_file") if mode == "xsede" else ""
    problems += cluster_problems(spawner, login_secret or "")
    problems += profile_problems(spawner)
    if mode == "gateway":
        from xsedehub.spawner.validate import InvalidValue

        spawner.mode = mode
        try:
            spawner.sandbox_settings()
        except InvalidValue as e:
            problems.append(
                Problem(
                    f"SlurmSSHSpawner.{e.field}",
                    e.message,
                    "correct it (docs/howto/gateway.md, the attendee sandbox)",
                )
            )
    return problems


def cluster_problems(spawner: SlurmSSHSpawner, login_secret: str = "") -> list[Problem]:
    """Every problem of ``SlurmSSHSpawner.clusters``, each with its path, e.g.
    ``SlurmSSHSpawner.clusters.expanse.partitions.gpu.max_gpus``; then each cluster's
    files (host keys, keys) as the top-level ones are checked."""
    if not spawner.clusters:
        return []
    from xsedehub.spawner.clusters import ClusterProblems

    fix = "correct it (docs/howto/clusters.md)"
    try:
        clusters = spawner.cluster_list()
    except ClusterProblems as e:
        return [Problem(f"SlurmSSHSpawner.{p.field}", p.message, fix) for p in e.problems]
    problems: list[Problem] = []
    for cl in clusters:
        at = f"SlurmSSHSpawner.clusters.{cl.name}"
        for name in ("known_hosts", "tunnel_known_hosts"):
            p = _file_problem(f"{at}.{name}", getattr(cl, name))
            if p:
                problems.append(p)
        secrets = ["gateway_key"] if spawner.mode == "gateway" else []
        secrets += ["site_key"] if cl.site_key else []
        secrets += ["issuer_secret_file"] if cl.issuer_secret_file else []
        for name in secrets:
            p = _file_problem(f"{at}.{name}", getattr(cl, name), secret=True)
            if p:
                problems.append(p)
    problems += _shared_secrets(clusters, login_secret)
    if len(clusters) > 1 and not spawner.profiles:
        problems.append(
            Problem(
                "SlurmSSHSpawner.profiles",
                f"is empty, but there are {len(clusters)} clusters: users choose one "
                "through a profile",
                "add profiles, each naming its cluster (docs/howto/clusters.md)",
            )
        )
    return problems


def _shared_secrets(clusters: list, login_secret: str) -> list[Problem]:
    """Each certificate issuer its own secret: one shared would let whoever holds one
    issuer's (or the hub's copy of it) ask the other issuer for certificates."""
    named = [("XSEDECILogonAuthenticator.issuer_secret_file", login_secret)] if login_secret else []
    named += [
        (f"SlurmSSHSpawner.clusters.{c.name}.issuer_secret_file", c.issuer_secret_file)
        for c in clusters
        if c.issuer_secret_file
    ]
    problems: list[Problem] = []
    seen: dict[object, str] = {}
    for setting, path in named:
        keys: list[object] = [("path", os.path.realpath(path))]
        try:
            keys.append(("content", Path(path).read_bytes().strip()))
        except OSError:
            pass  # reported as the file's own problem
        for key in keys:
            if key in seen:
                what = f"is {path}, as is" if key[0] == "path" else "holds the same secret as"
                problems.append(
                    Problem(
                        setting,
                        f"{what} {seen[key]}",
                        "give each certificate issuer a secret of its own",
                    )
                )
                break
            seen[key] = setting
    return problems


def profile_problems(spawner: SlurmSSHSpawner) -> list[Problem]:
    """Every problem of ``SlurmSSHSpawner.profiles`` (and of the partitions they name),
    each with its path, e.g. ``SlurmSSHSpawner.profiles.gpu-workshop.max_gpus``."""
    if not spawner.profiles:
        return []
    from xsedehub.spawner import form
    from xsedehub.spawner.clusters import ClusterProblems
    from xsedehub.spawner.profiles import ProfileProblems
    from xsedehub.spawner.validate import InvalidValue

    fix = "correct it (docs/howto/profiles.md)"
    try:
        specs = form.partition_specs(spawner)
        form.profile_list(spawner, specs)
    except ClusterProblems:
        return []  # cluster_problems names them
    except ProfileProblems as e:
        return [Problem(f"SlurmSSHSpawner.{p.field}", p.message, fix) for p in e.problems]
    except InvalidValue as e:
        return [Problem(f"SlurmSSHSpawner.{e.field}", e.message, fix)]
    return []


def apply(c: Config, mode: str | None = None) -> str:
    """Wire the hub for ``mode`` (default ``c.XSEDEHub.mode``) or exit with the problems."""
    mode = mode or _get(c.XSEDEHub, "mode")
    if not mode:
        raise ConfigError(
            [Problem("XSEDEHub.mode", "is not set", 'set c.XSEDEHub.mode = "gateway" or "xsede"')]
        )
    problems = check(c, mode)
    if problems:
        raise ConfigError(problems)
    c.JupyterHub.authenticator_class = AUTHENTICATORS[mode]
    c.JupyterHub.spawner_class = SPAWNER
    c.SlurmSSHSpawner.mode = mode
    # batch jobs outlive the hub process: keep them, and the proxy routes to them
    c.JupyterHub.cleanup_servers = False
    # the home page's additions (each job's time left, "start again as last time") and
    # the not-running page's walltime note, after the site's own templates
    paths = list(c.JupyterHub.template_paths) if "template_paths" in c.JupyterHub else []
    if HUB_TEMPLATES not in paths:
        c.JupyterHub.template_paths = [*paths, HUB_TEMPLATES]
    _add_walltime_pages(c)
    c[AUTH_SECTION[mode]].enable_auth_state = True
    key_file = _get(c.XSEDEHub, "crypt_key_file")
    if key_file:
        c.CryptKeeper.keys = [read_crypt_key(key_file)]
    return mode


def _add_walltime_pages(c: Config) -> None:
    """The API the job-side extension asks for the time left (docs/howto/walltime.md);
    the pages that show it are among :data:`HUB_TEMPLATES`.  A site's own handlers come
    first."""
    from xsedehub.spawner.walltime import HANDLERS

    handlers = list(_get(c.JupyterHub, "extra_handlers") or [])
    if not any(h in handlers for h in HANDLERS):
        c.JupyterHub.extra_handlers = [*handlers, *HANDLERS]
