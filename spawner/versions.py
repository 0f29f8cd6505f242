"""The hub's JupyterHub and the job environment's: do they work together?

``jupyterhub-singleuser`` in each job is a piece of JupyterHub too: it logs the user in
through the hub's OAuth provider, checks their tokens against the hub's API and reports
activity to it.  A job environment with another major version of JupyterHub than the
hub's is the classic batchspawner failure: the job starts, the server runs, and the
browser then loops between hub and server, or gets "403 Forbidden", with nothing in the
job's log that says why.  A minor version apart works (JupyterHub keeps its API within a
major version), though what the newer side added stays off.

:func:`compare` judges two versions; ``xsedehub check`` and the spawner's first start
(:func:`job_env_version`) use it.  Pure but for :func:`job_env_version`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .ssh import Connection

_VERSION = re.compile(r"^v?([0-9]+)\.([0-9]+)")

WHY_MAJOR = (
    "jupyterhub-singleuser in each job logs users in through the hub's OAuth and reports "
    "to the hub's API, which change between major versions: the job starts and the server "
    "runs, but the browser loops between hub and server or gets 403 Forbidden"
)


@dataclass(frozen=True)
class Mismatch:
    """The hub's version, the job environment's, and how far apart they are."""

    hub: str
    job: str
    major: bool  # True: different major versions (fails); False: minor versions apart

    def explain(self) -> str:
        """One sentence for the hub's log: what differs, what it does, what to do."""
        if self.major:
            return (
                f"The job environment has JupyterHub {self.job}, the hub {self.hub}: "
                f"{WHY_MAJOR}.  Install jupyterhub=={self.hub} in the job environment "
                "(xsedehub check shows the same)."
            )
        return (
            f"The job environment has JupyterHub {self.job}, the hub {self.hub}: the same "
            "major version works, but what the newer side added stays off; install "
            f"jupyterhub=={self.hub} in the job environment when convenient."
        )


def parse(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string (``"5.2.1"``, ``"6.0.0b1"``), or None."""
    m = _VERSION.match(version.strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def compare(hub: str, job: str) -> Mismatch | None:
    """None when the two versions work together as they are (same major and minor),
    else the :class:`Mismatch`.  A version that cannot be read counts as a major
    difference: nothing says it works."""
    h, j = parse(hub), parse(job)
    if h is not None and h == j:
        return None
    major = h is None or j is None or h[0] != j[0]
    return Mismatch(hub=hub.strip(), job=job.strip(), major=major)


def version_line(stdout: str) -> str:
    """The version ``jupyterhub-singleuser --version`` printed (its last line)."""
    lines = [ln.strip() for ln in stdout.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


async def job_env_version(conn: Connection, cmd: list[str], *, timeout: float = 60) -> str:
    """The JupyterHub version of the job environment: ``cmd --version`` on the login node
    (the account's own ``~/.local`` kept out, as in a job).  Raises ``RuntimeError``
    with the command's error when it does not run."""
    r = await conn.run(["/usr/bin/env", "PYTHONNOUSERSITE=1", *cmd, "--version"], timeout=timeout)
    out = version_line(str(r.stdout))
    if r.exit_status != 0 or not out:
        # one line, printable: the account's own environment writes this text, and it
        # goes into the hub's log
        said = " | ".join(str(r.stderr).strip().splitlines()) or f"exit {r.exit_status}"
        raise RuntimeError(said[-300:].encode("ascii", "backslashreplace").decode())
    return out[:100].encode("ascii", "backslashreplace").decode()


async def warn_if_mismatched(
    conn: Connection, cmd: list[str], hub_version: str, log: logging.Logger
) -> Mismatch | None:
    """Compare the job environment's JupyterHub with ``hub_version`` and log a warning
    that explains a difference; never raises (a job environment that cannot be asked
    is only logged: the spawn itself then says what fails)."""
    try:
        job = await job_env_version(conn, cmd)
    except Exception as e:
        log.warning("could not ask the job environment for its JupyterHub version: %s", e)
        return None
    mismatch = compare(hub_version, job)
    if mismatch is not None:
        log.warning("%s", mismatch.explain())
    else:
        log.info("the job environment has JupyterHub %s, as the hub", job)
    return mismatch
