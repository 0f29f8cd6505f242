"""The job script comes from a template (spawner/templates/job.sh.j2): for the same job it
renders byte for byte what the f-string it replaced produced.  That f-string is kept
below, only here, as the reference."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xsedehub.spawner import slurm

OLD_FREE_PORT = (
    "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
)


def old_build_job_script(job: slurm.JobScript) -> str:
    """slurm.build_job_script as it was before the template (commit 293364c)."""
    q = shlex.quote
    t = job.tunnel
    ssh = [
        "ssh",
        "-N",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "UserKnownHostsFile=$XH_DIR/known_hosts",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ServerAliveInterval=5",
        "-o",
        "ServerAliveCountMax=3",
        "-o",
        "ConnectTimeout=10",
        "-i",
        "$XH_DIR/tunnel_key",
        "-p",
        str(t.port),
    ]
    target = f"{t.user}@{t.host}"

    def ssh_cmd(*forward: str) -> str:
        # $XH_DIR and $XH_API_PORT are ours (set below from quoted constants): keep them
        # expandable, quote everything else
        return " ".join(f'"{a}"' if "$XH_" in a else q(a) for a in [*ssh, *forward, target])

    api_forward = ssh_cmd("-L", f"127.0.0.1:$XH_API_PORT:{t.api_host}:{t.api_port}")
    reverse = ssh_cmd("-R", f"127.0.0.1:{t.hub_port}:$XH_DIR/server.sock")
    prologue = "\n".join(" ".join(q(a) for a in argv) for argv in job.prologue)
    singleuser = " ".join(q(a) for a in job.singleuser)
    return f"""#!/bin/bash
{chr(10).join(slurm.sbatch_directives(job))}
# Written by xsedehub.  The hub delivers secrets as 0600 files in the job directory;
# nothing secret is in this script, in an argv or in the job's log.
set -uo pipefail
umask 077
cd "$HOME" || exit 1
XH_DIR="$HOME"/{q(job.job_dir)}
XH_WORK="$HOME"/{q(job.work_dir) if job.work_dir != "." else '""'}
XH_PY={q(job.python)}
log() {{ printf '%s [xsedehub] %s\\n' "$(date -u +%FT%TZ)" "$*"; }}
cleanup() {{
    trap - EXIT TERM INT
    [ -n "${{XH_SERVER:-}}" ] && kill -TERM "$XH_SERVER" 2>/dev/null && wait "$XH_SERVER"
    for t in ${{XH_API_TUNNEL:-}} ${{XH_TUNNEL:-}}; do
        kill -TERM "$t" 2>/dev/null
        pkill -TERM -P "$t" 2>/dev/null
    done
    rm -f "$XH_DIR/env" "$XH_DIR/tunnel_key" "$XH_DIR/server.sock"
    log "job ended"
}}
trap cleanup EXIT
trap 'exit 143' TERM INT

if ! [ -r "$XH_DIR/env" ] || ! [ -r "$XH_DIR/tunnel_key" ]; then
    log "job files missing in $XH_DIR"
    exit 2
fi
log "on node ${{SLURMD_NODENAME:-$(hostname)}} as $(id -un), job ${{SLURM_JOB_ID:-?}}"
XH_API_PORT=$("$XH_PY" -c {q(OLD_FREE_PORT)}) || {{ log "no python3 at $XH_PY"; exit 2; }}

# Two SSH connections as the tunnel account, each re-opened whenever it drops: first the
# forward to the hub API (the server needs it to start), then, once the server answers,
# the reverse tunnel: the hub's port opens exactly when the server is ready.
(
    while :; do
        {api_forward} </dev/null
        log "hub API forward closed ($?); reopening"
        sleep 2
    done
) &
XH_API_TUNNEL=$!
for _ in $(seq 1 300); do
    "$XH_PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" \\
        "$XH_API_PORT" 2>/dev/null && break
    sleep 0.2
done
log "hub API forwarded to local port $XH_API_PORT"

set -a
. "$XH_DIR/env"
set +a
mkdir -p "$XH_WORK" && cd "$XH_WORK" || exit 2
{prologue}
log "starting the single-user server"
{singleuser} --ServerApp.sock="$XH_DIR/server.sock" --ServerApp.sock_mode=0600 &
XH_SERVER=$!
until "$XH_PY" -c "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])" \\
        "$XH_DIR/server.sock" 2>/dev/null; do
    kill -0 "$XH_SERVER" 2>/dev/null || {{ log "the server exited"; wait "$XH_SERVER"; exit; }}
    sleep 0.2
