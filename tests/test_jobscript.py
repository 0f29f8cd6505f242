"""The job script comes from a template (spawner/templates/job.sh.j2), rendered by
slurm.render_job_script: for the same job it is byte for byte what the f-string it
replaced produced.

data/job_scripts_293364c.json holds jobs and the scripts ``build_job_script`` of commit
293364c (``git show 293364c:spawner/slurm.py``, the f-string) made of them: a gateway job,
an xsede job with every directive, hostile free text, and 20 jobs with generated hostile
text in the server's command, the prologue and the job's Python."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from xsedehub.spawner import slurm

FIXTURE = json.loads((Path(__file__).parent / "data" / "job_scripts_293364c.json").read_text())


def job_of(data: dict) -> slurm.JobScript:
    data = dict(data)
    data["resources"] = slurm.JobResources(**data["resources"])
    data["tunnel"] = slurm.Tunnel(**data["tunnel"])
    return slurm.JobScript(**data)


def test_the_fixture_covers_both_modes_and_hostile_text():
    names = [case["name"] for case in FIXTURE]
    assert len(names) == 23 and {"gateway", "xsede, home folder"} <= set(names)


@pytest.mark.parametrize("case", FIXTURE, ids=lambda c: c["name"])
def test_template_renders_the_old_script(case):
    assert slurm.build_job_script(job_of(case["job"])) == case["script"]


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
