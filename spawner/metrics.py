"""Prometheus metrics, served on JupyterHub's own ``/hub/metrics``.

JupyterHub serves the default registry of ``prometheus_client``; everything here is
registered there at import, named ``xsedehub_...``.  Labels are bounded: ``cluster`` is
the configured login host (:attr:`SlurmSSHSpawner.login_host`), ``partition`` a
partition the one validation gate accepted, ``outcome`` one of :data:`OUTCOMES`.  No
label ever carries a user name or an unvalidated value.

Counters and histograms move where things happen (one-line hooks in the spawner, the
SSH connection, the shared ``squeue``).  What is a state rather than an event (SSH
connections open, tunnel keys live, jobs watched against what the refreshed ``squeue``
lists, the age of that ``squeue`` result) is read when ``/metrics`` is scraped, from the
objects that hold it, so it is never stale.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from tornado import web

from .errors import ClusterUnreachable, CredentialExpired, SpawnError, StartTimeout

if TYPE_CHECKING:
    from .spawner import SlurmSSHSpawner
    from .ssh import Connection

__all__ = [
    "OUTCOMES",
    "QUEUE_WAIT",
    "SPAWNS",
    "SQUEUE_SECONDS",
    "SSH_CONNECTS",
    "STARTUP",
    "classify",
    "count_spawn",
]

#: seconds from submission to RUNNING: an idle partition starts a job in a second, a busy
#: batch queue in hours
QUEUE_WAIT_BUCKETS = (
    1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400,
)  # fmt: skip
#: seconds from RUNNING to a server that answers through the tunnel (a cold shared file
#: system can take minutes)
STARTUP_BUCKETS = (2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800)
#: seconds one shared ``squeue`` takes
SQUEUE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

#: how a start ended (the ``outcome`` label of ``xsedehub_spawns_total``)
OUTCOMES = (
    "started",  # the server answers
    "refused",  # options the validation gate refused (HTTP 400); nothing was submitted
    "unreachable",  # the login node could not be reached within cluster_retry_seconds
    "credential_expired",  # xsede mode: the user's certificate has expired
    "job_failed",  # the submitted job ended, or its server failed, before it answered
    "timeout",  # start_timeout or http_timeout ran out
    "cancelled",  # a Stop during the start (or the hub shutting down)
    "error",  # anything else: a misconfiguration, a refused folder claim, a bug
)

QUEUE_WAIT = Histogram(
    "xsedehub_queue_wait_seconds",
    "Seconds from sbatch to the job seen RUNNING, per cluster and partition.",
    ["cluster", "partition"],
    buckets=QUEUE_WAIT_BUCKETS,
)
STARTUP = Histogram(
    "xsedehub_startup_seconds",
    "Seconds from the job seen RUNNING to its server answering through the tunnel.",
    ["cluster", "partition"],
    buckets=STARTUP_BUCKETS,
)
SPAWNS = Counter(
    "xsedehub_spawns",
    "Starts by how they ended (outcome: " + ", ".join(OUTCOMES) + ").",
    ["cluster", "outcome"],
)
SQUEUE_SECONDS = Histogram(
    "xsedehub_squeue_seconds",
    "Round-trip time of the shared squeue (the SSH command included), per cluster.",
    ["cluster"],
    buckets=SQUEUE_BUCKETS,
)
SQUEUE_FAILURES = Counter(
    "xsedehub_squeue_failures",
    "Shared squeue runs that failed (login node unreachable, squeue erred), per cluster.",
    ["cluster"],
)
SSH_CONNECTS = Counter(
    "xsedehub_ssh_connects",
    "SSH handshakes that succeeded: kind=first for a connection's first, kind=reopen for "
    "one re-opened after it dropped, idled out or was closed.",
    ["cluster", "kind"],
)
SSH_CONNECT_FAILURES = Counter(
    "xsedehub_ssh_connect_failures",
    "SSH handshakes that failed (refused, timed out, host key or login rejected).",
    ["cluster"],
)

#: every connection that has logged in once, for the gauges read at scrape time
_connections: weakref.WeakSet[Connection] = weakref.WeakSet()


def cluster_of(spawner: SlurmSSHSpawner) -> str:
    """The ``cluster`` label of a spawner's metrics: its configured login host."""
    return spawner.login_host or "unset"


# ----------------------------------------------------------------- spawns
def classify(exc: BaseException | None, *, submitted: bool, timed_out: bool) -> str:
    """The outcome of a start that raised ``exc`` (None: it returned).

    ``submitted``: a batch job had been submitted; ``timed_out``: a cancelled start had
    run for the whole ``start_timeout`` (JupyterHub cancels it then, as it does at a Stop).
    """
    if exc is None:
        return "started"
    if isinstance(exc, asyncio.CancelledError):
        return "timeout" if timed_out else "cancelled"
    if isinstance(exc, web.HTTPError) and exc.status_code == 400:
        return "refused"
    if isinstance(exc, CredentialExpired):
        return "credential_expired"
    if isinstance(exc, StartTimeout):
        return "timeout"
    if isinstance(exc, ClusterUnreachable) or isinstance(exc.__cause__, ClusterUnreachable):
        return "unreachable"
    if isinstance(exc, SpawnError) and submitted:
        return "job_failed"
    return "error"


