"""The job agent (spawner/jobagent.py) by itself, on this machine: the port it holds, the
relay, the supervision of its children, its ways out.  The real thing (real ssh, real
SLURM, another account on the node) is in test_jobside.py and test_faults.py."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from xsedehub.spawner import jobagent

SOURCE = Path(jobagent.__file__).read_text()


def opts_for(tmp_path: Path, *extra: str):
    return jobagent.parse_args(
        [
            *("--dir", str(tmp_path), "--ssh-target", "tunnelbot@127.0.0.1"),
            *("--api-host", "127.0.0.1", "--api-port", "8081", "--hub-port", "20001"),
            *extra,
        ]
    )


def test_the_agent_is_python_38_and_standard_library_only():
    tree = ast.parse(SOURCE, feature_version=(3, 8))
    modules = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules - {"__future__"} <= sys.stdlib_module_names, modules


def intruder_binds(port: int) -> list[str]:
    """Every way another socket could take ``port``; the ones that worked."""
    took = []
    for addr in ("127.0.0.1", "0.0.0.0"):  # noqa: S104 (what an intruder would try)
        for opts in ((), (socket.SO_REUSEADDR,), (socket.SO_REUSEPORT,)):
            s = socket.socket()
            try:
                for o in opts:
                    s.setsockopt(socket.SOL_SOCKET, o, 1)
                s.bind((addr, port))
                s.listen()
                took.append(f"{addr} {opts}")
            except OSError:
                pass
            finally:
                s.close()
    return took


async def ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    writer.write_eof()  # a half-closed request: the answer must still come back
    answer = await reader.read()
    writer.close()
    return answer


async def test_the_port_is_held_and_relayed_across_a_dropped_forward(tmp_path):
    agent = jobagent.Agent(opts_for(tmp_path))
    port = agent.bind()
    await agent.serve()
    assert intruder_binds(port) == []

    async def hub_api(reader, writer):  # stands where ssh's -L socket would be
        data = await reader.read()
        writer.write(b"HTTP/1.0 200 OK\r\n\r\ngot " + data)
        await writer.drain()
        writer.close()

    sock = str(tmp_path / "hubapi.sock")
    # a request before the forward is up waits for it, then goes through
    early = asyncio.ensure_future(ask(port, b"GET /early"))
    await asyncio.sleep(0.3)
    assert not early.done()
    up = await asyncio.start_unix_server(hub_api, sock)
    assert (await early).endswith(b"got GET /early")
    assert (await ask(port, b"x" * 200_000)).endswith(b"got " + b"x" * 200_000)
    # the forward drops: the port stays held, a request waits, then goes through
    up.close()
    await up.wait_closed()
    os.unlink(sock)
    held = asyncio.ensure_future(ask(port, b"GET /during-the-drop"))
    assert intruder_binds(port) == []
    await asyncio.sleep(0.3)
    assert not held.done()
    up = await asyncio.start_unix_server(hub_api, sock)
    assert (await held).endswith(b"got GET /during-the-drop")
    await agent.shutdown()
    up.close()
    # the port is released only by the agent's own end
    assert intruder_binds(port) != []


async def test_a_dropped_connection_is_reopened_until_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(jobagent, "BACKOFF_FIRST", 0.01)
    quick = jobagent.Connection("quick", [sys.executable, "-c", "pass"])
    quick.start()
    while quick.starts < 3:  # noqa: ASYNC110 (a count, not an event)
        await asyncio.sleep(0.05)
    await quick.stop()
    starts = quick.starts
    await asyncio.sleep(0.2)
    assert quick.starts == starts

    # ready once its socket answers; stop() ends the child
    sock = tmp_path / "ready.sock"
    listen = (
        "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
        "s.bind(sys.argv[1]); s.listen(); time.sleep(60)"
    )
    slow = jobagent.Connection("slow", [sys.executable, "-c", listen, str(sock)], ready=str(sock))
    slow.start()
    await asyncio.wait_for(slow.opened.wait(), 30)
    proc = slow.proc
    await slow.stop()
    assert proc.returncode == -signal.SIGTERM

    # after SIGTERM (reopen cleared) a connection that drops stays closed
    once = jobagent.Connection("once", [sys.executable, "-c", "pass"])
    once.reopen = False
    once.start()
    await asyncio.wait_for(once._task, 30)
    assert once.starts == 1


async def test_a_process_is_known_by_pid_and_start_time():
    child = subprocess.Popen(["sleep", "30"])
    p = jobagent.Process(child.pid)
    assert p.alive()
    other = jobagent.Process(child.pid)
    other.start = "1"  # the same pid, another process (a reused pid)
    assert not other.alive()
    await p.end(grace=5)
    assert child.wait(5) == -signal.SIGTERM
    assert not p.alive()


def run_agent(tmp_path: Path, *extra: str, ctl: bool = True):
    """The agent as the job script runs it: its text on standard input of ``python3 -I -``."""
    for name in ("env", "tunnel_key"):
        (tmp_path / name).write_text("secret\n")
    r, w = os.pipe() if ctl else (None, None)
    argv = [sys.executable, "-I", "-", "--dir", str(tmp_path), "--ssh-target", "t@127.0.0.1"]
    argv += ["--api-host", "127.0.0.1", "--api-port", "1", "--hub-port", "2", *extra]
    if ctl:
        argv += ["--ctl-fd", str(r)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(r,) if ctl else (),
        text=True,
    )
    proc.stdin.write(SOURCE)
    proc.stdin.close()
    if ctl:
        os.close(r)
    return proc, w


def test_a_forward_that_never_opens_is_reported_and_the_port_held_till_the_end(tmp_path):
    # /bin/false in place of ssh: the forward can never open
    proc, ctl = run_agent(tmp_path, "--ssh", "/bin/false", "--api-timeout", "1")
    try:
        word, port = proc.stdout.readline().split()
        assert word == "port"
        socket.create_connection(("127.0.0.1", int(port)), 5).close()
        assert proc.stdout.readline() == "forward-failed\n"
        assert intruder_binds(int(port)) == []
        # the script started a server and then went away without ending it
        server = subprocess.Popen(["sleep", "60"])
        os.write(ctl, f"server {server.pid}\n".encode())
        assert intruder_binds(int(port)) == []
    finally:
        os.close(ctl)
    assert proc.wait(30) == 0
    assert server.wait(5) == -signal.SIGTERM  # ended by the agent before the port went
    log = proc.stderr.read()
    assert "the hub API forward did not open within 1 s" in log
    assert "ending the server" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # secrets and sockets gone
    assert intruder_binds(int(port)) != []


def test_the_agent_loads_no_tls_but_the_hub_keeps_it(tmp_path):
    """Run as the job's agent, it leaves ssl (and OpenSSL, 1.3 MB per job) out; imported
    into another program (the hub reads its text; tests import it), it changes nothing."""
    proc, ctl = run_agent(tmp_path, "--ssh", "/bin/false", "--api-timeout", "60")
    try:
        assert proc.stdout.readline().split()[0] == "port"
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libssl" not in maps and "_ssl" not in maps, maps
    finally:
        os.close(ctl)
        assert proc.wait(30) == 0
    code = "import xsedehub.spawner.jobagent, ssl, asyncio.sslproto as p; print(p.ssl is ssl)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout == "True\n"


def test_sigterm_removes_the_secrets_at_once(tmp_path):
    proc, ctl = run_agent(tmp_path, "--ssh", "/bin/false", "--api-timeout", "60")
    try:
        assert proc.stdout.readline().startswith("port ")
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (tmp_path / "env").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not (tmp_path / "env").exists() and not (tmp_path / "tunnel_key").exists()
        assert proc.poll() is None  # with a control channel, the script says when to end
    finally:
        os.close(ctl)
    assert proc.wait(30) == 0

    # without one (run by hand), SIGTERM ends it
    proc, _ = run_agent(tmp_path, "--ssh", "/bin/false", ctl=False)
    assert proc.stdout.readline().startswith("port ")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not (tmp_path / "env").exists()


def test_a_job_directory_too_deep_for_a_unix_socket_is_said(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    proc, ctl = run_agent(deep, "--ssh", "/bin/false")
    os.close(ctl)
    assert proc.stdout.readline() == "failed\n"
    assert proc.wait(30) == 2
    assert "too long for a unix socket" in proc.stderr.read()


async def test_a_wait_for_a_socket_wakes_when_it_is_created(tmp_path, monkeypatch):
    monkeypatch.setattr(jobagent, "WATCH_FALLBACK", 60.0)  # only the watch can wake it
    created = jobagent.Created.watch(str(tmp_path))
    assert created is not None  # Linux: inotify through ctypes
    path = str(tmp_path / "server.sock")
    try:
        waiting = asyncio.ensure_future(jobagent.wait_accepting(path, created, lambda: True))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        server = await asyncio.start_unix_server(lambda r, w: w.close(), path)
        assert await asyncio.wait_for(waiting, 10) is True
        server.close()
        # and it gives up when told to
        assert (
            await jobagent.wait_accepting(str(tmp_path / "none"), created, lambda: False) is False
        )
    finally:
        created.close()


def test_a_job_directory_too_deep_for_the_control_socket_forwards_at_once():
    """ssh binds the control socket at its path plus 17 characters: where that does not
    fit a unix socket's path, the reverse tunnel forwards from its start (as before the
    forward was added late) instead of failing.  (The agent only builds argv here.)"""
    room = jobagent.UNIX_PATH_MAX - jobagent.CONTROL_SUFFIX - len("/tunnel.ctl")

    def agent(length: int) -> jobagent.Agent:
        opts = opts_for(Path("/tmp"))
        opts.dir = "/" + "d" * (length - 1)
        return jobagent.Agent(opts)

    fits, too_long = agent(room), agent(room + 1)
    assert fits.late_forward and "-R" not in fits.tunnel.argv and "-L" in fits.tunnel.argv
    assert fits.tunnel.ready == fits.opts.dir + "/hubapi.sock"
    assert fits.ctl_path == fits.opts.dir + "/tunnel.ctl"
    assert not too_long.late_forward and "-R" in too_long.tunnel.argv
    assert "-L" in too_long.tunnel.argv


async def test_a_wait_for_a_linked_socket_sleeps_until_it_is_created(tmp_path, monkeypatch):
    """In the sandbox the server's socket is a link (``server.sock`` to
    ``sock/server.sock``) made before the server starts: the wait watches the link's
    target folder and sleeps until the socket appears there, instead of looking every
    CHECK_INTERVAL (20 times a second, for the whole of a server's start-up)."""
    (tmp_path / "sock").mkdir()
    link = tmp_path / "server.sock"
    link.symlink_to("sock/server.sock")
    monkeypatch.setattr(jobagent, "WATCH_FALLBACK", 60.0)  # only the watch can wake it
    looks = []
    real_accepts = jobagent.accepts
    monkeypatch.setattr(jobagent, "accepts", lambda p: looks.append(p) or real_accepts(p))
    created = jobagent.Created.watch(str(tmp_path))
    assert created is not None
    try:
        waiting = asyncio.ensure_future(jobagent.wait_accepting(str(link), created, lambda: True))
        await asyncio.sleep(1.5)
        assert not waiting.done()
        assert len(looks) <= 3, f"{len(looks)} looks in 1.5 s"  # polling: about 30
        server = await asyncio.start_unix_server(
            lambda r, w: w.close(), tmp_path / "sock/server.sock"
        )
        assert await asyncio.wait_for(waiting, 10) is True
        server.close()
    finally:
        created.close()


async def test_a_link_out_of_the_job_directory_is_not_watched(tmp_path):
    """What the sandbox's socket folder holds is the attendee's: a socket link whose
    target lies outside the job directory gets no watch there (the wait looks every
    CHECK_INTERVAL instead), and links are read one level, never resolved further."""
    job = tmp_path / "job"
    (job / "sock").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    created = jobagent.Created.watch(str(job))
    assert created is not None
    try:
        (job / "server.sock").symlink_to(outside / "server.sock")
        assert created.covers(str(job / "server.sock")) is False
        (job / "server.sock").unlink()
        (job / "server.sock").symlink_to("sock/server.sock")
        (job / "sock" / "server.sock").symlink_to(outside / "x.sock")  # a second level
        assert created.covers(str(job / "server.sock")) is True
        assert created.folders == {str(job), str(job / "sock")}
    finally:
        created.close()


def _serve_one_mux_client(
    ctl: Path, answer: bytes, *, hello: bytes | None = None, raw: bytes | None = None
) -> tuple[threading.Thread, list[bytes]]:
    """A control master's side of one control connection: its hello (or ``hello``, as
    sent), then every packet the client sends is recorded, and the first one after the
    client's hello gets ``answer`` (an ``MUX_S_*`` type and body; the request id is the
    client's), or ``raw`` bytes as they are (then the connection closes)."""
    got: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(ctl))
    srv.listen()

    def packet(c: socket.socket) -> bytes:
        head = c.recv(4, socket.MSG_WAITALL)
        return head + c.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)

    def serve() -> None:
        c, _ = srv.accept()
        with c, srv:
            c.sendall(
                hello
                if hello is not None
                else jobagent.mux_packet(jobagent.MUX_MSG_HELLO, (4).to_bytes(4, "big"))
            )
            got.append(packet(c))  # the client's hello
            got.append(packet(c))  # its request
            if raw is not None:
                c.sendall(raw)
                return
            request_id = got[-1][8:12]
            c.sendall(
                jobagent.mux_packet(int.from_bytes(answer[:4], "big"), request_id + answer[4:])
            )

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, got


