"""What the benchmarks share: a hub's CPU and memory from /proc, percentiles, a
client of the hub's REST API, and py-spy samplers of the hub.  Standard library and
requests only (burst.py's baseline needs batchspawner; scale.py does not)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

HUB = "http://127.0.0.1:8000"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and the children it waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime


def peak_mb(pid: int) -> float:
    """The peak resident memory of ``pid`` (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Api:
    """The hub's REST API with a token; many requests at once."""

    def __init__(self, token: str):
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"token {token}"
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=128)
        self.s.mount("http://", adapter)

    def __call__(self, method: str, path: str, **kw) -> requests.Response:
        try:
            r = self.s.request(method, f"{HUB}/hub/api{path}", timeout=300, **kw)
            r.resent = False  # type: ignore[attr-defined]
        except requests.ConnectionError:
            # the proxy (node) closes a kept-alive connection after 5 s idle: a request
            # sent on it just then gets no answer.  Sent again once, on a new connection;
            # the first may have reached the hub (see started() and created())
            r = self.s.request(method, f"{HUB}/hub/api{path}", timeout=300, **kw)
            r.resent = True  # type: ignore[attr-defined]
        return r

    @staticmethod
    def started(r: requests.Response) -> bool:
        """A server start the hub took (201, 202; or, sent again, "already running")."""
        return r.status_code in (201, 202) or (
            getattr(r, "resent", False) and r.status_code == 400 and "already running" in r.text
        )

    @staticmethod
    def created(r: requests.Response) -> None:
        """Raise unless users were created (or, sent again, already were: 409)."""
        if not (getattr(r, "resent", False) and r.status_code == 409):
            r.raise_for_status()


def markdown_table(results: list, cols: list[tuple[str, str | Callable[[Any], Any]]]) -> str:
    """A Markdown table of ``results``: one column per (heading, attribute name or
    function of a result); floats to three significant digits."""
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    rows = []
    for r in results:
        cells = []
        for _, how in cols:
            val = how(r) if callable(how) else getattr(r, how)
            cells.append(f"{val:.3g}" if isinstance(val, float) else str(val))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def process_kind(argv: list[str]) -> str:
    """What a process is, by its command line (for :class:`CpuCensus`)."""
    cmd = " ".join(argv)
    prog = os.path.basename(argv[0]) if argv else ""
    if "jobagent" in cmd or "--ssh-target" in argv:  # the job script runs it as python -I -
        return "job agent"
    if any(a.endswith(("burst.py", "scale.py")) for a in argv):
        return "benchmark"
    if any(
        s in cmd for s in ("jupyterhub-singleuser", "jupyter-lab", "jupyter lab", "responder.py")
    ):
        return "single-user server"
    if "-m jupyterhub" in cmd or prog == "jupyterhub":
        return "hub"
    if "configurable-http-proxy" in cmd:
        return "proxy"
    if prog.startswith("sshd"):
        return "sshd"
    if prog == "ssh":
        return "ssh"
    if prog.startswith("slurm") or prog in ("sbatch", "squeue", "scancel", "srun"):
        return "slurm"
    if prog == "bwrap":
        return "sandbox"
    if prog in ("bash", "sh"):
        return "shell"
    return "other"


class CpuCensus:
    """Where the machine's CPU went over a stretch of time, by kind of process: samples
    every process's CPU seconds (``/proc/<pid>/stat``: utime + stime) twice a second,
    keeps each process's last figure, and sums the growth per kind.  A process that lives
    less than half a second between samples is missed, and the CPU a process used between
    its last sample and its exit is too: the census is a lower bound, good for shares."""

    def __init__(self) -> None:
        import threading

        # (pid, start time) -> (kind, CPU seconds at the first sample, at the last, name)
        self._seen: dict[tuple[int, int], tuple[str, float, float, str]] = {}
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                head, _, rest = Path(f"/proc/{d}/stat").read_text().rpartition(")")
                comm, stat = head.partition("(")[2], rest.split()
                key = (int(d), int(stat[19]))  # pid and start time: pids are reused
                cpu = (int(stat[11]) + int(stat[12])) / TICK
                seen = self._seen.get(key)
                # the kind from the newest command line: a fork execs after we see it,
                # and an exec changes the name in stat (read again only then)
                if seen is not None and (seen[3] == comm or stat[0] == "Z"):
                    kind = seen[0]
                else:
                    raw = Path(f"/proc/{d}/cmdline").read_bytes().rstrip(b"\0")
                    argv = raw.decode(errors="replace").split("\0") if raw else []
                    if not argv and (stat[1] == "2" or d == "2"):  # kthreadd's
                        kind = f"kernel: {comm.split('/')[0]}"  # kworker/1:1H-kblockd
                    elif not argv:  # amid an exec (the new name, no command line yet)
                        kind = seen[0] if seen is not None else f"other: {comm}"
                        comm = ""  # not settled: read again next time
                    else:
                        kind = process_kind(argv)
                        if kind == "other":  # named by its program, to tell what it is
                            kind = f"other: {os.path.basename(argv[0])[:20]}"
                # a process already running at the start counts from there
                first = seen[1] if seen is not None else (0.0 if self._started else cpu)
                self._seen[key] = (kind, first, cpu, comm)
            except (OSError, IndexError, ValueError):
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._started = True
            self._stop.wait(0.5)

    def __enter__(self) -> CpuCensus:
        import time

        self._started = False
        self._t0 = time.monotonic()
        self._sample()
        self._started = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.monotonic() - self._t0

    def by_kind(self) -> dict[str, float]:
        """CPU seconds per kind, largest first."""
        out: dict[str, float] = {}
        for kind, first, last, _name in self._seen.values():
            out[kind] = out.get(kind, 0.0) + (last - first)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def spy_on(
    pid: int, profile: Path | None, name: str, notes: list[str], seconds: float | None = None
) -> subprocess.Popen | None:
    """py-spy sampling ``pid`` from outside (not in its CPU) into ``profile/name.txt``
    (folded stacks), for ``seconds`` or until :func:`end_spy`; None without --profile."""
    if profile is None:
        return None
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(spy_bin, os.X_OK):
        if "--profile: py-spy is not installed (pip install py-spy)" not in notes:
            notes.append("--profile: py-spy is not installed (pip install py-spy)")
        return None
    profile.mkdir(parents=True, exist_ok=True)
    argv = [spy_bin, "record", "--nonblocking", "--format", "raw", "--rate", "50"]
    if seconds is not None:
        argv += ["--duration", str(int(seconds))]
    argv += ["--pid", str(pid), "--output", str(profile / f"{name}.txt")]
    with open(profile / f"{name}.err", "wb") as err:  # py-spy's own complaints
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    spy.timed = seconds is not None  # type: ignore[attr-defined]
    return spy


def end_spy(spy: subprocess.Popen | None, notes: list[str]) -> None:
    """Let a sampler write its stacks: one with a duration ends on its own (given 5 s
    more), one without on SIGINT (as on Ctrl-C), at once."""
    if spy is None:
        return
    if spy.timed:  # type: ignore[attr-defined]
        try:
            spy.wait(5)
        except subprocess.TimeoutExpired:
            pass
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    if spy.returncode:
        notes.append(f"py-spy ended {spy.returncode}: see its .err file beside the stacks")


def finally_on_sigterm() -> None:
    """SIGTERM (a run started in the background ignores Ctrl-C) ends the run as an error
    does: through its ``finally`` blocks, which stop the hub and its jobs and undo what
    the run set; a second SIGTERM cannot cut them short."""

    def ended(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, ended)