T = TypeVar("T")


def count_spawn(
    start: Callable[[SlurmSSHSpawner], Awaitable[T]],
) -> Callable[[SlurmSSHSpawner], Awaitable[T]]:
    """Decorates ``SlurmSSHSpawner.start``: every start counts once in
    ``xsedehub_spawns_total`` with its outcome (see :func:`classify`)."""

    @functools.wraps(start)
    async def counted(spawner: SlurmSSHSpawner) -> T:
        began = time.monotonic()
        try:
            result = await start(spawner)
        except BaseException as e:
            timed_out = time.monotonic() - began >= 0.99 * float(spawner.start_timeout)
            outcome = classify(e, submitted=bool(spawner.job_id), timed_out=timed_out)
            SPAWNS.labels(cluster_of(spawner), outcome).inc()
            raise
        SPAWNS.labels(cluster_of(spawner), "started").inc()
        return result

    return counted


def refused(spawner: SlurmSSHSpawner) -> None:
    """Options refused before ``start`` (the spawn form or URL query)."""
    SPAWNS.labels(cluster_of(spawner), "refused").inc()


def queue_wait(spawner: SlurmSSHSpawner, partition: str, submitted_at: float) -> float:
    """The job is RUNNING: observe its time in the queue; returns now (monotonic)."""
    now = time.monotonic()
    QUEUE_WAIT.labels(cluster_of(spawner), partition).observe(now - submitted_at)
    return now


def startup(spawner: SlurmSSHSpawner, partition: str, running_at: float) -> None:
    """The server answers: observe the time since its job was seen RUNNING."""
    STARTUP.labels(cluster_of(spawner), partition).observe(time.monotonic() - running_at)


# ----------------------------------------------------------------- SSH and squeue
def ssh_connected(conn: Connection) -> None:
    """A handshake succeeded (first for this connection, or a re-open)."""
    kind = "reopen" if conn in _connections else "first"
    _connections.add(conn)
    SSH_CONNECTS.labels(conn.node.host, kind).inc()


def ssh_connect_failed(conn: Connection) -> None:
    SSH_CONNECT_FAILURES.labels(conn.node.host).inc()


def squeue_done(conn: Connection, started: float, fut: asyncio.Future) -> None:
    """Done-callback of a shared squeue query that began at ``started`` (monotonic)."""
    if fut.cancelled():
        return
    if fut.exception() is None:
        SQUEUE_SECONDS.labels(conn.node.host).observe(time.monotonic() - started)
    else:
        SQUEUE_FAILURES.labels(conn.node.host).inc()


# ----------------------------------------------------------------- read at scrape time
class StateCollector:
    """The gauges read from live objects when ``/metrics`` is scraped."""

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        open_, watched, in_squeue, age = (defaultdict(float) for _ in range(4))
        for conn in list(_connections):
            host = conn.node.host
            open_[host] += conn.is_open
            cache = conn.status
            if not cache.watching:
                continue  # its refresher has stopped: its last squeue is history
            watched[host] += len(cache._watched)
            in_squeue[host] += sum(1 for st in cache.jobs.values() if st.spawn_id and st.running)
            if cache.fetched_at:
                age[host] = max(age[host], now - cache.fetched_at)
        fams = self._families()
        for host, n in open_.items():
            fams[0].add_metric([host], n)
        for host in open_:
            fams[1].add_metric([host], watched[host])
            fams[2].add_metric([host], in_squeue[host])
        for host, seconds in age.items():
            fams[3].add_metric([host], seconds)
        fams[4].add_metric([], tunnel_keys_live())
        yield from fams

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "xsedehub_ssh_connections_open",
                "SSH connections to the login node open now, per cluster.",
                labels=["cluster"],
            ),
            GaugeMetricFamily(
                "xsedehub_jobs_believed_running",
                "Servers the hub watches as running (their jobs RUNNING, the server "
                "answered), per cluster.",
                labels=["cluster"],
            ),
            GaugeMetricFamily(
                "xsedehub_jobs_in_squeue",
                "xsedehub's jobs (by their --comment) RUNNING in the last shared squeue of "
                "the connections that watch servers, per cluster.",
                labels=["cluster"],
            ),
            GaugeMetricFamily(
                "xsedehub_squeue_result_age_seconds",
                "Age of the oldest squeue result a watching connection relies on, per "
                "cluster (grows when the refresher cannot reach the login node).",
                labels=["cluster"],
            ),
            GaugeMetricFamily(
                "xsedehub_tunnel_keys_live",
                "Unexpired per-job keys in the tunnel account's authorized_keys.",
            ),
        ]


def tunnel_keys_live() -> int:
    """Unexpired keys in every tunnel-key file this process manages."""
    from .tunnel import TunnelKeys

    now = time.time()
    live = 0
    for keys in list(TunnelKeys._instances.values()):
        try:
            live += sum(1 for e in keys.entries() if e.expires > now)
        except (OSError, ValueError):
            pass  # unreadable now: the next scrape tries again
    return live


def _register() -> Any:
    collector = StateCollector()
    REGISTRY.register(collector)
    return collector


COLLECTOR = _register()
