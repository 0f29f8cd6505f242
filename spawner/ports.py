"""Which of the hub's loopback ports listen: one look for every starting server at once.

A starting server's hub port listens once the job's agent has added the reverse forward
(the hub's sshd binds it), and the agent adds it once the server listens on the node.
So a spawn waits for its port to listen.  Each spawn looking by itself (a ``connect()``
every 0.1 s) made the hub's work grow with the number of servers starting: 100 of them
made 1,000 looks a second, 37% of the samples in which the hub was busy during a burst
of 100 (py-spy), in the very seconds the servers arrive and JupyterHub has work to do
for each.

:class:`PortWatch` looks once for all of them: every :data:`LOOK_INTERVAL` seconds while
any spawn waits, one dump of the listening TCP sockets from the kernel (Linux's
``sock_diag`` netlink interface, what ``ss -tl`` reads: no connection is made, nothing
reaches sshd or the node), and wakes the spawns whose port is among them.  Where that
interface cannot be had, each waited-for port gets one ``connect()`` per look instead
(:func:`port_open`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import struct
import weakref

#: how often the watch looks while some spawn waits (a dump costs a fraction of a
#: millisecond, whatever the number of spawns)
LOOK_INTERVAL = 0.05
#: how long a connect() look waits (ms): on loopback the kernel accepts or refuses
#: within the call, so this only bounds a listener that does not accept
LOOK_WAIT_MS = 2
#: what a look costs (µs, measured on a 2-core VM): a dump, plus per listening socket in
#: it (1.1 ms with 1,000 servers running), against one connect() per waited-for port;
#: each look takes the cheaper (a few spawns beside many running servers: connects)
DUMP_COST_US, DUMP_COST_PER_SOCKET_US, CONNECT_COST_US = 40.0, 1.1, 25.0
#: while it looks with connect()s, a dump every so many looks (every 5 s) keeps the
#: count of listening sockets, on which that choice rests, up to date
REDUMP_EVERY = 100

log = logging.getLogger("JupyterHub").getChild("xsedehub.ports")

# netlink sock_diag (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h)
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
#: inet_diag_req_v2: family, protocol, extensions, pad, states; then a zeroed socket id
_REQUEST = struct.Struct("=BBBBI48x")
#: of inet_diag_msg: family, state, timer, retransmits, then the socket id's source
#: port (network order, as the address) and address (its first four bytes for IPv4)
_DIAG_MSG = struct.Struct(">BBBBH2x4s")
#: the addresses a connect() to 127.0.0.1 reaches
_LOOPBACK = (socket.inet_aton("127.0.0.1"), socket.inet_aton("0.0.0.0"))  # noqa: S104


class DiagUnavailable(OSError):
    """The kernel's socket dump cannot be had here (not Linux, or refused): not worth
    asking again in this process."""


#: errors of the netlink socket's creation that will not go away
_FOR_GOOD = {errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EPERM, errno.EACCES}


def listening_ports() -> set[int]:
    """The TCP ports that listen on 127.0.0.1 (or on every IPv4 address) in this network
    namespace, from one netlink dump: what an IPv4 ``connect()`` to 127.0.0.1 reaches,
    except a listener on IPv6's ``::`` (the tunnel's forward binds 127.0.0.1) and except
    that a listener whose accept queue is full still counts (JupyterHub's ``wait_up``
    retries).  :class:`DiagUnavailable` where there is no such dump; another
    :class:`OSError` for a failure that may pass (out of descriptors, no buffer)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except AttributeError as e:  # not Linux
        raise DiagUnavailable(f"no netlink here: {e}") from e
    except OSError as e:
        if e.errno in _FOR_GOOD:
            raise DiagUnavailable(f"no sock_diag netlink socket: {e}") from e
        raise
    with sock:
        sock.settimeout(1.0)  # the kernel answers a dump within the call: never waited on
        body = _REQUEST.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
        )
        sock.sendto(header + body, (0, 0))
        return read_dump(sock)


