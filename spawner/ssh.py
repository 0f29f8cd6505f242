"""One kept-alive asyncssh connection per SSH identity, shared by every spawner using it.

In gateway mode every attendee's spawn, poll and stop goes over the same connection;
in xsede mode each user has their own.  A dropped connection is re-opened on the
next use.  Host keys are always checked against a known_hosts file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncssh

from . import slurm

#: a child of JupyterHub's own logger: in a hub, these lines go where the hub's go, in its
#: format and at its level (``--debug`` included)
log = logging.getLogger("JupyterHub").getChild("xsedehub.ssh")


class ClusterUnreachable(RuntimeError):
    """The login node could not be reached or did not answer (not: the job is gone)."""


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


@dataclass(frozen=True)
class LoginNode:
    host: str
    port: int
    known_hosts: str  # path to a known_hosts file (may use @cert-authority)


@dataclass
class Counters:
    """What went over the wire (read by the benchmark)."""

    handshakes: int = 0
    commands: dict[str, int] = field(default_factory=dict)

    def count(self, argv0: str) -> None:
        self.commands[argv0] = self.commands.get(argv0, 0) + 1


COUNTERS = Counters()


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
    ):
        self.node, self.ident = node, ident
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
                COUNTERS.handshakes += 1
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
        command = shlex.join(argv)
        COUNTERS.count(argv[0])
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


class SqueueCache:
    """One ``squeue`` per interval for all the jobs of a connection's account.

    Concurrent callers share the in-flight query; a result older than a job's
    submission is never used for that job.  Running servers are *watched*: a background
    refresher runs one squeue per interval (jittered) for all of them and wakes the
    spawner of any job that has ended, so the hub learns of it within one interval while
    the login node sees one squeue per interval, however many servers run.
    """

    def __init__(self, conn: Connection):
        self.conn = conn
        self.fetched_at = 0.0
        self.jobs: dict[str, slurm.JobStatus] = {}
        self._inflight: asyncio.Future[dict[str, slurm.JobStatus]] | None = None
        self._inflight_started = 0.0
        self._watched: dict[str, object] = {}  # job id -> spawner (has poll_and_notify)
        self._refresher: asyncio.Task | None = None
        self._wakeups: set[asyncio.Task] = set()
        self.interval = 30.0
        self.failures = 0  # refreshes failed in a row (logged when squeue answers again)

    def watch(self, job_id: str, spawner: object, interval: float) -> None:
        self._watched[job_id] = spawner
        self.interval = interval
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh())

    def unwatch(self, job_id: str) -> None:
        self._watched.pop(job_id, None)

    async def _refresh(self) -> None:
        import random

        while self._watched:
            # jitter only ever lengthens the interval: never two runs in one interval
            await asyncio.sleep(self.interval * random.uniform(1.0, 1.1))  # noqa: S311
            if not self._watched:
                break
            if time.monotonic() - self.fetched_at < self.interval * 0.5:
                jobs = self.jobs  # a spawn's query just ran: reuse it
            else:
                try:
                    jobs = await self._shared_query()
                except ClusterUnreachable as e:
                    self.failures += 1
                    log.warning("squeue for %s failed: %s", self.conn.ident.username, e)
                    continue
                if self.failures:
                    log.info(
                        "squeue for %s answers again after %d failed refreshes",
                        self.conn.ident.username,
                        self.failures,
                    )
                    self.failures = 0
            for job_id, spawner in list(self._watched.items()):
                st = jobs.get(job_id)
                if st is None or not st.alive:
                    self._watched.pop(job_id, None)
                    task = asyncio.ensure_future(spawner.poll_and_notify())  # type: ignore[attr-defined]
                    self._wakeups.add(task)
                    task.add_done_callback(self._wakeups.discard)

    async def _shared_query(self, not_before: float = 0.0) -> dict[str, slurm.JobStatus]:
        """Join the squeue in flight, or start one; never one that started before
        ``not_before`` (it cannot know of a job submitted since)."""
        if (
            self._inflight is not None
            and not self._inflight.done()
            and self._inflight_started < not_before
        ):
            try:
                await asyncio.shield(self._inflight)
            except ClusterUnreachable:
                pass
        if self._inflight is None or self._inflight.done():
            self._inflight_started = time.monotonic()
            self._inflight = asyncio.ensure_future(self._query())
            self._inflight.add_done_callback(self._clear)
        return await asyncio.shield(self._inflight)

    async def _query(self) -> dict[str, slurm.JobStatus]:
        started = time.monotonic()
        r = await self.conn.run(slurm.squeue_argv(self.conn.ident.username), timeout=30)
        if r.exit_status != 0:
            raise ClusterUnreachable(
                f"squeue failed ({r.exit_status}): {str(r.stderr).strip()[:300]}"
            )
        self.jobs = slurm.parse_squeue(str(r.stdout))
        self.fetched_at = started
        return self.jobs

    async def get(
        self,
        job_id: str,
        *,
        max_age: float,
        not_before: float = 0.0,
    ) -> slurm.JobStatus | None:
        """Status of ``job_id`` from a result at most ``max_age`` old and fetched after
        ``not_before`` (monotonic); ``None`` means squeue answered and the job is not there."""
        fresh = self.fetched_at and time.monotonic() - self.fetched_at <= max_age
        if not fresh or self.fetched_at < not_before:
            jobs = await self._shared_query(not_before)
        else:
            jobs = self.jobs
        return jobs.get(job_id)

    def _clear(self, fut: asyncio.Future) -> None:
        if self._inflight is fut:
            self._inflight = None
        if not fut.cancelled():
            fut.exception()  # mark retrieved


class Pool:
    """Connections keyed by (login node, account, credential)."""

    def __init__(self) -> None:
        self._conns: dict[tuple, Connection] = {}

    def get(self, node: LoginNode, ident: SSHIdentity, **kw) -> Connection:
        key = (node, ident.username, ident.fingerprint)
        conn = self._conns.get(key)
        if conn is None:
            # a renewed certificate replaces the user's old connection
            for old_key in [k for k in self._conns if k[:2] == key[:2]]:
                self._conns.pop(old_key).close()
            conn = self._conns[key] = Connection(node, ident, **kw)
        return conn

    def live(self, node: LoginNode, username: str) -> Connection | None:
        """An open connection as ``username``, whatever credential opened it."""
        for key, conn in self._conns.items():
            if key[:2] == (node, username) and conn.is_open:
                return conn
        return None


POOL = Pool()
