"""What the job's server is told beyond JupyterHub's own arguments: its idle limits and
JupyterLab's first-run prompts (builders and settings; no cluster).  The job-side
effects run on the local cluster in test_idle.py and test_browser.py."""

from __future__ import annotations

import json
import subprocess

import pytest
from traitlets import TraitError
from traitlets.config import Config
from xsedehub.spawner import slurm
from xsedehub.spawner import validate as v
from xsedehub.spawner.sandbox import Sandbox
from xsedehub.spawner.spawner import SlurmSSHSpawner

from xsedehub import config, tljh

ANNOUNCEMENTS = "@jupyterlab/apputils-extension:announcements"


def test_idle_defaults_suit_an_allocation():
    sp = SlurmSSHSpawner()
    assert (sp.server_idle_timeout, sp.kernel_idle_timeout) == (3600, 3600)
    assert slurm.idle_args(3600, 3600) == [
        "--ServerApp.shutdown_no_activity_timeout=3600",
        "--MappingKernelManager.cull_idle_timeout=3600",
        "--MappingKernelManager.cull_interval=300",
        "--MappingKernelManager.cull_connected=True",
    ]
    assert slurm.idle_args(0, 0) == []
    assert slurm.idle_args(5, 0) == ["--ServerApp.shutdown_no_activity_timeout=5"]
    # short kernel limits are checked often enough to hold
    assert "--MappingKernelManager.cull_interval=10" in slurm.idle_args(0, 20)


@pytest.mark.parametrize("bad", [-1, "5; rm -rf ~", True, 10**8])
def test_idle_limits_are_validated(bad):
    with pytest.raises(v.InvalidValue):
        slurm.idle_args(bad, 0)
    with pytest.raises(v.InvalidValue):
        slurm.idle_args(0, bad)
    with pytest.raises(TraitError, match="server_idle_timeout"):
        SlurmSSHSpawner(server_idle_timeout=bad)


def _job(**kw) -> slurm.JobScript:
    base = dict(
        job_name="jupyter-ada",
        resources=slurm.JobResources(partition="compute", walltime_minutes=30),
        job_dir=".xsedehub/jobs/u1-abc",
        work_dir="workshop/ada",
        singleuser=["/opt/env/bin/jupyterhub-singleuser"],
        tunnel=slurm.Tunnel(
            host="hub",
            port=22,
            user="tunnelbot",
            hub_port=20001,
            api_host="127.0.0.1",
            api_port=8081,
        ),
        python="python3",
        spawn_id="u1-abc",
    )
    base.update(kw)
    return slurm.JobScript(**base)


def _page_config_of(script: str, tmp_path, sandbox: bool) -> dict:
    """Run the script's lab-config lines in bash, as the job does; the file's JSON."""
    lines = [ln for ln in script.splitlines() if "labconfig" in ln or "JUPYTER_CONFIG" in ln]
    r = subprocess.run(
        ["bash", "-c", "\n".join([f"XH_DIR={tmp_path}", *lines, 'echo "$JUPYTER_CONFIG_PATH"'])],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "JUPYTER_CONFIG_PATH": "/site/etc/jupyter"},
    )
    assert r.stdout.strip() == f"{tmp_path}/jupyter:/site/etc/jupyter"
    where = tmp_path / ("sock/jupyter" if sandbox else "jupyter") / "labconfig"
    return json.loads((where / "page_config.json").read_text())


def test_first_run_prompts_off_through_a_page_config_of_the_job(tmp_path):
    sp = SlurmSSHSpawner()
    assert sp.lab_disabled_plugins == [ANNOUNCEMENTS]
    script = slurm.build_job_script(_job(lab_disabled_plugins=(ANNOUNCEMENTS,)))
    assert _page_config_of(script, tmp_path, sandbox=False) == {
        "disabledExtensions": {ANNOUNCEMENTS: True}
    }
    assert "/.jupyter" not in script  # nothing of the user's is written
    # in the sandbox the job directory's path shows its sock folder: the file goes there
    sb_dir = tmp_path / "sb"
    script = slurm.build_job_script(_job(lab_disabled_plugins=(ANNOUNCEMENTS,), sandbox=Sandbox()))
    assert _page_config_of(script, sb_dir, sandbox=True)["disabledExtensions"] == {
        ANNOUNCEMENTS: True
    }
    # configurable: empty leaves JupyterLab as it comes
    assert "JUPYTER_CONFIG_PATH" not in slurm.build_job_script(_job())


@pytest.mark.parametrize(
    "bad", ["x'; touch /tmp/xh-canary; '", "a b", "@scope/pkg:plug\nin", "../etc", ""]
)
def test_lab_plugin_ids_are_validated(bad):
    with pytest.raises(TraitError, match="lab_disabled_plugins"):
        SlurmSSHSpawner(lab_disabled_plugins=[bad])
    with pytest.raises(v.InvalidValue):
        _job(lab_disabled_plugins=(bad,))


def test_idle_culler_service_with_documented_defaults():
    c = Config()
    c.JupyterHub.services = [{"name": "other", "api_token": "x" * 32}]
    config.idle_culler(c)
    culler = c.JupyterHub.services[-1]
    assert c.JupyterHub.services[0]["name"] == "other"
    assert culler["name"] == "idle-culler"
    assert culler["command"][1:] == [
        "-m",
        "xsedehub.idleculler",
        "--timeout=3600",
        "--cull-every=300",
    ]
    role = c.JupyterHub.load_roles.get_value([])[-1]  # appended to traitlets' lazy value
    assert role["services"] == ["idle-culler"] and "delete:servers" in role["scopes"]
    # the TLJH plugin sizes TLJH's own culler the same way
    assert tljh.CULLER == {"timeout": 3600, "every": 300}
    with pytest.raises(ValueError, match="timeout"):
        config.idle_culler(Config(), timeout=0)
    # the culler is installed with xsedehub
    import jupyterhub_idle_culler  # noqa: F401


def test_the_culler_keeps_its_token_out_of_the_log_and_stops_on_sigint(tmp_path):
    """A cull that fails (the hub unreachable) makes tornado log the culler's callback
    with its arguments: the token is masked.  Started with SIGINT ignored (as from a
    shell's background job), the culler still ends on the SIGINT JupyterHub stops it
    with (plain jupyterhub_idle_culler ignored it, and each hub shutdown waited 30 s)."""
    import os
    import signal
    import socket
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there: every cull fails
    token = "feedc0ffee" * 4
    env = dict(
        os.environ,
        JUPYTERHUB_API_TOKEN=token,
        JUPYTERHUB_API_URL=f"http://127.0.0.1:{port}/hub/api",
    )
    err = tmp_path / "culler.err"
    with err.open("w") as f:
        p = subprocess.Popen(
            [sys.executable, "-m", "xsedehub.idleculler", "--timeout=10", "--cull-every=1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=f,
            cwd=tmp_path,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        deadline = time.monotonic() + 30
        while "api_token=" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        p.wait(20)  # well below JupyterHub's 30 s before it tries SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = err.read_text()
    assert "api_token='[secret]'" in text, text
    assert token not in text
