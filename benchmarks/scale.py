"""The hub's own cost at N = 250, 500, 1000 running servers, on sqlite and PostgreSQL.

Every part is real (SLURM jobs, the job agent and its SSH connection, tunnel keys,
proxy routes, the shared squeue and the polls) except the single-user server: each job
runs benchmarks/responder.py, a few-MB HTTP responder on the job's socket, so that 1,000
jobs fit on the machine.  Gateway mode, the default poll interval (30 s).

    sudo /opt/xsedehub/hub-env/bin/python benchmarks/scale.py                # 250 500 1000
    sudo /opt/xsedehub/hub-env/bin/python benchmarks/scale.py --n 50 --db sqlite

For each database and N: time until all N servers are routed; hub CPU per poll cycle and
hub memory while they run; squeue runs per interval (the login node's wrappers); the
proxy's route count; the time the shared squeue takes to answer (the spawner's own argv,
on the login node); memory per job (PSS of the job's processes, its slurmstepd and the
hub side's sshd processes of its tunnel) and the machine's MemAvailable drop per
job; then the hub is stopped (SIGTERM; servers keep running) and started again, and the
time until every server is ready again is taken; then every server stops.  PostgreSQL
is Debian's, a private cluster on a unix socket that this script starts and stops.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchlib import (  # noqa: E402
    Api,
    cpu_seconds,
    end_spy,
    finally_on_sigterm,
    markdown_table,
    peak_mb,
    spy_on,
)
from xsedehub.spawner import slurm  # noqa: E402

from xsedehub.testbed import localcluster, localhub, netns  # noqa: E402

RESPONDER = HERE / "responder.py"
PROXY_API = "http://127.0.0.1:8001/api/routes"
PROXY_TOKEN = "xsedehub-scale-" + os.urandom(8).hex()
PG_BIN = Path("/usr/lib/postgresql")
POLL = 30  # SlurmSSHSpawner's default poll_interval


@dataclass
class Result:
    db: str
    n: int
    started: int = 0  # servers running (fewer than n where memory ran short)
    all_ready_s: float = 0.0
    failures: int = 0
    routes: int = 0
    poll_cycles: int = 0
    hub_cpu_per_poll_cycle_s: float = 0.0
    hub_cpu_share_of_core: float = 0.0
    #: each cycle's hub CPU; one of every 10 holds JupyterHub's last-activity sweep
    hub_cpu_each_cycle_s: list[float] = field(default_factory=list)
    hub_cpu_median_cycle_s: float = 0.0
    hub_rss_mb: float = 0.0
    hub_peak_mb: float = 0.0
    proxy_rss_mb: float = 0.0
    postgres_pss_mb: float = 0.0
    squeue_per_interval: float = 0.0
    squeue_answer_s: float = 0.0
    squeue_lines: int = 0
    job_pss_mb: float = 0.0  # per job: the job's own processes
    slurmstepd_pss_mb: float = 0.0  # per job
    tunnel_sshd_pss_mb: float = 0.0  # per job: the hub side's sshd of its connection
    mem_available_drop_per_job_mb: float = 0.0
    processes_per_job: float = 0.0
    restart_exit_s: float = 0.0
    restart_all_ready_s: float = 0.0
    restart_initialized_s: float = 0.0
    restart_ready: int = 0
    restart_hub_cpu_s: float = 0.0
    stop_all_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- measures
def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def processes() -> list[tuple[int, int, str]]:
    """(pid, uid, cmdline) of every process."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            uid = int(
                next(
                    ln for ln in (p / "status").read_text().splitlines() if ln.startswith("Uid:")
                ).split()[1]
            )
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, StopIteration):
            continue
        out.append((int(p.name), uid, cmd.strip()))
    return out


def pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def job_memory(info, n: int, res: Result) -> None:
    import pwd

    gw = pwd.getpwnam(info.gateway_user).pw_uid
    tb = info.tunnel_user
    job = step = sshd = 0.0
    nproc = 0
    pg = 0.0
    pg_uid = _uid("postgres")
    for pid, uid, cmd in processes():
        if cmd.startswith("slurmstepd:"):
            step += pss_mb(pid)
            nproc += 1
        elif uid == gw and not cmd.startswith("sshd:") and "sftp" not in cmd:
            job += pss_mb(pid)
            nproc += 1
        elif cmd.startswith(f"sshd: {tb}"):
            sshd += pss_mb(pid)
            nproc += 1
        elif pg_uid is not None and uid == pg_uid and res.db == "postgresql":
            pg += pss_mb(pid)  # (in a sqlite lane the server idles for the other lane)
    res.job_pss_mb = job / n
    res.slurmstepd_pss_mb = step / n
    res.tunnel_sshd_pss_mb = sshd / n
    res.processes_per_job = nproc / n
    res.postgres_pss_mb = pg


def _uid(user: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


# ------------------------------------------------------------------------- PostgreSQL
class Postgres:
    """A private PostgreSQL cluster (Debian's binaries, run as ``postgres``), listening
    only on a unix socket in its own directory; trust authentication on that socket (the
    directory is 0700 postgres: only root and postgres reach it)."""

    def __init__(self) -> None:
        versions = sorted((p for p in PG_BIN.glob("*/bin/initdb")), key=lambda p: int(p.parts[-3]))
        if not versions:
            raise SystemExit("PostgreSQL is not installed: run scripts/install.sh")
        self.bin = versions[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="xh-scale-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data, self.sock = self.dir / "data", self.dir / "sock"
        self.as_pg(["mkdir", "-m", "0700", str(self.data), str(self.sock)])
        self.as_pg(
            [str(self.bin / "initdb"), "-A", "trust", "-D", str(self.data)],
            stdout=subprocess.DEVNULL,
        )
        conf = (
            f"listen_addresses = ''\nunix_socket_directories = '{self.sock}'\n"
            "max_connections = 200\nfsync = on\n"
        )
        self.as_pg(["sh", "-c", f"cat >> {self.data}/postgresql.conf"], input=conf)
        self.as_pg(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "postgres.log"),
                "-w",
                "start",
            ]
        )

    def as_pg(self, argv: list[str], **kw) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv], check=True, text=True, cwd="/", **kw
        )

    def create(self, name: str) -> str:
        self.as_pg([str(self.bin / "createdb"), "-h", str(self.sock), name])
        return f"postgresql+psycopg://postgres@/{name}?host={self.sock}"

    def stop(self) -> None:
        self.as_pg([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------- the run
def in_cluster(info, *argv: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*netns.nsenter_argv(info.cluster_netns), *argv],
        text=True,
        capture_output=True,
        check=False,
        **kw,
    )


def squeue_answer(info) -> tuple[float, int]:
    """Median wall time of the spawner's own shared squeue, as the gateway account on the
    login node (SLURM's binary, not the counting wrapper), and its line count."""
    argv = slurm.squeue_argv(info.gateway_user)
    argv[0] = "/usr/bin/squeue"
    times, lines = [], 0
    for _ in range(5):
        t = time.perf_counter()
        r = in_cluster(info, "runuser", "-u", info.gateway_user, "--", *argv)
        times.append(time.perf_counter() - t)
        lines = len(r.stdout.splitlines())
    return statistics.median(times), lines


def ready_count(api: Api) -> int:
    r = api("GET", "/users?state=ready&limit=5000")
    if r.status_code != 200:
        return -1
    return sum(1 for u in r.json() if (u.get("servers") or {}).get("", {}).get("ready"))


def wait_no_jobs(info, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = in_cluster(info, "squeue", "-h", "-u", info.gateway_user, "-o", "%i")
        if r.returncode == 0 and not r.stdout.strip():
            return True
        time.sleep(2)
    return False


def run_one(
    db: str,
    n: int,
    info,
    cycles: int,
    pg: Postgres | None,
    threads: int,
    wave: int,
    floor_mb: int,
    profile: Path | None = None,
) -> Result:
    res = Result(db, n)
    workdir = Path(tempfile.mkdtemp(prefix=f"xh-scale-{db}-{n}-"))
    db_line = ""
    if pg is not None:
        db_line = f"c.JupyterHub.db_url = {pg.create(f'jh{n}_{os.getpid()}')!r}\n"
    extra = (
        db_line + "c.SlurmSSHSpawner.require_github_id = False\n"
        'c.SlurmSSHSpawner.workshop_repo = ""\n'
        f"c.SlurmSSHSpawner.cmd = [{info.job_env + '/bin/python'!r}, '-I', '-S', "
        f"{str(RESPONDER)!r}]\n"
        "c.JupyterHub.log_level = 'INFO'\n"
        # JupyterHub's default (the local hub's tests use 60 s): every interval the hub
        # reads every route's activity from the proxy and looks up each user in its
        # database, the largest part of its CPU at these sizes
        "c.JupyterHub.last_activity_interval = 300\n"
        "c.JupyterHub.concurrent_spawn_limit = 0\n"
        "c.JupyterHub.active_server_limit = 0\n"
        "c.JupyterHub.api_page_max_limit = 5000\n"
        "c.SlurmSSHSpawner.http_timeout = 300\n"
        "c.SlurmSSHSpawner.start_timeout = 900\n"
        f"c.ConfigurableHTTPProxy.auth_token = {PROXY_TOKEN!r}\n"
    )
    localhub.write_config(workdir, info, poll_interval=POLL, extra=extra)
    mem0 = mem_available_mb()
    hub = localhub.start_hub(workdir, debug=False)
    api = Api((workdir / "service_token").read_text().strip())
    names = [f"scale-{i:04d}" for i in range(n)]
    proxy = requests.Session()
    proxy.headers["Authorization"] = f"token {PROXY_TOKEN}"
    try:
        api.created(api("POST", "/users", json={"usernames": names}))
        t0 = time.time()

        def start(name: str) -> None:
            r = api("POST", f"/users/{name}/server")
            if not api.started(r):
                res.notes.append(f"{name}: start {r.status_code} {r.text[:100]}")

        # in waves: before each wave, the memory the running jobs took so far says whether
        # the next wave fits above the floor; if not, the run goes on with those running
        ready: set[str] = set()
        requested: list[str] = []
        for w in range(0, n, wave):
            batch = names[w : w + wave]
            if ready:
                per_job = (mem0 - mem_available_mb()) / len(ready)
                left = mem_available_mb() - per_job * len(batch)
                if left < floor_mb:
                    res.notes.append(
                        f"stopped at {len(ready)} servers: {per_job:.1f} MB per job so far, "
                        f"{mem_available_mb():.0f} MB available; {len(batch)} more would "
                        f"leave {left:.0f} MB, under the {floor_mb} MB floor"
                    )
                    print(f"   {res.notes[-1]}", flush=True)
                    break
            with concurrent.futures.ThreadPoolExecutor(threads) as ex:
                list(ex.map(start, batch))
            requested += batch
            deadline = time.time() + 300 + 1.5 * len(batch)
            last_print = last_check = time.time()
            while len(ready) < len(requested) and time.time() < deadline:
                routes = proxy.get(PROXY_API, timeout=60).json()
                ready |= {nm for nm in requested if f"/user/{nm}" in routes}
                now = time.time()
                if now - last_print > 30:
                    last_print = now
                    print(f"   {len(ready)}/{n} routed after {now - t0:.0f} s", flush=True)
                if now - last_check > 60:  # a rare look at the hub: did spawns fail?
                    last_check = now
                    users = api("GET", "/users?limit=5000").json()
                    failed = sum(
                        1
                        for u in users
                        if u["name"] in requested
                        and u["name"] not in ready
                        and not u.get("servers")
                        and not u.get("pending")
                    )
                    if failed and failed + len(ready) >= len(requested):
                        break
                time.sleep(1)
        res.all_ready_s = time.time() - t0
        res.started = len(ready)
        res.failures = len(requested) - len(ready)
        print(f"   {len(ready)}/{n} routed in {res.all_ready_s:.0f} s", flush=True)
        # steady state: the servers run for `cycles` poll intervals
        time.sleep(5)
        spy = spy_on(hub.pid, profile, f"hub-steady-{db}-{n}", res.notes, POLL * cycles)
        t_steady, cpu2 = time.time(), cpu_seconds(hub.pid)
        marks = [cpu2]
        for c in range(cycles):  # the CPU of each cycle: JupyterHub's sweep shows as one
            time.sleep(max(0.0, t_steady + POLL * (c + 1) - time.time()))
            marks.append(cpu_seconds(hub.pid))
        cpu3 = marks[-1]
        res.hub_cpu_each_cycle_s = [round(b - a, 2) for a, b in itertools.pairwise(marks)]
        res.hub_cpu_median_cycle_s = statistics.median(res.hub_cpu_each_cycle_s)
        end_spy(spy, res.notes)
        res.poll_cycles = cycles
        res.hub_cpu_per_poll_cycle_s = (cpu3 - cpu2) / cycles
        res.hub_cpu_share_of_core = res.hub_cpu_per_poll_cycle_s / POLL
        res.squeue_per_interval = localcluster.command_counts(since=t_steady)["squeue"] / cycles
        res.routes = sum(
            1 for r in proxy.get(PROXY_API, timeout=60).json() if r.startswith("/user/")
        )
        res.hub_rss_mb = rss_mb(hub.pid)
        proxy_pid = int((workdir / "proxy.pid").read_text().strip())
        res.proxy_rss_mb = rss_mb(proxy_pid)
        res.squeue_answer_s, res.squeue_lines = squeue_answer(info)
        job_memory(info, max(1, len(ready)), res)
        res.mem_available_drop_per_job_mb = (mem0 - mem_available_mb()) / max(1, len(ready))
        print(f"   steady: {json.dumps(asdict(res))}", flush=True)
        # the hub restarts with every server running (cleanup_servers is False)
        res.hub_peak_mb = peak_mb(hub.pid)
        t_term = time.time()
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(120)
        except subprocess.TimeoutExpired:
            res.notes.append("the hub did not exit within 120 s of SIGTERM: killed")
            hub.kill()
            hub.wait()
        res.restart_exit_s = time.time() - t_term
        log_mark = (workdir / "hub.log").stat().st_size
        t_start = time.time()
        hub = localhub.start_hub(workdir, debug=False)
        spy = spy_on(hub.pid, profile, f"hub-restart-{db}-{n}", res.notes)
        deadline = time.time() + 600
        count = -1
        while time.time() < deadline:
            count = ready_count(api)
            if count >= len(ready):
                break
            time.sleep(1)
        res.restart_all_ready_s = time.time() - t_start
        res.restart_ready = count
        res.restart_hub_cpu_s = cpu_seconds(hub.pid)
        end_spy(spy, res.notes)
        with open(workdir / "hub.log", "rb") as f:
            f.seek(log_mark)
            m = re.search(rb"Initialized (\d+) spawners in ([\d.]+) seconds", f.read())
        if m:
            res.restart_initialized_s = float(m.group(2))
        print(
            f"   restart: {count}/{len(ready)} ready {res.restart_all_ready_s:.1f} s after the "
            f"new hub process started (SIGTERM to exit {res.restart_exit_s:.1f} s)",
            flush=True,
        )
        # everyone stops
        spy = spy_on(hub.pid, profile, f"hub-stop-{db}-{n}", res.notes)
        t_stop = time.time()
        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda nm: api("DELETE", f"/users/{nm}/server"), names))
        deadline = time.time() + 600
        while time.time() < deadline:
            if not any(u.get("servers") for u in api("GET", "/users?limit=5000").json()):
                break
            time.sleep(2)
        res.stop_all_s = time.time() - t_stop
        end_spy(spy, res.notes)
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(120)
        except subprocess.TimeoutExpired:
            hub.kill()
        localhub.stop_proxy(workdir)
        # nothing may be left running between rounds
        in_cluster(info, "scancel", "-u", info.gateway_user)
        if not wait_no_jobs(info, 300):
            res.notes.append("jobs were still in the queue 300 s after scancel")
        print(f"   hub log: {workdir / 'hub.log'}", flush=True)
    return res


