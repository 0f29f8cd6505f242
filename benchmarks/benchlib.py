"""What the benchmarks share: a hub's CPU and memory from /proc, percentiles, and a
client of the hub's REST API.  Standard library and requests only (burst.py's baseline
needs batchspawner; scale.py does not)."""

from __future__ import annotations

import os
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

    def __call__(self, method: str, path: str, **kw):
        return self.s.request(method, f"{HUB}/hub/api{path}", timeout=300, **kw)


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
