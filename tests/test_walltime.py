"""The walltime's pure parts: SLURM durations, the wording, the end from squeue's time
left, and the hub wiring (home template, API handler).  End to end: tests/test_browser.py
(the countdown and a warning in JupyterLab, the home page) and
tests/test_faults.py::test_walltime_end_is_noticed (the page after a job's walltime)."""

from __future__ import annotations

from pathlib import Path

import pytest
from traitlets.config import Config
from xsedehub.spawner import slurm, walltime


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("0:59", 59),
        ("1:00", 60),  # MM:SS: squeue's %l of a one-minute job
        ("19:58", 19 * 60 + 58),
        ("1:00:00", 3600),
        ("12:34:56", 12 * 3600 + 34 * 60 + 56),
        ("2-00:00:00", 2 * 86400),
        ("1-02:03:04", 86400 + 7384),
        ("UNLIMITED", None),
        ("NOT_SET", None),
        ("INVALID", None),
        ("", None),
        ("1:2:3:4", None),
        ("-1:00", None),
    ],
)
def test_parse_duration(text, seconds):
    assert walltime.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "seconds,words",
    [
        (45, "45 s"),
        (60, "1 min"),
        (15 * 60, "15 min"),
        (3600, "1 h"),
        (5400, "1 h 30 min"),
        (2 * 86400 + 4 * 3600, "2 d 4 h"),
    ],
)
def test_describe(seconds, words):
    assert walltime.describe(seconds) == words


def test_timeout_message_names_the_walltime():
    assert "job 42 reached its 1 h walltime" in walltime.timeout_message("42", 3600)
    assert "job 42 reached its walltime" in walltime.timeout_message("42", None)


def test_squeue_format_carries_time_left_and_limit_before_the_comment():
    # the comment is last: it may hold anything, "|" included
    text = (
        "12|RUNNING|node1|None|2026-11-26T10:00:00|gateway|18:30|20:00|xsedehub:u3-a|b\n"
        "13|PENDING||Resources|N/A|gateway|20:00|20:00|(null)\n"
        "14|TIMEOUT|node2|TimeLimit|2026-11-26T09:00:00|gateway|0:00|1:00|xsedehub:u4-c\n"
    )
    jobs = slurm.parse_squeue(text, observed_at=1000.0)
    assert slurm.SQUEUE_FORMAT.endswith("|%L|%l|%k")
    assert jobs["12"].time_left == "18:30" and jobs["12"].time_limit == "20:00"
    assert jobs["12"].comment == "xsedehub:u3-a|b" and jobs["12"].observed_at == 1000.0
    assert jobs["13"].comment == ""
    left = walltime.time_left(jobs["12"])
    assert left == walltime.TimeLeft("12", 1000.0 + 18 * 60 + 30, 20 * 60)
    assert left.seconds_left(now=1010.0) == 18 * 60 + 20
    assert left.seconds_left(now=10**6) == 0
    assert left.limit_text == "20 min"
    assert walltime.time_left(jobs["13"]) is None  # not running: no end yet
    assert walltime.time_left(jobs["14"]) is None
    assert jobs["14"].state in walltime.TIMEOUT_STATES


@pytest.mark.parametrize(
    "state,seconds_before_end,reached",
    [
        ("TIMEOUT", 3000, True),  # SLURM's own word
        ("DEADLINE", 3000, True),
        # the job script ends on SLURM's TERM 60 s before the end (sent up to 60 s early)
        ("FAILED", 100, True),
        ("COMPLETED", 60, True),
        ("FAILED", -30, True),  # noticed after the end
        ("FAILED", 600, False),  # a server that failed ten minutes before the end
        ("COMPLETED", 3000, False),
        ("CANCELLED", 30, False),  # scancel / the user's stop, however late
    ],
)
def test_reached_walltime(state, seconds_before_end, reached):
    last = walltime.TimeLeft("7", end=10_000.0, limit=3600)
    assert walltime.reached(state, last, 10_000.0 - seconds_before_end) is reached


def test_reached_walltime_needs_the_end_unless_slurm_says_timeout():
    assert walltime.reached("TIMEOUT", None, 0.0)
    assert not walltime.reached("FAILED", None, 0.0)


def test_time_left_needs_a_limit_and_the_time_of_the_query():
    unlimited = slurm.parse_squeue("1|RUNNING|n|None|x|u|UNLIMITED|UNLIMITED|", 5.0)["1"]
    assert walltime.time_left(unlimited) is None
    unobserved = slurm.parse_squeue("1|RUNNING|n|None|x|u|10:00|20:00|")["1"]
    assert walltime.time_left(unobserved) is None


