"""Another Unix account on a compute node, trying to take what a job of another account
sends to its hub API forward (the server's API token, users' OAuth tokens).

It runs as that account in the cluster's namespace (all nodes of the local cluster share
it: the same node, for sockets), from before the job starts until the test stops it, and
learns the job's ports as well as any user of the node can: from every process's argv
(``/proc/*/cmdline``) and from the node's listening sockets and their owners
(``/proc/net/tcp``).  Whenever one of those ports is free it binds it (with and without
``SO_REUSEADDR``/``SO_REUSEPORT``, on ``127.0.0.1`` and on the wildcard), records
everything a connection brings and answers as the hub's API would (so that a server
carries on, with its token); it also tries to connect to every unix socket it sees
named in an argv.  It writes what it did as JSON when told to stop.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import subprocess
from pathlib import Path

import jupyterhub

from xsedehub.testbed.netns import nsenter_argv

PROGRAM = r"""
import json, os, re, select, socket, sys, time

victim, out, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
PORT_IN_ARGV = re.compile(r"(?:^|[\s=:])127\.0\.0\.1:(\d+)(?=[:\s]|$)")
SOCK_IN_ARGV = re.compile(r"(/[^\s:]+\.sock)\b")
seen_ports, seen_socks, held = {}, set(), {}
BODY = b'{"version": "%s"}' % sys.argv[4].encode()
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-JupyterHub-Version: "
    + sys.argv[4].encode() + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
    + BODY
)
report = {"ports_learned": [], "bound": [], "received": [], "socket_reached": [], "scans": 0}


def learn(port, how):
    if port not in seen_ports:
        seen_ports[port] = how
        report["ports_learned"].append([port, how])


def scan_argv():
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if os.getpid() == int(pid):
            continue
        for m in PORT_IN_ARGV.finditer(cmd):
            learn(int(m.group(1)), "argv")
        for m in SOCK_IN_ARGV.finditer(cmd):
            seen_socks.add(m.group(1))


def scan_listening():
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, state, uid = parts[1], parts[3], int(parts[7])
            if state == "0A" and uid == victim:
                learn(int(local.split(":")[1], 16), "listening")


def try_bind(port):
    for addr in ("127.0.0.1", "0.0.0.0"):
        for opt in (None, socket.SO_REUSEADDR, socket.SO_REUSEPORT):
            s = socket.socket()
            try:
                if opt is not None:
                    s.setsockopt(socket.SOL_SOCKET, opt, 1)
                s.bind((addr, port))
                s.listen(16)
            except OSError:
                s.close()
                continue
            held[port] = s
            report["bound"].append([port, addr, opt, time.time()])
            return


def serve(ready):
    for s in ready:
        port = s.getsockname()[1]
        try:
            c, _ = s.accept()
        except OSError:
            continue
        c.settimeout(2)
        data = b""
        try:
            while len(data) < 65536:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data:
                    break
        except OSError:
            pass
        try:  # answer as the hub would, so that a server goes on (and sends its token)
            c.sendall(ANSWER)
        except OSError:
            pass
        c.close()
        report["received"].append([port, data[:400].decode(errors="replace")])


def try_sockets():
    for path in sorted(seen_socks):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(0.5)
        try:
            s.connect(path)
            report["socket_reached"].append(path)
        except OSError:
            pass
        finally:
            s.close()


last_argv = 0.0
while not os.path.exists(stop):
    report["scans"] += 1
    now = time.monotonic()
    if now - last_argv > 0.02:
        scan_argv()
        try_sockets()
        last_argv = now
    scan_listening()
    for port in list(seen_ports):
        if port not in held:
            try_bind(port)
    if held:
        ready, _, _ = select.select(list(held.values()), [], [], 0.005)
        serve(ready)
    else:
        time.sleep(0.005)
with open(out, "w") as f:
    json.dump(report, f)
"""


class Intruder:
    """``with Intruder(cluster, "bob", victim="gateway") as spy: ...``; then
    ``spy.report``: ports learned, ports bound, what arrived, unix sockets reached."""

    def __init__(self, cluster, account: str, *, victim: str):
        self.cluster, self.account = cluster, account
        self.victim_uid = pwd.getpwnam(victim).pw_uid
        tag = secrets.token_hex(6)
        self.out = Path(f"/tmp/xh-intruder-{tag}.json")
        self.stop = Path(f"/tmp/xh-intruder-{tag}.stop")
        self.report: dict = {}

    def __enter__(self) -> Intruder:
        argv = [
            *nsenter_argv(self.cluster.cluster_netns),
            *("runuser", "-u", self.account, "--", "/usr/bin/python3", "-"),
            *(str(self.victim_uid), str(self.out), str(self.stop), jupyterhub.__version__),
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, cwd="/tmp", text=True)
        self.proc.stdin.write(PROGRAM)
        self.proc.stdin.close()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.touch()
        try:
            self.proc.wait(30)
            self.report = json.loads(self.out.read_text())
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for p in (self.out, self.stop):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

    def running(self) -> bool:
        return self.proc.poll() is None
