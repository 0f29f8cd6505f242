"""The secrets audit shared by the end-to-end tests of both modes."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import asyncssh

from xsedehub.testbed.netns import nsenter_argv


def private_key_needles(pem: str) -> list[str]:
    """What to search for to find ``pem``'s private key anywhere: the lines of its text
    that no other key of its type shares (the first lines are the same OpenSSH header for
    every ed25519 key, so they prove nothing), and the private value itself, in hex and
    base64, as another encoding of a leak would carry it."""
    key = asyncssh.import_private_key(pem)
    other = asyncssh.generate_private_key(key.algorithm.decode())
    common = set(other.export_private_key().decode().splitlines())
    lines = [ln for ln in pem.strip().splitlines() if ln not in common and len(ln) >= 16]
    raw = key._key.private_value
    if isinstance(raw, int):
        raw = raw.to_bytes((raw.bit_length() + 7) // 8, "big")
    return [*lines, raw.hex(), base64.b64encode(raw).decode().rstrip("=")]


def leaks(secrets: list[str], texts: list[str]) -> list[str]:
    """The secrets (first 12 characters only) that occur in any of ``texts``."""
    return [s[:12] for s in secrets if any(s in t for t in texts)]


class ArgvScanner:
    """Records the argv of every process on the machine (hub and cluster namespaces share
    the PID namespace) every few milliseconds while spawns happen."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            self.seen.add(f.read().replace(b"\0", b" ").decode(errors="replace"))
                    except OSError:
                        pass
            time.sleep(0.02)

    def __enter__(self) -> ArgvScanner:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cmdlines() -> dict[int, str]:
    """Every process's command line (pid -> argv joined by spaces), read from /proc."""
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                out[int(pid)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


def cluster_out(argv: list[str]) -> str:
    return subprocess.run(
        [*nsenter_argv("xh-cluster"), *argv], capture_output=True, text=True, check=False
    ).stdout


def server_env(job_id: str) -> dict[str, str]:
    """The environment of a job's single-user server, read as root from /proc (in
    gateway mode its HOME is the attendee's folder: the sandbox sets it so)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if b"jupyterhub-singleuser" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)
        if env.get("SLURM_JOB_ID") == job_id:
            return env
    raise AssertionError(f"no single-user server of job {job_id} found")


def job_dir(job_id: str) -> Path:
    import pwd

    env = server_env(job_id)
    user_home = Path(pwd.getpwnam(env["SLURM_JOB_USER"]).pw_dir)
    comment = cluster_out(["squeue", "-h", "-j", job_id, "-o", "%k"]).strip()
    assert comment.startswith("xsedehub:"), comment
    return user_home / ".xsedehub" / "jobs" / comment.split(":", 1)[1]


def audit(scan: ArgvScanner, job_ids: list[str], hub_log: str, extra_secrets=()) -> int:
    """Assert no secret of these jobs is anywhere it should not be; return how many
    secrets were checked."""
    secrets: list[str] = list(extra_secrets)
    logs = [hub_log]
    root = Path("/var/lib/xsedehub/localcluster/log")
    logs += [p.read_text(errors="replace") for p in root.glob("*.log")]
    for job in job_ids:
        env = server_env(job)
        secrets.append(env["JUPYTERHUB_API_TOKEN"])
        d = job_dir(job)
        secrets += private_key_needles((d / "tunnel_key").read_text())
        # modes of everything the spawn wrote
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for f in ("env", "tunnel_key"):
            assert stat.S_IMODE((d / f).stat().st_mode) == 0o600, d / f
        assert stat.S_IMODE(d.parent.stat().st_mode) & 0o077 == 0
        logs.append((d / "job.log").read_text(errors="replace"))
        # the job script SLURM keeps
        script = cluster_out(["scontrol", "write", "batch_script", job, "-"])
        assert "#SBATCH" in script
        logs.append(script)
    assert any("jupyterhub-singleuser" in a for a in scan.seen)  # the scanner did see jobs
    assert all(len(secret) >= 16 for secret in secrets)
    assert leaks(secrets, list(scan.seen)) == [], "a secret showed up in an argv"
    assert leaks(secrets, logs) == [], "a secret showed up in a log or job script"
    return len(secrets)