def test_the_forward_request_is_what_ssh_O_forward_sends(tmp_path):
    """The agent speaks OpenSSH's control protocol itself instead of starting
    ``ssh -O forward -R ...``: the real ssh client's bytes, recorded on a control socket,
    are the agent's, byte for byte."""
    opts = opts_for(tmp_path)
    ok = jobagent._mux_u32(jobagent.MUX_S_OK)
    t, got = _serve_one_mux_client(tmp_path / "tunnel.ctl", ok)
    spec = f"127.0.0.1:20001:{tmp_path}/server.sock"
    r = subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", f"ControlPath={tmp_path}/tunnel.ctl"]
        + ["-O", "forward", "-R", spec, "tunnelbot@127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    t.join(10)
    assert r.returncode == 0, r.stderr
    assert b"".join(got) == jobagent.open_forward_request(opts)


U32 = jobagent._mux_u32
DENIED = U32(jobagent.MUX_S_PERMISSION_DENIED, 6) + b"denied"


@pytest.mark.parametrize(
    ("answer", "hello", "raw", "why"),
    [
        (U32(jobagent.MUX_S_REMOTE_PORT, 20001), None, None, None),
        (DENIED, None, None, "denied"),
        (U32(0x80000099), None, None, "an unexpected answer (0x80000099)"),
        (b"", None, U32(8, jobagent.MUX_S_OK, 7), "an answer to another request"),
        (b"", jobagent.mux_packet(1, U32(3)), None, "does not speak version 4"),
        (b"", None, U32(0xFFFFFFFF), "a packet of 4294967295 bytes"),
        (b"", None, b"", "the control connection failed"),
    ],
    ids=["remote port", "denied", "unknown", "other id", "version 3", "huge", "closed"],
)
async def test_every_answer_of_the_master_is_read_right(tmp_path, answer, hello, raw, why):
    """Only OK or the remote port (for this request) count as added; anything else is
    a reason, never an exception: a refusal with the master's words, an unknown
    answer, an answer to another request, another protocol version, a length past the
    master's own bound, a connection closed mid-answer."""
    t, _ = _serve_one_mux_client(tmp_path / "tunnel.ctl", answer, hello=hello, raw=raw)
    result = await jobagent.add_forward(opts_for(tmp_path), 10)
    t.join(10)
    if why is None:
        assert result is None
    else:
        assert result is not None and why in result, result


async def test_the_agent_adds_the_forward_and_says_why_not(tmp_path):
    """The master's answers: OK is added; a refusal comes back with the master's reason
    (printable only); a socket nobody listens on, or one that does not answer in the
    protocol, is a reason too, never an exception."""
    opts = opts_for(tmp_path)
    ctl = tmp_path / "tunnel.ctl"
    t, got = _serve_one_mux_client(ctl, jobagent._mux_u32(jobagent.MUX_S_OK))
    assert await jobagent.add_forward(opts, 10) is None
    t.join(10)
    assert b"".join(got) == jobagent.open_forward_request(opts)
    ctl.unlink()
    reason = b"remote port forwarding failed for listen port 20001\x1b[2J"
    refusal = jobagent._mux_u32(jobagent.MUX_S_FAILURE, len(reason)) + reason
    t, _ = _serve_one_mux_client(ctl, refusal)
    why = await jobagent.add_forward(opts, 10)
    t.join(10)
    assert why == "remote port forwarding failed for listen port 20001?[2J"
    ctl.unlink()
    assert "cannot reach the connection's control socket" in await jobagent.add_forward(opts, 10)
    # a listener that says nothing: the timeout, not a hang
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(ctl))
    silent.listen()
    try:
        assert await jobagent.add_forward(opts, 0.5) == "no answer within 0.5 s"
    finally:
        silent.close()


