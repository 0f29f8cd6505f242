"""Per-job tunnel keys in the tunnel account's authorized_keys.

Every server gets its own key pair, generated on the hub for that job.  Its line in
the tunnel account's ``authorized_keys`` allows exactly one thing: listen on that
job's hub-side port on loopback, and open a connection to the hub API.  The line
expires on its own and is removed when the job stops, so a leaked key cannot bind
another user's port, nor log in once the job is gone.

A revoked key's port stays out of use until the key would have expired: a job whose
connection logged in before the revocation keeps that connection (sshd does not read
the file again), and its agent adds the port's forward only once its server listens, so
the port may still be bound by the old job.  Its line is replaced by a comment that
holds the port::

    # xsedehub: port PORT held until YYYYMMDDHHMMSSZ (revoked: SPAWN_ID)

The authorized_keys file is also the registry of hub-side ports in use, so it survives
hub restarts.  Every edit (read, change, atomic replace) holds an exclusive ``flock`` on
a lock file beside it (``.<name>.lock``), so the hub and ``xsedehub check``, separate
processes, never overwrite each other's lines nor hand out the same port.  Lines look like::

    restrict,port-forwarding,permitlisten="127.0.0.1:PORT",permitopen="HOST:PORT",
    expiry-time="YYYYMMDDHHMMSSZ",command="/bin/false" ssh-ed25519 AAAA... xsedehub:SPAWN_ID
"""

from __future__ import annotations

import asyncio
import calendar
import fcntl
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import asyncssh

from . import slurm
from . import validate as v

_LINE = re.compile(
    r'permitlisten="127\.0\.0\.1:(?P<port>\d+)".*expiry-time="(?P<exp>\d{14})Z".*'
    r" xsedehub:(?P<spawn>[A-Za-z0-9_.-]+)$"
)
_HELD = re.compile(
    r"^# xsedehub: port (?P<port>\d+) held until (?P<exp>\d{14})Z "
    r"\(revoked: (?P<spawn>[A-Za-z0-9_.-]+)\)$"
)
_SPAWN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
#: the ids the spawner gives its spawns (see :func:`.slurm.new_spawn_id`)
SPAWN_ID_FORMAT = slurm.SPAWN_ID_FORMAT

T = TypeVar("T")


@dataclass(frozen=True)
class TunnelGrant:
    spawn_id: str
    port: int
    private_key: str = field(repr=False)  # to the job directory (0600), nowhere else
    expires: float