def table(results: list[Result]) -> str:
    cols = [
        ("db", "db"),
        ("N", "n"),
        ("running", "started"),
        ("all routed (s)", "all_ready_s"),
        ("failures", "failures"),
        ("routes", "routes"),
        ("hub CPU/poll cycle (s)", "hub_cpu_per_poll_cycle_s"),
        ("share of a core", "hub_cpu_share_of_core"),
        ("median cycle (s)", "hub_cpu_median_cycle_s"),
        ("hub RSS MB", "hub_rss_mb"),
        ("hub peak MB", "hub_peak_mb"),
        ("squeue/interval", "squeue_per_interval"),
        ("squeue answer (s)", "squeue_answer_s"),
        ("job PSS MB", "job_pss_mb"),
        ("slurmstepd PSS MB", "slurmstepd_pss_mb"),
        ("hub sshd PSS MB", "tunnel_sshd_pss_mb"),
        ("MemAvailable drop/job MB", "mem_available_drop_per_job_mb"),
        ("restart: all ready (s)", "restart_all_ready_s"),
        ("restart: spawners initialized (s)", "restart_initialized_s"),
        ("stop all (s)", "stop_all_s"),
    ]
    return markdown_table(results, cols)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[250, 500, 1000])
    ap.add_argument("--db", nargs="+", default=["sqlite", "postgresql"])
    ap.add_argument(
        "--cycles",
        type=int,
        default=10,
        help="poll intervals (30 s) to measure; the default 10 spans one of JupyterHub's "
        "last_activity_interval (300 s), whose sweep of every route is part of the hub's cost",
    )
    ap.add_argument("--threads", type=int, default=32, help="concurrent start/stop requests")
    ap.add_argument("--wave", type=int, default=100, help="servers started per wave")
    ap.add_argument(
        "--floor-mb",
        type=int,
        default=2048,
        help="start no wave that would leave less MemAvailable than this (MB)",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the hub with py-spy (if installed) over the steady window, the "
        "restart and the stop; folded stacks into DIR",
    )
    args = ap.parse_args()

    finally_on_sigterm()  # the hub, its jobs and PostgreSQL go through the `finally`s
    r = subprocess.run([sys.executable, "-m", "xsedehub.cli", "cluster", "up"], check=False)
    if r.returncode:
        return r.returncode
    info = localcluster.ClusterInfo.load()
    if not os.access(RESPONDER, os.R_OK) or RESPONDER.stat().st_mode & 0o004 == 0:
        raise SystemExit(f"{RESPONDER} must be world-readable: the jobs run it")
    print(
        f"# {platform.node()} {os.cpu_count()} CPUs, "
        f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024} MB, "
        f"pid_max {Path('/proc/sys/kernel/pid_max').read_text().strip()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        flush=True,
    )
    pg = Postgres() if "postgresql" in args.db else None  # before entering the namespace
    netns.enter(info.hub_netns)
    results = []
    try:
        for db in args.db:
            for n in args.n:
                print(f"== {db}, N={n} ...", flush=True)
                res = run_one(
                    db,
                    n,
                    info,
                    args.cycles,
                    pg if db == "postgresql" else None,
                    args.threads,
                    args.wave,
                    args.floor_mb,
                    args.profile,
                )
                results.append(res)
                print(json.dumps(asdict(res)), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    finally:
        if pg is not None:
            pg.stop()
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