#: an ssh stand-in: records its argv; listens on its -L socket and, as a master, on its
#: ControlPath; refuses the first forward asked for in the control protocol (the port is
#: taken on the hub side) and adds the ones after
FAKE_SSH = """
import os, socket, sys, time
argv = sys.argv[1:]
log = os.environ["FAKE_SSH_LOG"]
with open(log, "a") as f:
    f.write(" ".join(argv) + "\\n")
api = socket.socket(socket.AF_UNIX)
api.bind(argv[argv.index("-L") + 1].split(":")[0])
api.listen()
if os.environ.get("FAKE_SSH_NO_CTL"):  # multiplexing could not start
    time.sleep(60)
ctl = [a.split("=", 1)[1] for a in argv if a.startswith("ControlPath=")][0]
s = socket.socket(socket.AF_UNIX)
s.bind(ctl)
s.listen()
while True:
    c, _ = s.accept()  # the agent's own look at the socket closes at once: no request
    try:
        c.sendall((8).to_bytes(4, "big") + (1).to_bytes(4, "big") + (4).to_bytes(4, "big"))
        for _ in range(2):
            head = c.recv(4, socket.MSG_WAITALL)
            body = c.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
    except OSError:
        continue
    if len(head) < 4:
        continue
    asked = sum(1 for line in open(log) if line.startswith("mux "))
    with open(log, "a") as f:
        f.write("mux " + body.hex() + "\\n")
    if asked == 0:
        reason = b"remote port forwarding failed for listen port 20001"
        answer = (0x80000003).to_bytes(4, "big") + body[4:8] + len(reason).to_bytes(4, "big")
        answer += reason
    else:
        answer = (0x80000001).to_bytes(4, "big") + body[4:8]
    c.sendall(len(answer).to_bytes(4, "big") + answer)
    c.close()
"""


