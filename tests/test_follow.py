"""spawner/follow.py's look at a starting server's hub port, by itself."""

from __future__ import annotations

import select
import socket

from xsedehub.spawner import follow


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

    monkeypatch.setattr(follow.select, "poll", Poll)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert follow.port_open(port) is False  # bound, not listening: refused
        s.listen(0)
        assert follow.port_open(port) is True
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
            assert follow.port_open(port) is False
        finally:
            for c in held:
                c.close()
    assert waits and all(w == follow.LOOK_WAIT_MS for w in waits), waits
