"""The job script comes from a template (spawner/templates/job.sh.j2), rendered by
slurm.render_job_script, with the job agent's text (spawner/jobagent.py) in a quoted
here-document.

data/job_inputs.json holds jobs recorded when the template replaced an f-string: a
gateway job, an xsede job with every directive, hostile free text, and 20 jobs with
generated hostile text in the server's command, the prologue and the job's Python."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from xsedehub.spawner import jobagent, slurm

CASES = json.loads((Path(__file__).parent / "data" / "job_inputs.json").read_text())


def job_of(data: dict) -> slurm.JobScript:
    data = dict(data)
    data["resources"] = slurm.JobResources(**data["resources"])
    data["tunnel"] = slurm.Tunnel(**data["tunnel"])
    return slurm.JobScript(**data)


def bash_words(text: str) -> list[str]:
    """The words bash makes of ``text`` (as a command's arguments)."""
    out = subprocess.run(
        ["bash", "-c", "XH_DIR=/jobdir\nprintf '%s\\0' " + text],
        capture_output=True,
        check=True,
    ).stdout
    return out.decode().split("\0")[:-1]


def test_the_recorded_jobs_cover_both_modes_and_hostile_text():
    names = [case["name"] for case in CASES]
    assert len(names) == 23 and {"gateway", "xsede, home folder"} <= set(names)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_hostile_text_reaches_bash_as_the_same_words(case):
    job = job_of(case["job"])
    script = slurm.build_job_script(job)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # the server's command line: its own line, then the socket options, in background
    server = shlex.join(job.singleuser)
    tail = ' --ServerApp.sock="$XH_DIR/server.sock" --ServerApp.sock_mode=0600 &\n'
    assert f"\n{server}{tail}" in script
    assert bash_words(server + tail[:-3]) == [
        *job.singleuser,
        "--ServerApp.sock=/jobdir/server.sock",
        "--ServerApp.sock_mode=0600",
    ]
    # each prologue command, on its own line before the wait for the forward
    before_server = script[: script.index(f"\n{server}{tail}")]
    for argv in job.prologue:
        assert f"\n{shlex.join(argv)}\n" in before_server
        assert bash_words(shlex.join(argv)) == argv
    # the job's Python
    assert f"\nXH_PY={shlex.quote(job.python)}\n" in script
    assert bash_words(shlex.quote(job.python)) == [job.python]


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c["name"])
def test_the_agent_gets_the_tunnel_as_separate_words(case):
    job = job_of(case["job"])
    script = slurm.build_job_script(job)
    line = re.search(r'\n    exec 3<&0 "\$XH_PY" -I - (.*) <<\'XH_JOBAGENT\'\n', script)
    assert line, "the agent's command line"
    opts = jobagent.parse_args(bash_words(line.group(1)))
    t = job.tunnel
    assert opts.dir == "/jobdir" and opts.ctl_fd == 3
    assert opts.ssh_target == f"{t.user}@{t.host}" and opts.ssh_port == t.port
    assert (opts.api_host, opts.api_port, opts.hub_port) == (t.api_host, t.api_port, t.hub_port)
    assert opts.api_timeout == job.api_timeout


def test_the_agent_text_is_in_the_script_as_it_is():
    script = slurm.build_job_script(job_of(CASES[0]["job"]))
    program = Path(jobagent.__file__).read_text().rstrip()
    assert f"<<'XH_JOBAGENT'\n{program}\nXH_JOBAGENT\n" in script
    # a quoted here-document: bash expands nothing in it
    assert "XH_JOBAGENT" not in program.splitlines()


def test_the_server_line_is_one_separate_piece():
    """The sandbox (or any wrapper) can take the server's command line as it is."""
    text = (Path(slurm.__file__).parent / "templates" / "job.sh.j2").read_text()
    lines = [ln for ln in text.splitlines() if "{{ singleuser }}" in ln]
    assert lines == [
        '{{ singleuser }} --ServerApp.sock="$XH_DIR/server.sock" --ServerApp.sock_mode=0600 &'
    ]


NAMES = {
    "directives",
    "job_dir",
    "work_dir",
    "python",
    "agent_args",
    "agent",
    "environment",
    "prologue",
    "singleuser",
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