async def test_the_reverse_forward_is_asked_for_again_and_added_on_every_connection(
    tmp_path, monkeypatch
):
    """A stale control socket does not keep the connection from opening.  The hub's
    sshd refuses the first forward: it is asked for again on the same connection, which
    stays up (its API forward with it) and never carries -R in its argv (with
    ExitOnForwardFailure a refused -R would end the connection and its API forward
    again and again).  When the connection drops, the forward is added again on the one
    that replaces it."""
    monkeypatch.setattr(jobagent, "BACKOFF_FIRST", 0.01)
    fake = tmp_path / "ssh"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SSH}")
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_SSH_LOG", str(calls))
    job = tmp_path / "job"
    job.mkdir()
    agent = jobagent.Agent(opts_for(job, "--ssh", str(fake)))
    assert agent.late_forward
    agent.created = agent.tunnel.created = jobagent.Created.watch(str(job))
    # sockets left by a killed ssh: removed before each start, or ssh would say
    # "already exists, disabling multiplexing" (the stand-in: fail to bind)
    for name in ("tunnel.ctl", "hubapi.sock"):
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(job / name))
        stale.close()

    def lines(prefix: str) -> list[str]:
        text = calls.read_text() if calls.exists() else ""
        return [ln for ln in text.splitlines() if ln.startswith(prefix)]

    async def until(what, count: int) -> None:
        deadline = time.monotonic() + 30
        while len(what()) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert len(what()) >= count, lines("")

    agent.tunnel.start()
    keeping = asyncio.ensure_future(agent.keep_reverse_forward())
    try:
        await until(lambda: lines("mux "), 2)  # refused, then added
        request = jobagent.open_forward_request(agent.opts)
        open_fwd = request[request.index(b"\x10\x00\x00\x06") :].hex()
        assert lines("mux ") == ["mux " + open_fwd] * 2
        started = lines("-N ")
        assert len(started) == 1 and agent.tunnel.starts == 1  # the same connection
        spec = f"-R 127.0.0.1:20001:{job}/server.sock"
        assert spec not in started[0] and "ControlMaster=yes" in started[0]
        agent.tunnel.proc.kill()  # the connection drops
        await until(lambda: lines("mux "), 3)  # added on the new one
        assert len(lines("-N ")) == 2 and spec not in lines("-N ")[1]
        assert not keeping.done()
    finally:
        agent.finished.set()
        await asyncio.wait_for(keeping, 30)
        await agent.tunnel.stop()
        agent.created.close()


