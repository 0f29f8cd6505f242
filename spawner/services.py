"""What the spawners of one hub process share, for as long as the process runs.

JupyterHub makes a spawner per server and drops it when the server stops; what must
outlive one spawner lives in the process's one :class:`HubServices`, made on first use
(:meth:`HubServices.shared`):

* ``pool``: the SSH connections, one per identity, each with its shared ``squeue``;
* ``spawns``: the spawns in flight here, and the tunnel-key files already reconciled
  with the hub's database;
* ``key_files``: the gateway's private key, read again only when its file changes;
* ``availability``: the form's live partition availability, at most 30 s old;
* ``pending_checked``: when the durable list of jobs still to cancel was last retried,
  per account (see :mod:`.pending_cancel`);
* ``versions_checked``: the job environments whose JupyterHub version was compared
  with the hub's at their first start (see :mod:`.versions`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

from . import form
from .errors import ClusterUnreachable
from .identity import KeyFiles
from .ssh import Connection, Pool
from .tunnel import TunnelKeys


class SpawnRegistry:
    """The spawns this hub process has started whose state may not be in the database
    yet, and the tunnel-key files it has reconciled with the database."""

    def __init__(self) -> None:
        self._active: set[str] = set()
        self._reconciled: set[str] = set()

    def started(self, spawn_id: str) -> None:
        self._active.add(spawn_id)

    def ended(self, spawn_id: str) -> None:
        self._active.discard(spawn_id)

    def first_look(self, keys_file: str) -> bool:
        """True the first time this process asks about ``keys_file``: reconcile it now."""
        if keys_file in self._reconciled:
            return False
        self._reconciled.add(keys_file)
        return True

    async def reconcile(self, keys: TunnelKeys, db: Any) -> list[str]:
        """Drop the tunnel keys of spawns the hub no longer knows (a job stopped, or a
        record lost, while the hub was down); the removed spawn ids."""
        from jupyterhub import orm

        known = set(self._active)
        for row in db.query(orm.Spawner).filter(orm.Spawner.server_id.isnot(None)):
            spawn_id = (row.state or {}).get("spawn_id")
            if spawn_id:
                known.add(spawn_id)
        return await keys.retain(known)


class AvailabilityCache:
    """``sinfo`` results per login node and account, reused for 30 s.

    The form waits at most :attr:`timeout` seconds for them (connecting included), so a
    login node that is down does not hold the spawn page for the SSH connect timeout;
    after a failure no new attempt is made for :attr:`retry_after` seconds."""

    max_age = 30.0
    timeout = 4.0
    retry_after = 20.0

    def __init__(self) -> None:
        self._results: dict[tuple, tuple[float, dict[str, form.Availability]]] = {}
        self._failed: dict[tuple, float] = {}

    async def get(self, conn: Connection) -> dict[str, form.Availability]:
        key = (conn.node, conn.ident.username)
        cached = self._results.get(key)
        if cached and time.monotonic() - cached[0] < self.max_age:
            return cached[1]
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed < self.retry_after:
            return {}
        try:
            r = await asyncio.wait_for(conn.run(form.SINFO_ARGV, timeout=15), self.timeout)
        except (TimeoutError, ClusterUnreachable) as e:
            self._failed[key] = time.monotonic()
            why = str(e) or f"no answer within {self.timeout:.0f} s"
            raise ClusterUnreachable(
                f"sinfo for the form: {why}; not asked again for {self.retry_after:.0f} s"
            ) from e
        self._failed.pop(key, None)
        data = form.parse_sinfo(str(r.stdout)) if r.exit_status == 0 else {}
        self._results[key] = (time.monotonic(), data)
        return data


class HubServices:
    """The hub process's shared services (one per process: :meth:`shared`)."""

    _shared: ClassVar[HubServices | None] = None

    def __init__(self) -> None:
        self.pool = Pool()
        self.spawns = SpawnRegistry()
        self.key_files = KeyFiles()
        self.availability = AvailabilityCache()
        #: when each (pending-cancel file, login node, account) was last retried
        self.pending_checked: dict[tuple, float] = {}
        #: (login node, server command) whose JupyterHub version was compared with the hub's
        self.versions_checked: set[tuple] = set()
        #: tasks that run beside the spawns (kept here so that they are not collected)
        self.background: set[asyncio.Task] = set()

    @classmethod
    def shared(cls) -> HubServices:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared
