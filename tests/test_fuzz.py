"""Hostile input, generated: usernames, GitHub logins, form values and user_options.

Each value is refused with a message naming the field, or handled safely (what gets
through renders a job script bash accepts, with clean #SBATCH lines); through the real
hub's REST API, a canary shows that no injected command ever ran on the cluster."""

from __future__ import annotations

import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xsedehub.spawner import form, slurm
from xsedehub.spawner import validate as v

from .conftest import (
    CANARY,
    canaries,
    fill_nodes,
    make_hub,
    remove_canaries,
    stop_hub_and_proxy,
)
from .test_gateway import in_cluster_root

PARTS = [
    form.PartitionSpec("compute", max_cores=8, max_memory=16384, max_walltime=480),
    form.PartitionSpec("debug", max_cores=2, max_memory=4096, max_walltime=30),
]
INJECTIONS = [
    f"$(touch {CANARY}-a)",
    f"`touch {CANARY}-b`",
    f"; touch {CANARY}-c",
    f"\ntouch {CANARY}-d",
    f"| touch {CANARY}-e",
    f"&& touch {CANARY}-f",
    "../../etc/passwd",
    "\x00",
    "é" * 40,
    "x" * 5000,
    "-oProxyCommand=x",
    "compute\n#SBATCH --uid=0",
]
hostile_text = st.one_of(
    st.sampled_from(INJECTIONS),
    st.builds(lambda a, b: a + b, st.text(max_size=20), st.sampled_from(INJECTIONS)),
)
any_value = st.one_of(
    st.text(max_size=60),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=3),
    hostile_text,
)
options = st.dictionaries(
    st.one_of(st.sampled_from(form.FIELDS), st.text(max_size=12)), any_value, max_size=6
)


@settings(max_examples=1500, deadline=None)
@given(options)
def test_options_refused_or_safe(opts):
    try:
        res = form.validate_options(opts, PARTS, default_partition="compute", allow_account=True)
    except v.InvalidValue as e:
        assert e.field and e.message
        return
    script = slurm.build_job_script(
        slurm.JobScript(
            job_name="jupyter-x",
            resources=res,
            job_dir=".xsedehub/jobs/u1-abc",
            work_dir=".",
            singleuser=["jupyterhub-singleuser"],
            python="python3",
            tunnel=slurm.Tunnel(
                host="10.0.0.1",
                port=22,
                user="tunnelbot",
                hub_port=20000,
                api_host="127.0.0.1",
                api_port=8081,
            ),
        )
    )
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            assert all(c not in line[8:] for c in " \t;`$|&\n")
    assert "touch" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@settings(max_examples=3000, deadline=None)
@given(st.text(max_size=50))
def test_logins_and_accounts_refused_or_plain(text):
    for check, pattern in (
        (v.github_login, "abcdefghijklmnopqrstuvwxyz0123456789-"),
        (v.posix_username, "abcdefghijklmnopqrstuvwxyz0123456789_-"),
    ):
        try:
            out = check(text)
        except v.InvalidValue:
            continue
        assert out and all(c in pattern for c in out) and not out.startswith("-")


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=80))
def test_paths_never_escape(text):
    try:
        out = v.relative_path(text, "path")
    except v.InvalidValue:
        return
    assert not out.startswith("/") and ".." not in out.split("/")


# ---------------------------------------------------------------------------- real hub
@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    # each accepted example's job waits in the queue: the POST answers 202 after half a
    # second, not after JupyterHub's default 10 s slow_spawn_timeout
    h = make_hub(
        tmp_path_factory.mktemp("fuzzhub"),
        cluster,
        provider,
        poll_interval=5,
        extra='c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0.5}\n',
    )
    h.client.login("ada")
    yield h
    stop_hub_and_proxy(h)


hostile_options = st.dictionaries(
    st.sampled_from(form.FIELDS), hostile_text, min_size=1, max_size=4
)


@pytest.mark.cluster
def test_rest_api_fuzz_runs_nothing(hub, cluster):
    c = hub.client
    remove_canaries()
    before = set(in_cluster_root(["squeue", "-h", "--states=all", "-o", "%i"]).split())
    seen = []

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(hostile_options)
    def one(opts):
        r = c.start("ada-l", opts)
        seen.append(opts)
        assert r.status_code == 400, (opts, r.text)
        assert any(f in r.json()["message"] for f in form.FIELDS), r.text
        assert not c.user("ada-l")["servers"]

    one()
    time.sleep(2)
    assert len(seen) >= 30
    assert canaries() == [], "an injected command ran"
    after = set(in_cluster_root(["squeue", "-h", "--states=all", "-o", "%i"]).split())
    assert after <= before, "a job was submitted for a refused request"


# values the validator must accept, however odd they look: padding with ASCII and unicode
# spaces, leading zeros, lowercase units, minutes alone; each reaches a real sbatch
PAD = st.sampled_from(["", " ", "  ", "\u00a0", "\u3000", " \u2003"])


@st.composite
def accepted_options(draw):
    """(user_options, what SLURM must record: partition, walltime, cpus, memory MB)."""
    part = draw(st.sampled_from(["compute", "debug"]))
    minutes = draw(st.integers(1, 30))
    cores = draw(st.integers(1, 2))
    mem_mb = draw(st.sampled_from([256, 512, 1024, 2048]))
    wall = draw(
        st.sampled_from(
            [str(minutes), f"00:{minutes:02d}:00", f"0-00:{minutes:02d}", f"00:{minutes:02d}"]
        )
    )
    core_text = draw(st.sampled_from([str(cores), f"0{cores}", f"00{cores}"]))
    mem_text = draw(
        st.sampled_from(
            [f"{mem_mb}M", f"{mem_mb}m", f"{mem_mb}mb", f"{mem_mb}", f"{mem_mb // 256 * 256}MB"]
            + ([f"{mem_mb // 1024}g", f"{mem_mb // 1024}GB"] if mem_mb >= 1024 else [])
        )
    )
    opts = {
        "partition": part,
        "walltime": draw(PAD) + wall + draw(PAD),
        "cores": draw(PAD) + core_text + draw(PAD),
        "memory": draw(PAD) + mem_text + draw(PAD),
    }
    shown = f"{mem_mb // 1024}G" if mem_mb % 1024 == 0 else f"{mem_mb}M"  # as squeue's %m
    return opts, (part, f"{minutes}:00", str(cores), shown)


@pytest.mark.cluster
def test_rest_api_fuzz_accepted_values_reach_sbatch_as_meant(hub, cluster):
    """What the validator accepts is what SLURM records, and no odd character runs
    anything: each accepted value goes all the way to a real sbatch (queue held busy, so
    the job waits and is cancelled cheaply)."""
    c = hub.client
    remove_canaries()
    fillers = fill_nodes(cluster)
    recorded = []
    try:

        @settings(
            max_examples=16,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(accepted_options())
        def one(case):
            opts, expected = case
            r = c.start("ada-l", opts)
            assert r.status_code in (201, 202), (opts, r.text)
            deadline = time.monotonic() + 30
            out = ""
            while time.monotonic() < deadline and not out:
                out = in_cluster_root(
                    ["squeue", "-h", "-u", "gateway", "-n", "jupyter-ada-l", "-o", "%P %l %C %m"]
                ).strip()
                time.sleep(0.2)
            c.stop("ada-l")
            recorded.append((opts, out))
            assert tuple(out.split()) == expected, (opts, out)

        one()
    finally:
        in_cluster_root(["scancel", *fillers])
    assert len(recorded) >= 12  # hypothesis ran most of its 16 examples (each one asserts)
    assert canaries() == [], "an injected command ran"
