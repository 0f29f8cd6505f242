"""The secrets audit shared by the end-to-end tests of both modes."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path

from xsedehub.testbed.netns import nsenter_argv


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


def cluster_out(argv: list[str]) -> str:
    return subprocess.run(
        [*nsenter_argv("xh-cluster"), *argv], capture_output=True, text=True, check=False
    ).stdout


def server_env(job_id: str) -> dict[str, str]:
    """The environment of a job's single-user server, read as root from /proc."""
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
    env = server_env(job_id)
    user_home = Path(env["HOME"])
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
        key = (d / "tunnel_key").read_text()
        secrets += [ln for ln in key.splitlines() if ln and "PRIVATE KEY" not in ln][:2]
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
    for secret in secrets:
        assert len(secret) >= 16
        assert not [a for a in scan.seen if secret in a], "a secret showed up in an argv"
        for text in logs:
            assert secret not in text, "a secret showed up in a log or job script"
    return len(secrets)
