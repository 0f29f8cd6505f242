"""Who the hub logs in to the cluster as, for one user's jobs.

* ``gateway`` mode: the hub's own key (:attr:`SlurmSSHSpawner.gateway_key`), as the shared
  workshop account;
* ``xsede`` mode: the short-lived certificate the authenticator keeps in the user's
  encrypted auth_state, as the user's own account (the certificate's principal).

Host keys are checked against a known_hosts file, always: there is no way to skip it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncssh

from . import validate as v
from .errors import CredentialExpired, SpawnError
from .ssh import LoginNode, SSHIdentity


def login_node(host: str, port: int, known_hosts: str, slurm_bin: str = "/usr/bin") -> LoginNode:
    if not host:
        raise SpawnError("xsedehub is not configured: SlurmSSHSpawner.login_host is empty")
    if not known_hosts:
        raise SpawnError("xsedehub is not configured: SlurmSSHSpawner.known_hosts is empty")
    return LoginNode(
        v.host(host, "login_host"), port, known_hosts, v.absolute_path(slurm_bin, "slurm_bin_dir")
    )


class KeyFiles:
    """Private keys read from the hub's disk, read again only when their file changes."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[float, asyncssh.SSHKey]] = {}

    def read(self, path: str) -> asyncssh.SSHKey:
        mtime = Path(path).stat().st_mtime
        cached = self._keys.get(path)
        if cached is None or cached[0] != mtime:
            cached = self._keys[path] = (mtime, asyncssh.read_private_key(path))
        return cached[1]


def gateway_identity(keys: KeyFiles, key_path: str, user: str) -> SSHIdentity:
    if not key_path:
        raise SpawnError("xsedehub is not configured: SlurmSSHSpawner.gateway_key is empty")
    key = keys.read(key_path)
    return SSHIdentity(v.posix_username(user, "gateway_user"), key, label="gateway")


def site_identity(keys: KeyFiles, key_path: str, user: str) -> SSHIdentity:
    """The optional site account (xsede mode) that watches and cancels jobs whose
    owner's certificate has expired."""
    return SSHIdentity(v.posix_username(user, "site_user"), keys.read(key_path), label="site")


async def certificate_identity(user: Any) -> SSHIdentity:
    """The identity in ``user``'s auth_state (a JupyterHub ``User``)."""
    from xsedehub.auth.cilogon import STATE_KEY
    from xsedehub.auth.issuer_client import Credential

    auth_state = await user.get_auth_state() or {}
    cred = Credential.from_state(auth_state.get(STATE_KEY))
    if cred is None:
        raise SpawnError(
            "No cluster credential for this login: log out and log in again to get one."
        )
    if cred.valid_before <= time.time():
        raise CredentialExpired("Your cluster certificate has expired: log out and log in again.")
    return SSHIdentity(
        v.posix_username(cred.principal, "certificate principal"),
        asyncssh.import_private_key(cred.private_key),
        asyncssh.import_certificate(cred.certificate),
        label="certificate",
    )


#: auth_state key of the certificates obtained for clusters with their own issuer
CLUSTER_STATE_KEY = "xsedehub_cluster_credentials"
#: a cluster certificate this close to its end is replaced before a connection (seconds)
CLUSTER_RENEW_MARGIN = 600.0


#: one lock per user (by name): the read, renewal and save of their cluster
#: certificates, so that two connections at once do not overwrite each other's
_CLUSTER_LOCKS: dict[str, asyncio.Lock] = {}


def _kept_for(entry: object, cluster: Any) -> Any:
    """The credential kept in ``entry`` if it was obtained for ``cluster`` as configured
    now (its issuer and login node): a cluster renamed or pointed elsewhere gets none."""
    from xsedehub.auth.issuer_client import Credential

    if not isinstance(entry, dict):
        return None
    if entry.get("issuer_url") != cluster.issuer_url or entry.get("login_node") != [
        cluster.login_host,
        cluster.login_port,
    ]:
        return None
    return Credential.from_state(entry)


async def cluster_certificate_identity(user: Any, cluster: Any, log: Any = None) -> SSHIdentity:
    """``user``'s identity on ``cluster`` (a :class:`.clusters.ClusterSpec` with its own
    ``issuer_url``): a certificate from that cluster's issuer, which maps the person
    (their login's ID token) to their account there.  Obtained at first use and when
    near its end, and kept, like the login's, only in the encrypted auth_state, with the
    issuer and login node it is for.

    A renewal that fails (the login's ID token has expired, the issuer is down) leaves
    the certificate in use while it is valid; once it has expired,
    :class:`~.errors.CredentialExpired`, as for the login's certificate (a connection
    still open, or the site account, then serves the job's poll and stop)."""
    lock = _CLUSTER_LOCKS.setdefault(str(user.name), asyncio.Lock())
    async with lock:
        cred = await _cluster_credential(user, cluster, log)
    return SSHIdentity(
        v.posix_username(cred.principal, "certificate principal"),
        asyncssh.import_private_key(cred.private_key),
        asyncssh.import_certificate(cred.certificate),
        label=f"certificate ({cluster.name})",
    )


async def _cluster_credential(user: Any, cluster: Any, log: Any) -> Any:
    from xsedehub.auth.cilogon import XSEDECILogonAuthenticator
    from xsedehub.auth.issuer_client import (
        IssuerError,
        IssuerRefused,
        obtain_credential,
        read_hub_secret,
    )

    state = await user.get_auth_state() or {}
    kept = dict(state.get(CLUSTER_STATE_KEY) or {})
    cred = _kept_for(kept.get(cluster.name), cluster)
    if cred is not None and not cred.expires_within(CLUSTER_RENEW_MARGIN):
        return cred

    def failed(why: str) -> Any:
        if cred is not None and not cred.expires_within(0):
            if log is not None:
                log.warning(
                    "certificate for %s on cluster %s not renewed, the old one is used "
                    "until it expires: %s",
                    user.name,
                    cluster.name,
                    why,
                )
            return cred
        if cred is not None:
            raise CredentialExpired(
                f"Your certificate for cluster {cluster.display_name} has expired and "
                f"could not be renewed ({why}): log out and log in again."
            )
        raise SpawnError(why)

    id_token = XSEDECILogonAuthenticator._id_token(state)
    if not id_token:
        return failed("No login token to ask for a cluster certificate: log in again.")
    try:
        new = await obtain_credential(
            cluster.issuer_url,
            id_token,
            hub_secret=read_hub_secret(cluster.issuer_secret_file),
        )
    except IssuerRefused as e:
        return failed(f"No account on cluster {cluster.display_name} for this login: {e.message}")
    except IssuerError as e:
        return failed(
            f"The certificate service of cluster {cluster.display_name} is unavailable: {e.message}"
        )
    # read again: the login's credential may have been renewed meanwhile
    state = await user.get_auth_state() or {}
    kept = dict(state.get(CLUSTER_STATE_KEY) or {})
    kept[cluster.name] = {
        **new.to_state(),
        "issuer_url": cluster.issuer_url,
        "login_node": [cluster.login_host, cluster.login_port],
    }
    state[CLUSTER_STATE_KEY] = kept
    await user.save_auth_state(state)
    if log is not None:
        log.info(
            "certificate for %s on cluster %s: principal %s, serial %d",
            user.name,
            cluster.name,
            new.principal,
            new.serial,
        )
    return new
