"""The job's walltime, as the hub shows it: time left, the end of a job that reached it.

Pure helpers (SLURM durations, the wording), and the hub's API handler the job-side
extension (``jobext/``) asks: ``GET /hub/api/xsedehub/walltime/<server name>``.

Where the time left comes from: the shared ``squeue`` the hub runs every poll interval
anyway (:mod:`.squeue`) prints each job's time left (``%L``), a duration, so no clock
time and no time zone is involved (``squeue`` prints clock times in the login node's
local zone, without saying which); the hub adds it to the wall-clock time it asked.
An extension of the job (a new time limit) shows at the next refresh.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jupyterhub.apihandlers.base import APIHandler
from tornado import web

if TYPE_CHECKING:
    from .slurm import JobStatus

_DURATION = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")

#: the states in which SLURM ended a job at its time limit
TIMEOUT_STATES = frozenset({"TIMEOUT", "DEADLINE"})


def parse_duration(text: str) -> int | None:
    """Seconds in a SLURM duration as ``squeue`` prints it (``%L``, ``%l``):
    ``[D-]HH:MM:SS``, ``MM:SS``; ``None`` for ``UNLIMITED``, ``NOT_SET``, ``INVALID``..."""
    m = _DURATION.match(text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def describe(seconds: int) -> str:
    """A walltime in words: ``1 h``, ``1 h 30 min``, ``15 min``, ``2 d 4 h``, ``45 s``."""
    if seconds < 60:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = [f"{days} d"] if days else []
    if hours:
        parts.append(f"{hours} h")
    if minutes:
        parts.append(f"{minutes} min")
    return " ".join(parts)


#: the job script asks SLURM for SIGTERM up to 60 s before the walltime
#: (``--signal=B:TERM@...``, :func:`.slurm.signal_lead`) and ends on it, so a job
#: "reaching its walltime" usually ends FAILED (143), not TIMEOUT; SLURM may send that
#: signal up to 60 s early
SIGNAL_LEAD = 60 + 60 + 5


def reached(state: str, last: TimeLeft | None, now: float) -> bool:
    """Whether a job that ended in ``state`` ended at its walltime: SLURM says TIMEOUT,
    or it ended (not cancelled) within the time before its end in which SLURM sends the
    job script its warning signal (``last``: the job's end as last seen running)."""
    if state in TIMEOUT_STATES:
        return True
    if state == "CANCELLED" or last is None:
        return False
    return now >= last.end - SIGNAL_LEAD


def timeout_message(job_id: str, limit_seconds: int | None) -> str:
    """What the hub page says of a job SLURM ended at its walltime."""
    limit = f" {describe(limit_seconds)}" if limit_seconds else ""
    return (
        f"Your job {job_id} reached its{limit} walltime: SLURM ended it, and the server "
        "with it. Start a new one (with a longer walltime if you need it)."
    )


@dataclass(frozen=True)
class TimeLeft:
    """A running job's end, by the hub's clock."""

    job_id: str
    end: float  # epoch seconds
    limit: int | None  # the job's time limit, seconds

    @property
    def limit_text(self) -> str:
        return describe(self.limit) if self.limit else ""

    def seconds_left(self, now: float | None = None) -> float:
        return max(0.0, self.end - (time.time() if now is None else now))


def time_left(st: JobStatus | None) -> TimeLeft | None:
    """The end of a running job from its squeue line, or ``None`` (not running, no limit,
    or a status that did not carry the time left)."""
    if st is None or not st.running or not st.observed_at:
        return None
    left = parse_duration(st.time_left)
    if left is None:
        return None
    return TimeLeft(st.job_id, st.observed_at + left, parse_duration(st.time_limit))


def extended_limit(limit_seconds: int | None, step_minutes: int, max_minutes: int) -> int | None:
    """The time limit (minutes) one extension asks for: ``step_minutes`` more, at most the
    partition's ``max_minutes``; ``None`` when the job is at that limit already (or its
    limit is unknown)."""
    if limit_seconds is None:
        return None
    current = limit_seconds // 60
    new = min(current + step_minutes, max_minutes)
    return new if new > current else None


class WalltimeAPIHandler(APIHandler):
    """``/hub/api/xsedehub/walltime/<server name>``, for the server's owner, with a token
    that may use that server (``access:servers!server=<owner>/<name>``: the server's own
    token, the owner's session).

    ``GET``: ``{"job_id", "seconds_left", "limit_seconds", "warnings", "extend"}``;
    ``seconds_left`` is ``null`` while the hub does not know it (the job is not running
    yet); ``extend`` is the minutes one extension adds, 0 when the site allows none
    or the job is at its partition's limit.
    ``POST``: extend the job (``SlurmSSHSpawner.walltime_extend_command``); answers the
    same fields plus ``ok`` and ``message`` (SLURM's or the site command's answer).
    """

    def _spawner(self, server_name: str) -> Any:
        user = self.current_user
        if user is None or getattr(user, "kind", "user") != "user":
            raise web.HTTPError(403)
        # the owner's token is not enough: it must be one that may use this server (the
        # server's own token, the owner's session), not a narrower one the owner handed
        # to a script, or that a shared server of someone else received at its login
        if not self.has_scope(f"access:servers!server={user.name}/{server_name}"):
            raise web.HTTPError(403, "this token may not use that server")
        spawner = user.spawners.get(server_name) if server_name in user.spawners else None
        if spawner is None or not spawner.active or not hasattr(spawner, "walltime_status"):
            raise web.HTTPError(404, f"no server {server_name!r} running")
        return spawner

    def get(self, server_name: str = "") -> None:
        body = self._spawner(server_name).walltime_status()
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    async def post(self, server_name: str = "") -> None:
        body = await self._spawner(server_name).extend_walltime()
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))


#: what :func:`xsedehub.config.apply` adds to ``c.JupyterHub.extra_handlers``
HANDLERS = [(r"/api/xsedehub/walltime/?([^/]*)", WalltimeAPIHandler)]
