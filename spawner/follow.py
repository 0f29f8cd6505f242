"""From a submitted job to a server that answers: following the job through the queue,
then waiting for its server behind the tunnel, with progress events on the way; and the
retries of a spawn's steps while the login node cannot be reached.

Both waits read the connection's shared ``squeue`` (no query of their own per spawn)
and end with a :class:`~xsedehub.spawner.errors.SpawnError` that carries the tail of the
job's log when the job ends first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from . import ports
from .errors import ClusterUnreachable, SpawnError, StartTimeout
from .job import JobFiles
from .ssh import Connection

T = TypeVar("T")

#: how often a spawn waiting for its server asks whether the job still runs (the
#: connection's shared squeue result)
JOB_CHECK_EVERY = 5.0


class Report(Protocol):
    """Reports a progress event: a message and, maybe, a percentage."""

    def __call__(self, message: str, pct: int | None = None) -> None: ...


async def retrying(
    what: str, fn: Callable[..., Awaitable[T]], *args: Any, within: float, report: Report
) -> T:
    """Run ``fn`` and retry with backoff while the login node is unreachable, for up to
    ``within`` seconds; then a :class:`SpawnError` that says so."""
    deadline = time.monotonic() + within
    delay = 1.0
    while True:
        try:
            return await fn(*args)
        except ClusterUnreachable as e:
            if time.monotonic() + delay > deadline:
                raise SpawnError(
                    f"The cluster's login node cannot be reached ({what}): {e}. "
                    "Try again later; if it persists, tell the hub's administrators."
                ) from e
            report(f"Login node unreachable ({what}); retrying in {delay:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15)


async def _ended(files: JobFiles, what: str, cls: type[SpawnError] = SpawnError) -> SpawnError:
    tail = await files.log_tail()
    return cls(what + (f"\nLast lines of its log:\n{tail}" if tail else ""))


async def wait_running(
    conn: Connection, job_id: str, files: JobFiles, submitted_at: float, report: Report
) -> None:
    """Until SLURM runs the job, reporting its place in the queue as it changes."""
    last = ""
    while True:
        try:
            st = await conn.status.get(job_id, max_age=1.0, not_before=submitted_at)
        except ClusterUnreachable as e:
            report(f"Login node unreachable while job {job_id} is queued ({e}); retrying")
            await asyncio.sleep(5)
            continue
        if st is None and time.monotonic() - submitted_at < 15:
            await asyncio.sleep(1)  # not visible yet: ask again rather than give up
            continue
        if st is None or not st.alive:
            state = st.state if st else "gone from the queue"
            raise await _ended(
                files, f"Batch job {job_id} ended before the server started ({state})."
            )
        if st.running:
            report(f"Job {job_id} running on {st.nodes}; waiting for its server", 50)
            return
        msg = f"Job {job_id} is {st.state.lower()}"
        if st.reason and st.reason != "None":
            msg += f" ({st.reason})"
        if st.start and st.start not in ("N/A", "Unknown"):
            msg += f", expected to start {st.start}"
        if msg != last:
            report(msg, 30)
            last = msg
        await asyncio.sleep(1)


async def wait_server(
    conn: Connection,
    job_id: str,
    files: JobFiles,
    *,
    hub_port: int,
    timeout: float,
    report: Report,
) -> None:
    """Until the hub's port listens (the hub process's one :class:`~.ports.PortWatch`
    looks for every starting server at once), watching that the job is still alive.

    The job's agent adds the reverse forward once the server listens on its socket, so
    the port listening *is* the server listening, and until then nothing listens on it:
    a look costs the compute node and the hub's sshd nothing.  The HTTP check that
    follows is JupyterHub's own (``wait_up``, once start() returns): no second round
    trip through the tunnel.  (Where the job directory's path is too long for ssh's
    control socket, the job forwards from the tunnel's start; ``wait_up`` then retries
    until the server answers.)"""
    listening = asyncio.ensure_future(ports.watch().wait(hub_port, timeout))
    job_ended = asyncio.ensure_future(_until_ended(conn, job_id, files, report))
    try:
        # the watch goes on while the job is looked at: a slow squeue (a busy login node
        # or slurmctld) must not hide a port that listens meanwhile
        await asyncio.wait([listening, job_ended], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (listening, job_ended):
            task.cancel()
        await asyncio.gather(listening, job_ended, return_exceptions=True)
    if listening.done() and not listening.cancelled() and listening.result():
        report("The server listens and the tunnel to the compute node is up", 95)
        return
    if job_ended.done() and not job_ended.cancelled() and job_ended.exception() is not None:
        raise job_ended.exception()  # type: ignore[misc]
    raise await _ended(
        files, f"The server in job {job_id} did not answer within {timeout} s.", StartTimeout
    )


async def _until_ended(conn: Connection, job_id: str, files: JobFiles, report: Report) -> None:
    """Raise a :class:`SpawnError` with the job's log once the job is gone from the queue
    (the connection's shared ``squeue``, asked every :data:`JOB_CHECK_EVERY` seconds)."""
    while True:
        await asyncio.sleep(JOB_CHECK_EVERY)
        try:
            st = await conn.status.get(job_id, max_age=2.0)
        except ClusterUnreachable as e:
            # a blip of the login node is not the job's end: ask again later
            report(f"Login node unreachable while the server starts ({e}); retrying")
            continue
        if st is None or not st.alive:
            raise await _ended(files, f"Batch job {job_id} ended while the server was starting.")
