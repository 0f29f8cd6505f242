"""The workshop burst: N attendees press Start at once, work for a few poll intervals,
then stop.  xsedehub's spawner against batchspawner's stock SlurmSpawner over ssh (the
baseline, benchmarks/baseline.py), in the same run, on the local cluster, gateway mode,
real single-user servers behind real tunnels.

    sudo /opt/xsedehub/hub-env/bin/python benchmarks/burst.py            # N = 10 50 100
    sudo /opt/xsedehub/hub-env/bin/python benchmarks/burst.py --n 10 --impl ours

Printed for each implementation and N: time until all servers are ready; each spawn's
overhead (ready time minus the moment the job's server was listening, from its log);
SSH handshakes at the login node; sbatch/squeue/scancel runs on the login node (counted by
the local cluster's command wrappers); hub CPU seconds per spawn and per poll cycle; hub
peak memory; failures.  Then ours/baseline ratios.  Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import xh_bench_baseline as baseline  # noqa: E402

from xsedehub.testbed import localcluster, localhub, netns  # noqa: E402

HUB = "http://127.0.0.1:8000"
PROXY_API = "http://127.0.0.1:8001/api/routes"
PROXY_TOKEN = "xsedehub-bench-" + os.urandom(8).hex()
TICK = os.sysconf("SC_CLK_TCK")
LISTENING = re.compile(
    r"^\[I (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ServerApp\] Jupyter Server .* is running at"
)


@dataclass
class Result:
    impl: str
    n: int
    all_ready_s: float = 0.0
    overhead_median_s: float = 0.0
    overhead_p95_s: float = 0.0
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
    notes: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def handshakes(info) -> int:
    log = Path(info.root) / "log" / "sshd_login.log"
    return log.read_text(errors="replace").count(f"Accepted publickey for {info.gateway_user}")


def listening_time(log: Path) -> float | None:
    try:
        for line in log.read_text(errors="replace").splitlines():
            m = LISTENING.match(line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Api:
    def __init__(self, token: str):
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"token {token}"
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=128)
        self.s.mount("http://", adapter)

    def __call__(self, method: str, path: str, **kw):
        return self.s.request(method, f"{HUB}/hub/api{path}", timeout=300, **kw)


def run_one(impl: str, n: int, info, poll: int, steady_cycles: int, tunnel_key: str) -> Result:
    res = Result(impl, n)
    workdir = Path(tempfile.mkdtemp(prefix=f"xh-bench-{impl}-{n}-"))
    extra = (
        "c.SlurmSSHSpawner.require_github_id = False\n"
        'c.SlurmSSHSpawner.workshop_repo = ""\n'
        "c.JupyterHub.log_level = 'INFO'\n"
        "c.JupyterHub.concurrent_spawn_limit = 0\n"
        "c.JupyterHub.active_server_limit = 0\n"
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
        api("POST", "/users", json={"usernames": names}).raise_for_status()
        cpu0, hs0, t_cmd0 = cpu_seconds(hub.pid), handshakes(info), time.time()
        requested: dict[str, float] = {}

        def start(name: str) -> None:
            requested[name] = time.time()
            r = api("POST", f"/users/{name}/server")
            if r.status_code not in (201, 202):
                res.notes.append(f"{name}: start {r.status_code} {r.text[:100]}")

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
            time.sleep(0.25)
        res.failures = n - len(ready)
        res.all_ready_s = (max(ready.values()) - min(requested.values())) if ready else float("nan")
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
        overheads = []
        for name, t_ready in ready.items():
            if impl == "ours":
                log = Path(
                    f"/home/{info.gateway_user}/.xsedehub/jobs/"
                    f"{states[name].get('spawn_id')}/job.log"
                )
            else:
                log = Path(f"/home/{info.gateway_user}/bench-baseline-{name}.log")
            t_listen = listening_time(log)
            if t_listen:
                overheads.append(t_ready - t_listen)
        res.overhead_median_s = percentile(overheads, 0.5)
        res.overhead_p95_s = percentile(overheads, 0.95)
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
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(60)
        except subprocess.TimeoutExpired:
            hub.kill()
        localhub.stop_proxy(workdir)
        # nothing may be left running between rounds
        subprocess.run(
            [*netns.nsenter_argv(info.cluster_netns), "scancel", "-u", info.gateway_user],
            check=False,
        )
        time.sleep(3)
    return res


def table(results: list[Result]) -> str:
    cols = [
        ("impl", "impl"),
        ("N", "n"),
        ("all ready (s)", "all_ready_s"),
        ("overhead median (s)", "overhead_median_s"),
        ("overhead p95 (s)", "overhead_p95_s"),
        ("SSH handshakes", "handshakes_total"),
        ("sbatch", "sbatch"),
        ("squeue (burst)", "squeue_burst"),
        ("squeue per poll cycle", None),
        ("scancel", "scancel"),
        ("hub CPU/spawn (s)", "hub_cpu_per_spawn_s"),
        ("hub CPU/poll cycle (s)", "hub_cpu_per_poll_cycle_s"),
        ("hub peak MB", "hub_peak_mb"),
        ("failures", "failures"),
    ]
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    rows = []
    for r in results:
        cells = []
        for _, attr in cols:
            if attr is None:
                val = r.squeue_steady / max(1, r.poll_cycles)
            else:
                val = getattr(r, attr)
            cells.append(f"{val:.3g}" if isinstance(val, float) else str(val))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def ratios(results: list[Result]) -> str:
    lines = []
    by = {(r.impl, r.n): r for r in results}
    for n in sorted({r.n for r in results}):
        ours, base = by.get(("ours", n)), by.get(("baseline", n))
        if not ours or not base:
            continue

        def q(a: float, b: float) -> str:
            return f"{a / b:.2f}" if b else "n/a"

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
    ap.add_argument("--impl", nargs="+", default=["ours", "baseline"], choices=["ours", "baseline"])
    ap.add_argument("--poll", type=int, default=10, help="poll interval of both spawners (s)")
    ap.add_argument("--cycles", type=int, default=3, help="poll intervals to stay running")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    r = subprocess.run([sys.executable, "-m", "xsedehub.cli", "cluster", "up"], check=False)
    if r.returncode:
        return r.returncode
    info = localcluster.ClusterInfo.load()
    netns.enter(info.hub_netns)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    # the baseline's single shared tunnel key (as in the 2019 setup), removed afterwards
    import asyncssh

    shared = asyncssh.generate_private_key("ssh-ed25519")
    line = (
        f'restrict,port-forwarding,permitopen="127.0.0.1:{info.hub_api_port}" '
        + shared.export_public_key().decode().strip()
        + " bench-baseline-shared"
    )
    path = Path(info.tunnel_authorized_keys)
    results = []
    try:
        if "baseline" in args.impl:
            path.write_text(path.read_text() + line + "\n")
        for n in args.n:
            for impl in args.impl:
                print(f"== {impl}, N={n} ...", flush=True)
                res = run_one(
                    impl, n, info, args.poll, args.cycles, shared.export_private_key().decode()
                )
                results.append(res)
                print(json.dumps(asdict(res)), flush=True)
    finally:
        path.write_text(
            "".join(
                ln + "\n"
                for ln in path.read_text().splitlines()
                if not ln.endswith("bench-baseline-shared")
            )
        )
    print()
    print(table(results))
    print()
    print(ratios(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