async def test_a_control_socket_that_never_comes_is_said_in_the_log(tmp_path, monkeypatch, capfd):
    """ssh could not start multiplexing (its control socket never appears): the agent
    says so in the job's log and asks again, on the same connection, instead of
    waiting forever in silence; the API forward stays up."""
    monkeypatch.setattr(jobagent, "ADD_FORWARD_TIMEOUT", 0.3)
    monkeypatch.setattr(jobagent, "BACKOFF_FIRST", 0.01)
    fake = tmp_path / "ssh"
    fake.write_text(f"#!{sys.executable}\n{FAKE_SSH}")
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "calls"))
    monkeypatch.setenv("FAKE_SSH_NO_CTL", "1")
    job = tmp_path / "job"
    job.mkdir()
    agent = jobagent.Agent(opts_for(job, "--ssh", str(fake)))
    agent.created = agent.tunnel.created = jobagent.Created.watch(str(job))
    agent.tunnel.start()
    keeping = asyncio.ensure_future(agent.keep_reverse_forward())
    try:
        await asyncio.wait_for(agent.tunnel.opened.wait(), 30)  # the API forward is up
        said = "its control socket did not answer within 0.3 s"
        err, deadline = "", time.monotonic() + 30
        while err.count(said) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            err += capfd.readouterr().err
        assert err.count(said) >= 2, err  # said, and asked again
        assert agent.tunnel.starts == 1 and agent.tunnel.live.is_set()
    finally:
        agent.finished.set()
        await asyncio.wait_for(keeping, 30)
        await agent.tunnel.stop()
        agent.created.close()


