"""The shared ``squeue``: one query per interval for all the jobs of one SSH identity.

Every :class:`~xsedehub.spawner.ssh.Connection` has one :class:`SqueueCache`.  Spawns,
polls and the background refresher read job states from it; the refresher wakes a
:class:`Watcher` (a spawner) whose job has ended.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from functools import partial
from typing import TYPE_CHECKING, Protocol

from . import metrics, slurm
from .errors import ClusterUnreachable

if TYPE_CHECKING:
    from .ssh import Connection

#: a child of JupyterHub's own logger: in a hub, these lines go where the hub's go, in its
#: format and at its level (``--debug`` included)
log = logging.getLogger("JupyterHub").getChild("xsedehub.ssh")


class Watcher(Protocol):
    """What the refresher wakes when a watched job has ended (JupyterHub's spawners are)."""

    async def poll_and_notify(self) -> int | None: ...


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
        self._watched: dict[str, Watcher] = {}  # job id -> its spawner
        self._refresher: asyncio.Task | None = None
        self._wakeups: set[asyncio.Task] = set()
        self.interval = 30.0
        self.failures = 0  # refreshes failed in a row (logged when squeue answers again)
        self.sacct_available: bool | None = None  # None: not asked yet

    def watch(self, job_id: str, spawner: Watcher, interval: float) -> None:
        self._watched[job_id] = spawner
        self.interval = interval
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.ensure_future(self._refresh())

    def unwatch(self, job_id: str) -> None:
        self._watched.pop(job_id, None)

    @property
    def watching(self) -> bool:
        """Some job is watched (its connection is in use, never idle)."""
        return bool(self._watched)

    def adopt(self, old: SqueueCache) -> None:
        """Take over the watched jobs of ``old`` (the cache of a connection this one
        replaces, e.g. after a certificate renewal) and end its refresher."""
        moved, old._watched = old._watched, {}
        if old._refresher is not None:
            old._refresher.cancel()
            old._refresher = None
        if moved:
            self._watched.update(moved)
            self.interval = old.interval
            if self._refresher is None or self._refresher.done():
                self._refresher = asyncio.ensure_future(self._refresh())

    def close(self) -> None:
        """Watch nothing more, and end the refresher."""
        self._watched.clear()
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None

    async def _refresh(self) -> None:
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
                    task = asyncio.ensure_future(spawner.poll_and_notify())
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
            self._inflight.add_done_callback(
                partial(metrics.squeue_done, self.conn, time.monotonic())
            )
        return await asyncio.shield(self._inflight)

    async def _query(self) -> dict[str, slurm.JobStatus]:
        started, wall = time.monotonic(), time.time()
        r = await self.conn.run(slurm.squeue_argv(self.conn.ident.username), timeout=30)
        if r.exit_status != 0:
            raise ClusterUnreachable(
                f"squeue failed ({r.exit_status}): {str(r.stderr).strip()[:300]}"
            )
        self.jobs = slurm.parse_squeue(str(r.stdout), observed_at=wall)
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

    async def lookup(self, spawn_id: str) -> slurm.JobStatus | None:
        """The job of ``spawn_id`` (by its ``--comment``) in a squeue started now."""
        jobs = await self._shared_query(time.monotonic())
        for st in jobs.values():
            if st.spawn_id == spawn_id:
                return st
        return None

    async def confirm(self, job_id: str) -> slurm.JobStatus | None:
        """Ask SLURM about ``job_id`` alone, for a job missing from the shared squeue
        (a hiccup must not read as "job gone"): ``sacct`` where accounting is on, else
        ``squeue --jobs``.  ``None`` means SLURM says it knows no such job (it ended
        and was purged); raises :class:`ClusterUnreachable` when neither can tell."""
        if self.sacct_available is not False:
            r = await self.conn.run(slurm.sacct_argv(job_id), timeout=30)
            err = f"{r.stderr}{r.stdout}"
            if r.exit_status == 0:
                self.sacct_available = True
                st = slurm.parse_sacct(str(r.stdout)).get(job_id)
                if st is not None:
                    return st
            elif slurm.sacct_disabled(err):
                self.sacct_available = False
                log.info(
                    "sacct on %s: accounting is off (%s); jobs missing from squeue are "
                    "confirmed with squeue --jobs",
                    self.conn.node.host,
                    err.strip()[:200],
                )
            else:
                log.warning("sacct -j %s failed (%s): %s", job_id, r.exit_status, err[:300])
        wall = time.time()
        r = await self.conn.run(slurm.squeue_argv(self.conn.ident.username, [job_id]), timeout=30)
        if r.exit_status == 0:
            return slurm.parse_squeue(str(r.stdout), observed_at=wall).get(job_id)
        if "Invalid job id" in str(r.stderr):
            return None
        raise ClusterUnreachable(
            f"squeue --jobs={job_id} failed ({r.exit_status}): {str(r.stderr).strip()[:300]}"
        )

    def _clear(self, fut: asyncio.Future) -> None:
        if self._inflight is fut:
            self._inflight = None
        if not fut.cancelled():
            fut.exception()  # mark retrieved
