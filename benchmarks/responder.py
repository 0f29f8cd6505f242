"""The smallest stand-in for a single-user server, for benchmarks/scale.py: it listens on
the unix socket the job script names (``--ServerApp.sock=PATH``, ``--ServerApp.sock_mode``)
and answers every HTTP request with 200 and a few bytes, one connection at a time
(JupyterHub's "is it up?" checks and the proxy are all it ever sees).  Run it with the job
environment's Python as ``python -I -S responder.py``: standard library only, no threads,
a few MB of private memory.  Every other argument is ignored.
"""

import os
import selectors
import signal
import socket
import sys

BODY = b'{"xsedehub-bench": "responder"}'
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(BODY) + BODY
)


def main() -> int:
    path, mode = None, 0o600
    for arg in sys.argv[1:]:
        if arg.startswith("--ServerApp.sock="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--ServerApp.sock_mode="):
            mode = int(arg.split("=", 1)[1], 8)
    if not path:
        print("responder: no --ServerApp.sock=PATH", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, mode)
    srv.listen(64)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    pending: dict[socket.socket, bytes] = {}
    print(f"responder listening on {path}", flush=True)
    try:
        while True:
            for key, _ in sel.select():
                s = key.fileobj
                if s is srv:
                    conn, _ = srv.accept()
                    conn.setblocking(False)
                    pending[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    pending.pop(s, None)
                    s.close()
                    continue
                buf = pending[s] + data
                # requests carry no body here (GET/HEAD): one answer per header block
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    try:
                        s.sendall(ANSWER)
                    except OSError:
                        break
                pending[s] = buf[-65536:]
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
