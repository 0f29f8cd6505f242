"""One kept-alive asyncssh connection per SSH identity, shared by every spawner using it.

In gateway mode every attendee's spawn, poll and stop goes over the same connection;
in xsede mode each user has their own.  A dropped connection is re-opened on the
next use.  Host keys are always checked against a known_hosts file.  Each connection
carries the shared ``squeue`` of its account (:class:`~xsedehub.spawner.squeue.SqueueCache`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncssh

from .errors import ClusterUnreachable
from .squeue import SqueueCache

__all__ = ["ClusterUnreachable", "Connection", "Counters", "LoginNode", "Pool", "SSHIdentity"]

#: a child of JupyterHub's own logger: in a hub, these lines go where the hub's go, in its
#: format and at its level (``--debug`` included)
log = logging.getLogger("JupyterHub").getChild("xsedehub.ssh")


@dataclass(frozen=True)
class SSHIdentity:
    """Who the hub logs in as on the login node, and with what."""

    username: str
    key: asyncssh.SSHKey
    certificate: asyncssh.SSHCertificate | None = None
    label: str = ""

    @property
    def fingerprint(self) -> str:
        data = self.key.public_data + (self.certificate.public_data if self.certificate else b"")
        return hashlib.sha256(data).hexdigest()[:16]


#: SLURM's commands: the hub runs them from :attr:`LoginNode.slurm_bin`, never through
#: the account's ``PATH`` (which a shared gateway account's users could change)
SLURM_COMMANDS = frozenset({"sbatch", "squeue", "scancel", "sacct", "scontrol", "sinfo"})


@dataclass(frozen=True)
class LoginNode:
    host: str
    port: int
    known_hosts: str  # path to a known_hosts file (may use @cert-authority)
    slurm_bin: str = "/usr/bin"  # absolute directory of SLURM's commands on the node

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as the node runs it: a SLURM command by its absolute path."""
        if argv[0] in SLURM_COMMANDS:
            return [f"{self.slurm_bin.rstrip('/')}/{argv[0]}", *argv[1:]]
        return list(argv)


@dataclass
class Counters:
    """What went over the wire: SSH handshakes, and commands by name (a pool's, or a
    lone connection's)."""

    handshakes: int = 0
    commands: dict[str, int] = field(default_factory=dict)

    def count(self, argv0: str) -> None:
        self.commands[argv0] = self.commands.get(argv0, 0) + 1


class Connection:
    """A lazily (re)connected SSH connection with a bounded number of open channels."""

    def __init__(
        self,
        node: LoginNode,
        ident: SSHIdentity,
        *,
        max_sessions: int = 8,
        connect_timeout: float = 15,
        keepalive: float = 30,
        counters: Counters | None = None,
    ):
        self.node, self.ident = node, ident
        self.counters = counters if counters is not None else Counters()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self._sftp_lock = asyncio.Lock()
        # sshd's MaxSessions (default 10) caps channels per connection; the SFTP session
        # keeps one of them open
        self._sessions = asyncio.Semaphore(max(1, max_sessions - 1))
        self.connect_timeout, self.keepalive = connect_timeout, keepalive
        self.status = SqueueCache(self)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            keys = (
                [(self.ident.key, self.ident.certificate)]
                if self.ident.certificate
                else [self.ident.key]
            )
            try:
                self.counters.handshakes += 1
                self._conn = await asyncssh.connect(
                    self.node.host,
                    self.node.port,
                    username=self.ident.username,
                    client_keys=keys,
                    known_hosts=self.node.known_hosts,
                    agent_path=None,
                    config=None,
                    password=None,
                    kbdint_auth=False,
                    connect_timeout=self.connect_timeout,
                    keepalive_interval=self.keepalive,
                    keepalive_count_max=3,
                )
            except (TimeoutError, OSError, asyncssh.Error) as e:
                self._conn = None
                raise ClusterUnreachable(
                    f"cannot reach {self.ident.username}@{self.node.host}:{self.node.port}: {e}"
                ) from e
            self._sftp = None
            log.info("connected to %s@%s:%s", self.ident.username, self.node.host, self.node.port)
            return self._conn

    def _drop(self, conn: asyncssh.SSHClientConnection | None) -> None:
        if conn is not None and conn is self._conn:
            conn.close()
            self._conn = self._sftp = None

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 60,
    ) -> asyncssh.SSHCompletedProcess:
        """Run ``argv`` (quoted, never a shell string of user input) on the login node.

        Retries once on a fresh connection if the old one had died; raises
        :class:`ClusterUnreachable` when the node cannot be reached.
        """
        command = shlex.join(self.node.argv(argv))
        self.counters.count(argv[0])
        for attempt in (1, 2):
            conn = await self._connect()
            try:
                async with self._sessions:
                    return await conn.run(command, input=input, check=False, timeout=timeout)
            except (
                asyncssh.ChannelOpenError,
                asyncssh.ConnectionLost,
                OSError,
                asyncssh.DisconnectError,
            ) as e:
                self._drop(conn)
                if attempt == 2:
                    raise ClusterUnreachable(f"{argv[0]} on {self.node.host}: {e}") from e
            except asyncssh.TimeoutError as e:
                raise ClusterUnreachable(f"{argv[0]} on {self.node.host} timed out") from e
        raise AssertionError("unreachable")

    async def sftp(self) -> asyncssh.SFTPClient:
        """The connection's one SFTP session (opened on first use, shared)."""
        conn = await self._connect()
        async with self._sftp_lock:
            if self._sftp is None:
                try:
                    self._sftp = await conn.start_sftp_client()
                except (asyncssh.Error, OSError) as e:
                    self._drop(conn)
                    raise ClusterUnreachable(f"SFTP to {self.node.host}: {e}") from e
            return self._sftp

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._sftp = None


class Pool:
    """Connections keyed by (login node, account, credential), counted together."""

    def __init__(self) -> None:
        self._conns: dict[tuple[LoginNode, str, str], Connection] = {}
        self.counters = Counters()

    def get(self, node: LoginNode, ident: SSHIdentity, *, max_sessions: int = 8) -> Connection:
        """The connection for ``ident`` (made on first use; its channels are capped at
        ``max_sessions``)."""
        key = (node, ident.username, ident.fingerprint)
        conn = self._conns.get(key)
        if conn is None:
            # a renewed certificate replaces the user's old connection
            for old_key in [k for k in self._conns if k[:2] == key[:2]]:
                self._conns.pop(old_key).close()
            conn = self._conns[key] = Connection(
                node, ident, max_sessions=max_sessions, counters=self.counters
            )
        return conn

    def live(self, node: LoginNode, username: str) -> Connection | None:
        """An open connection as ``username``, whatever credential opened it."""
        for key, conn in self._conns.items():
            if key[:2] == (node, username) and conn.is_open:
                return conn
        return None