async def test_connections_past_the_cap_are_closed_and_the_relay_goes_on(tmp_path, monkeypatch):
    """Any account on the node can connect to the port: past MAX_CLIENTS relays at once
    a new connection is closed at once (no descriptors piling up), and once the flood
    ends, requests go through again."""
    monkeypatch.setattr(jobagent, "MAX_CLIENTS", 4)
    agent = jobagent.Agent(opts_for(tmp_path))
    port = agent.bind()
    await agent.serve()
    # the forward is down: every connection waits for it, holding its descriptors
    flood = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
    await asyncio.sleep(0.3)
    closed = 0
    for reader, _ in flood:
        try:
            if await asyncio.wait_for(reader.read(), 0.2) == b"":
                closed += 1
        except TimeoutError:
            pass  # still waiting for the forward: one of the capped few
    assert closed == 12 - 4, closed
    for _, writer in flood:
        writer.close()

    async def hub_api(reader, writer):
        data = await reader.read()
        writer.write(b"HTTP/1.0 200 OK\r\n\r\ngot " + data)
        await writer.drain()
        writer.close()

    up = await asyncio.start_unix_server(hub_api, str(tmp_path / "hubapi.sock"))
    await asyncio.sleep(0.3)  # the flood's waiting relays notice their clients left
    assert (await ask(port, b"GET /after")).endswith(b"got GET /after")
    await agent.shutdown()
    up.close()
