"""The Littlest JupyterHub plugin (pluggy project ``tljh``, entry point ``xsedehub``).

Install: ``curl ... | sudo python3 - --plugin xsedehub ...`` (or ``pip install xsedehub``
in ``/opt/tljh/hub`` and ``tljh-config reload``).  Settings live under ``xsedehub`` in
TLJH's ``config.yaml``::

    sudo tljh-config set xsedehub.mode gateway
    sudo tljh-config set xsedehub.spawner.login_host login.cluster.example.org
    sudo tljh-config set xsedehub.spawner.known_hosts /etc/xsedehub/known_hosts
    sudo tljh-config set xsedehub.authenticator.client_id <GitHub OAuth app id>
    sudo tljh-config reload

``xsedehub.spawner.<name>`` sets ``SlurmSSHSpawner.<name>``; ``xsedehub.authenticator.<name>``
sets the mode's authenticator's ``<name>``.  Unknown names and wrong types stop the hub
with a message naming the setting.

What TLJH does differently, and how this plugin fits it: the hub's API is on
127.0.0.1:15001 behind traefik (the tunnel's ``PermitOpen`` must name that port; the
``post_install`` hook writes it so); users are ``jupyter-<name>`` system users on the
VM, which this spawner never needs (jobs run on the cluster), so TLJH's user-creating
spawner is replaced; servers must survive hub restarts (``cleanup_servers = False``).
"""

from __future__ import annotations

import os
import re
import subprocess
from importlib import metadata
from pathlib import Path

from pluggy import HookimplMarker
from traitlets import Unicode
from traitlets.config import Config

from .config import AUTH_SECTION, MODES, ConfigError, Problem, apply

hookimpl = HookimplMarker("tljh")

TLJH_HUB_API = "127.0.0.1:15001"
ETC = Path(os.environ.get("XSEDEHUB_ETC", "/etc/xsedehub"))
DEFAULTS = {
    "mode": "gateway",
    "spawner": {
        "tunnel_authorized_keys": str(ETC / "tunnelbot_authorized_keys"),
        "known_hosts": str(ETC / "known_hosts"),
        "tunnel_known_hosts": str(ETC / "hub_known_hosts"),
    },
}


def tljh_config_path() -> Path:
    prefix = os.environ.get("TLJH_INSTALL_PREFIX", "/opt/tljh")
    return Path(prefix) / "config" / "config.yaml"


def load_tljh_settings(path: Path | None = None) -> dict:
    import yaml

    path = path or tljh_config_path()
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    section = data.get("xsedehub") or {}
    if not isinstance(section, dict):
        raise ConfigError([Problem("xsedehub", "must be a mapping", "see the plugin's docs")])
    return section


def _auth_class(mode: str):
    if mode == "xsede":
        from .auth.cilogon import XSEDECILogonAuthenticator

        return XSEDECILogonAuthenticator
    from .auth.github import GatewayGitHubAuthenticator

    return GatewayGitHubAuthenticator


def settings_to_config(settings: dict, c: Config | None = None) -> Config:
    """Translate the ``xsedehub`` section of TLJH's config into traitlets config."""
    from .spawner.spawner import SlurmSSHSpawner

    c = c if c is not None else Config()
    problems: list[Problem] = []
    mode = settings.get("mode")
    if mode not in MODES:
        raise ConfigError(
            [
                Problem(
                    "xsedehub.mode",
                    f"is {mode!r}",
                    "sudo tljh-config set xsedehub.mode gateway   (or xsede)",
                )
            ]
        )
    c.XSEDEHub.mode = mode
    unknown_top = set(settings) - {"mode", "spawner", "authenticator"}
    for key in sorted(unknown_top):
        problems.append(
            Problem(f"xsedehub.{key}", "is not a setting", f"sudo tljh-config unset xsedehub.{key}")
        )
    targets = (
        ("spawner", SlurmSSHSpawner, "SlurmSSHSpawner"),
        ("authenticator", _auth_class(mode), AUTH_SECTION[mode]),
    )
    for group, cls, section in targets:
        values = settings.get(group) or {}
        traits = cls.class_traits(config=True)
        for name, value in values.items():
            trait = traits.get(name)
            if trait is None:
                problems.append(
                    Problem(
                        f"xsedehub.{group}.{name}",
                        f"{cls.__name__} has no such setting",
                        f"sudo tljh-config unset xsedehub.{group}.{name}",
                    )
                )
                continue
            if isinstance(value, str) and not isinstance(trait, Unicode):
                try:
                    value = trait.from_string(value)
                except Exception as e:  # traitlets raises several kinds
                    problems.append(
                        Problem(
                            f"xsedehub.{group}.{name}",
                            f"{value!r}: {e}",
                            "set a value of the right type",
                        )
                    )
                    continue
            c[section][name] = value
    if problems:
        raise ConfigError(problems)
    return c


@hookimpl
def tljh_extra_hub_pip_packages() -> list[str]:
    """Our tested dependency pins, minus jupyterhub (TLJH owns the hub's version)."""
    reqs = metadata.requires("xsedehub") or []
    return [r for r in reqs if "extra ==" not in r and not re.match(r"^jupyterhub\b", r)]


@hookimpl
def tljh_config_post_install(config: dict) -> None:
    """Defaults under ``xsedehub``, never overwriting what the admin set."""
    section = config.setdefault("xsedehub", {})
    section.setdefault("mode", DEFAULTS["mode"])
    spawner = section.setdefault("spawner", {})
    for key, value in DEFAULTS["spawner"].items():
        spawner.setdefault(key, value)


@hookimpl
def tljh_custom_jupyterhub_config(c: Config) -> None:
    settings = load_tljh_settings()
    if not settings:
        return  # plugin installed but not configured yet: leave TLJH as it is
    settings_to_config(settings, c)
    apply(c)


@hookimpl
def tljh_post_install() -> None:
    """Safe to re-run: the tunnel account, the hub-managed key file, /etc/xsedehub."""
    ETC.mkdir(parents=True, exist_ok=True)
    ETC.chmod(0o755)
    keys = ETC / "tunnelbot_authorized_keys"
    if not keys.exists():
        keys.write_text("")
    keys.chmod(0o644)
    ensure_tunnel_account("tunnelbot", ACCOUNTS_ROOT)


#: the root whose /etc/passwd holds the tunnel account (``/``; a copy in the tests)
ACCOUNTS_ROOT = Path("/")


def _account_exists(user: str, root: Path) -> bool:
    if root == Path("/"):
        return subprocess.run(["id", user], capture_output=True, check=False).returncode == 0
    passwd = (root / "etc" / "passwd").read_text()
    return any(line.split(":", 1)[0] == user for line in passwd.splitlines())


def ensure_tunnel_account(user: str, root: Path = Path("/")) -> bool:
    """Create the no-shell tunnel account if missing; True if it was created.

    ``root`` other than ``/`` edits the account files under it (``useradd --prefix``)."""
    prefix = [] if root == Path("/") else ["--prefix", str(root)]
    if _account_exists(user, root):
        subprocess.run(["usermod", *prefix, "-s", "/usr/sbin/nologin", user], check=True)
        return False
    subprocess.run(
        ["useradd", *prefix, "--system", "--create-home", "--shell", "/usr/sbin/nologin", user],
        check=True,
    )
    subprocess.run(["usermod", *prefix, "-p", "*", user], check=True)
    return True