def test_apply_adds_the_walltime_api_after_the_sites_own_and_its_pages_are_there():
    from xsedehub.config import HUB_TEMPLATES, _add_walltime_pages

    c = Config()
    c.JupyterHub.extra_handlers = [("/api/site", object)]
    _add_walltime_pages(c)
    _add_walltime_pages(c)  # idempotent
    assert c.JupyterHub.extra_handlers == [("/api/site", object), *walltime.HANDLERS]
    for page in ("home.html", "xsedehub-walltime.html", "not_running.html"):
        assert (Path(HUB_TEMPLATES) / page).is_file()


def test_walltime_warnings_default_ten_and_two_minutes():
    from xsedehub.spawner.spawner import SlurmSSHSpawner

    assert SlurmSSHSpawner().walltime_warnings == [600, 120]


@pytest.mark.parametrize(
    "limit,step,maximum,new",
    [
        (20 * 60, 30, 30, 30),  # capped at the partition's limit
        (20 * 60, 5, 30, 25),
        (30 * 60, 30, 30, None),  # at the limit already: nothing to ask for
        (3600, 30, 8 * 60, 90),
        (None, 30, 30, None),  # the limit unknown (UNLIMITED, not seen yet)
    ],
)
def test_extended_limit(limit, step, maximum, new):
    assert walltime.extended_limit(limit, step, maximum) == new


def _site_command():
    import importlib.machinery
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "site" / "xsedehub-extend-walltime"
    loader = importlib.machinery.SourceFileLoader("xsedehub_extend_walltime", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "text,minutes",
    [
        ("00:30:00", 30),
        ("08:00:00", 480),
        ("1-00:00:00", 1440),
        ("1-02:30", 1440 + 150),  # D-H:M
        ("1-02", 1440 + 120),  # D-H
        ("45", 45),
        ("30:00", 30),  # M:S
        ("UNLIMITED", None),
    ],
)
def test_site_command_reads_slurm_time_limits(text, minutes):
    assert _site_command().minutes(text) == minutes


@pytest.mark.parametrize(
    "argv",
    [
        ["12"],
        ["12", "30", "x"],
        ["12;id", "30"],
        ["12", "-5"],
        ["12", "3O"],
        ["12", "\u00b2"],  # a digit to str.isdigit(), not to int()
        ["\u0661\u0662", "30"],  # Arabic-Indic digits
        ["12", "12345678901"],
    ],
)
def test_site_command_refuses_anything_but_a_job_id_and_minutes(argv):
    import subprocess
    import sys

    path = Path(__file__).parents[1] / "scripts" / "site" / "xsedehub-extend-walltime"
    r = subprocess.run(
        [sys.executable, str(path), *argv], capture_output=True, text=True, check=False
    )
    assert r.returncode != 0 and "usage:" in r.stderr


def test_site_command_never_asks_for_more_than_a_week():
    import subprocess
    import sys

    path = Path(__file__).parents[1] / "scripts" / "site" / "xsedehub-extend-walltime"
    r = subprocess.run(
        [sys.executable, str(path), "12", str(7 * 24 * 60 + 1)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SUDO_USER": "alice"},
        check=False,
    )
    assert r.returncode != 0 and "at most 10080 minutes" in r.stderr


def test_site_command_runs_only_through_sudo():
    import subprocess
    import sys

    path = Path(__file__).parents[1] / "scripts" / "site" / "xsedehub-extend-walltime"
    env = {"PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, str(path), "12", "30"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert r.returncode != 0 and "through sudo" in r.stderr


async def test_extend_is_off_by_default_and_says_so():
    from xsedehub.spawner.spawner import SlurmSSHSpawner

    sp = SlurmSSHSpawner()
    assert sp.walltime_extend_command == []
    status = sp.walltime_status()
    assert status["extend"] == 0 and status["seconds_left"] is None
    answer = await sp.extend_walltime()
    assert answer["ok"] is False and "does not allow" in answer["message"]


async def test_extend_without_a_running_job_asks_nothing():
    from xsedehub.spawner.spawner import SlurmSSHSpawner

    sp = SlurmSSHSpawner(walltime_extend_command=["/usr/bin/sudo", "-n", "/x"])
    answer = await sp.extend_walltime()
    assert answer["ok"] is False and "not seen this job running" in answer["message"]


def test_the_countdowns_own_requests_are_not_activity():
    """JupyterLab asks the job-side extension every 30 s: were that activity, an abandoned
    tab would keep the server from its idle shutdown (and the hub's culler) forever.
    Checked with the job environment's jupyter_server, on this checkout's jobext."""
    import subprocess

    from xsedehub.testbed.clusterconf import JOB_ENV

    python = JOB_ENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no job environment at {JOB_ENV} (scripts/install.sh builds it)")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from xsedehub_jobext.handlers import WalltimeHandler as H;"
        "from jupyter_server.base.handlers import APIHandler;"
        "assert issubclass(H, APIHandler) and H._track_activity is False, H._track_activity"
    )
    jobext = Path(__file__).parents[1] / "jobext"
    r = subprocess.run(
        [str(python), "-I", "-c", code, str(jobext)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
