"""The pure builders and validators: table-driven, no cluster needed."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from xsedehub.spawner import slurm
from xsedehub.spawner import validate as v


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


def test_script_has_directives_and_is_valid_bash():
    script = slurm.build_job_script(job())
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert "#SBATCH --partition=compute" in directives
    assert "#SBATCH --time=01:30:00" in directives
    assert "#SBATCH --cpus-per-task=2" in directives
    assert "#SBATCH --mem=2048M" in directives
    # all directives come before the first command (sbatch stops reading at it)
    first_cmd = next(i for i, ln in enumerate(lines[1:], 1) if ln and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_cmd
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "--hub-port 20001 " in script
    assert "StrictHostKeyChecking=no" not in script


def test_the_agents_ssh_checks_the_hub_and_forwards_only_what_it_must():
    from xsedehub.spawner import jobagent

    opts = jobagent.parse_args(
        [
            *("--dir", "/h/.xsedehub/jobs/u1-abc", "--ssh-target", "tunnelbot@10.0.0.1"),
            *("--api-host", "127.0.0.1", "--api-port", "8081", "--hub-port", "20001"),
        ]
    )
    master = jobagent.tunnel_argv(opts, late=True)
    plain = jobagent.tunnel_argv(opts, late=False)
    for argv in (master, plain):
        text = " ".join(argv)
        assert argv[0] == "ssh" and argv[-1] == "tunnelbot@10.0.0.1"
        assert "StrictHostKeyChecking=yes" in text
        assert "UserKnownHostsFile=/h/.xsedehub/jobs/u1-abc/known_hosts" in text
        assert "GlobalKnownHostsFile=/dev/null" in text
        assert "-i /h/.xsedehub/jobs/u1-abc/tunnel_key" in text
        assert "ExitOnForwardFailure=yes" in text and "BatchMode=yes" in text
        # one connection carries both: the API forward listens on a unix socket in the
        # job directory, never on a port
        assert argv[argv.index("-L") + 1] == "/h/.xsedehub/jobs/u1-abc/hubapi.sock:127.0.0.1:8081"
        assert argv.count("-L") == 1 and argv.count("-R") <= 1
    assert plain[plain.index("-R") + 1] == "127.0.0.1:20001:/h/.xsedehub/jobs/u1-abc/server.sock"
    # it opens as a control master with the API forward only; the reverse forward is
    # added on it (through its control socket in the job directory) once the server listens
    ctl = "ControlPath=/h/.xsedehub/jobs/u1-abc/tunnel.ctl"
    assert "-R" not in master and "ControlMaster=yes" in master and ctl in master
    # where the control socket's path would be too long, the forward comes at once
    assert not any(a.startswith("Control") for a in plain)
    opts.api_host = "fd00::1"
    assert jobagent.api_spec(opts).endswith(":[fd00::1]:8081")


def test_script_with_account_gpus_and_prologue():
    script = slurm.build_job_script(
        job(
            resources=slurm.JobResources(
                partition="gpu", walltime_minutes=30, gpus=1, account="abc123"
            ),
            prologue=[["gitpuller", "https://github.com/x/y", "main", "y"]],
        )
    )
    assert "#SBATCH --gpus=1" in script
    assert "#SBATCH --account=abc123" in script
    assert "gitpuller https://github.com/x/y main y" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize(
    "field,value",
    [
        ("partition", "compute\n#SBATCH --uid=0"),
        ("partition", "a b"),
        ("partition", "$(id)"),
        ("account", "x;rm -rf ~"),
        ("account", "`id`"),
        ("partition", ""),
        ("partition", "p" * 65),
    ],
)
def test_resources_refuse_hostile_names(field, value):
    kw = {"partition": "compute", "walltime_minutes": 10}
    kw[field] = value
    with pytest.raises(v.InvalidValue) as e:
        slurm.JobResources(**kw)
    assert e.value.field == field


@pytest.mark.parametrize(
    "value,minutes",
    [("01:00:00", 60), ("00:30", 30), ("90", 90), (45, 45), ("1-00:00:00", 1440), ("00:00:30", 1)],
)
def test_walltime(value, minutes):
    assert v.walltime_minutes(value) == minutes


@pytest.mark.parametrize(
    "value", ["", "1h", "01:61:00", "-5", "0", True, "12:00:00\n", 10**9, None]
)
def test_walltime_rejects(value):
    with pytest.raises(v.InvalidValue):
        v.walltime_minutes(value)


@pytest.mark.parametrize(
    "value,mb", [("2G", 2048), ("512M", 512), ("512", 512), ("1gb", 1024), (100, 100)]
)
def test_memory(value, mb):
    assert v.memory_mb(value) == mb


@pytest.mark.parametrize("value", ["2X", "", "-1G", "1G;id", "0", True])
def test_memory_rejects(value):
    with pytest.raises(v.InvalidValue):
        v.memory_mb(value)


@pytest.mark.parametrize("login", ["ada", "Ada-L", "a1-b2-c3", "x" * 39])
def test_github_logins(login):
    assert v.github_login(login) == login.lower()


@pytest.mark.parametrize(
    "login", ["", "-ada", "ada-", "a--b", "a_b", "a.b", "../x", "a b", "x" * 40, "é", "a\nb", 5]
)
def test_github_logins_rejected(login):
    with pytest.raises(v.InvalidValue):
        v.github_login(login)


@pytest.mark.parametrize("path", ["../x", "/abs", "a/../b", "a//b", "a/.hidden", "a/b c", ""])
def test_relative_paths_rejected(path):
    with pytest.raises(v.InvalidValue):
        v.relative_path(path, "p")


def test_hidden_paths_only_when_asked():
    assert v.relative_path(".xsedehub/jobs", "p", hidden=True) == ".xsedehub/jobs"
    with pytest.raises(v.InvalidValue):
        v.relative_path(".xsedehub/jobs", "p")
    with pytest.raises(v.InvalidValue):
        v.relative_path("../jobs", "p", hidden=True)


def test_env_file_quotes_everything_and_rewrites_the_api():
    env = {
        "JUPYTERHUB_API_TOKEN": "s3cr3t'$(touch /tmp/pwned)`id`",
        "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
        "JUPYTERHUB_ACTIVITY_URL": "http://127.0.0.1:8081/hub/api/users/a b/activity",
        "LANG": "C.UTF-8",
    }
    text = slurm.env_file(env, "http://127.0.0.1:8081")
    script = f"XH_API_PORT=4242\n{text}\nenv -0"
    out = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    got = dict(kv.split("=", 1) for kv in out.stdout.split("\0") if "=" in kv)
    assert got["JUPYTERHUB_API_TOKEN"] == env["JUPYTERHUB_API_TOKEN"]
    assert got["JUPYTERHUB_API_URL"] == "http://127.0.0.1:4242/hub/api"
    assert got["JUPYTERHUB_ACTIVITY_URL"] == "http://127.0.0.1:4242/hub/api/users/a b/activity"


@pytest.mark.parametrize("key", ["A B", "A;B", "1A", "A=B", "A\nB"])
def test_env_file_rejects_bad_names(key):
    with pytest.raises(v.InvalidValue):
        slurm.env_file({key: "x"}, "")


def test_squeue_parse_and_argv():
    text = (
        "12|RUNNING|node1|None|2026-11-26T10:00:00|gateway\n"
        "13|PENDING||Resources|2026-11-26T11:00:00|gateway\n"
        "14|CANCELLED by 0||None|N/A|gateway|xsedehub:u3-abc\n"
        "garbage line\n"
    )
    jobs = slurm.parse_squeue(text)
    assert jobs["12"].running and jobs["12"].nodes == "node1"
    assert jobs["13"].alive and jobs["13"].reason == "Resources"
    assert not jobs["14"].alive and jobs["14"].state == "CANCELLED"
    assert jobs["14"].spawn_id == "u3-abc" and jobs["12"].spawn_id == ""
    assert slurm.squeue_argv("gateway")[-1] == "--user=gateway"
    with pytest.raises(v.InvalidValue):
        slurm.squeue_argv("gate way")


@pytest.mark.parametrize("out,jid", [("123\n", "123"), ("77;cluster\n", "77")])
def test_parse_sbatch(out, jid):
    assert slurm.parse_sbatch(out) == jid


@pytest.mark.parametrize("out", ["", "Submitted batch job\n", "abc"])
def test_parse_sbatch_rejects(out):
    with pytest.raises(ValueError):
        slurm.parse_sbatch(out)


def test_scancel_argv_only_takes_job_ids():
    assert slurm.scancel_argv("42") == ["scancel", "42"]
    with pytest.raises(v.InvalidValue):
        slurm.scancel_argv("42; id")


def test_singleuser_args_are_quoted():
    script = slurm.build_job_script(job(singleuser=["/bin/su", "--x=$(id)", "a b"]))
    assert shlex.join(["/bin/su", "--x=$(id)", "a b"]) in script


@pytest.mark.parametrize("field", ["walltime", "cores", "memory", "gpus"])
@pytest.mark.parametrize("value", ["\u00b2", "\u00b30", "\u0663", "\uff11", "1\u00b2"])
def test_numbers_are_ascii_digits_only(field, value):
    """str.isdigit() accepts '²', which int() then refuses: a 500 instead of a 400."""
    from xsedehub.spawner import form

    parts = [form.PartitionSpec("compute", max_cores=8, max_memory=16384, max_walltime=480)]
    with pytest.raises(v.InvalidValue) as e:
        form.validate_options({field: value}, parts, default_partition="compute")
    assert e.value.field == field


@pytest.mark.parametrize("minutes,lead", [(1, 15), (2, 30), (3, 45), (4, 60), (60, 60)])
def test_the_walltime_warning_signal_leaves_short_jobs_time_to_run(minutes, lead):
    """SLURM checks time limits about every 30 s and may send --signal that much early:
    a one-minute job warned 60 s ahead was ended at its first check."""
    from xsedehub.spawner import slurm

    assert slurm.signal_lead(minutes) == lead
    job = slurm.JobScript(
        job_name="jupyter-ada",
        resources=slurm.JobResources("debug", minutes, 1, 512),
        job_dir=".xsedehub/jobs/u0-0123456789ab",
        work_dir=".",
        singleuser=["jupyterhub-singleuser"],
        tunnel=slurm.Tunnel("10.0.0.1", 22, "tunnelbot", 20001, "127.0.0.1", 8081),
        python="/usr/bin/python3",
    )
    assert f"#SBATCH --signal=B:TERM@{lead}" in slurm.sbatch_directives(job)
