"""spawner/ports.py: which of the hub's loopback ports listen, looked at once for every
starting server (no cluster: sockets on this machine's loopback)."""

from __future__ import annotations

import asyncio
import select
import socket
import struct

import pytest
from xsedehub.spawner import ports


def test_a_look_at_the_hub_port_says_whether_it_accepts_and_never_hangs(monkeypatch):
    """Refused (no forward yet): False; listening (the forward added): True; a listener
    whose backlog is full (the kernel drops the handshake): False, "not yet", after a
    wait of at most LOOK_WAIT_MS, never a hang of the hub's event loop."""
    waits = []
    real_poll = select.poll

    class Poll:  # select.poll, recording how long each look may wait
        def __init__(self) -> None:
            self.poll_ = real_poll()

        def register(self, fd, mask) -> None:
            self.poll_.register(fd, mask)

        def poll(self, timeout=None):
            waits.append(timeout)
            return self.poll_.poll(timeout)

    monkeypatch.setattr(ports.select, "poll", Poll)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert ports.port_open(port) is False  # bound, not listening: refused
        s.listen(0)
        assert ports.port_open(port) is True
        held = []
        try:
            while len(held) < 64:  # fill the accept queue: nothing accepts
                c = socket.socket()
                c.settimeout(0.2)
                if c.connect_ex(("127.0.0.1", port)) != 0:
                    c.close()
                    break
                held.append(c)
            assert len(held) < 64, "the accept queue never filled"
            assert ports.port_open(port) is False
        finally:
            for c in held:
                c.close()
    assert waits and all(w == ports.LOOK_WAIT_MS for w in waits), waits


def dump_or_skip() -> set[int]:
    try:
        return ports.listening_ports()
    except ports.DiagUnavailable as e:  # e.g. a sandbox kernel without sock_diag
        pytest.skip(f"no socket dump here: {e}")


def test_the_kernels_dump_lists_the_loopback_ports_that_listen_and_no_other():
    """A port bound but not listening is not in it; listening on 127.0.0.1 or on every
    address it is; listening on another loopback address (where a connect to 127.0.0.1
    would be refused) it is not; closed, it is gone."""
    with socket.socket() as s, socket.socket() as anyaddr, socket.socket() as other:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert port not in dump_or_skip()
        s.listen(1)
        anyaddr.bind(("0.0.0.0", 0))  # noqa: S104 (a test of what a loopback connect reaches)
        anyaddr.listen(1)
        other.bind(("127.0.0.2", 0))
        other.listen(1)
        found = ports.listening_ports()
        assert port in found
        assert anyaddr.getsockname()[1] in found
        assert other.getsockname()[1] not in found
        assert ports.port_open(other.getsockname()[1]) is False  # as a connect says
    assert port not in ports.listening_ports()


def test_a_dump_over_many_datagrams_is_read_to_its_end():
    dump_or_skip()
    held = []
    try:
        for _ in range(600):  # 72 bytes each in the dump: the kernel sends it in pieces
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        found = ports.listening_ports()
        assert {s.getsockname()[1] for s in held} <= found
    finally:
        for s in held:
            s.close()


class Datagrams:
    """A socket that hands out the given datagrams (what the kernel would answer)."""

    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)

    def recv(self, size: int) -> bytes:
        return self.datagrams.pop(0) if self.datagrams else b""


def message(kind: int, body: bytes) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body
    return raw + bytes(-len(raw) % 4)


def listener(port: int, address: str = "127.0.0.1", state: int = 10) -> bytes:
    # inet_diag_msg: family, state, timer, retransmits, the socket id, five u32
    sockid = struct.pack(">HH", port, 0) + socket.inet_aton(address) + bytes(12 + 16 + 12)
    return message(20, struct.pack("=BBBB", socket.AF_INET, state, 0, 0) + sockid + bytes(20))


DONE = message(3, struct.pack("=i", 0))


