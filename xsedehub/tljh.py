"""The Littlest JupyterHub plugin (pluggy project ``tljh``, entry point ``xsedehub``).

Install: ``curl ... | sudo python3 - --admin <login> --plugin <xsedehub pip spec>``
(TLJH's installer pip-installs the plugin into ``/opt/tljh/hub``, then runs its hooks).
Settings live under ``xsedehub`` in TLJH's ``config.yaml``::

    sudo tljh-config set xsedehub.mode gateway
    sudo tljh-config set xsedehub.spawner.login_host login.cluster.example.org
    sudo tljh-config set xsedehub.spawner.cmd '["/shared/env/bin/jupyterhub-singleuser"]'
    sudo tljh-config add-item xsedehub.authenticator.allowed_organizations my-org
    sudo tljh-config reload

``xsedehub.spawner.<name>`` sets ``SlurmSSHSpawner.<name>``; ``xsedehub.authenticator.<name>``
sets the mode's authenticator's ``<name>``; ``xsedehub.crypt_key_file`` names the hub's
encryption key (default ``/etc/xsedehub/crypt_key``, made by the install).  ``tljh-config``
guesses types (``2222`` is a number, ``true`` a boolean, anything else a string) and
``add-item`` builds lists: each value is converted and checked by the option's own type,
and an unknown name or a wrong value stops the hub with a message naming the setting.

Until ``xsedehub.mode`` is set, the plugin leaves TLJH as it is (TLJH's installer starts
the hub before the admin has configured anything).

What TLJH does differently, and how this plugin fits it: the hub's API is on
127.0.0.1:15001 behind traefik (the tunnel's ``PermitOpen`` must name that port:
``xsedehub tunnel setup --hub-api 127.0.0.1:15001``); users are ``jupyter-<name>`` system
users on the VM, which this spawner never needs (jobs run on the cluster), so TLJH's
user-creating spawner is replaced; servers must survive hub restarts
(``cleanup_servers = False``); TLJH's idle culler would cancel a batch job after 10
idle minutes, so the install sets HPC-sized culler defaults (:data:`CULLER`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pluggy import HookimplMarker
from traitlets import Container, Dict, HasTraits, TraitError, TraitType, Unicode
from traitlets.config import Config

from .config import (
    AUTH_SECTION,
    IDLE_CULLER_EVERY,
    IDLE_CULLER_TIMEOUT,
    MODES,
    ConfigError,
    Problem,
    apply,
)

hookimpl = HookimplMarker("tljh")

TLJH_HUB_API = "127.0.0.1:15001"
ETC = Path(os.environ.get("XSEDEHUB_ETC", "/etc/xsedehub"))


def defaults() -> dict[str, Any]:
    """Where the files live unless the admin names others (never written to config.yaml:
    a ``xsedehub`` section there is the admin's, and its presence means "configured")."""
    return {
        "crypt_key_file": str(ETC / "crypt_key"),
        "client_secret_file": str(ETC / "oauth_client_secret"),
        "spawner": {
            "tunnel_authorized_keys": str(ETC / "tunnelbot_authorized_keys"),
            "known_hosts": str(ETC / "known_hosts"),
            "tunnel_known_hosts": str(ETC / "hub_known_hosts"),
        },
    }


#: TLJH's idle culler, sized for batch jobs: TLJH's own 600 s timeout would cancel a
#: researcher's job (and its place in the queue) after ten idle minutes.  The install
#: sets these unless the admin set their own; ``tljh-config set services.cull.timeout``
#: changes them as usual.
CULLER = {"timeout": IDLE_CULLER_TIMEOUT, "every": IDLE_CULLER_EVERY}


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


def _parse(trait: TraitType, text: str) -> Any:
    """A string from ``tljh-config set`` for an option that is not a string."""
    if isinstance(trait, Container | Dict):
        for parse in (json.loads, ast.literal_eval):
            try:
                return parse(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
        return text  # let the option judge (a command may be one string)
    return trait.from_string(text)


def _convert(trait: TraitType, value: Any) -> Any:
    """``value`` as ``trait`` takes it, checked by the trait itself (TraitError if not).

    tljh-config stores ``2222`` as a number even for a string option, ``'["a"]'`` as a
    string even for a list option; ``add-item`` makes a list."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(trait, Unicode) and number:
        value = str(value)
    elif isinstance(value, str) and not isinstance(trait, Unicode):
        value = _parse(trait, value)
    # validate against a bare instance: class traits have no object of their own
    return trait._validate(HasTraits(), value)


def _client_secret(settings: dict, default: str, section: Config) -> list[Problem]:
    """The OAuth client secret from a file only root reads (``xsedehub.client_secret_file``,
    default ``/etc/xsedehub/oauth_client_secret`` when it exists): never on a command line,
    as ``tljh-config set ...client_secret`` would put it."""
    path = settings.get("client_secret_file")
    if path is None:
        if not Path(default).exists():
            return []
        path = default
    setting = "xsedehub.client_secret_file"
    if not isinstance(path, str) or not Path(path).is_file():
        return [Problem(setting, f"{path!r} is not a file", "write the secret there (0600)")]
    p = Path(path)
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [Problem(setting, f"{path} is readable by others", f"chmod 600 {path}")]
    section.client_secret = p.read_text().strip()
    return []


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
                    "is not set" if mode is None else f"is {mode!r}, not gateway or xsede",
                    "sudo tljh-config set xsedehub.mode gateway   (or xsede)",
                )
            ]
        )
    c.XSEDEHub.mode = mode
    unknown_top = set(settings) - {
        "mode",
        "spawner",
        "authenticator",
        "crypt_key_file",
        "client_secret_file",
    }
    for key in sorted(unknown_top):
        problems.append(
            Problem(f"xsedehub.{key}", "is not a setting", f"sudo tljh-config unset xsedehub.{key}")
        )
    dflt = defaults()
    # the key file, unless the admin gave the hub JUPYTERHUB_CRYPT_KEY another way
    key_file = settings.get("crypt_key_file")
    if key_file is None and not os.environ.get("JUPYTERHUB_CRYPT_KEY"):
        key_file = dflt["crypt_key_file"]
    if key_file is None or isinstance(key_file, str):
        if key_file:
            c.XSEDEHub.crypt_key_file = key_file
    else:
        problems.append(
            Problem("xsedehub.crypt_key_file", f"{key_file!r} is not a path", "set a file path")
        )
    problems += _client_secret(settings, dflt["client_secret_file"], c[AUTH_SECTION[mode]])
    targets = (
        ("spawner", SlurmSSHSpawner, "SlurmSSHSpawner"),
        ("authenticator", _auth_class(mode), AUTH_SECTION[mode]),
    )
    for group, cls, section in targets:
        values = settings.get(group) or {}
        if not isinstance(values, dict):
            problems.append(
                Problem(
                    f"xsedehub.{group}",
                    f"is {values!r}, not a group of settings",
                    f"sudo tljh-config unset xsedehub.{group}",
                )
            )
            continue
        values = {**dflt.get(group, {}), **values}
        traits = cls.class_traits(config=True)
        for name, value in values.items():
            setting = f"xsedehub.{group}.{name}"
            trait = traits.get(name)
            if trait is None:
                problems.append(
                    Problem(
                        setting,
                        f"{cls.__name__} has no such setting",
                        f"sudo tljh-config unset {setting}",
                    )
                )
                continue
            try:
                c[section][name] = _convert(trait, value)
            except (TraitError, ValueError, TypeError) as e:
                secret = re.search(r"secret|token|password|key$", name)
                shown = "the value" if secret else repr(value)
                problems.append(
                    Problem(
                        setting,
                        f"{shown} is not a valid value: {type(e).__name__ if secret else e}",
                        f"sudo tljh-config set {setting} <a value of the right type>  "
                        '(lists: \'["a", "b"]\' or tljh-config add-item)',
                    )
                )
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
    """TLJH's idle culler sized for batch jobs (:data:`CULLER`), unless the admin set
    their own values.  Nothing under ``xsedehub``: until the admin sets
    ``xsedehub.mode``, TLJH runs as it is."""
    services = config.setdefault("services", {})
    cull = services.setdefault("cull", {})
    for key, value in CULLER.items():
        cull.setdefault(key, value)


@hookimpl
def tljh_custom_jupyterhub_config(c: Config) -> None:
    settings = load_tljh_settings()
    if not settings:
        print(
            "xsedehub: the plugin is installed but not configured (no xsedehub section in "
            f"{tljh_config_path()}): TLJH runs unchanged; start with "
            "`sudo tljh-config set xsedehub.mode gateway` (or xsede)",
            file=sys.stderr,
        )
        return
    settings_to_config(settings, c)
    try:
        apply(c)
    except ConfigError as e:  # name each setting as the admin sets it: with tljh-config
        raise ConfigError(
            [Problem(tljh_name(p.setting), p.message, tljh_name(p.fix)) for p in e.problems]
        ) from None


_SECTIONS = {
    "SlurmSSHSpawner": "xsedehub.spawner",
    "GatewayGitHubAuthenticator": "xsedehub.authenticator",
    "XSEDECILogonAuthenticator": "xsedehub.authenticator",
    "XSEDEHub": "xsedehub",
}


def tljh_name(text: str) -> str:
    """``c.SlurmSSHSpawner.login_host`` -> ``xsedehub.spawner.login_host``, and so on."""
    for section, prefix in _SECTIONS.items():
        text = re.sub(rf"\b(?:c\.)?{section}\.(\w+)", rf"{prefix}.\1", text)
    return text


@hookimpl
def tljh_post_install() -> None:
    """Safe to re-run: /etc/xsedehub, the hub-managed tunnel key file, the hub's
    encryption key (0600, kept once made) and the no-shell tunnel account."""
    ETC.mkdir(parents=True, exist_ok=True)
    ETC.chmod(0o755)
    keys = ETC / "tunnelbot_authorized_keys"
    if not keys.exists():
        keys.write_text("")
    keys.chmod(0o644)
    ensure_crypt_key(ETC / "crypt_key")
    ensure_tunnel_account("tunnelbot", ACCOUNTS_ROOT)


def ensure_crypt_key(path: Path) -> bool:
    """A fresh random key in ``path`` (0600) unless one is there; True if made.  An
    existing key is never replaced: it decrypts every user's stored auth_state."""
    if path.exists():
        path.chmod(0o600)
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return True


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
