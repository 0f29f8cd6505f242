"""The workshop burst: N attendees press Start at once, work for a few poll intervals,
then stop.  xsedehub's spawner against batchspawner's stock SlurmSpawner over ssh (the
baseline, benchmarks/baseline.py), in the same run, on the local cluster, gateway mode,
real single-user servers behind real tunnels; and the physical floor ("floor"): the same
N ``jupyterhub-singleuser`` servers from the same job environment, one sbatch each
straight from the login node (no hub, no SSH, no tunnel; their hub API is a stand-in in
this process that answers the version check they wait for at start), timed until each
answers on its socket.  ``--floor-server lab`` runs ``jupyter lab`` instead (no hub API
at all; it imports less).

The CPU census counts the whole machine's CPU by kind of process during each burst
(server, job agent, ssh, sshd, hub, proxy, SLURM...): where the time goes.

    sudo /opt/xsedehub/hub-env/bin/python benchmarks/burst.py            # N = 10 50 100
    sudo /opt/xsedehub/hub-env/bin/python benchmarks/burst.py --n 10 --impl ours floor

Printed for each implementation and N: time until all servers are ready; each spawn's
overhead (ready time minus the moment the job's server was listening, from its log);
each spawn's latency (ready minus its request; median and p95);
SSH handshakes at the login node; sbatch/squeue/scancel runs on the login node (counted by
the local cluster's command wrappers); hub CPU seconds per spawn and per poll cycle; hub
peak memory; failures.  Then ours/baseline and ours/floor ratios.  Not a test: nothing
here asserts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import jupyterhub
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import xh_bench_baseline as baseline  # noqa: E402
from benchlib import (  # noqa: E402
    Api,
    CpuCensus,
    cpu_seconds,
    end_spy,
    finally_on_sigterm,
    markdown_table,
    peak_mb,
    percentile,
    spy_on,
)

from xsedehub.testbed import clusterconf, localcluster, localhub, netns  # noqa: E402

PROXY_API = "http://127.0.0.1:8001/api/routes"
PROXY_TOKEN = "xsedehub-bench-" + os.urandom(8).hex()
#: how often every lane looks for its servers being ready (the proxy's routing table for
#: the hubs' lanes, each server's socket for the floor), in seconds
READY_LOOK = 0.1
LISTENING = re.compile(
    r"^\[I (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ServerApp\] Jupyter Server .* is running at"
)


@dataclass
class Result:
    impl: str
    n: int
    hub_apart: bool = False
    all_ready_s: float = 0.0
    overhead_median_s: float = 0.0
    overhead_p95_s: float = 0.0
    # ours only: the overhead split where the hub saw its port accept (the server listens
    # and the tunnel is up: start() returns, JupyterHub checks the server and routes it)
    listening_to_answered_median_s: float = float("nan")
    answered_to_routed_median_s: float = float("nan")
    # ours only: from the server's socket accepting (the job agent's line, which it logs
    # when its inotify watch sees the socket accept) to routed.  "is running at", where
    # the overhead starts, comes earlier: jupyter_server 2 binds its socket on its event
    # loop's first turn, after it logs that line
    accepting_to_routed_median_s: float = float("nan")
    accepting_to_routed_p95_s: float = float("nan")
    latency_median_s: float = 0.0
    latency_p95_s: float = 0.0
    handshakes_burst: int = 0
    handshakes_total: int = 0
    sbatch: int = 0
    squeue_burst: int = 0
    squeue_steady: int = 0
    poll_cycles: int = 0
    scancel: int = 0
    hub_cpu_per_spawn_s: float = 0.0
    hub_cpu_per_poll_cycle_s: float = 0.0
    hub_cpu_total_s: float = 0.0
    hub_peak_mb: float = 0.0
    failures: int = 0
    # CPU seconds by kind of process on the whole machine, from the first request until
    # all were ready (benchlib.CpuCensus; a lower bound)
    cpu_by_kind: dict[str, float] = field(default_factory=dict)
    # the nice values the servers ran at (--hub-apart: the jobs'), read at "all ready"
    servers_nice: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def handshakes(info) -> int:
    log = Path(info.root) / "log" / "sshd_login.log"
    return log.read_text(errors="replace").count(f"Accepted publickey for {info.gateway_user}")


ACCEPTING = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \[xsedehub\] server listening on its socket"
)


def accepting_time(log: Path) -> float | None:
    """When the job agent saw the server's socket accept (its log line, in UTC with
    milliseconds; None for a log without one)."""
    try:
        for line in log.read_text(errors="replace").splitlines():
            m = ACCEPTING.match(line)
            if m:
                stamp = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f")
                return stamp.replace(tzinfo=UTC).timestamp()
    except OSError:
        return None
    return None


def listening_time(log: Path) -> float | None:
    try:
        for line in log.read_text(errors="replace").splitlines():
            m = LISTENING.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except OSError:
        return None
    return None


def stop_hub(hub: subprocess.Popen, workdir: Path, info) -> None:
    """The hub, its proxy, and every job of the gateway account."""
    hub.send_signal(signal.SIGTERM)
    try:
        hub.wait(60)
    except subprocess.TimeoutExpired:
        hub.kill()
    localhub.stop_proxy(workdir)
    subprocess.run(
        [*netns.nsenter_argv(info.cluster_netns), "scancel", "-u", info.gateway_user],
        check=False,
    )


#: --hub-apart: the jobs' nice value.  The local cluster has SLURM's
#: ``PropagatePrioProcess=1``: a job runs at the nice value of the sbatch that submitted
#: it, so the login node's sbatch (the local cluster's wrapper, see set_jobs_nice) and
#: the floor's sbatch run at this value; the login node's sshd, its squeue and scancel,
#: slurmd, slurmctld and slurmstepd stay at 0 (until 2026-11-29 the login node's sshd
#: was niced, and every squeue and ssh command of both hubs with it; a slurmd
#: niced with its jobs, starved, stopped answering slurmctld at N = 100, which requeued
#: its jobs).  19, the lowest priority: at nice 10, 100 runnable jobs (weight 110 each)
#: left the hub (1024) about a sixth of a core, and its event loop stalled for seconds
JOBS_NICE = 19


def set_jobs_nice(info, value: int | None) -> None:
    """Have the login node's ``sbatch`` (the local cluster's wrapper) run at nice
    ``value``, and so the jobs it submits (None: as it is)."""
    path = clusterconf.jobs_nice_file(Path(info.root))
    if value is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(f"{value}\n")
        path.chmod(0o644)


AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


def set_autogroup(value: str) -> str:
    """Turn the kernel's per-session CPU sharing on ("1") or off ("0"); returns what it
    was ("" where the kernel has none).  With it on, every job is a session of its own
    and gets the same CPU share as the hub whatever its nice value: 100 jobs leave the
    hub a hundredth of the CPU.  --hub-apart turns it off for the run, so the jobs' nice
    value counts against the hub's."""
    try:
        before = AUTOGROUP.read_text().strip()
        AUTOGROUP.write_text(value)
    except OSError:
        return ""
    return before


