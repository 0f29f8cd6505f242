"""Spawn options (form, URL, REST API) and progress, against the real local cluster."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import canaries, fill_nodes, make_hub, remove_canaries, stop_hub_and_proxy
from .test_gateway import in_cluster_root

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    h = make_hub(tmp_path_factory.mktemp("formhub"), cluster, provider, poll_interval=5)
    h.client.login("ada")
    h.client.login("grace")
    yield h
    stop_hub_and_proxy(h)


def all_jobs() -> set[str]:
    return set(in_cluster_root(["squeue", "-h", "--states=all", "-o", "%i"]).split())


HOSTILE = [
    ({"partition": "nope"}, "partition"),
    ({"partition": "compute\n#SBATCH --uid=0"}, "partition"),
    ({"partition": "compute; touch /tmp/xh-canary"}, "partition"),
    ({"walltime": "12:00:00"}, "walltime"),
    ({"walltime": "$(touch /tmp/xh-canary)"}, "walltime"),
    ({"cores": 99}, "cores"),
    ({"cores": "1`touch /tmp/xh-canary`"}, "cores"),
    ({"cores": True}, "cores"),
    ({"memory": "100G"}, "memory"),
    ({"memory": "1G\n"}, "memory"),
    ({"gpus": 1}, "gpus"),
    ({"account": "abc"}, "account"),
    ({"image": "evil"}, "options"),
    ({"partition": {"nested": "x"}}, "partition"),
    ({"walltime": "01:00:00" * 200}, "walltime"),
]


def test_hostile_options_through_the_rest_api(hub):
    c = hub.client
    remove_canaries()
    before = all_jobs()
    for opts, field in HOSTILE:
        r = c.start("ada-l", opts)
        assert r.status_code == 400, (opts, r.status_code, r.text)
        assert field in r.json()["message"], (opts, r.text)
        assert not c.user("ada-l")["servers"], opts
    time.sleep(1)
    assert all_jobs() <= before, "a job was submitted for a refused request"
    assert canaries() == [], "an injected command ran"


def test_form_shows_partitions_and_availability(hub):
    c = hub.client
    s = c.login("grace")
    page = s.get(f"{c.url}/hub/spawn", timeout=30)
    assert page.status_code == 200
    assert 'name="partition" value="compute"' in page.text
    assert 'name="partition" value="debug"' in page.text
    assert "cores idle on" in page.text  # live from sinfo
    # a bad value through the form: the form again, with the field named
    xsrf = s.cookies.get("_xsrf", path="/hub/") or s.cookies.get("_xsrf")
    r = s.post(
        f"{c.url}/hub/spawn",
        data={"partition": "debug", "cores": "99", "walltime": "00:10:00", "_xsrf": xsrf},
        timeout=30,
    )
    assert r.status_code == 400
    assert "cores: at most 2 in partition debug" in r.text
    assert not c.user("grace")["servers"]


def test_spawn_from_url_query(hub):
    c = hub.client
    s = c.login("grace")
    r = s.get(
        f"{c.url}/hub/spawn/grace?partition=debug&walltime=00:10:00&cores=2",
        timeout=60,
        allow_redirects=False,
    )
    assert r.status_code in (302, 303), r.text[:500]
    c.wait_ready("grace")
    out = in_cluster_root(
        ["squeue", "-h", "-n", "jupyter-grace", "-t", "RUNNING", "-o", "%P %l %C"]
    ).split()
    assert out == ["debug", "10:00", "2"]
    c.stop("grace")


def scrape(c) -> dict[tuple[str, frozenset], float]:
    """xsedehub's samples on the hub's /hub/metrics, read as a Prometheus server would
    (with a token that has the read:metrics scope)."""
    r = c.api.get(f"{c.url}/hub/metrics", timeout=30)
    assert r.status_code == 200, r.text[:300]
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(r.text)
        if fam.name.startswith("xsedehub_")
        for s in fam.samples
    }


def test_metrics_move_after_a_spawn_and_a_refusal(hub, cluster):
    c = hub.client
    assert requests.get(f"{c.url}/hub/metrics", timeout=30).status_code == 403  # no token
    host = cluster.login_ip  # the cluster label: the configured login host

    def at(samples, name, **labels):
        return samples.get((name, frozenset({"cluster": host, **labels}.items())), 0.0)

    s = c.login("grace")
    s.get(f"{c.url}/hub/spawn", timeout=30)
    xsrf = s.cookies.get("_xsrf", path="/hub/") or s.cookies.get("_xsrf")
    before = scrape(c)
    r = c.start("grace", {"partition": "debug", "cores": 99})  # refused in start()
    assert r.status_code == 400, r.text
    form = {"partition": "debug", "cores": "99", "walltime": "00:10:00", "_xsrf": xsrf}
    r = s.post(f"{c.url}/hub/spawn", data=form, timeout=30)  # refused by the form
    assert r.status_code == 400, r.text[:300]
    r = c.start("grace", {"partition": "debug", "walltime": "00:10:00"})
    assert r.status_code in (201, 202), r.text
    c.wait_ready("grace")
    up = scrape(c)
    moved = {
        o: at(up, "xsedehub_spawns_total", outcome=o)
        - at(before, "xsedehub_spawns_total", outcome=o)
        for o in ("started", "refused", "job_failed", "unreachable", "timeout", "error")
    }
    assert moved == {
        "started": 1,
        "refused": 2,
        "job_failed": 0,
        "unreachable": 0,
        "timeout": 0,
        "error": 0,
    }
    for name in ("xsedehub_queue_wait_seconds_count", "xsedehub_startup_seconds_count"):
        assert at(up, name, partition="debug") == at(before, name, partition="debug") + 1, name
    assert at(up, "xsedehub_squeue_seconds_count") > at(before, "xsedehub_squeue_seconds_count")
    assert at(up, "xsedehub_ssh_connections_open") >= 1
    assert at(up, "xsedehub_ssh_connects_total", kind="first") >= 1
    tunnel_keys = ("xsedehub_tunnel_keys_live", frozenset())
    assert up[tunnel_keys] == before.get(tunnel_keys, 0) + 1
    # grace's job, besides whatever ran before (the module's hub is shared)
    for name in ("xsedehub_jobs_believed_running", "xsedehub_jobs_in_squeue"):
        assert at(up, name) == at(before, name) + 1, name
    assert at(up, "xsedehub_squeue_result_age_seconds") >= 0
    assert ("xsedehub_squeue_result_age_seconds", frozenset({("cluster", host)})) in up
    c.stop("grace")
    down = scrape(c)
    assert down[tunnel_keys] == before.get(tunnel_keys, 0)
    assert at(down, "xsedehub_jobs_believed_running") == at(
        before, "xsedehub_jobs_believed_running"
    )


def _events(c, name: str, into: list, stop: threading.Event) -> None:
    url = f"{c.url}/hub/api/users/{name}/server/progress"
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with c.api.get(url, stream=True, timeout=120) as r:
                if r.status_code != 200:
                    time.sleep(0.2)
                    continue
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data:"):
                        into.append(json.loads(line[5:]))
                return
        except requests.RequestException:
            time.sleep(0.2)


def test_progress_while_queued_shows_reason_and_node(hub, cluster):
    c = hub.client
    fillers = fill_nodes(cluster)
    try:
        events: list[dict] = []
        stop = threading.Event()
        r = c.start("ada-l")
        assert r.status_code in (201, 202), r.text
        t = threading.Thread(target=_events, args=(c, "ada-l", events, stop), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            "pending" in e.get("message", "") for e in events
        ):
            time.sleep(0.2)
    finally:
        in_cluster_root(["scancel", *fillers])
    c.wait_ready("ada-l")
    t.join(30)
    stop.set()
    messages = [e.get("message", "") for e in events]
    text = "\n".join(messages)
    assert "Submitted batch job" in text
    assert "is pending (Resources)" in text or "is pending (Priority)" in text, text
    assert any(f"running on {n}" in m for n in cluster.nodes for m in messages), text
    assert "tunnel to the compute node is up" in text
    assert events[-1].get("ready") is True
    c.stop("ada-l")


def test_job_that_dies_at_start_shows_its_log(hub):
    c = hub.client
    cfg = hub.workdir / "jupyterhub_config.py"
    good = cfg.read_text()
    cfg.write_text(
        good.replace(
            "from xsedehub.config import apply",
            'c.SlurmSSHSpawner.job_python = "/nonexistent/python3"\n'
            "from xsedehub.config import apply",
        )
    )
    hub.restart()
    try:
        events: list[dict] = []
        stop = threading.Event()
        r = c.start("grace")
        assert r.status_code in (201, 202, 500), r.text
        _events(c, "grace", events, stop)
        failed = [e for e in events if e.get("failed")]
        assert failed, events
        msg = failed[-1]["message"]
        assert "ended before the server started" in msg or "ended while the server" in msg, msg
        assert "is /nonexistent/python3 a Python 3.8 or newer?" in msg  # the job log's tail
        assert not c.user("grace")["servers"]
    finally:
        cfg.write_text(good)
        hub.restart()
