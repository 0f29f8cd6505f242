"""The hub's JupyterHub against the job environment's: the comparison, ``xsedehub
check``'s explanation, and the spawner's warning at the first start.  The cluster tests
use the job environment the TLJH pieces install (TLJH's JupyterHub, another major
version than the hub's), skipped with the TLJH test where its source is missing."""

from __future__ import annotations

import logging
import os
import re

import jupyterhub
import pytest
from xsedehub.spawner import versions

from xsedehub.testbed import localhub, localtljh


@pytest.mark.parametrize(
    "hub,job,result",
    [
        ("6.1.1", "6.1.1", None),
        ("6.1.1", "6.1.0", None),  # patch releases never matter
        ("6.1.1", "6.0.2", "minor"),
        ("6.1.1", "5.5.4", "major"),
        ("5.2.1", "6.0.0b1", "major"),
        ("6.1.1", "not a version", "major"),
    ],
)
def test_compare(hub, job, result):
    m = versions.compare(hub, job)
    if result is None:
        assert m is None
        return
    assert m.major == (result == "major")
    text = m.explain()
    assert job in text and hub in text and f"jupyterhub=={hub}" in text
    if m.major:
        assert "403" in text and "loops" in text


def test_version_line():
    assert versions.version_line("a warning\n5.5.4\n\n") == "5.5.4"
    assert versions.version_line("") == ""


# ---------------------------------------------------------------------------- cluster
def _other_env() -> str:
    singleuser = localtljh.JOB_ENV / "bin" / "jupyterhub-singleuser"
    if not singleuser.exists():
        reason = f"{singleuser} is not installed (scripts/install.sh, with TLJH's source)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run this test", pytrace=False)
        pytest.skip(reason)
    return str(singleuser)


async def test_check_explains_a_job_environment_of_another_major_version(cluster, tmp_path):
    from xsedehub.check import Checker, Report, load_config

    other = _other_env()
    cfg = localhub.write_config(tmp_path, cluster, extra=f"c.SlurmSSHSpawner.cmd = [{other!r}]")
    lines: list[str] = []
    checker = Checker(load_config(str(cfg)), Report(out=lines.append))
    conn = await checker.connect(await checker.identity())
    try:
        await checker.singleuser(conn)
    finally:
        conn.close()
    text = "\n".join(lines)
    assert checker.r.failed == ["singleuser-version"], text
    hub = jupyterhub.__version__
    job = re.search(rf"The job environment has jupyterhub (\S+); the hub runs {hub}:", text)
    assert job and versions.parse(job.group(1))[0] != versions.parse(hub)[0], text
    assert "403 Forbidden" in text and "loops" in text
    assert f"pip install 'jupyterhub=={jupyterhub.__version__}'" in text


async def test_spawner_warns_once_at_the_first_start(cluster, caplog):
    """The spawner's own comparison at a start, over a real connection to the login
    node: one warning that explains the difference, once per job environment and hub
    process, beside the spawn (a job environment of the hub's version: see the check's
    test of a good deployment, and test_compare)."""
    import asyncio

    from xsedehub.spawner.identity import KeyFiles, gateway_identity, login_node
    from xsedehub.spawner.spawner import SlurmSSHSpawner
    from xsedehub.spawner.ssh import Pool

    other = _other_env()
    node = login_node(cluster.login_ip, cluster.login_port, cluster.known_hosts, cluster.slurm_bin)
    conn = Pool().get(node, gateway_identity(KeyFiles(), cluster.gateway_key, cluster.gateway_user))
    log = logging.getLogger("xsedehub-test-versions")
    try:
        with caplog.at_level(logging.INFO, logger=log.name):
            for _ in range(2):  # two starts with the same job environment
                sp = SlurmSSHSpawner(cmd=[other])
                sp.log = log
                sp._compare_versions_once(conn)  # what start() does once connected
                await asyncio.gather(*sp.services.background)
    finally:
        conn.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    job = re.match(r"The job environment has JupyterHub (\S+), the hub ", warnings[0])
    assert job, warnings
    assert warnings[0] == versions.compare(jupyterhub.__version__, job.group(1)).explain()
    assert versions.compare(jupyterhub.__version__, job.group(1)).major
    assert "403 Forbidden" in warnings[0]
