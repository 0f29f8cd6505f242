"""Jobs the hub meant to cancel but could not yet: a durable list on the hub's disk.

A stop that cannot reach the cluster (``scancel`` failing, or an expired certificate
with no live connection) must not forget the job: JupyterHub clears the server's state
whatever ``stop()`` does.  The spawner revokes the job's tunnel key at once (hub-local),
then records the job here; a later poll or start over the same account, and
``xsedehub orphans``, retry the ``scancel`` and drop the entry once SLURM has it.

The file (``SlurmSSHSpawner.pending_cancel_file``) is JSON, mode ``0600``, replaced
atomically on every change, with writers serialised by an ``flock`` on ``<file>.lock``::

    {"version": 1,
     "jobs": [{"job_id": "4242",            # SLURM job id (digits)
               "login_host": "login.example.org", "login_port": 22,
               "ssh_user": "gateway",        # the cluster account that owns the job
               "spawn_id": "u3-0a1b2c3d4e5f",  # its comment is xsedehub:<spawn_id>
               "user": "ada",                # the JupyterHub user, for the logs
               "since": 1767000000.0,        # when the first cancel failed (epoch s)
               "attempts": 1,                # cancels tried so far
               "error": "..."}]}             # the last failure, for the admin

A job is identified by ``(login_host, login_port, job_id)``.  Readers ignore entries
they cannot parse and fields they do not know; a missing file is an empty list.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

__all__ = ["PendingCancel", "add", "read", "remove", "update"]

VERSION = 1


@dataclass(frozen=True)
class PendingCancel:
    """One job still to cancel."""

    job_id: str
    login_host: str
    login_port: int
    ssh_user: str
    spawn_id: str = ""
    user: str = ""
    since: float = 0.0
    attempts: int = 0
    error: str = ""

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.login_host, self.login_port, self.job_id)

    @classmethod
    def from_dict(cls, d: dict) -> PendingCancel | None:
        try:
            job_id = str(d["job_id"])
            if not job_id.isdigit():
                return None
            return cls(
                job_id=job_id,
                login_host=str(d["login_host"]),
                login_port=int(d.get("login_port", 22)),
                ssh_user=str(d["ssh_user"]),
                spawn_id=str(d.get("spawn_id", "")),
                user=str(d.get("user", "")),
                since=float(d.get("since", 0.0)),
                attempts=int(d.get("attempts", 0)),
                error=str(d.get("error", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None


def read(path: str | os.PathLike) -> list[PendingCancel]:
    """The jobs in ``path`` (empty if there is no such file)."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read the pending-cancel list {path}: {e}") from e
    jobs = data.get("jobs", []) if isinstance(data, dict) else []
    return [j for j in (PendingCancel.from_dict(d) for d in jobs if isinstance(d, dict)) if j]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, jobs: list[PendingCancel]) -> None:
    text = json.dumps({"version": VERSION, "jobs": [asdict(j) for j in jobs]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def update(
    path: str | os.PathLike, change: Callable[[list[PendingCancel]], list[PendingCancel]]
) -> list[PendingCancel]:
    """Replace the list with ``change(list)``, under the file's lock; the new list."""
    p = Path(path)
    with _locked(p):
        jobs = change(read(p))
        _write(p, jobs)
        return jobs


def add(path: str | os.PathLike, job: PendingCancel) -> None:
    """Record ``job`` (or count one more attempt if it is there already)."""

    def change(jobs: list[PendingCancel]) -> list[PendingCancel]:
        for i, old in enumerate(jobs):
            if old.key == job.key:
                jobs[i] = replace(old, attempts=old.attempts + job.attempts, error=job.error)
                return jobs
        return [*jobs, replace(job, since=job.since or time.time())]

    update(path, change)


def remove(path: str | os.PathLike, jobs: list[PendingCancel]) -> None:
    """Drop ``jobs`` (those cancelled since) from the list."""
    gone = {j.key for j in jobs}
    if gone and Path(path).exists():
        update(path, lambda current: [j for j in current if j.key not in gone])
