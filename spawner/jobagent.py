"""The job agent: what a batch job runs beside the single-user server, for its whole life.

Standard library only, Python 3.8 or newer.  The job script (``templates/job.sh.j2``)
carries this module's text and hands it to the job's own ``python3`` on standard input,
so the job environment needs nothing of xsedehub's.  The script talks to it over two
pipes: the agent's standard output (its reports, one line each) and a control channel
(``--ctl-fd``) on which the script names the server's process and which it closes when
the job ends.

What it does, and why:

* **It holds the node's end of the hub API forward.**  Before anything else it binds
  ``127.0.0.1:0`` (no ``SO_REUSEADDR``, no ``SO_REUSEPORT``) and keeps that socket
  until the job ends; the server's ``JUPYTERHUB_API_URL`` points at it.  Each
  connection is relayed to ``<job dir>/hubapi.sock``, the unix socket of
  ``ssh -L`` (``0600``, in the ``0700`` job directory).  The port is never free while
  the server may use it: not at the start, not while ssh reconnects, not while the job
  ends.  So no other account on the node can bind it and receive the server's requests
  (they carry its API token and users' OAuth tokens).  While the forward is down, a
  connection waits for it (up to :data:`HOLD_SECONDS`) instead of failing.
* **It reports without a race.**  ``port N`` once the socket listens; then
  ``forward-open`` once ssh's socket answers, or ``forward-failed`` if it did not within
  ``--api-timeout`` seconds (ssh's own messages, in the job's log, say why).
* **It keeps one SSH connection open** as the tunnel account, reopened with backoff
  whenever it drops.  It carries both forwards: the hub API forward, and the reverse
  tunnel from the hub's port to the server's socket.  It opens at the job's start, while
  the server starts, so its handshake does not delay the server being seen by the hub.
  It opens with the API forward only, as a control master; the reverse forward is added
  on it once the server listens, and again on each connection that replaces it: a
  request on the open connection, through its control socket, in OpenSSH's control
  protocol (what ``ssh -O forward`` sends, without starting it).  A forward the hub's
  sshd refuses is asked for again with backoff; the API forward never waits for it.
  Until then the hub's port refuses connections on the hub itself, so the hub's checks
  while the server starts cost the node and the hub's sshd nothing.  Readiness is
  checked in this process (a ``connect()`` on a unix socket, woken by inotify), never
  by starting a process.
* **It ends cleanly**: when the control channel closes (the script ended, or died), or on
  SIGTERM when there is no control channel.  In that order: the secret files go, the
  server is ended if it still runs, then the ssh children, and only then the port.  On
  SIGTERM it removes the secret files at once and stops reopening connections.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the job's agent (not the hub, not a test importing this)
    # it speaks no TLS: asyncio imports ssl only to offer it, and OpenSSL's start-up
    # would add 1.3 MB to every job (an import of a module set to None fails, and
    # asyncio goes on without it, as on a Python built without ssl)
    sys.modules.setdefault("ssl", None)  # type: ignore[assignment]

import argparse
import asyncio
import os
import random
import signal
import socket
import struct
import time
from collections.abc import Callable

#: files of the job directory that hold secrets: removed on every way out
SECRET_FILES = ("env", "tunnel_key")
API_SOCKET = "hubapi.sock"
SERVER_SOCKET = "server.sock"
#: the reverse tunnel's control socket (ssh binds it at this path plus 17 characters)
CONTROL_SOCKET = "tunnel.ctl"
CONTROL_SUFFIX = 17
#: how long a connection to the hub API port waits for the forward to (re)open
HOLD_SECONDS = 30.0
#: connections relayed at once, at most: any account on the node can connect to the port,
#: and each connection holds two descriptors; past this a new one is closed at once
#: (JupyterHub's own traffic from one server is a handful of connections)
MAX_CLIENTS = 256
#: reopening a dropped connection: first delay, doubled after each quick failure, capped
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0
#: a connection that stayed up this long starts the backoff afresh when it drops
STABLE_SECONDS = 30.0
#: in-process readiness checks (a connect() on a unix socket costs microseconds)
CHECK_INTERVAL = 0.05
#: a wait on a folder watch looks again after this long even if nothing was created
#: (to see whether it should go on waiting)
WATCH_FALLBACK = 1.0
#: how long the server and ssh get to end on SIGTERM before SIGKILL
SERVER_GRACE = 15.0
SSH_GRACE = 3.0
#: how long the open connection gets to add the forward (the hub's sshd answering)
ADD_FORWARD_TIMEOUT = 30.0
#: OpenSSH's control protocol (PROTOCOL.mux in OpenSSH's sources), version 4: what
#: ``ssh -O forward`` sends, spoken here without starting a process for it
MUX_VERSION = 4
MUX_MSG_HELLO = 0x00000001
MUX_C_OPEN_FWD = 0x10000006
MUX_S_OK = 0x80000001
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_REMOTE_PORT = 0x80000007
MUX_FWD_REMOTE = 2
MUX_PORT_STREAMLOCAL = 0xFFFFFFFE  # (unsigned) -2: the connect host is a unix socket path
MUX_MAX_PACKET = 256 * 1024  # the master's own bound on a packet
MUX_REQUEST_ID = 0  # as ssh -O numbers its first request
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def log(message: str) -> None:
    """One line in the job's log, in the job script's format with milliseconds (what
    the agent does between the server listening and the hub's port leading to it takes
    fractions of a second: benchmarks/burst.py's job logs split it)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    try:
        sys.stderr.write(f"{stamp} [xsedehub] {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="xsedehub-jobagent", description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="the job directory (absolute)")
    p.add_argument("--ssh-target", required=True, help="tunnel user@host")
    p.add_argument("--ssh-port", type=int, default=22)
    p.add_argument("--api-host", required=True, help="the hub API, as the hub's sshd sees it")
    p.add_argument("--api-port", type=int, required=True)
    p.add_argument("--hub-port", type=int, required=True, help="the hub-side port of the tunnel")
    p.add_argument("--api-timeout", type=float, default=120.0)
    p.add_argument("--ctl-fd", type=int, default=None, help="the script's control channel")
    p.add_argument("--ssh", default="ssh", help="the OpenSSH client")
    return p.parse_args(argv)


def ssh_argv(opts: argparse.Namespace, *forward: str) -> list[str]:
    """One ssh connection as the tunnel account: host key checked against the job's
    known_hosts only, the job's own key only, no shell, exit when a forward fails."""
    d = opts.dir
    return [
        opts.ssh,
        "-N",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={d}/known_hosts",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "StreamLocalBindUnlink=yes",
        "-o",
        "StreamLocalBindMask=0177",
        "-i",
        f"{d}/tunnel_key",
        "-p",
        str(opts.ssh_port),
        *forward,
        opts.ssh_target,
    ]


def api_spec(opts: argparse.Namespace) -> str:
    """``<job dir>/hubapi.sock:<hub API>``: the hub API forward listens on a unix socket."""
    host = f"[{opts.api_host}]" if ":" in opts.api_host else opts.api_host
    return f"{opts.dir}/{API_SOCKET}:{host}:{opts.api_port}"


def reverse_spec(opts: argparse.Namespace) -> str:
    """``127.0.0.1:<hub port>:<job dir>/server.sock``: the hub's port to the server."""
    return f"127.0.0.1:{opts.hub_port}:{opts.dir}/{SERVER_SOCKET}"


def control_path(opts: argparse.Namespace) -> str:
    return os.path.join(opts.dir, CONTROL_SOCKET)


def tunnel_argv(opts: argparse.Namespace, *, late: bool) -> list[str]:
    """The job's one SSH connection.  With ``late``: ``ssh -L <api_spec>`` as a control
    master (its socket in the job directory), the API forward only; :func:`add_forward`
    adds the reverse forward once the server listens.  Without: ``ssh -L <api_spec>
    -R <reverse_spec>``, both at once."""
    if late:
        mux = ("-o", "ControlMaster=yes", "-o", f"ControlPath={control_path(opts)}")
        return ssh_argv(opts, *mux, "-L", api_spec(opts))
    return ssh_argv(opts, "-L", api_spec(opts), "-R", reverse_spec(opts))


def _mux_u32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def _mux_string(text: str) -> bytes:
    data = os.fsencode(text)
    return _mux_u32(len(data)) + data


def mux_packet(kind: int, body: bytes) -> bytes:
    """One control-protocol packet: its length, its type, its body."""
    return _mux_u32(4 + len(body), kind) + body


def open_forward_request(opts: argparse.Namespace) -> bytes:
    """The hello and ``MUX_C_OPEN_FWD`` for ``-R <reverse_spec>``, byte for byte what
    ``ssh -O forward -R 127.0.0.1:<hub port>:<job dir>/server.sock`` sends."""
    forward = (
        _mux_u32(MUX_REQUEST_ID, MUX_FWD_REMOTE)
        + _mux_string("127.0.0.1")
        + _mux_u32(opts.hub_port)
        + _mux_string(f"{opts.dir}/{SERVER_SOCKET}")
        + _mux_u32(MUX_PORT_STREAMLOCAL)
    )
    return mux_packet(MUX_MSG_HELLO, _mux_u32(MUX_VERSION)) + mux_packet(MUX_C_OPEN_FWD, forward)


async def _mux_read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    if not 4 <= length <= MUX_MAX_PACKET:
        raise ValueError(f"a packet of {length} bytes")
    data = await reader.readexactly(length)
    return struct.unpack(">I", data[:4])[0], data[4:]


def _mux_reason(body: bytes) -> str:
    """The reason of a ``MUX_S_FAILURE`` or ``MUX_S_PERMISSION_DENIED`` (after its
    request id), printable."""
    (length,) = struct.unpack(">I", body[4:8])
    reason = body[8 : 8 + length].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in reason)[:200]


async def add_forward(
    opts: argparse.Namespace, timeout: float, wanted: Callable[[], bool] = lambda: True
) -> str | None:
    """Add the reverse forward to the open connection through its control socket, as
    ``ssh -O forward`` does, but in this process: a request on the connection (no new
    connection, no handshake, no process to start while the node is busiest).  The
    master answers once the hub's sshd has bound the port.  None when it is added (or
    was already there), else why not.  ``wanted`` is asked last, just before the
    request goes (the job may have begun to end while the socket opened)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(control_path(opts)), timeout
        )
    except (OSError, asyncio.TimeoutError) as e:  # noqa: UP041 (not the same class before 3.11)
        return f"cannot reach the connection's control socket: {e}"
    try:
        if not wanted():
            return "the job is ending"
        writer.write(open_forward_request(opts))
        kind, body = await asyncio.wait_for(_mux_read(reader), timeout)
        if kind != MUX_MSG_HELLO or body[:4] != _mux_u32(MUX_VERSION):
            return "the control socket does not speak version 4 of ssh's control protocol"
        kind, body = await asyncio.wait_for(_mux_read(reader), timeout)
        if body[:4] != _mux_u32(MUX_REQUEST_ID):
            return "an answer to another request"
        if kind in (MUX_S_OK, MUX_S_REMOTE_PORT):
            return None
        if kind in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
            return _mux_reason(body)
        return f"an unexpected answer ({kind:#x})"
    except asyncio.TimeoutError:  # noqa: UP041 (not the same class before Python 3.11)
        return f"no answer within {timeout:g} s"
    except (OSError, EOFError, ValueError, struct.error) as e:
        return f"the control connection failed: {e!r}"
    finally:
        writer.close()


def remove_secrets(job_dir: str) -> None:
    for name in SECRET_FILES:
        try:
            os.unlink(os.path.join(job_dir, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            log(f"could not remove {name}: {e}")


def accepts(path: str) -> bool:
    """Something listens on the unix socket ``path`` (a few microseconds: no process,
    no wait; a missing file is not even a socket call)."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except BlockingIOError:  # listening, its backlog full
        return True
    except OSError:
        return False
    finally:
        s.close()
    return True


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``event`` is set meanwhile."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([waiter], timeout=seconds)
    finally:
        waiter.cancel()


IN_MOVED_TO, IN_CREATE = 0x80, 0x100
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
#: what a folder watch reports: a name created or moved in, in a folder that is no link
WATCHED = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW


class Created:
    """Wakes its waiters when a file is created in a watched folder (Linux's inotify,
    through ctypes), so that waiting for a socket to appear costs nothing until it does."""

    def __init__(self, libc, fd: int) -> None:
        self.libc, self.fd = libc, fd
        self.root = ""  # the first folder watched (the job directory)
        self.folders: set[str] = set()
        self.event = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._readable)

    @classmethod
    def watch(cls, directory: str) -> Created | None:
        """A watch on ``directory``, or None where inotify is not to be had."""
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except Exception:  # no ctypes, no libc, not Linux: look every CHECK_INTERVAL
            return None
        if fd < 0:
            return None
        created = cls(libc, fd)
        created.root = os.path.abspath(directory)
        if not created.add(directory):
            created.close()
            return None
        return created

    def add(self, folder: str) -> bool:
        """Watch ``folder`` too (True if it is watched; a link is not followed)."""
        folder = os.path.abspath(folder)
        if folder not in self.folders:
            if self.libc.inotify_add_watch(self.fd, os.fsencode(folder), WATCHED) < 0:
                return False
            self.folders.add(folder)
        return True

    def covers(self, path: str) -> bool:
        """Whether this watch sees ``path`` appear, adding a watch on the folder where
        it will.  ``path`` may be a link (the sandbox's socket: the job script links
        ``server.sock`` to a socket in the sandbox's own folder): its target's folder is
        read from the link itself, one level, and watched only if it is inside the job
        directory (the attendee owns what is in that folder: nothing there is followed)."""
        target = path
        if os.path.islink(path):
            target = os.path.join(os.path.dirname(path), os.readlink(path))
        folder = os.path.dirname(os.path.normpath(target))
        if folder != self.root and not folder.startswith(self.root + os.sep):
            return False
        return self.add(folder)

    def _readable(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except OSError:  # drained (EAGAIN)
            pass
        self.event.set()

    async def wait(self, timeout: float) -> None:
        await _sleep_or(self.event, timeout)
        self.event.clear()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


async def wait_accepting(path: str, created: Created | None, waiting) -> bool:
    """Wait, in this process, until the unix socket ``path`` accepts connections (True),
    or ``waiting()`` turns false (False, looked at least once a second).  Until the
    socket exists, a folder watch wakes this up when it is created (in the sandbox,
    ``path`` is a link to a socket in another folder: that folder is watched too); a
    socket that exists but does not accept yet (bound, not listening; or a stale one) is
    looked at every :data:`CHECK_INTERVAL`."""
    while waiting():
        if accepts(path):
            return True
        if created is not None and not os.path.exists(path) and created.covers(path):  # noqa: ASYNC240 (one stat)
            await created.wait(WATCH_FALLBACK)
        else:
            await asyncio.sleep(CHECK_INTERVAL)
    return False


def _find_prctl():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:  # not Linux, or no ctypes: children are still ended by stop()
        return None


_PRCTL = _find_prctl()


def _die_with_parent() -> None:
    """In an ssh child, before exec: SIGTERM when the agent dies (even by SIGKILL)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Connection:
    """One ssh process, reopened with backoff whenever it ends, until :meth:`stop`.

    ``ready``, if given, is a unix socket that answers once the connection is usable:
    :attr:`opened` is set the first time it does.  ``ready`` and ``sockets`` (the
    connection's other sockets: its control socket) are removed before each start: a
    socket the last process left would pass for this one's, and ssh does not replace a
    control socket that exists.  :attr:`live` is set while the running
    process is usable, :attr:`down` once it has ended (until the next one is usable)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready: str | None = None,
        created: Created | None = None,
        sockets: tuple[str, ...] = (),
    ) -> None:
        self.name, self.argv, self.ready, self.created = name, argv, ready, created
        self.sockets = (ready, *sockets) if ready else sockets
        self.proc: asyncio.subprocess.Process | None = None
        self.opened = asyncio.Event()
        self.live = asyncio.Event()
        self.down = asyncio.Event()
        self.reopen = True  # cleared on SIGTERM: the key is gone, do not try again
        self.starts = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Future | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _spawn(self, argv: list[str]) -> asyncio.subprocess.Process | None:
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),  # ssh's messages go to the job's log
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            log(f"{self.name}: cannot run {argv[0]}: {e}")
            return None

    async def _watch_ready(self, proc: asyncio.subprocess.Process) -> None:
        if self.ready and await wait_accepting(
            self.ready, self.created, lambda: proc.returncode is None
        ):
            if self.opened.is_set():
                log(f"{self.name} open again")
            self.down.clear()
            self.live.set()
            self.opened.set()

    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stopping.is_set():
            if self.starts and not self.reopen:  # SIGTERM came during the pause
                return
            began = time.monotonic()
            self.starts += 1
            for path in self.sockets:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self.proc = proc = await self._spawn(list(self.argv))
            rc = None
            if proc is not None:
                if self._stopping.is_set():  # stop() came while ssh was starting
                    await _end(proc, SSH_GRACE)
                    return
                watch = asyncio.ensure_future(self._watch_ready(proc)) if self.ready else None
                rc = await proc.wait()
                self.live.clear()
                self.down.set()
                if watch is not None:
                    watch.cancel()
            if self._stopping.is_set():
                return
            if not self.reopen:
                log(f"{self.name} closed ({rc}); the job is ending, not reopening")
                return
            if time.monotonic() - began >= STABLE_SECONDS:
                delay = BACKOFF_FIRST
            pause = delay * random.uniform(0.8, 1.2)  # noqa: S311 (jitter)
            log(f"{self.name} closed ({rc}); reopening in {pause:.1f} s")
            await _sleep_or(self._stopping, pause)
            delay = min(delay * 2, BACKOFF_MAX)

    async def stop(self) -> None:
        """End the ssh process (SIGTERM, then SIGKILL) and reopen it no more."""
        self._stopping.set()
        if self.proc is not None:
            await _end(self.proc, SSH_GRACE)
        if self._task is not None:
            await asyncio.wait([self._task])


