"""Validation of every value that can reach the cluster.

Anything that ends up in a path, an argv on the login node or an ``#SBATCH`` line goes
through one of these functions first.  They return the canonical value or raise
:class:`InvalidValue` with a message that names the field; they never try to "clean"
hostile input into something else.
"""

from __future__ import annotations

import ipaddress
import re


class InvalidValue(ValueError):
    """A value that must not reach the cluster; ``field`` names where it came from."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_POSIX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# GitHub logins: letters, digits and single inner hyphens, at most 39 characters.
_GITHUB_LOGIN = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){0,38}$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# JupyterHub 6's own rule for new server names ("safe slugs"), with uppercase, '_' and '.'
# as older hubs allowed them: never a separator, a space or anything a shell reads
_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,29}$")
# [0-9], not \d: \d and str.isdigit() also take Arabic-Indic, fullwidth or superscript
# digits (superscripts crash int())
_WALLTIME = re.compile(r"^(?:([0-9]{1,3})-)?([0-9]{1,3}):([0-9]{2})(?::([0-9]{2}))?$")
_MEMORY = re.compile(r"^([1-9][0-9]{0,6})([KMGT]?)$")
_DIGITS = re.compile(r"^[0-9]+$")
_SAFE_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}$")
_SAFE_HIDDEN_PART = re.compile(r"^\.?[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,127}$")
_HOST = re.compile(r"^[A-Za-z0-9.:_-]{1,253}$")
# a JupyterLab plugin or extension id: "@scope/package:plugin", "package:plugin", "package"
_LAB_PLUGIN = re.compile(r"^(?:@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(?::[A-Za-z0-9._-]+)?$")


def _text(field: str, value: object, limit: int = 256) -> str:
    if not isinstance(value, str):
        raise InvalidValue(field, f"must be text, not {type(value).__name__}")
    if len(value) > limit:
        raise InvalidValue(field, f"longer than {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidValue(field, "contains control characters (newline, tab, NUL...)")
    return value


def posix_username(value: object, field: str = "username") -> str:
    v = _text(field, value, 32)
    if not _POSIX_USER.match(v):
        raise InvalidValue(
            field, f"{v!r} is not a valid cluster account name (lowercase letters, digits, _ and -)"
        )
    return v


def github_login(value: object, field: str = "GitHub login") -> str:
    v = _text(field, value, 39).lower()
    if not _GITHUB_LOGIN.match(v):
        raise InvalidValue(field, f"{v!r} is not a GitHub login (letters, digits, single hyphens)")
    return v


def slurm_name(value: object, field: str) -> str:
    """A partition, account, QOS or reservation name."""
    v = _text(field, value, 64)
    if not _SLURM_NAME.match(v):
        raise InvalidValue(field, f"{v!r} is not a valid name (letters, digits, '_', '.', '-')")
    return v


def job_name(value: object, field: str = "job name") -> str:
    """A SLURM job name (``--job-name``): a name like :func:`slurm_name`, up to 128."""
    v = _text(field, value, 128)
    if not _JOB_NAME.match(v):
        raise InvalidValue(field, f"{v!r} is not a valid job name (letters, digits, '_', '.', '-')")
    return v


def server_name(value: object, field: str = "server name") -> str:
    """A JupyterHub server name ("" is the default server): it goes into the job's name,
    comment and folder, so 1 to 30 letters, digits, '-', '_' or '.', starting with a
    letter or digit."""
    v = _text(field, value, 30)
    if v and not _SERVER_NAME.match(v):
        raise InvalidValue(
            field,
            f"{v!r} cannot name a server on this hub (1 to 30 letters, digits, '-', '_' or "
            "'.', starting with a letter or digit)",
        )
    return v


def walltime_minutes(value: object, field: str = "walltime") -> int:
    """``[D-]HH:MM[:SS]`` or a whole number of minutes, as minutes (rounded up)."""
    if isinstance(value, bool):
        raise InvalidValue(field, "must be HH:MM[:SS] or minutes")
    if isinstance(value, int):
        minutes = value
    else:
        v = _text(field, value, 16).strip()
        if _DIGITS.match(v):
            minutes = int(v)
        else:
            m = _WALLTIME.match(v)
            if not m:
                raise InvalidValue(field, f"{v!r} is not a walltime like 01:30:00 or 90")
            d, h, mi, s = (int(x) if x else 0 for x in m.groups())
            if mi >= 60 or s >= 60:
                raise InvalidValue(field, f"{v!r}: minutes and seconds must be below 60")
            minutes = d * 1440 + h * 60 + mi + (1 if s else 0)
    if not 1 <= minutes <= 366 * 1440:
        raise InvalidValue(field, "must be between 1 minute and 366 days")
    return minutes


def format_walltime(minutes: int) -> str:
    d, rest = divmod(minutes, 1440)
    h, m = divmod(rest, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def memory_mb(value: object, field: str = "memory") -> int:
    """``512M``, ``4G``, ``2048`` (MB) -> megabytes."""
    if isinstance(value, bool):
        raise InvalidValue(field, "must be a size like 2G or 512M")
    if isinstance(value, int):
        mb = value
    else:
        v = _text(field, value, 16).strip().upper().removesuffix("B")
        m = _MEMORY.match(v)
        if not m:
            raise InvalidValue(field, f"{value!r} is not a size like 2G or 512M")
        n, unit = int(m.group(1)), m.group(2) or "M"
        mb = {"K": max(1, n // 1024), "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]
    if not 1 <= mb <= 64 * 1024 * 1024:
        raise InvalidValue(field, "must be between 1M and 64T")
    return mb


def positive_int(value: object, field: str, *, low: int = 1, high: int = 4096) -> int:
    if isinstance(value, bool):
        raise InvalidValue(field, "must be a whole number")
    if isinstance(value, str):
        v = _text(field, value, 8).strip()
        if not _DIGITS.match(v):
            raise InvalidValue(field, f"{value!r} is not a whole number")
        value = int(v)
    if not isinstance(value, int):
        raise InvalidValue(field, "must be a whole number")
    if not low <= value <= high:
        raise InvalidValue(field, f"must be between {low} and {high}")
    return value


def lab_plugin_id(value: object, field: str) -> str:
    """A JupyterLab plugin id (``@jupyterlab/apputils-extension:announcements``) or
    extension name (``@jupyterlab/apputils-extension``)."""
    v = _text(field, value, 214)
    if not _LAB_PLUGIN.match(v):
        raise InvalidValue(
            field,
            f"{v!r} is not a JupyterLab plugin id "
            "(like @jupyterlab/apputils-extension:announcements)",
        )
    return v


def path_part(value: object, field: str, *, hidden: bool = False) -> str:
    """One path component: no separators, nothing a shell treats specially, and no
    leading dot unless ``hidden`` (for paths from the hub's own configuration)."""
    v = _text(field, value, 128)
    if not (_SAFE_HIDDEN_PART if hidden else _SAFE_PATH_PART).match(v):
        raise InvalidValue(field, f"{v!r} is not a safe folder name")
    return v


def relative_path(value: object, field: str, *, hidden: bool = False) -> str:
    """A relative path of safe components (``workshop/alice``), never ``..`` or absolute."""
    v = _text(field, value, 512)
    parts = v.split("/")
    if not v or v.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidValue(field, f"{v!r} must be a relative path without '..'")
    for p in parts:
        path_part(p, field, hidden=hidden)
    return v


def absolute_path(value: object, field: str) -> str:
    v = _text(field, value, 1024)
    parts = v.split("/")
    if not v.startswith("/") or any(p in (".", "..") for p in parts[1:]):
        raise InvalidValue(field, f"{v!r} must be an absolute path without '..'")
    for p in parts[1:]:
        if p:
            path_part(p, field)
    return v


def host(value: object, field: str) -> str:
    v = _text(field, value, 253)
    if not _HOST.match(v):
        raise InvalidValue(field, f"{v!r} is not a host name or address")
    return v


def is_loopback(host: str) -> bool:
    """``host`` (a name or address, brackets allowed) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
