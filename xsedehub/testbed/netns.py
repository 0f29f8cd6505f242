"""Small helpers for Linux network namespaces (used by the local cluster and its tests).

A socket belongs to the network namespace its creating thread was in when it was
made, and keeps it afterwards.  That lets one process listen on the host's loopback
and connect into a namespace (:func:`bridge`), and lets a test process act as the
"hub machine" by moving itself into the hub namespace (:func:`enter`).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter(name: str) -> None:
    """Move the calling thread (and threads it starts later) into namespace ``name``."""
    fd = os.open(netns_path(name), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextmanager
def inside(name: str) -> Iterator[None]:
    """Run a block with the calling thread in namespace ``name``, then come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def nsenter_argv(name: str) -> list[str]:
    """argv prefix that runs a command in namespace ``name`` (not ``ip netns exec``:
    it remounts /sys, which slurmd does not survive)."""
    return ["nsenter", f"--net={netns_path(name)}"]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except OSError:
            pass


async def _bridge(listen_port: int, ns: str, target_host: str, target_port: int) -> None:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", listen_port))
    lsock.listen(512)
    lsock.setblocking(False)
    # From here on, every socket this (single) thread creates lives in `ns`.
    enter(ns)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            tr, tw = await asyncio.open_connection(target_host, target_port)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, tw), _pipe(tr, w))

    server = await asyncio.start_server(handle, sock=lsock)
    async with server:
        await server.serve_forever()


def bridge(listen_port: int, ns: str, target_host: str, target_port: int) -> None:
    """Forward host loopback ``listen_port`` to ``target_host:target_port`` inside ``ns``.

    Used by the demo so that a browser on the host reaches a hub that lives in the
    hub namespace.  Runs until killed.
    """
    try:
        asyncio.run(_bridge(listen_port, ns, target_host, target_port))
    except KeyboardInterrupt:
        pass