done
(
    while :; do
        {reverse} </dev/null
        log "tunnel closed ($?); reopening"
        sleep 2
    done
) &
XH_TUNNEL=$!
log "server listening; tunnel to hub port {t.hub_port} opening"
wait "$XH_SERVER"
"""


def job(**kw) -> slurm.JobScript:
    base = dict(
        job_name="jupyter-ada",
        resources=slurm.JobResources(
            partition="compute", walltime_minutes=90, cpus=2, memory_mb=2048
        ),
        job_dir=".xsedehub/jobs/u1-abc",
        work_dir="workshop/ada",
        singleuser=["/opt/env/bin/jupyterhub-singleuser", "--debug"],
        tunnel=slurm.Tunnel(
            host="10.0.0.1",
            port=22,
            user="tunnelbot",
            hub_port=20001,
            api_host="127.0.0.1",
            api_port=8081,
        ),
        python="/opt/env/bin/python",
    )
    base.update(kw)
    return slurm.JobScript(**base)


CASES = {
    "gateway": job(
        prologue=[["gitpuller", "https://github.com/x/y", "main", "y"]],
        spawn_id="u1-0123456789ab",
    ),
    "xsede, home folder": job(
        job_name="jupyterhub",
        work_dir=".",
        resources=slurm.JobResources(
            partition="gpu",
            walltime_minutes=30,
            cpus=4,
            memory_mb=8192,
            gpus=2,
            account="abc123",
            qos="normal",
            reservation="workshop",
        ),
        extra_directives={"constraint": "haswell", "exclusive-user": "yes"},
        spawn_id="u7-ffffffffffff",
    ),
    "hostile text in the free-form parts": job(
        singleuser=["/opt/my env/bin/jupyterhub-singleuser", "--x=$(id)", "a'b\"c", "`x`", "é"],
        prologue=[
            ["git puller", "https://example.org/a b", "$HOME", "{{ x }}", "{% raw %}"],
            ["echo", "${XH_DIR}", "\\", "\n", ";"],
        ],
        python="/opt/py $(x)/bin/python3",
        work_dir="my-folder/x.y",
        job_dir=".xsedehub/jobs/u2-00000000000a",
        tunnel=slurm.Tunnel(
            host="hub.example.org",
            port=2222,
            user="tunnel_bot",
            hub_port=29999,
            api_host="hub-api.internal",
            api_port=15001,
        ),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_template_renders_the_old_script(name):
    assert slurm.build_job_script(CASES[name]) == old_build_job_script(CASES[name])


free_text = st.text(st.characters(exclude_characters="\0"), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    singleuser=st.lists(free_text, min_size=1, max_size=4),
    prologue=st.lists(st.lists(free_text, min_size=1, max_size=4), max_size=3),
    python=free_text.filter(bool),
    work_dir=st.sampled_from([".", "workshop/ada", "a-b/c_d", ".hidden/x"]),
    hub_port=st.integers(1, 65535),
    spawn_id=st.sampled_from(["", "u1-0123456789ab", "check-1a2b3c4d"]),
)
def test_template_renders_the_old_script_for_any_free_text(
    singleuser, prologue, python, work_dir, hub_port, spawn_id
):
    j = job(
        singleuser=singleuser,
        prologue=prologue,
        python=python,
        work_dir=work_dir,
        spawn_id=spawn_id,
        tunnel=slurm.Tunnel(
            host="10.0.0.1",
            port=22,
            user="tunnelbot",
            hub_port=hub_port,
            api_host="127.0.0.1",
            api_port=8081,
        ),
    )
    assert slurm.build_job_script(j) == old_build_job_script(j)


NAMES = {
    "directives",
    "job_dir",
    "work_dir",
    "python",
    "free_port",
    "api_forward",
    "prologue",
    "singleuser",
    "reverse",
    "hub_port",
}


def test_template_names_exactly_the_values_build_job_script_gives():
    import jinja2
    from jinja2 import meta

    env = jinja2.Environment(autoescape=True)  # only parsed here
    text = (Path(slurm.__file__).parent / "templates" / "job.sh.j2").read_text()
    assert meta.find_undeclared_variables(env.parse(text)) == NAMES


def test_render_quotes_every_value_that_is_not_verbatim():
    hostile = "$(touch /tmp/x) `id`; a'b"
    script = slurm.render_job_script(**dict.fromkeys(NAMES, hostile))
    assert script.count(hostile) == 0
    assert script.count(shlex.quote(hostile)) == len(NAMES)
    script = slurm.render_job_script(**dict.fromkeys(NAMES, slurm.Verbatim("echo ok")))
    assert "\necho ok\n" in script  # the prologue's line, as it is


def test_render_refuses_a_missing_value():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        slurm.render_job_script(**dict.fromkeys(NAMES - {"python"}, "x"))


def test_template_ships_in_the_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("xsedehub-*.whl")
    assert "xsedehub/spawner/templates/job.sh.j2" in zipfile.ZipFile(wheel).namelist()
