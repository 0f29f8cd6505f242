"""``xsedehub gateway setup``: what the cluster's admins set up for the shared gateway
account, so that no attendee can change what the hub's own commands do.

Every attendee's server runs as the gateway account, so every attendee can write that
account's files.  The hub's commands on the login node must therefore never run through
a file the account can write:

* the hub's key sits in a root-owned ``AuthorizedKeysFile`` (attendees cannot add their
  own keys, or keep access after the workshop), limited with ``from=`` to the hub's
  address and with ``restrict`` (no forwarding, no pty, no ``~/.ssh/rc``);
* the account's login shell reads no start-up file when sshd runs a command with it
  (``/bin/sh``: dash reads none for ``sh -c``, and bash run as ``sh`` reads none either;
  Debian's bash as ``/bin/bash`` reads ``~/.bashrc`` for every SSH command, where a
  function can shadow any command, even one named by its absolute path);
* SLURM's commands are run by absolute path (``SlurmSSHSpawner.slurm_bin_dir``);
* on Debian and Ubuntu, ``pam_env`` reads ``~/.pam_environment`` for SSH sessions
  (``user_readenv=1`` in ``/etc/pam.d/sshd``), which could set ``LD_PRELOAD`` for the
  hub's commands: set ``user_readenv=0`` there.  ``xsedehub check`` looks for such
  variables in the hub's sessions.

This module only builds text (pure); the command prints it: the hub cannot apply it, it
is the cluster's configuration.  The local test cluster is set up from the same builders.
"""

from __future__ import annotations

from .spawner import validate as v

#: login shells that read no start-up file when sshd runs ``SHELL -c COMMAND``
SAFE_SHELLS = frozenset({"/bin/sh", "/usr/bin/sh", "/bin/dash", "/usr/bin/dash"})

#: session variables that change what any command does (from ``~/.pam_environment`` or
#: ``~/.ssh/environment``): their presence means an attendee may have set them
DANGEROUS_ENV = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "BASH_ENV", "ENV", "PYTHONPATH")


def keys_line(public_key: str, hub_address: str) -> str:
    """The line of the root-owned keys file: the hub's key, from the hub only, restricted."""
    parts = public_key.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise v.InvalidValue("public key", "not an OpenSSH public key line")
    addr = v.host(hub_address, "hub address")
    return f'from="{addr}",restrict {parts[0]} {parts[1]} xsedehub-hub'


def sshd_block(user: str, keys_file: str) -> str:
    """The sshd_config block that reads the account's keys from the root-owned file only."""
    user = v.posix_username(user, "gateway user")
    keys_file = v.absolute_path(keys_file, "keys file")
    return f"Match User {user}\n    AuthorizedKeysFile {keys_file}\n"


def shell_problem(login_shell: str) -> str | None:
    """Why ``login_shell`` lets the account's own files run before the hub's commands."""
    if login_shell in SAFE_SHELLS:
        return None
    return (
        f"{login_shell} reads start-up files the account can write (such as ~/.bashrc) "
        "before every command the hub runs"
    )


def env_problems(env_output: str, home: str) -> list[str]:
    """Variables of an SSH session (``env`` output) that an attendee could have set."""
    found = []
    for line in env_output.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        if name in DANGEROUS_ENV:
            found.append(name)
        elif (
            name == "PATH"
            and home
            and any(
                p == "" or p == "." or p == home or p.startswith(home.rstrip("/") + "/")
                for p in value.split(":")
            )
        ):
            found.append("PATH (a folder the account can write)")
    return found


def instructions(user: str, public_key: str, hub_address: str, keys_file: str) -> str:
    """The whole text ``xsedehub gateway setup`` prints for the cluster's admins."""
    line = keys_line(public_key, hub_address)
    block = sshd_block(user, keys_file)
    return f"""\
# On every login node, as root.  Attendees share the account {user}: these settings
# keep them from changing what the hub's commands do (xsedehub explanation/security).

# 1. The hub's key, in a file only root can write, usable from the hub only:
install -d -m 755 {keys_file.rsplit("/", 1)[0] or "/"}
printf '%s\\n' '{line}' > {keys_file}
chown root:root {keys_file} && chmod 644 {keys_file}

# 2. sshd_config (then test with `sshd -t` and reload sshd): only that file counts for
#    {user}, so keys an attendee adds to ~{user}/.ssh/authorized_keys are ignored.
{block}
# 3. A login shell that reads no start-up file for commands (bash reads ~/.bashrc);
#    JupyterLab's terminals still get bash: c.SlurmSSHSpawner.environment =
#    {{"SHELL": "/bin/bash"}} on the hub.
usermod -s /bin/sh {user}

# 4. Debian/Ubuntu: if /etc/pam.d/sshd has `pam_env.so user_readenv=1`, change it to
#    user_readenv=0 (otherwise ~/.pam_environment sets variables in the hub's sessions).

# 5. On the hub: SlurmSSHSpawner.slurm_bin_dir = the directory of sbatch on the login
#    node (`command -v sbatch`); then run `xsedehub check`.
"""
