"""Files and folders on the login node that the cluster account, not the hub, controls.

The job's log and an attendee's folder-owner file are written by whoever holds the
cluster account (in gateway mode, every attendee): the hub reads them as untrusted
input.  :func:`read_capped` reads at most a fixed number of bytes of a regular file
(never through a symlink, never a FIFO or device), decoding with replacement, so that
a sparse 100 GB log, a symlink to a huge file or a few non-UTF-8 bytes cost the hub
no more than 64 KiB and no crash.

:func:`make_private_dirs` creates a path's missing folders ``0700`` and changes the mode
of those it created only: a folder that was there before (the account's own folder
that ``job_dir_root`` may start with) keeps its mode.
"""

from __future__ import annotations

import stat

import asyncssh

#: the most the hub reads of a file the cluster account controls
READ_LIMIT = 64 * 1024


class NotARegularFile(OSError):
    """The path is a symlink, a folder, a FIFO or a device, not a regular file."""


async def read_capped(
    sftp: asyncssh.SFTPClient, path: str, *, limit: int = READ_LIMIT, tail: bool = False
) -> str:
    """At most ``limit`` bytes of the regular file ``path`` (its last ones with ``tail``,
    from the start of a line), decoded as UTF-8 with replacement characters.

    Raises :class:`NotARegularFile` for anything but a regular file (a symlink is not
    followed), and asyncssh's SFTP errors (``SFTPNoSuchFile``...) as they come."""
    attrs = await sftp.lstat(path)
    if attrs.permissions is None or not stat.S_ISREG(attrs.permissions):
        raise NotARegularFile(f"{path} is not a regular file")
    async with sftp.open(path, "rb") as f:
        # the same check on what was opened: a file swapped for something else between
        # the two is refused too; the read below is bounded whatever was opened
        opened = await f.stat()
        if opened.permissions is None or not stat.S_ISREG(opened.permissions):
            raise NotARegularFile(f"{path} is not a regular file")
        size = opened.size or 0
        offset = max(0, size - limit) if tail else 0
        data = await f.read(limit, offset)
    data = data[:limit]
    if tail and offset > 0:
        # the first line was cut: start at the next whole line, when there is one
        cut = data.find(b"\n")
        if 0 <= cut < len(data) - 1:
            data = data[cut + 1 :]
    return data.decode("utf-8", errors="replace").replace("\x00", "")


async def make_private_dirs(sftp: asyncssh.SFTPClient, path: str) -> list[str]:
    """Create the missing folders of the relative ``path``, each ``0700``; the ones created.

    A folder that already exists is left as it is: the hub changes the mode only of
    folders it made itself."""
    created = []
    parts = [p for p in path.split("/") if p and p != "."]
    for i in range(len(parts)):
        sub = "/".join(parts[: i + 1])
        try:
            await sftp.mkdir(sub, asyncssh.SFTPAttrs(permissions=0o700))
        except asyncssh.SFTPFailure:
            # OpenSSH's sftp-server answers "failure" for an existing path
            if not await sftp.isdir(sub):
                raise
            continue
        except asyncssh.SFTPFileAlreadyExists:
            if not await sftp.isdir(sub):
                raise
            continue
        created.append(sub)
    # the umask may have narrowed the mode, never widened it; make it exact
    for sub in created:
        await sftp.chmod(sub, 0o700)
    return created