def servers_nice() -> list[int]:
    """The nice values of the running single-user servers (what --hub-apart gave them)."""
    out = set()
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and b"jupyterhub-singleuser" in Path(f"/proc/{d}/cmdline").read_bytes():
                out.add(int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[16]))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(out)


def run_one(
    impl: str,
    n: int,
    info,
    poll: int,
    steady_cycles: int,
    tunnel_key: str,
    hub_apart: bool = False,
    keep_logs: Path | None = None,
    profile: Path | None = None,
) -> Result:
    res = Result(impl, n, hub_apart)
    # the hub's own folder (its sqlite database, its log): on this machine's one disk,
    # which the jobs write to as well, or (--hub-apart) in memory
    workdir = Path(
        tempfile.mkdtemp(prefix=f"xh-bench-{impl}-{n}-", dir="/dev/shm" if hub_apart else None)
    )
    extra = (
        "c.SlurmSSHSpawner.require_github_id = False\n"
        'c.SlurmSSHSpawner.workshop_repo = ""\n'
        "c.JupyterHub.log_level = 'INFO'\n"
        "c.JupyterHub.concurrent_spawn_limit = 0\n"
        "c.JupyterHub.active_server_limit = 0\n"
        # JupyterHub's default (the local hub of the tests sets 60 s): its sweep of
        # every route is part of what a hub does while servers arrive
        "c.JupyterHub.last_activity_interval = 300\n"
        # 100 JupyterLab servers start on the same 2 cores as everything else: give
        # both implementations the same generous time to answer
        "c.SlurmSSHSpawner.http_timeout = 300\n"
        f"c.ConfigurableHTTPProxy.auth_token = {PROXY_TOKEN!r}\n"
    )
    post = baseline.config(info, tunnel_key, info.job_env) if impl == "baseline" else ""
    localhub.write_config(workdir, info, poll_interval=poll, extra=extra, post=post)
    hub = localhub.start_hub(workdir, debug=False)
    api = Api((workdir / "service_token").read_text().strip())
    names = [f"bench-{i:03d}" for i in range(n)]
    try:
        api.created(api("POST", "/users", json={"usernames": names}))
        cpu0, hs0, t_cmd0 = cpu_seconds(hub.pid), handshakes(info), time.time()
        requested: dict[str, float] = {}

        def start(name: str) -> None:
            requested[name] = time.time()
            r = api("POST", f"/users/{name}/server")
            if not api.started(r):
                res.notes.append(f"{name}: start {r.status_code} {r.text[:100]}")

        census = CpuCensus().__enter__()
        spy = spy_on(hub.pid, profile, f"hub-burst-{impl}-{n}", res.notes)
        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            list(ex.map(start, names))
        # readiness from the proxy's routing table (JupyterHub adds a user's route when
        # the server is up): watching costs the hub nothing
        ready: dict[str, float] = {}
        deadline = time.time() + 360
        proxy = requests.Session()
        proxy.headers["Authorization"] = f"token {PROXY_TOKEN}"
        last_check = time.time()
        while len(ready) < n and time.time() < deadline:
            routes = proxy.get(PROXY_API, timeout=30).json()
            now = time.time()
            for name in names:
                if name not in ready and f"/user/{name}" in routes:
                    ready[name] = now
            if now - last_check > 15:  # a rare look at the hub: did spawns fail?
                last_check = now
                users = api("GET", "/users").json()
                failed = sum(
                    1
                    for u in users
                    if u["name"] not in ready and not u.get("servers") and not u.get("pending")
                )
                if failed and failed + len(ready) >= n:
                    break
            time.sleep(READY_LOOK)
        end_spy(spy, res.notes)
        census.__exit__(None, None, None)
        res.cpu_by_kind = census.by_kind()
        res.servers_nice = servers_nice()
        res.failures = n - len(ready)
        res.all_ready_s = (max(ready.values()) - min(requested.values())) if ready else float("nan")
        latencies = [ready[nm] - requested[nm] for nm in ready]
        res.latency_median_s = percentile(latencies, 0.5)
        res.latency_p95_s = percentile(latencies, 0.95)
        cpu1, hs1 = cpu_seconds(hub.pid), handshakes(info)
        counts = localcluster.command_counts(since=t_cmd0)
        res.sbatch, res.squeue_burst = counts["sbatch"], counts["squeue"]
        res.handshakes_burst = hs1 - hs0
        res.hub_cpu_per_spawn_s = (cpu1 - cpu0) / n
        # each spawn's overhead: ready minus the moment its server listened (job log)
        states = {
            u["name"]: (u.get("servers") or {}).get("", {}).get("state") or {}
            for u in api("GET", "/users").json()
        }
        overheads, to_answered, to_routed, from_accepting = [], [], [], []
        hub_log = (workdir / "hub.log").read_text(errors="replace")
        if keep_logs:
            (keep_logs / f"{impl}-{n}-hub.log").write_text(hub_log)
        for name, t_ready in ready.items():
            if impl == "ours":
                log = Path(
                    f"/home/{info.gateway_user}/.xsedehub/jobs/"
                    f"{states[name].get('spawn_id')}/job.log"
                )
            else:
                log = Path(f"/home/{info.gateway_user}/bench-baseline-{name}.log")
            if keep_logs:
                shutil.copy(log, keep_logs / f"{impl}-{n}-{name}.job.log")
            t_listen = listening_time(log)
            if t_listen:
                overheads.append(t_ready - t_listen)
            t_accept = accepting_time(log) if impl == "ours" else None
            if t_accept:
                from_accepting.append(t_ready - t_accept)
            answered = hub_events(hub_log, name, t_cmd0 - 1).get("answered")
            if t_listen and answered:
                to_answered.append(answered - t_listen)
                to_routed.append(t_ready - answered)
        if to_answered:
            res.listening_to_answered_median_s = percentile(to_answered, 0.5)
            res.answered_to_routed_median_s = percentile(to_routed, 0.5)
        res.overhead_median_s = percentile(overheads, 0.5)
        res.overhead_p95_s = percentile(overheads, 0.95)
        if from_accepting:
            res.accepting_to_routed_median_s = percentile(from_accepting, 0.5)
            res.accepting_to_routed_p95_s = percentile(from_accepting, 0.95)
        # steady state: everyone works for a few poll intervals
        t_steady, cpu2 = time.time(), cpu_seconds(hub.pid)
        time.sleep(poll * steady_cycles)
        cpu3 = cpu_seconds(hub.pid)
        res.poll_cycles = steady_cycles
        res.squeue_steady = localcluster.command_counts(since=t_steady)["squeue"]
        res.hub_cpu_per_poll_cycle_s = (cpu3 - cpu2) / steady_cycles
        # everyone stops
        t_stop = time.time()
        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            list(ex.map(lambda nm: api("DELETE", f"/users/{nm}/server"), names))
        deadline = time.time() + 180
        while time.time() < deadline:
            if not any(u.get("servers") for u in api("GET", "/users").json()):
                break
            time.sleep(1)
        res.scancel = localcluster.command_counts(since=t_stop)["scancel"]
        res.handshakes_total = handshakes(info) - hs0
        res.hub_cpu_total_s = cpu_seconds(hub.pid) - cpu0
        res.hub_peak_mb = peak_mb(hub.pid)
    finally:
        stop_hub(hub, workdir, info)
        time.sleep(3)  # nothing may be left running between rounds
    return res


