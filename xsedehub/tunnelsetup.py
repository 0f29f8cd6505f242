"""``xsedehub tunnel setup``: the hub side of the tunnel, shown before it is written.

* the no-shell tunnel account;
* the hub-managed authorized_keys file (one restricted, expiring line per running job,
  written by the spawner);
* an sshd ``Match User`` block that confines the account to remote forwards on
  loopback and a single local forward to the hub API.

Idempotent: the block sits between markers and is replaced, never duplicated.  The new
sshd configuration is checked with ``sshd -t`` before it replaces the old one.
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .spawner import validate as v

BEGIN = "# BEGIN xsedehub tunnel (managed by `xsedehub tunnel setup`; edits here are replaced)"
END = "# END xsedehub tunnel"


def match_block(user: str, keys_file: str, hub_api: str) -> str:
    """The sshd ``Match`` block for the tunnel account (also used by the local cluster)."""
    v.posix_username(user, "tunnel user")
    v.absolute_path(keys_file, "authorized keys file")
    host, _, port = hub_api.rpartition(":")
    v.host(host, "hub API host")
    v.positive_int(int(port), "hub API port", high=65535)
    return "\n".join(
        [
            BEGIN,
            f"Match User {user}",
            f"    AuthorizedKeysFile {keys_file}",
            "    AllowTcpForwarding yes",
            f"    PermitOpen {host}:{port}",
            "    PermitListen 127.0.0.1:*",
            "    GatewayPorts no",
            "    AllowStreamLocalForwarding no",
            "    PermitTunnel no",
            "    PermitTTY no",
            "    X11Forwarding no",
            "    AllowAgentForwarding no",
            "    PasswordAuthentication no",
            "    KbdInteractiveAuthentication no",
            "    ForceCommand /bin/false",
            "    ClientAliveInterval 10",
            "    ClientAliveCountMax 3",
            END,
        ]
    )


def with_block(config_text: str, block: str) -> str:
    """``config_text`` with our block replaced (or appended at the end, as Match blocks
    must be)."""
    lines = config_text.splitlines()
    out: list[str] = []
    skipping = False
    for line in lines:
        if line.strip() == BEGIN:
            skipping = True
            continue
        if skipping:
            if line.strip() == END:
                skipping = False
            continue
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join([*out, "", block]) + "\n"


@dataclass
class Plan:
    sshd_config: Path
    old: str
    new: str
    keys_file: Path
    user: str
    account_exists: bool

    @property
    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.old.splitlines(True),
                self.new.splitlines(True),
                str(self.sshd_config),
                f"{self.sshd_config} (new)",
            )
        )

    @property
    def changes(self) -> bool:
        return self.old != self.new or not self.account_exists or not self.keys_file.exists()


def plan(sshd_config: Path, keys_file: Path, user: str, hub_api: str) -> Plan:
    old = sshd_config.read_text() if sshd_config.exists() else ""
    new = with_block(old, match_block(user, str(keys_file), hub_api))
    exists = subprocess.run(["id", user], capture_output=True, check=False).returncode == 0
    return Plan(sshd_config, old, new, keys_file, user, exists)


def apply_plan(p: Plan, *, sshd: str = "/usr/sbin/sshd") -> None:
    from .tljh import ensure_tunnel_account

    ensure_tunnel_account(p.user)
    p.keys_file.parent.mkdir(parents=True, exist_ok=True)
    if not p.keys_file.exists():
        p.keys_file.write_text("")
    p.keys_file.chmod(0o644)
    if p.old == p.new:
        return
    fd, tmp = tempfile.mkstemp(dir=p.sshd_config.parent, prefix=".sshd_config.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(p.new)
        os.chmod(tmp, 0o644)
        r = subprocess.run([sshd, "-t", "-f", tmp], capture_output=True, text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"sshd rejects the new configuration: {r.stderr.strip()}")
        if p.sshd_config.exists():
            shutil.copy2(p.sshd_config, f"{p.sshd_config}.xsedehub-backup")
        os.replace(tmp, p.sshd_config)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
