"""Tunnel-key edits from separate processes (the hub and ``xsedehub check``) do not
overwrite each other: no cluster needed, real processes on one authorized_keys file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from xsedehub.spawner.tunnel import TunnelKeys

# one process: wait for the start signal, then grant N keys and revoke every other one
WORKER = """
import asyncio, os, sys, time
from xsedehub.spawner.tunnel import TunnelKeys
path, go, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
keys = TunnelKeys.for_file(path, (40000, 49999), "127.0.0.1", 8081)
async def main():
    for i in range(n):
        await keys.grant(f"{tag}-{i}", 600)
        if i % 2:
            await keys.revoke(f"{tag}-{i}")
while not os.path.exists(go):
    time.sleep(0.001)
asyncio.run(main())
"""

N = 60


def test_two_processes_editing_the_keys_file_lose_no_line(tmp_path: Path):
    path = tmp_path / "tunnelbot_authorized_keys"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(go), tag, str(N)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("hub", "check")
    ]
    time.sleep(0.5)  # both interpreters up (not a timing assertion: only overlap)
    go.touch()
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read() if p.stderr else ""
    entries = TunnelKeys(str(path), (40000, 49999), "127.0.0.1", 8081).entries()
    ids = sorted(e.spawn_id for e in entries)
    want = sorted(f"{tag}-{i}" for tag in ("hub", "check") for i in range(0, N, 2))
    missing, extra = set(want) - set(ids), set(ids) - set(want)
    print(f"{len(ids)} lines, {len(missing)} lost, {len(extra)} revoked lines back")
    assert not missing and not extra
    ports = [e.port for e in entries]
    assert len(set(ports)) == len(ports), "one port handed to two keys"


async def test_a_revoked_keys_port_is_held_until_the_key_would_have_expired(tmp_path: Path):
    """A job whose connection logged in before its key was revoked keeps it (sshd does
    not read the file again) and binds its port only once its server listens: the port
    must not go to the next spawn meanwhile, or that spawn's user would be routed to the
    old job's server.  Once the old key's expiry has passed, the port is free again."""
    keys = TunnelKeys(str(tmp_path / "keys"), (40000, 40005), "127.0.0.1", 8081)
    first = await keys.grant("u1-aaaaaaaaaaaa", 600)
    assert await keys.revoke("u1-aaaaaaaaaaaa")
    assert keys.entries() == []  # no key line: sshd lets the key in no more
    second = await keys.grant("u2-bbbbbbbbbbbb", 600)
    assert second.port != first.port
    assert not await keys.revoke("u1-aaaaaaaaaaaa")  # nothing left to revoke
    # a hold whose key would have expired already frees its port, and its line goes
    gone = await keys.grant("u3-cccccccccccc", -60)
    await keys.revoke("u3-cccccccccccc")
    again = await keys.grant("u4-dddddddddddd", 600)
    assert again.port == gone.port
    assert "u3-cccccccccccc" not in (tmp_path / "keys").read_text()
    assert f"port {first.port} held until" in (tmp_path / "keys").read_text()
    # a key no job was ever submitted with holds nothing: its port is free at once
    unused = await keys.grant("u5-eeeeeeeeeeee", 600)
    assert await keys.revoke("u5-eeeeeeeeeeee", hold=False)
    assert "u5-eeeeeeeeeeee" not in (tmp_path / "keys").read_text()
    assert (await keys.grant("u6-ffffffffffff", 600)).port == unused.port