def read_dump(sock: socket.socket) -> set[int]:
    """The loopback ports in a sock_diag dump's answer, read from ``sock`` until its
    end (``NLMSG_DONE``), over as many datagrams as the kernel sends."""
    ports: set[int] = set()
    while True:
        data = sock.recv(65536)
        if not data:
            raise OSError("the socket dump ended early")
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                raise OSError("a malformed netlink message in the socket dump")
            if kind == NLMSG_DONE:
                return ports
            if kind == NLMSG_ERROR:
                if length < _NLMSGHDR.size + 4:
                    raise OSError("a truncated netlink error")
                (code,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                raise DiagUnavailable(f"the kernel refused the socket dump (errno {-code})")
            if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _DIAG_MSG.size:
                family, state, _t, _r, port, address = _DIAG_MSG.unpack_from(
                    data, offset + _NLMSGHDR.size
                )
                if family == socket.AF_INET and state == TCP_LISTEN and address in _LOOPBACK:
                    ports.add(port)
            offset += (length + 3) & ~3  # messages are 4-byte aligned


def port_open(port: int) -> bool:
    """Whether the hub's port on loopback accepts, by a non-blocking ``connect()``: the
    kernel accepts or refuses a loopback connect within the call, so this holds the event
    loop for tens of microseconds, and never more than :data:`LOOK_WAIT_MS` (a listener
    that accepts nothing, its queue full, is "not yet").  The look where the socket dump
    cannot be had."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            return False
        poller = select.poll()
        poller.register(s, select.POLLOUT)
        if not poller.poll(LOOK_WAIT_MS):
            return False
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


class PortWatch:
    """Wakes each spawn waiting for a port once it listens; one look per
    :data:`LOOK_INTERVAL` for all of them (:func:`listening_ports`, else a
    :func:`port_open` per port), and none while nobody waits."""

    def __init__(self, interval: float = LOOK_INTERVAL) -> None:
        self.interval = interval
        self.use_dump = True  # until the dump turns out not to be had: then connect()s
        self.listeners = 0  # how many sockets listened at the last dump
        self.looks = 0  # how many times it looked (for tests and curiosity)
        self._waiting: dict[int, list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, port: int, timeout: float) -> bool:
        """True once ``port`` listens, False if it did not within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.setdefault(port, []).append(waiter)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:  # woken in the same turn as the timeout: still a yes
            return waiter.done() and not waiter.cancelled()
        finally:
            others = self._waiting.get(port)
            if others is not None and waiter in others:
                others.remove(waiter)
                if not others:
                    del self._waiting[port]

    def _listening(self, ports: list[int]) -> set[int]:
        dump_cost = DUMP_COST_US + DUMP_COST_PER_SOCKET_US * self.listeners
        cheaper = len(ports) * CONNECT_COST_US >= dump_cost
        if self.use_dump and (cheaper or self.looks % REDUMP_EVERY == 1):
            try:
                found = listening_ports()
            except DiagUnavailable as e:
                log.info("Looking at starting servers' ports with connect(): %s", e)
                self.use_dump = False
            except OSError as e:  # it may pass: connect()s this time
                log.debug("The socket dump failed this time: %s", e)
            else:
                self.listeners = len(found)
                return found.intersection(ports)
        return {p for p in ports if port_open(p)}

    async def _run(self) -> None:
        try:
            while self._waiting:
                self.looks += 1
                try:
                    found = self._listening(list(self._waiting))
                except Exception:  # never leave the waiters without a watch: look again
                    log.exception("A look at the starting servers' ports failed")
                    found = set()
                for port in found:
                    for waiter in self._waiting.pop(port, []):
                        if not waiter.done():
                            waiter.set_result(None)
                await asyncio.sleep(self.interval)
        finally:
            self._task = None  # the finished task holds the loop: let it go


_WATCHES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PortWatch] = (
    weakref.WeakKeyDictionary()
)


def watch() -> PortWatch:
    """The running event loop's watch (the hub has one loop: one watch for all spawns)."""
    loop = asyncio.get_running_loop()
    found = _WATCHES.get(loop)
    if found is None:
        found = _WATCHES[loop] = PortWatch()
    return found
