"""One kept-alive asyncssh connection per SSH identity, shared by every spawner using it.

In gateway mode every attendee's spawn, poll and stop goes over the same connection;
in xsede mode each user has their own.  A dropped connection is re-opened on the
next use.  Host keys are always checked against a known_hosts file.  Each connection
carries the shared ``squeue`` of its account (:class:`~xsedehub.spawner.squeue.SqueueCache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncssh

from . import metrics
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
        idle_timeout: float = 0,
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
        # closed after this many seconds without a command (0: kept open); reopened on use
        self.idle_timeout = idle_timeout
        self._busy = 0
        self._last_used = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
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
                metrics.ssh_connect_failed(self)
                raise ClusterUnreachable(
                    f"cannot reach {self.ident.username}@{self.node.host}:{self.node.port}: {e}"
                ) from e
            self._sftp = None
            metrics.ssh_connected(self)
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
        retry: bool = True,
    ) -> asyncssh.SSHCompletedProcess:
        """Run ``argv`` (quoted, never a shell string of user input) on the login node.

        A command that never reached the node (the channel could not be opened) is tried
        again once; one that may have run (the connection died under it) is tried again
        on a fresh connection only if ``retry`` (leave it False for what must not run
        twice, like ``sbatch``).  A command that times out has its channel closed, so
        timed-out commands never pile up to sshd's ``MaxSessions``.  Raises
        :class:`ClusterUnreachable` when the node cannot be reached or did not answer.
        """
        command = shlex.join(self.node.argv(argv))
        self.counters.count(argv[0])
        self._busy += 1
        try:
            for attempt in (1, 2):
                conn = await self._connect()
                try:
                    async with self._sessions:
                        return await self._run_on(conn, command, input, timeout)
                except asyncssh.ChannelOpenError as e:
                    # the command did not start; the connection may be fine (too many
                    # sessions): closing it would break every other command on it
                    if conn.is_closed():
                        self._drop(conn)
                    if attempt == 2:
                        raise ClusterUnreachable(f"{argv[0]} on {self.node.host}: {e}") from e
                    await asyncio.sleep(0.5)
                except (asyncssh.ConnectionLost, OSError, asyncssh.DisconnectError) as e:
                    self._drop(conn)
                    if attempt == 2 or not retry:
                        raise ClusterUnreachable(f"{argv[0]} on {self.node.host}: {e}") from e
            raise AssertionError("unreachable")
        finally:
            self._busy -= 1
            self._touch()

    @staticmethod
    async def _run_on(
        conn: asyncssh.SSHClientConnection, command: str, input: str | None, timeout: float
    ) -> asyncssh.SSHCompletedProcess:
        process = await conn.create_process(command, input=input)
        try:
            return await process.wait(check=False, timeout=timeout)
        except asyncssh.TimeoutError as e:
            name = command.split(" ", 1)[0]
            raise ClusterUnreachable(f"{name} timed out after {timeout:g} s") from e
        finally:
            if process.exit_status is None and process.exit_signal is None:
                # sshd counts the session towards MaxSessions until its command exits,
                # even once the channel is closed: end the command, then the channel
                with contextlib.suppress(asyncssh.Error, OSError):
                    process.send_signal("KILL")
            process.close()

    def _touch(self) -> None:
        """Note a use; a connection unused for :attr:`idle_timeout` is closed."""
        self._last_used = time.monotonic()
        if self.idle_timeout > 0 and self._idle_timer is None:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.idle_timeout, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        if not self.is_open:
            return
        idle = time.monotonic() - self._last_used
        if self._busy or self.status.watching or idle < self.idle_timeout:
            # in use: look again when it may have become idle
            wait = max(self.idle_timeout - idle, 1.0)
            self._idle_timer = asyncio.get_running_loop().call_later(wait, self._close_if_idle)
            return
        log.info(
            "closing the idle connection to %s@%s (%.0f s unused)",
            self.ident.username,
            self.node.host,
            idle,
        )
        self.close()

    async def sftp(self) -> asyncssh.SFTPClient:
        """The connection's one SFTP session (opened on first use, shared)."""
        conn = await self._connect()
        self._touch()
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
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class Pool:
    """Connections keyed by (login node, account, credential), counted together."""

    def __init__(self, *, idle_timeout: float = 0) -> None:
        self._conns: dict[tuple[LoginNode, str, str], Connection] = {}
        self.counters = Counters()
        self.idle_timeout = idle_timeout

    def get(self, node: LoginNode, ident: SSHIdentity, *, max_sessions: int = 8) -> Connection:
        """The connection for ``ident`` (made on first use; its channels are capped at
        ``max_sessions``)."""
        key = (node, ident.username, ident.fingerprint)
        conn = self._conns.get(key)
        if conn is None:
            conn = self._conns[key] = Connection(
                node,
                ident,
                max_sessions=max_sessions,
                idle_timeout=self.idle_timeout,
                counters=self.counters,
            )
            # a renewed certificate replaces the user's old connection: its watched jobs
            # move to the new one, and its refresher ends (it would log in again with
            # the old, soon expired, certificate every interval, forever)
            for old_key in [k for k in self._conns if k[:2] == key[:2] and k != key]:
                old = self._conns.pop(old_key)
                conn.status.adopt(old.status)
                old.close()
        return conn

    def live(self, node: LoginNode, username: str) -> Connection | None:
        """An open connection as ``username``, whatever credential opened it."""
        for key, conn in self._conns.items():
            if key[:2] == (node, username) and conn.is_open:
                return conn
        return None

    def unwatch(self, job_id: str, node: LoginNode | None = None) -> None:
        """Stop watching ``job_id`` on every connection (to ``node``, if given)."""
        for key, conn in self._conns.items():
            if node is None or key[0] == node:
                conn.status.unwatch(job_id)