async def _end(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is not None:
        return
    try:
        proc.terminate()
    except ProcessLookupError:
        return
    waiter = asyncio.ensure_future(proc.wait())
    done, _ = await asyncio.wait([waiter], timeout=grace)
    if not done:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await waiter


class Process:
    """Another process (the server, started by the script), named by pid and start time
    so that a reused pid is never mistaken for it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self._start_time()

    def _start_time(self) -> str | None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return None if fields[0] in ("Z", "X") else fields[19]  # field 22: starttime

    def alive(self) -> bool:
        if self.start is None:
            return False
        return self._start_time() == self.start

    async def end(self, grace: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not self.alive():
                return
            try:
                os.kill(self.pid, sig)
            except OSError:
                return
            deadline = time.monotonic() + wait
            # not our child: its end is no event here, so look (in this process)
            while self.alive() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)


class Agent:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.api_path = os.path.join(opts.dir, API_SOCKET)
        self.server_path = os.path.join(opts.dir, SERVER_SOCKET)
        # the connection opens at the start with the API forward only, and the reverse
        # forward is added when the server listens: until then the hub's port refuses at
        # once, on the hub, and a check the hub makes costs nothing here (where ssh's
        # control socket cannot be made, the path being too long, it forwards from the
        # start)
        self.ctl_path = control_path(opts)
        self.late_forward = len(os.fsencode(self.ctl_path)) + CONTROL_SUFFIX <= UNIX_PATH_MAX
        self.tunnel = Connection(
            f"tunnel to the hub (API, port {opts.hub_port})",
            tunnel_argv(opts, late=self.late_forward),
            ready=self.api_path,
            sockets=(self.ctl_path,) if self.late_forward else (),
        )
        self.server: Process | None = None
        self.created: Created | None = None
        self.ending = False
        self.finished = asyncio.Event()
        self.listener: socket.socket | None = None
        self.port = 0
        self._relay: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._relays = 0  # connections being relayed (or waiting for the forward)
        self._tasks: set[asyncio.Future] = set()

    # ------------------------------------------------------------------ the port
    def bind(self) -> int:
        """Bind and listen on 127.0.0.1:0, once, for the job's whole life."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        s.setblocking(False)
        self.listener, self.port = s, s.getsockname()[1]
        return self.port

    async def serve(self) -> None:
        self._relay = await asyncio.start_server(self._client, sock=self.listener)

    async def _upstream(self):
        """A connection to the forward's socket; while the forward is down, wait for it
        (up to :data:`HOLD_SECONDS`); None if it did not come back."""
        deadline = time.monotonic() + HOLD_SECONDS
        while True:
            try:
                return await asyncio.open_unix_connection(self.api_path)
            except OSError:
                pass
            if not await wait_accepting(
                self.api_path,
                self.created,
                lambda: not self.ending and time.monotonic() < deadline,
            ):
                return None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._relays >= MAX_CLIENTS:
            writer.close()
            return
        self._relays += 1
        self._clients.add(writer)
        up_writer = None
        try:
            up = await self._upstream()
            if up is None:
                return
            up_reader, up_writer = up
            self._clients.add(up_writer)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._relays -= 1
            for w in (writer, up_writer):
                if w is not None:
                    self._clients.discard(w)
                    w.close()

    # ------------------------------------------------------------------ the server
    def server_started(self, pid: int) -> None:
        if self.server is None:
            self.server = Process(pid)
            self._tasks.add(asyncio.ensure_future(self._log_when_listening()))

    async def _log_when_listening(self) -> None:
        """One line in the job's log when the server first answers on its socket; then
        the hub's port is made to lead to it."""
        server = self.server
        if await wait_accepting(
            self.server_path, self.created, lambda: not self.ending and server.alive()
        ):
            log("server listening on its socket")
            await self.keep_reverse_forward()

    def forward_wanted(self) -> bool:
        """Whether the hub's port may lead to the server: not once the job is ending
        (SIGTERM: its key may be revoked and its port given to another spawn, whose user
        the forward would lead to this server)."""
        return not self.ending and self.tunnel.reopen and not self.finished.is_set()

    async def keep_reverse_forward(self) -> None:
        """The server listens: from now on the hub's port leads to it, on the open
        connection and on each one that replaces it, through its control socket.  The
        connection's own argv never asks for it, so a forward the hub's sshd refuses
        (ExitOnForwardFailure) cannot take the API forward down with it: it is asked for
        again, with backoff, on the same connection."""
        if not self.late_forward:  # the forward came with the connection
            return
        delay, added = BACKOFF_FIRST, False
        while self.forward_wanted():
            await _first(self.tunnel.live, self.finished)
            if not self.forward_wanted():
                return
            deadline = time.monotonic() + ADD_FORWARD_TIMEOUT
            if await wait_accepting(
                self.ctl_path,
                self.created,
                lambda deadline=deadline: (
                    self.forward_wanted()
                    and self.tunnel.live.is_set()
                    and time.monotonic() < deadline
                ),
            ):
                why = await add_forward(self.opts, ADD_FORWARD_TIMEOUT, self.forward_wanted)
            else:
                why = f"its control socket did not answer within {ADD_FORWARD_TIMEOUT:g} s"
            if why is None:
                word = "again" if added else "now"
                log(f"hub port {self.opts.hub_port} {word} leads to the server")
                delay, added = BACKOFF_FIRST, True
                await _first(self.tunnel.down, self.finished)  # then on the next connection
                continue
            if not self.forward_wanted() or not self.tunnel.live.is_set():
                continue  # ending, or it dropped meanwhile: on the next connection
            pause = delay * random.uniform(0.8, 1.2)  # noqa: S311 (jitter)
            log(f"could not add the forward to the open tunnel ({why}); again in {pause:.1f} s")
            await _sleep_or(self.finished, pause)
            delay = min(delay * 2, BACKOFF_MAX)

    # ------------------------------------------------------------------ control
    async def control(self, fd: int) -> None:
        """Read the script's lines (``server PID``) until it closes the channel."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        while True:
            line = await reader.readline()
            if not line:
                break
            words = line.decode("ascii", "replace").split()
            if len(words) == 2 and words[0] == "server" and words[1].isdigit():
                self.server_started(int(words[1]))
        self.finished.set()

    def on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT/SIGHUP: the job is ending.  Secrets go now and nothing is
        reopened; with a control channel, the script says when the rest may go."""
        if not self.ending:
            remove_secrets(self.opts.dir)
            self.tunnel.reopen = False
        if self.opts.ctl_fd is None:
            self.finished.set()

    # ------------------------------------------------------------------ life
    async def wait_forward(self) -> bool:
        opened = asyncio.ensure_future(self.opened_or_finished())
        await asyncio.wait([opened], timeout=self.opts.api_timeout)
        opened.cancel()
        return self.tunnel.opened.is_set()

    async def opened_or_finished(self) -> None:
        await _first(self.tunnel.opened, self.finished)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.on_signal, sig)
        for path in (self.api_path, self.server_path):
            if len(os.fsencode(path)) > UNIX_PATH_MAX:
                log(f"the job directory's path is too long for a unix socket: {path}")
                emit("failed")
                return 2
        self.created = self.tunnel.created = Created.watch(self.opts.dir)
        self.bind()
        await self.serve()
        emit(f"port {self.port}")
        if self.opts.ctl_fd is not None:
            self._tasks.add(asyncio.ensure_future(self.control(self.opts.ctl_fd)))
        # the connection opens while the server starts: it is ready before the server
        # listens, so no SSH handshake lies between the server listening and the hub
        # seeing it
        self.tunnel.start()
        if await self.wait_forward():
            log(f"hub API forwarded to local port {self.port} (held by the job agent)")
            emit("forward-open")
        elif not self.finished.is_set():
            log(
                f"the hub API forward did not open within {self.opts.api_timeout:g} s "
                "(ssh's messages above say why)"
            )
            await self.tunnel.stop()
            emit("forward-failed")
            if self.opts.ctl_fd is None:
                self.finished.set()
        await self.finished.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        """Secrets, then the server (if it still runs), then ssh, and the port last."""
        self.ending = True
        remove_secrets(self.opts.dir)
        if self.server is not None and self.server.alive():
            log("the job script is gone while the server runs: ending the server")
            await self.server.end(SERVER_GRACE)
        await self.tunnel.stop()
        if self._relay is not None:
            self._relay.close()
        for w in list(self._clients):
            w.close()
        if self.listener is not None:
            self.listener.close()
        for path in (self.api_path, self.server_path, control_path(self.opts)):
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.created is not None:
            self.created.close()
        log(f"job agent ended (ssh closed, port {self.port} released)")


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF, then pass the EOF on (HTTP keep-alive and
    half-closed connections behave as without the relay)."""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()


def emit(report: str) -> None:
    """A report to the job script, on standard output (ignored when it is gone)."""
    try:
        sys.stdout.write(report + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


async def run(opts: argparse.Namespace) -> int:
    # the agent is made inside the loop: Python 3.8 and 3.9 bind events to a loop when
    # they are made
    return await Agent(opts).run()


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    opts.dir = os.path.abspath(opts.dir)
    return asyncio.run(run(opts))


if __name__ == "__main__":
    sys.exit(main())