@dataclass(frozen=True)
class Entry:
    spawn_id: str
    port: int
    expires: float


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (binding it would succeed)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class TunnelKeys:
    """The hub-side registry; one instance per authorized_keys file per process."""

    _instances: dict[str, TunnelKeys] = {}

    def __init__(self, path: str, port_range: tuple[int, int], api_host: str, api_port: int):
        self.path = Path(path)
        self.port_range = port_range
        self.api = f"{v.host(api_host, 'hub API host')}:{int(api_port)}"
        self._lock = asyncio.Lock()

    @classmethod
    def for_file(
        cls,
        path: str,
        port_range: tuple[int, int],
        api_host: str,
        api_port: int,
    ) -> TunnelKeys:
        inst = cls._instances.get(path)
        if inst is None or inst.port_range != port_range or inst.api != f"{api_host}:{api_port}":
            inst = cls._instances[path] = cls(path, port_range, api_host, api_port)
        return inst

    # -- file I/O (small file, rewritten atomically under both locks)
    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """The lock every process editing this file takes (blocking until it is free)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # read-only is enough for flock; 0644: whoever may edit the keys may take it
        fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def _edit(self, change: Callable[[], T]) -> T:
        """Run ``change`` (read, modify, write) holding this process's lock and the file
        lock.  It runs in a thread: waiting for another process does not stall the hub,
        and a cancelled caller cannot leave the file lock taken (the thread finishes)."""

        def locked() -> T:
            with self._file_lock():
                return change()

        async with self._lock:
            return await asyncio.to_thread(locked)

    def _read(self) -> list[str]:
        try:
            return [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:
            return []

    def _write(self, lines: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tunnel-keys.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(ln + "\n" for ln in lines))
            os.chmod(tmp, 0o644)  # public keys only; sshd wants it not group/world-writable
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise

    def entries(self) -> list[Entry]:
        out = []
        for ln in self._read():
            m = _LINE.search(ln)
            if m:
                exp = calendar.timegm(time.strptime(m["exp"], "%Y%m%d%H%M%S"))
                out.append(Entry(m["spawn"], int(m["port"]), exp))
        return out

    async def grant(self, spawn_id: str, lifetime: float) -> TunnelGrant:
        """A fresh key allowed to listen on a newly allocated port for ``lifetime`` s."""
        if not _SPAWN_ID.match(spawn_id):
            raise v.InvalidValue("spawn id", f"{spawn_id!r}")
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"xsedehub:{spawn_id}")
        expires = time.time() + lifetime
        exp = time.strftime("%Y%m%d%H%M%S", time.gmtime(expires))
        pub = key.export_public_key("openssh").decode().strip().split()[:2]

        def add() -> int:
            lines = [ln for ln in self._read() if not ln.endswith(f" xsedehub:{spawn_id}")]
            now = time.time()
            used = {e.port for e in self.entries() if e.expires > now and e.spawn_id != spawn_id}
            used |= self._held(now)
            lo, hi = self.port_range
            port = next((p for p in range(lo, hi + 1) if p not in used and port_free(p)), None)
            if port is None:
                raise RuntimeError(f"no free hub-side tunnel port in {lo}-{hi}")
            opts = (
                f'restrict,port-forwarding,permitlisten="127.0.0.1:{port}",'
                f'permitopen="{self.api}",expiry-time="{exp}Z",command="/bin/false"'
            )
            # drop lines of expired keys while we are at it
            lines = [ln for ln in lines if not self._expired(ln, now)]
            lines.append(f"{opts} {pub[0]} {pub[1]} xsedehub:{spawn_id}")
            self._write(lines)
            return port

        port = await self._edit(add)
        return TunnelGrant(spawn_id, port, key.export_private_key("openssh").decode(), expires)

    def _held(self, now: float) -> set[int]:
        """Ports of revoked keys that would not have expired yet."""
        out = set()
        for ln in self._read():
            m = _HELD.match(ln)
            if m and calendar.timegm(time.strptime(m["exp"], "%Y%m%d%H%M%S")) > now:
                out.add(int(m["port"]))
        return out

    @staticmethod
    def _expired(line: str, now: float) -> bool:
        """A key line past its expiry, or a held port's comment past its hold."""
        m = _LINE.search(line) or _HELD.match(line)
        if not m:
            return False
        exp = calendar.timegm(time.strptime(m["exp"], "%Y%m%d%H%M%S"))
        return exp <= now

    async def revoke(self, spawn_id: str, *, hold: bool = True) -> bool:
        """Remove the spawn's key (True if it had one).  Its port stays held until the key
        would have expired (see the module's text), unless ``hold`` is false: no job was
        ever submitted with the key, so nothing can have logged in with it."""

        def remove() -> bool:
            keep, held, removed = [], [], False
            for ln in self._read():
                if not ln.endswith(f" xsedehub:{spawn_id}"):
                    keep.append(ln)
                    continue
                removed = True
                m = _LINE.search(ln)
                if hold and m:
                    held.append(
                        f"# xsedehub: port {m['port']} held until {m['exp']}Z (revoked: {spawn_id})"
                    )
            if removed:
                self._write(keep + held)
            return removed

        return await self._edit(remove)

    async def retain(self, spawn_ids: set[str]) -> list[str]:
        """Remove every line of a hub spawn (``u<user id>-<12 hex>``) whose id is not in
        ``spawn_ids`` (hub start-up); other lines (``xsedehub check``'s) are left alone."""

        def prune() -> list[str]:
            keep, gone = [], []
            for ln in self._read():
                m = _LINE.search(ln)
                if m and SPAWN_ID_FORMAT.match(m["spawn"]) and m["spawn"] not in spawn_ids:
                    gone.append(m["spawn"])
                else:
                    keep.append(ln)
            if gone:
                self._write(keep)
            return gone

        return await self._edit(prune)
