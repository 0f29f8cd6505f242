"""What a Prometheus scrape of /hub/metrics costs the hub, and what the hooks cost a spawn.

    /opt/xsedehub/hub-env/bin/python benchmarks/metrics_scrape.py --n 10 100 1000

For N servers (N watched jobs on N SSH connections, as in xsede mode, where each user has
their own; N live keys in a tunnel-key file) it prints the time of one whole
``generate_latest`` of the default registry (what JupyterHub's /metrics handler writes,
JupyterHub's own metrics included) and of xsedehub's scrape-time gauges alone, and the
time of one spawn's worth of hook calls.  No cluster, no network: the connections never
log in.  Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import asyncssh
import jupyterhub.metrics  # noqa: F401  (JupyterHub's own metrics: a whole page)
from prometheus_client import REGISTRY, generate_latest
from xsedehub.spawner import metrics, slurm
from xsedehub.spawner.ssh import Connection, LoginNode, SSHIdentity
from xsedehub.spawner.tunnel import TunnelKeys


class Idle:
    async def poll_and_notify(self) -> None:
        return None


def best_of(fn, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


async def one(n: int, workdir: Path) -> dict[str, float]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    node = LoginNode("login.bench", 22, "/nonexistent")
    conns = []
    for i in range(n):
        conn = Connection(node, SSHIdentity(f"user{i}", key))
        metrics.ssh_connected(conn)
        conn.status.watch(str(1000 + i), Idle(), 3600)
        conn.status.jobs = slurm.parse_squeue(
            f"{1000 + i}|RUNNING|c1|None|N/A|user{i}|xsedehub:u{i}-{i:012x}\n"
        )
        conn.status.fetched_at = time.monotonic()
        conns.append(conn)
    path = str(workdir / f"keys-{n}")
    keys = TunnelKeys.for_file(path, (30000, 30000 + n), "127.0.0.1", 8081)
    for i in range(n):
        await keys.grant(f"u{i}-{i:012x}", 3600)
    try:
        scrape = best_of(lambda: generate_latest(REGISTRY))
        ours = best_of(lambda: list(metrics.COLLECTOR.collect()))
        sp = type("S", (), {"login_host": "login.bench"})()

        def hooks() -> None:
            t = time.monotonic()
            metrics.queue_wait(sp, "compute", t)
            metrics.startup(sp, "compute", t)
            metrics.SPAWNS.labels("login.bench", "started").inc()

        hook = best_of(hooks, 1000)
        size = len(generate_latest(REGISTRY))
    finally:
        for conn in conns:
            conn.status.close()
        TunnelKeys._instances.pop(path, None)
    return {"scrape_ms": scrape * 1e3, "ours_ms": ours * 1e3, "hooks_us": hook * 1e6, "bytes": size}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    args = p.parse_args()
    print(f"{'N':>6} {'whole scrape':>14} {'xsedehub gauges':>16} {'hooks/spawn':>12} {'page':>9}")
    with tempfile.TemporaryDirectory() as d:
        for n in args.n:
            r = await one(n, Path(d))
            print(
                f"{n:>6} {r['scrape_ms']:>11.2f} ms {r['ours_ms']:>13.2f} ms "
                f"{r['hooks_us']:>9.1f} us {r['bytes']:>7.0f} B"
            )


if __name__ == "__main__":
    asyncio.run(main())
