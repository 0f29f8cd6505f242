"""The job's files on the real login node, over the hub's real SSH/SFTP connection: what
the cluster account controls (the job's log, an attendee's owner file, its own folders)
cannot exhaust the hub's memory, crash it, or have its mode changed by the hub."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import tracemalloc
from pathlib import Path

import asyncssh
import pytest
from xsedehub.spawner.errors import SpawnError
from xsedehub.spawner.job import JobFiles, claim_folder
from xsedehub.spawner.ssh import Connection, LoginNode, SSHIdentity

pytestmark = pytest.mark.cluster

HOME = Path("/home/gateway")
TOP = "xh-test-14b"  # a folder of the gateway account's own, made by the test


@pytest.fixture
async def conn(cluster):
    ident = SSHIdentity(
        cluster.gateway_user, asyncssh.read_private_key(cluster.gateway_key), label="gateway"
    )
    c = Connection(LoginNode(cluster.login_ip, cluster.login_port, cluster.known_hosts), ident)
    yield c
    c.close()


@pytest.fixture
def top(cluster):
    """``~gateway/xh-test-14b``, owned by the account, removed afterwards."""
    path = HOME / TOP
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    gw = pwd.getpwnam(cluster.gateway_user)
    os.chown(path, gw.pw_uid, gw.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _own(path: Path) -> None:
    gw = pwd.getpwnam("gateway")
    os.chown(path, gw.pw_uid, gw.pw_gid, follow_symlinks=False)


def _files(conn: Connection, job_dir: str) -> JobFiles:
    return JobFiles(conn, job_dir, logging.getLogger("test"), "test")


# ---------------------------------------------------------------------------- the job's log
async def test_log_tail_of_a_huge_sparse_log_reads_only_its_end(conn, top):
    log = top / "job.log"
    with log.open("wb") as f:
        f.truncate(1 << 30)  # 1 GiB of hole
        f.seek(0, os.SEEK_END)
        f.write(b"srun: error: the last words of the job\n")
    _own(log)
    tracemalloc.start()
    try:
        tail = await _files(conn, TOP).log_tail()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"tail of a 1 GiB log: {len(tail)} characters, peak memory {peak / 1024:.0f} KiB")
    assert tail.endswith("srun: error: the last words of the job")
    assert peak < 4 * 1024 * 1024, f"{peak} bytes held to read a log's tail"


async def test_log_tail_of_non_utf8_bytes_is_shown_with_replacements(conn, top):
    log = top / "job.log"
    log.write_bytes(b"start\n\xff\xfe latin-1: caf\xe9\nmodule: command not found\n")
    _own(log)
    tail = await _files(conn, TOP).log_tail()
    want = ["start", "\ufffd\ufffd latin-1: caf\ufffd", "module: command not found"]
    assert tail.splitlines() == want


async def test_log_tail_does_not_follow_a_symlink_nor_open_a_fifo(conn, top):
    secret = top / "elsewhere"
    secret.write_text("not the job's log\n")
    _own(secret)
    log = top / "job.log"
    log.symlink_to(secret)
    _own(log)
    assert await asyncio.wait_for(_files(conn, TOP).log_tail(), 60) == ""
    log.unlink()
    os.mkfifo(log)  # opening it for reading would block sftp-server until a writer came
    _own(log)
    assert await asyncio.wait_for(_files(conn, TOP).log_tail(), 60) == ""


# ---------------------------------------------------------------------------- owner file
class Attendee:
    """What claim_folder uses of JupyterHub's User: the name and the auth_state."""

    def __init__(self, name: str, github_id: int):
        self.name, self.github_id = name, github_id

    async def get_auth_state(self) -> dict:
        return {"github_user": {"id": self.github_id}}


async def _claim(conn: Connection, folder: str, who: Attendee) -> None:
    sftp = await conn.sftp()
    await claim_folder(sftp, folder, who, require_github_id=True)


async def test_owner_file_with_non_utf8_bytes_is_a_clear_refusal(conn, top):
    (top / "ada").mkdir()
    _own(top / "ada")
    owner = top / "ada" / ".xsedehub-owner"
    owner.write_bytes(b"\xff\xfe1001\n")
    _own(owner)
    with pytest.raises(SpawnError, match="belongs to another GitHub account"):
        await _claim(conn, f"{TOP}/ada", Attendee("ada", 1001))


async def test_owner_file_that_is_a_symlink_is_refused(conn, top):
    (top / "ada").mkdir()
    _own(top / "ada")
    forged = top / "forged"
    forged.write_text("1001\n")
    _own(forged)
    owner = top / "ada" / ".xsedehub-owner"
    owner.symlink_to(forged)
    _own(owner)
    with pytest.raises(SpawnError, match="not a regular file"):
        await _claim(conn, f"{TOP}/ada", Attendee("ada", 1001))


async def test_huge_owner_file_costs_no_memory(conn, top):
    (top / "ada").mkdir()
    _own(top / "ada")
    owner = top / "ada" / ".xsedehub-owner"
    with owner.open("wb") as f:
        f.write(b"1001\n")
        f.truncate(1 << 30)
    _own(owner)
    tracemalloc.start()
    try:
        await _claim(conn, f"{TOP}/ada", Attendee("ada", 1001))  # the right owner: accepted
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"claim with a 1 GiB owner file: peak memory {peak / 1024:.0f} KiB")
    assert peak < 4 * 1024 * 1024


# ---------------------------------------------------------------------------- folders
async def test_job_files_leave_the_mode_of_a_folder_the_hub_did_not_make(conn, top):
    top.chmod(0o755)  # the account's own folder, shared on purpose
    job_dir = f"{TOP}/jobs/u0-000000000000"
    await _files(conn, job_dir).create(lambda: {"env": "X=1\n"})
    assert top.stat().st_mode & 0o777 == 0o755
    assert (top / "jobs").stat().st_mode & 0o777 == 0o700  # made by the hub
    assert (HOME / job_dir).stat().st_mode & 0o777 == 0o700
    assert (HOME / job_dir / "env").stat().st_mode & 0o777 == 0o600