# ------------------------------------------------------------------ the physical floor
FLOOR_SCRIPT = """#!/bin/bash
#SBATCH --job-name=xh-floor-{i:03d}
#SBATCH --partition={partition}
#SBATCH --time=01:00:00
#SBATCH --mem=512M
#SBATCH --cpus-per-task=1
#SBATCH --output={dir}/job.log
cd {dir} || exit 2
{environment}
exec {server} --ServerApp.sock={dir}/server.sock --ServerApp.sock_mode=0600 {base_url}
"""

#: the floor's server: the same jupyterhub-singleuser as a spawn runs (its hub API is
#: the stand-in below), or `jupyter lab` (no hub at all; it imports about 1.4 s of CPU
#: less than jupyterhub-singleuser, which imports much of JupyterHub itself)
FLOOR_SERVERS = ("singleuser", "lab")


class HubStandIn:
    """What jupyterhub-singleuser needs of a hub to start, and no more: its hub API
    answers the version check (``GET .../hub/api``) and takes anything else (activity
    reports) with an empty 200.  A thread of this process, on the hub side's address, so
    the jobs reach it as they reach the hub's sshd; it does no work per request that a
    hub would (no database, no authentication)."""

    def __init__(self, host: str, version: str) -> None:
        import http.server
        import threading

        body = json.dumps({"version": version}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                out = body if self.path.rstrip("/").endswith("/hub/api") else b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/hub/api"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def floor_script(i: int, d: Path, info, partition: str, server: str, hub: HubStandIn | None) -> str:
    name = f"floor-{i:03d}"
    if server == "lab":
        return FLOOR_SCRIPT.format(
            i=i,
            partition=partition,
            dir=d,
            environment="",
            server=f"{info.job_env}/bin/jupyter-lab --no-browser",
            base_url=f"--ServerApp.base_url=/user/{name}/",
        )
    assert hub is not None
    env = {  # what a spawn's server gets, with the stand-in for the hub API
        "JUPYTERHUB_API_TOKEN": os.urandom(16).hex(),
        "JUPYTERHUB_API_URL": hub.url,
        "JUPYTERHUB_CLIENT_ID": f"jupyterhub-user-{name}",
        "JUPYTERHUB_USER": name,
        "JUPYTERHUB_SERVER_NAME": "",
        "JUPYTERHUB_BASE_URL": "/",
        "JUPYTERHUB_SERVICE_PREFIX": f"/user/{name}/",
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:8888/user/{name}/",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": f"/user/{name}/oauth_callback",
        "JUPYTERHUB_ROOT_DIR": ".",
    }
    return FLOOR_SCRIPT.format(
        i=i,
        partition=partition,
        dir=d,
        environment="\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        server=f"{info.job_env}/bin/jupyterhub-singleuser",
        base_url="",
    )


def answers(sock: str, prefix: str) -> bool:
    """The server behind the unix socket ``sock`` gives any HTTP answer."""
    import http.client
    import socket as _socket

    class UnixHTTP(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(sock)

    conn = UnixHTTP("localhost", timeout=5)
    try:
        conn.request("GET", f"{prefix}api")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def run_floor(
    n: int, info, server: str = "singleuser", partition: str = "compute", nice: int = 0
) -> Result:
    """N servers with no hub in the loop: one sbatch each, as the gateway account, on the
    login node; ready when the server answers on its socket (read from this machine: the
    job directories are on the same file system)."""
    res = Result("floor" if server == "singleuser" else f"floor ({server})", n)
    top = Path(f"/home/{info.gateway_user}/bench-floor")
    hub = HubStandIn(info.hub_ip, jupyterhub.__version__) if server == "singleuser" else None
    cluster = netns.nsenter_argv(info.cluster_netns)
    as_gateway = ["runuser", "-u", info.gateway_user, "--"]
    subprocess.run([*as_gateway, "rm", "-rf", str(top)], check=False)
    subprocess.run([*as_gateway, "mkdir", "-p", "-m", "700", str(top)], check=True)
    requested: dict[int, float] = {}
    dirs = {}
    for i in range(n):
        d = top / f"{i:03d}"
        subprocess.run([*as_gateway, "mkdir", "-m", "700", str(d)], check=True)
        dirs[i] = d
    t_cmd0 = time.time()

    def submit(i: int) -> None:
        script = floor_script(i, dirs[i], info, partition, server, hub)
        requested[i] = time.time()
        r = subprocess.run(
            [*cluster, "nice", "-n", str(nice), *as_gateway, f"{info.slurm_bin}/sbatch"]
            + ["--parsable"],
            input=script,
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode:
            res.notes.append(f"floor {i}: sbatch {r.returncode} {r.stderr.strip()[:100]}")

    try:
        census = CpuCensus().__enter__()
        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            list(ex.map(submit, range(n)))
        deadline = time.time() + 360

        def first_answer(i: int) -> float | None:
            # one prober per server: a server that accepts but is slow to answer holds
            # only its own prober (a single loop over all sockets waited for each in
            # turn, and so counted the slow ones' delay against every server after them)
            sock, prefix = str(dirs[i] / "server.sock"), f"/user/floor-{i:03d}/"
            while time.time() < deadline:
                if answers(sock, prefix):
                    return time.time()
                time.sleep(READY_LOOK)
            return None

        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            answered = list(ex.map(first_answer, range(n)))
        ready = {i: t for i, t in enumerate(answered) if t is not None}
        census.__exit__(None, None, None)
        res.cpu_by_kind = census.by_kind()
        res.servers_nice = servers_nice()
        res.failures = n - len(ready)
        if ready:
            res.all_ready_s = max(ready.values()) - min(requested.values())
        latencies = [ready[i] - requested[i] for i in ready]
        res.latency_median_s = percentile(latencies, 0.5)
        res.latency_p95_s = percentile(latencies, 0.95)
        # the floor's own "overhead": from the server's listening line to its first
        # answer on the socket (no tunnel, no hub): what a starting server takes to serve
        overheads = [
            ready[i] - t for i in ready if (t := listening_time(dirs[i] / "job.log")) is not None
        ]
        res.overhead_median_s = percentile(overheads, 0.5)
        res.overhead_p95_s = percentile(overheads, 0.95)
        res.sbatch = localcluster.command_counts(since=t_cmd0)["sbatch"]
        for i in sorted(set(range(n)) - set(ready))[:3]:  # why some never answered
            try:
                tail = (dirs[i] / "job.log").read_text(errors="replace").splitlines()[-5:]
            except OSError as e:
                tail = [str(e)]
            res.notes.append(f"floor {i} never answered: " + " | ".join(tail))
    finally:
        subprocess.run([*cluster, "scancel", "-u", info.gateway_user], check=False)
        time.sleep(3)
        subprocess.run([*as_gateway, "rm", "-rf", str(top)], check=False)
        if hub is not None:
            hub.close()
    return res


# ------------------------------------------------------------------ one spawn's phases
HUB_LINE = re.compile(r"^\[\w (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) JupyterHub [^\]]*\] (.*)$")
PHASES = (
    ("hub work before sbatch", "requested", "sbatch"),
    ("sbatch round trip", "sbatch", "submitted"),
    ("queue (until the hub sees RUNNING)", "submitted", "running"),
    ("job start to server listening", "running", "listening"),
    ("listening to routed", "listening", "routed"),
)


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def hub_events(log: str, user: str, since: float) -> dict[str, float]:
    """When the hub logged the submission, the job running and its own check of the
    server answering ("answered"), for ``user``."""
    seen: dict[str, float] = {}
    for line in log.splitlines():
        m = HUB_LINE.match(line)
        if not m or _stamp(m.group(1)) < since:
            continue
        msg = m.group(2)
        if msg.startswith(f"{user}: Submitted batch job"):
            seen.setdefault("submitted", _stamp(m.group(1)))
        elif msg.startswith(f"{user}: Job ") and " running on " in msg:
            seen.setdefault("running", _stamp(m.group(1)))
        elif msg == f"{user}: The server listens and the tunnel to the compute node is up":
            seen.setdefault("answered", _stamp(m.group(1)))
    return seen


def sbatch_time(info, since: float) -> float | None:
    path = Path(info.root) / "log" / "commands.log"
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "sbatch" and float(parts[0]) >= since:
            return float(parts[0])
    return None


def run_phases(info, poll: int, repeats: int) -> list[dict[str, float]]:
    """One spawn at a time on an idle cluster, ``repeats`` times: each spawn's phases
    (seconds), from the request, the login node's record of sbatch, the hub's log, the
    job's log and the proxy's routing table."""
    workdir = Path(tempfile.mkdtemp(prefix="xh-bench-phases-"))
    extra = (
        "c.SlurmSSHSpawner.require_github_id = False\n"
        'c.SlurmSSHSpawner.workshop_repo = ""\n'
        "c.JupyterHub.log_level = 'INFO'\n"
        f"c.ConfigurableHTTPProxy.auth_token = {PROXY_TOKEN!r}\n"
    )
    localhub.write_config(workdir, info, poll_interval=poll, extra=extra)
    hub = localhub.start_hub(workdir, debug=False)
    api = Api((workdir / "service_token").read_text().strip())
    proxy = requests.Session()
    proxy.headers["Authorization"] = f"token {PROXY_TOKEN}"
    out = []
    try:
        for k in range(repeats):
            name = f"phase-{k:02d}"
            api.created(api("POST", "/users", json={"usernames": [name]}))
            t = {"requested": time.time()}
            r = api("POST", f"/users/{name}/server")
            if not api.started(r):
                print(f"{name}: start {r.status_code} {r.text[:200]}")
                continue
            deadline = time.time() + 180
            while time.time() < deadline:
                if f"/user/{name}" in proxy.get(PROXY_API, timeout=30).json():
                    t["routed"] = time.time()
                    break
                time.sleep(0.02)
            state = api("GET", f"/users/{name}").json()["servers"][""]["state"]
            job_log = Path(
                f"/home/{info.gateway_user}/.xsedehub/jobs/{state.get('spawn_id')}/job.log"
            )
            t["listening"] = listening_time(job_log) or float("nan")
            t.update(
                hub_events(
                    (workdir / "hub.log").read_text(errors="replace"), name, t["requested"] - 1
                )
            )
            t["sbatch"] = sbatch_time(info, t["requested"]) or float("nan")
            phases = {
                label: t.get(b, float("nan")) - t.get(a, float("nan")) for label, a, b in PHASES
            }
            phases["total (request to routed)"] = t.get("routed", float("nan")) - t["requested"]
            out.append(phases)
            print(json.dumps({k2: round(v, 3) for k2, v in phases.items()}), flush=True)
            api("DELETE", f"/users/{name}/server")
            deadline = time.time() + 60
            while time.time() < deadline and api("GET", f"/users/{name}").json()["servers"]:
                time.sleep(0.5)
    finally:
        stop_hub(hub, workdir, info)
    return out


def phase_table(runs: list[dict[str, float]]) -> str:
    labels = [label for label, _, _ in PHASES] + ["total (request to routed)"]
    rows = ["| phase | median (s) | min (s) | max (s) |", "|---|---|---|---|"]
    for label in labels:
        vals = [r[label] for r in runs if r[label] == r[label]]  # not NaN
        if vals:
            rows.append(
                f"| {label} | {percentile(vals, 0.5):.2f} | {min(vals):.2f} | {max(vals):.2f} |"
            )
    return "\n".join(rows)


def table(results: list[Result]) -> str:
    cols = [
        ("impl", "impl"),
        ("N", "n"),
        ("all ready (s)", "all_ready_s"),
        ("overhead median (s)", "overhead_median_s"),
        ("overhead p95 (s)", "overhead_p95_s"),
        ("listening to hub port open, median (s)", "listening_to_answered_median_s"),
        ("hub port open to routed, median (s)", "answered_to_routed_median_s"),
        (
            "socket accepting to routed, median / p95 (s)",
            lambda r: f"{r.accepting_to_routed_median_s:.3g} / {r.accepting_to_routed_p95_s:.3g}",
        ),
        ("latency median (s)", "latency_median_s"),
        ("latency p95 (s)", "latency_p95_s"),
        ("SSH handshakes", "handshakes_total"),
        ("sbatch", "sbatch"),
        ("squeue (burst)", "squeue_burst"),
        ("squeue per poll cycle", lambda r: r.squeue_steady / max(1, r.poll_cycles)),
        ("scancel", "scancel"),
        ("hub CPU/spawn (s)", "hub_cpu_per_spawn_s"),
        ("hub CPU/poll cycle (s)", "hub_cpu_per_poll_cycle_s"),
        ("hub peak MB", "hub_peak_mb"),
        ("failures", "failures"),
    ]
    return markdown_table(results, cols)


def ratios(results: list[Result]) -> str:
    lines = []
    by = {(r.impl, r.n): r for r in results}

    def q(a: float, b: float) -> str:
        return f"{a / b:.2f}" if b else "n/a"

    for n in sorted({r.n for r in results}):
        ours, base, floor = by.get(("ours", n)), by.get(("baseline", n)), by.get(("floor", n))
        if ours and floor:
            lines.append(
                f"N={n}: ours/floor  all-ready {q(ours.all_ready_s, floor.all_ready_s)}, "
                f"overhead {q(ours.overhead_median_s, floor.overhead_median_s)}, "
                f"latency median {q(ours.latency_median_s, floor.latency_median_s)}, "
                f"latency p95 {q(ours.latency_p95_s, floor.latency_p95_s)}"
            )
        if not ours or not base:
            continue
        lines.append(
            f"N={n}: ours/baseline  all-ready {q(ours.all_ready_s, base.all_ready_s)}, "
            f"overhead {q(ours.overhead_median_s, base.overhead_median_s)}, "
            f"handshakes {ours.handshakes_total}/{base.handshakes_total}, "
            f"squeue per cycle {q(ours.squeue_steady, base.squeue_steady)}, "
            f"hub CPU/spawn {q(ours.hub_cpu_per_spawn_s, base.hub_cpu_per_spawn_s)}, "
            f"hub CPU/poll cycle "
            f"{q(ours.hub_cpu_per_poll_cycle_s, base.hub_cpu_per_poll_cycle_s)}, "
            f"peak memory {q(ours.hub_peak_mb, base.hub_peak_mb)}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument(
        "--impl",
        nargs="+",
        default=["ours", "baseline", "floor"],
        choices=["ours", "baseline", "floor"],
    )
    ap.add_argument("--poll", type=int, default=10, help="poll interval of both spawners (s)")
    ap.add_argument("--cycles", type=int, default=3, help="poll intervals to stay running")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--hub-apart",
        action="store_true",
        help="model a hub on a machine of its own: its folder (the sqlite database) in "
        f"memory, and the cluster's jobs at nice {JOBS_NICE} (submitted at that nice value: "
        "the login node's sbatch and the floor's; SLURM's PropagatePrioProcess=1; the "
        "kernel's per-session CPU sharing, autogroup, off for the run), so the hub's CPU "
        "and disk are not the jobs'",
    )
    ap.add_argument(
        "--floor-server",
        choices=FLOOR_SERVERS,
        default="singleuser",
        help="the floor's server: jupyterhub-singleuser with a stand-in hub API (default), "
        "or jupyter lab",
    )
    ap.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy the hub's log and every job's log of each burst into DIR",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample each hub with py-spy (if installed) from the first start request "
        "until all are ready, into DIR/hub-burst-IMPL-N.txt (folded stacks; "
        "benchmarks/profile_summary.py reads them)",
    )
    ap.add_argument(
        "--phases",
        type=int,
        metavar="K",
        help="instead of a burst: K single spawns on an idle cluster, split into phases",
    )
    args = ap.parse_args()
    finally_on_sigterm()  # the hubs, their jobs and the jobs' nice value go as after an error
    r = subprocess.run([sys.executable, "-m", "xsedehub.cli", "cluster", "up"], check=False)
    if r.returncode:
        return r.returncode
    info = localcluster.ClusterInfo.load()
    netns.enter(info.hub_netns)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    if args.phases:
        runs = run_phases(info, args.poll, args.phases)
        print()
        print(phase_table(runs))
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=2))
        return 0
    # the baseline's single shared tunnel key (as in the 2019 setup), removed afterwards
    import asyncssh

    shared = asyncssh.generate_private_key("ssh-ed25519")
    line = (
        f'restrict,port-forwarding,permitopen="127.0.0.1:{info.hub_api_port}" '
        + shared.export_public_key().decode().strip()
        + " bench-baseline-shared"
    )
    path = Path(info.tunnel_authorized_keys)
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    results = []
    set_jobs_nice(info, JOBS_NICE if args.hub_apart else None)
    autogroup = set_autogroup("0") if args.hub_apart else ""
    try:
        if "baseline" in args.impl:
            path.write_text(path.read_text() + line + "\n")
        for n in args.n:
            for impl in args.impl:
                print(f"== {impl}, N={n} ...", flush=True)
                if impl == "floor":
                    res = run_floor(
                        n, info, args.floor_server, nice=JOBS_NICE if args.hub_apart else 0
                    )
                    res.hub_apart = args.hub_apart
                else:
                    res = run_one(
                        impl,
                        n,
                        info,
                        args.poll,
                        args.cycles,
                        shared.export_private_key().decode(),
                        args.hub_apart,
                        args.keep_logs,
                        args.profile,
                    )
                results.append(res)
                print(json.dumps(asdict(res)), flush=True)
    finally:
        # the shared key first: it may listen on any of the hub's ports
        path.write_text(
            "".join(
                ln + "\n"
                for ln in path.read_text().splitlines()
                if not ln.endswith("bench-baseline-shared")
            )
        )
        if autogroup:
            set_autogroup(autogroup)
        set_jobs_nice(info, None)
    print()
    print(table(results))
    print()
    print(ratios(results))
    print()
    print("CPU seconds by kind of process, from the first request until all were ready:")
    for r in results:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in r.cpu_by_kind.items() if v >= 0.1)
        print(f"  {r.impl} N={r.n}: {kinds}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