def test_a_dump_is_read_from_the_kernels_bytes():
    """Ports in network order, only listeners on loopback or every address, over
    several datagrams, until NLMSG_DONE; the kernel's error, a truncated or malformed
    message, or an answer cut short are errors, never a wrong set of ports."""
    first = listener(8000) + listener(8001, "0.0.0.0") + listener(8002, "10.0.0.1")  # noqa: S104
    second = listener(40000, state=1) + listener(65535) + DONE
    assert ports.read_dump(Datagrams(first, second)) == {8000, 8001, 65535}
    assert ports.read_dump(Datagrams(listener(5) + DONE + listener(6))) == {5}
    with pytest.raises(ports.DiagUnavailable, match="errno 13"):
        ports.read_dump(Datagrams(message(2, struct.pack("=i", -13))))
    with pytest.raises(OSError, match="truncated"):
        ports.read_dump(Datagrams(message(2, b"")))
    with pytest.raises(OSError, match="malformed"):
        ports.read_dump(Datagrams(struct.pack("=IHHII", 8, 20, 2, 1, 0)))
    with pytest.raises(OSError, match="malformed"):
        ports.read_dump(Datagrams(listener(7)[:40]))
    with pytest.raises(OSError, match="ended early"):
        ports.read_dump(Datagrams(listener(7)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_one_watch_wakes_every_spawn_whose_port_listens_and_stops_looking_when_none_waits():
    watch = ports.PortWatch(interval=0.01)
    a, b = free_port(), free_port()
    first = asyncio.ensure_future(watch.wait(a, 30))
    second = asyncio.ensure_future(watch.wait(a, 30))  # two waits for one port
    other = asyncio.ensure_future(watch.wait(b, 0.3))
    await asyncio.sleep(0.1)
    assert not first.done() and not second.done()
    with socket.socket() as s:
        s.bind(("127.0.0.1", a))
        s.listen(1)
        assert await asyncio.wait_for(first, 5) is True
        assert await asyncio.wait_for(second, 5) is True
    assert await asyncio.wait_for(other, 5) is False  # b never listened: its timeout
    assert watch._waiting == {}
    await asyncio.sleep(0.05)
    looks = watch.looks
    await asyncio.sleep(0.1)
    assert watch.looks == looks, "the watch went on looking with nobody waiting"


async def test_a_cancelled_wait_is_forgotten():
    watch = ports.PortWatch(interval=0.01)
    port = free_port()
    task = asyncio.ensure_future(watch.wait(port, 30))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watch._waiting == {}


async def test_many_waits_cost_one_dump_per_look_and_one_wait_a_connect(monkeypatch):
    """Fifty spawns waiting: each look is one dump, no connect() per spawn; one spawn
    waiting beside many listeners: a connect(), not a dump of them all."""
    calls = {"dump": 0, "connect": 0}
    real_dump, real_open = ports.listening_ports, ports.port_open

    def dump() -> set[int]:
        calls["dump"] += 1
        return real_dump()

    def connect(port: int) -> bool:
        calls["connect"] += 1
        return real_open(port)

    monkeypatch.setattr(ports, "listening_ports", dump)
    monkeypatch.setattr(ports, "port_open", connect)
    watch = ports.PortWatch(interval=0.01)
    waits = [asyncio.ensure_future(watch.wait(free_port(), 0.2)) for _ in range(50)]
    assert await asyncio.gather(*waits) == [False] * 50
    assert calls["dump"] >= 5 and calls["connect"] == 0, calls
    calls.update(dump=0, connect=0)
    watch.listeners = 1000  # as after a dump with 1,000 servers running
    assert await watch.wait(free_port(), 0.2) is False
    assert calls["dump"] == 0 and calls["connect"] >= 5, calls


async def test_without_the_kernels_dump_the_watch_looks_with_connect(monkeypatch):
    def refused() -> set[int]:
        raise ports.DiagUnavailable("not here")

    monkeypatch.setattr(ports, "listening_ports", refused)
    watch = ports.PortWatch(interval=0.01)
    a, b = free_port(), free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", a))
        s.listen(1)
        both = await asyncio.gather(watch.wait(a, 5), watch.wait(b, 0.2))
    assert both == [True, False]
    assert watch.use_dump is False


async def test_a_transient_failure_of_the_dump_keeps_the_dump_and_a_broken_look_the_watch(
    monkeypatch,
):
    """Out of descriptors for one look: that look uses connect()s, the next dumps again;
    a look that fails outright is logged and the watch goes on looking."""
    calls = []
    real = ports.listening_ports

    def flaky() -> set[int]:
        calls.append(len(calls))
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        if len(calls) == 2:
            raise RuntimeError("a bug")
        return real()

    monkeypatch.setattr(ports, "listening_ports", flaky)
    watch = ports.PortWatch(interval=0.01)
    ports_ = [free_port() for _ in range(5)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports_[0]))
        s.listen(1)
        woken = await asyncio.gather(*(watch.wait(p, 0.3) for p in ports_))
    assert woken == [True, False, False, False, False]
    assert watch.use_dump is True and len(calls) >= 3, calls


async def test_each_event_loop_has_its_own_watch():
    mine = ports.watch()
    assert ports.watch() is mine
    theirs = await asyncio.to_thread(asyncio.run, _watch_of_a_new_loop())
    assert theirs is not mine


async def _watch_of_a_new_loop() -> ports.PortWatch:
    return ports.watch()
