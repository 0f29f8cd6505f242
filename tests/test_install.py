"""Nothing is downloaded at demo or test time: a missing piece stops the command at once,
naming the piece and the command that installs it (no retries, no hang)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code_or_argv, **env) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", code_or_argv] if isinstance(code_or_argv, str) else code_or_argv
    # the timeout only guards against a hang (the old code ran npm inside the namespace)
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=False
    )


def test_a_missing_proxy_is_named_with_the_install_command(tmp_path):
    r = _run(
        "from xsedehub.testbed import localhub\nlocalhub.ensure_chp()",
        XSEDEHUB_CHP=str(tmp_path / "no-chp"),
    )
    assert r.returncode != 0
    assert f"configurable-http-proxy is not installed at {tmp_path / 'no-chp'}" in r.stderr
    assert "bash scripts/install.sh" in r.stderr


@pytest.mark.cluster  # root: `cluster up` refuses to run as anyone else
def test_cluster_up_names_a_missing_piece_and_installs_nothing(tmp_path):
    missing = tmp_path / "no-job-env"
    r = _run([sys.executable, "-m", "xsedehub.cli", "cluster", "up"], XSEDEHUB_JOB_ENV=str(missing))
    assert r.returncode == 1, r.stderr
    assert "xsedehub cluster up: not installed: " in r.stderr
    assert f"the job environment {missing} does not exist" in r.stderr
    assert "bash scripts/install.sh" in r.stderr
    assert not missing.exists()  # nothing was built
