"""The admin's command line against the real local cluster: tunnel setup, check, orphans."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest
from xsedehub.auth.issuer_client import obtain_credential

from xsedehub import tunnelsetup
from xsedehub.check import MESSAGES, TEST_CERTIFICATE_COMMANDS, run_check
from xsedehub.orphans import find_orphans
from xsedehub.testbed import localcluster, localhub

from .conftest import hub_id_token, hub_secret, make_hub, stop_hub_and_proxy
from .test_gateway import in_cluster_root

pytestmark = pytest.mark.cluster


# ---------------------------------------------------------------------------- tunnel setup
def _base_sshd(cluster, path: Path) -> str:
    conf = Path(cluster.root) / "sshd_hub.conf"
    text = tunnelsetup.with_block(conf.read_text(), "").replace(tunnelsetup.BEGIN, "")
    text = text.split(tunnelsetup.BEGIN)[0]
    path.write_text(text)
    return text


def test_tunnel_setup_shows_then_writes_once(cluster, tmp_path):
    sshd_config = tmp_path / "sshd_config"
    base = _base_sshd(cluster, sshd_config)
    assert "Match User" not in base
    keys = tmp_path / "etc" / "tunnelbot_authorized_keys"
    cli = [
        sys.executable,
        "-m",
        "xsedehub.cli",
        "tunnel",
        "setup",
        "--sshd-config",
        str(sshd_config),
        "--keys-file",
        str(keys),
        "--hub-api",
        "127.0.0.1:15001",
    ]
    dry = subprocess.run(cli, capture_output=True, text=True, check=True)
    assert "+Match User tunnelbot" in dry.stdout and "+    PermitOpen 127.0.0.1:15001" in dry.stdout
    assert "dry run" in dry.stdout
    assert sshd_config.read_text() == base and not keys.exists()  # nothing written
    subprocess.run([*cli, "--apply"], capture_output=True, text=True, check=True)
    again = subprocess.run([*cli, "--apply"], capture_output=True, text=True, check=True)
    assert "nothing to change" in again.stdout
    text = sshd_config.read_text()
    assert text.count("Match User tunnelbot") == 1 and text.startswith(base.rstrip("\n"))
    assert keys.exists() and keys.stat().st_mode & 0o777 == 0o644
    subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(sshd_config)], check=True)
    # sshd's own view of the account's restrictions
    out = subprocess.run(
        [
            "/usr/sbin/sshd",
            "-T",
            "-f",
            str(sshd_config),
            "-C",
            "user=tunnelbot,host=x,addr=10.200.0.2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "permitopen 127.0.0.1:15001" in out
    assert "forcecommand /bin/false" in out and "permittty no" in out
    assert "gatewayports no" in out


def test_tunnel_setup_refuses_a_config_sshd_rejects(cluster, tmp_path):
    sshd_config = tmp_path / "sshd_config"
    sshd_config.write_text("ThisIsNotAnOption yes\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "xsedehub.cli",
            "tunnel",
            "setup",
            "--apply",
            "--sshd-config",
            str(sshd_config),
            "--keys-file",
            str(tmp_path / "k"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "sshd rejects the new configuration" in r.stderr
    assert sshd_config.read_text() == "ThisIsNotAnOption yes\n"


# ---------------------------------------------------------------------------- check
def _config(cluster, tmp_path, mode="gateway", extra=""):
    return localhub.write_config(tmp_path, cluster, mode=mode, extra=extra)


def _run(cfg, job_timeout: float = 30, **kw):
    lines: list[str] = []
    report = run_check(str(cfg), out=lines.append, job_timeout=job_timeout, **kw)
    return report, "\n".join(lines)


def test_check_passes_on_a_good_deployment(cluster, tmp_path):
    report, text = _run(_config(cluster, tmp_path))
    assert report.failed == [], text
    assert "opened the tunnel back to the hub" in text
    assert "jupyterhub-singleuser" in text
    assert "ok    gateway account gateway: login shell /bin/sh reads no start-up file" in text
    assert "gateway account's SSH sessions carry no variable" in text


async def test_check_in_xsede_mode_with_a_certificate(cluster, issuer, tmp_path):
    # a fresh account: check's test job is the first to create alice's job folders
    import shutil

    shutil.rmtree("/home/alice/.xsedehub", ignore_errors=True)
    cred = await obtain_credential(
        "http://127.0.0.1:8700/v1/certificate",
        hub_id_token("cilogon-alice"),
        hub_secret=hub_secret(cluster),
    )
    (tmp_path / "k").write_text(cred.private_key)
    (tmp_path / "k").chmod(0o600)
    (tmp_path / "k-cert.pub").write_text(cred.certificate)
    cfg = _config(cluster, tmp_path, mode="xsede")
    import asyncio

    loop = asyncio.get_running_loop()
    report, text = await loop.run_in_executor(
        None, lambda: _run(cfg, certificate=(str(tmp_path / "k"), str(tmp_path / "k-cert.pub")))
    )
    assert report.failed == [], text
    assert "logged in as alice (certificate)" in text
    # the folders it created are private, so the spawns that follow find them so
    for d in ("/home/alice/.xsedehub", "/home/alice/.xsedehub/jobs"):
        assert Path(d).stat().st_mode & 0o077 == 0, (d, oct(Path(d).stat().st_mode))


def test_check_in_xsede_mode_without_a_certificate_says_how_to_get_one(cluster, issuer, tmp_path):
    """Without --certificate, check says which steps it skipped and how to make a test
    certificate; the commands it prints, run as printed, give one it then accepts."""
    import shlex

    cfg = _config(cluster, tmp_path, mode="xsede")
    report, text = _run(cfg)
    assert report.failed == [] and report.skipped == ["certificate-needed"], text
    assert "ok    certificate issuer answers" in text
    assert "SKIP  xsede mode without a user certificate" in text
    assert TEST_CERTIFICATE_COMMANDS in text
    assert f"xsedehub check -f {cfg} --key xh-check --certificate xh-check-cert.pub" in text
    assert report.summary() != "all checks passed" and "skipped" in report.summary()
    # follow the hint: the local cluster's user CA, the account alice
    commands = TEST_CERTIFICATE_COMMANDS.replace("CA_KEY", shlex.quote(cluster.user_ca_key))
    subprocess.run(["bash", "-c", commands.replace("ACCOUNT", "alice")], cwd=tmp_path, check=True)
    cert = (str(tmp_path / "xh-check"), str(tmp_path / "xh-check-cert.pub"))
    report, text = _run(cfg, certificate=cert)
    assert report.failed == [] and report.skipped == [], text
    assert "logged in as alice (certificate)" in text
    assert "opened the tunnel back to the hub" in text
    assert report.summary() == "all checks passed"


@pytest.mark.parametrize(
    "case,extra,failed,says,fix",
    [
        (
            "wrong host key",
            "WRONG_KH",
            "login-hostkey",
            "not vouched for",
            "Add the login node's host key (ssh-keyscan -p PORT HOST",
        ),
        (
            "login node down",
            "c.SlurmSSHSpawner.login_port = 2999",
            "login-unreachable",
            "cannot be reached",
            "Check SlurmSSHSpawner.login_host and login_port",
        ),
        (
            "key not authorized",
            'c.SlurmSSHSpawner.gateway_user = "bob"',
            "gateway-refused",
            "refused the hub's key",
            "Have the cluster's admins put the hub's key in bob's root-owned keys file",
        ),
        (
            "tunnel account missing",
            'c.SlurmSSHSpawner.tunnel_user = "nosuchbot"',
            "tunnel-account",
            "does not exist on the hub",
            "Run: xsedehub tunnel setup --apply",
        ),
        (
            "tunnel keys not read by sshd",
            'c.SlurmSSHSpawner.tunnel_authorized_keys = "ELSEWHERE"',
            "tunnel-failed",
            "did not open the tunnel",
            "From a compute node, the hub's sshd must be reachable at tunnel_host:tunnel_port",
        ),
        (
            "no singleuser",
            'c.SlurmSSHSpawner.cmd = ["/opt/nothing/jupyterhub-singleuser"]',
            "singleuser-missing",
            "does not run on the login node",
            "Point SlurmSSHSpawner.cmd at jupyterhub-singleuser",
        ),
        (
            "bad partition",
            'c.SlurmSSHSpawner.partition = "nosuchpartition"',
            "test-job-refused",
            "sbatch refused",
            "Check SlurmSSHSpawner.partition, account and walltime",
        ),
    ],
)
def test_check_names_each_broken_setup(cluster, tmp_path, case, extra, failed, says, fix):
    if extra == "WRONG_KH":
        rogue = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        (tmp_path / "rogue_kh").write_text(f"@cert-authority * {rogue}")
        extra = f'c.SlurmSSHSpawner.known_hosts = "{tmp_path / "rogue_kh"}"'
    extra = extra.replace("ELSEWHERE", str(tmp_path / "not-the-sshd-file"))
    # a tunnel that never opens is waited for until the job timeout: a short one here
    timeout = 15 if failed == "tunnel-failed" else 30
    report, text = _run(_config(cluster, tmp_path, extra=extra), job_timeout=timeout)
    assert report.failed == [failed], text
    assert says in text
    assert f"fix: {fix}" in text.replace("\n", " "), text
    if failed == "tunnel-failed":  # refused, not merely slow: the job's log says so
        assert "Permission denied" in text, text


async def _gateway_step(cfg) -> tuple[list[str], str]:
    """Only check's gateway-account step (no test job): what it failed, what it said."""
    from xsedehub.check import Checker, Report, load_config

    lines: list[str] = []
    checker = Checker(load_config(str(cfg)), Report(out=lines.append))
    conn = await checker.connect(await checker.identity())
    try:
        await checker.gateway_account(conn)
    finally:
        conn.close()
    return checker.r.failed, "\n".join(checker.r.lines)


async def test_check_catches_a_gateway_account_attendees_could_steer(cluster, tmp_path):
    """The shared account's login shell reads ~/.bashrc, or its sessions carry a variable
    from ~/.pam_environment (Debian's sshd PAM reads it): check fails, naming each."""
    import pwd

    user = cluster.gateway_user
    shell = pwd.getpwnam(user).pw_shell  # /bin/sh, as the test cluster sets it up
    pam_env = Path(f"/home/{user}/.pam_environment")
    cfg = _config(cluster, tmp_path)
    try:
        _usermod_shell(user, "/bin/bash")
        failed, text = await _gateway_step(cfg)
        assert failed == ["gateway-shell"], text
        assert "/bin/bash reads start-up files" in text and "usermod -s /bin/sh" in text
        _usermod_shell(user, "/bin/sh")
        pam_env.write_text("BASH_ENV DEFAULT=/tmp/nothing-here\n")
        failed, text = await _gateway_step(cfg)
        assert failed == ["gateway-env"], text
        assert "BASH_ENV" in text and "user_readenv=0" in text
    finally:
        _usermod_shell(user, shell)
        pam_env.unlink(missing_ok=True)
    failed, text = await _gateway_step(cfg)
    assert failed == [], text


def _usermod_shell(user: str, shell: str) -> None:
    subprocess.run(["usermod", "-s", shell, user], check=True)


def test_check_issuer_down(cluster, tmp_path):
    cfg = _config(
        cluster,
        tmp_path,
        mode="xsede",
        extra='c.XSEDECILogonAuthenticator.issuer_url = "http://127.0.0.1:8799/v1/certificate"',
    )
    report, text = _run(cfg)
    assert report.failed == ["issuer-unreachable"], text
    assert "Start the issuer" in text


def test_every_check_message_is_documented():
    guide = (Path(__file__).parents[1] / "docs" / "howto" / "troubleshooting.md").read_text()
    for msg_id in MESSAGES:
        assert f"({msg_id})=" in guide or f"`{msg_id}`" in guide, msg_id


# ---------------------------------------------------------------------------- orphans
@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    h = make_hub(tmp_path_factory.mktemp("adminhub"), cluster, provider, poll_interval=5)
    yield h
    stop_hub_and_proxy(h)


def test_orphans_are_found_and_cancelled(hub, cluster):
    c = hub.client
    c.login("ada")
    c.start("ada-l")
    c.wait_ready("ada-l")
    out = in_cluster_root(
        [
            "sbatch",
            "--parsable",
            "--uid=gateway",
            "--gid=gateway",
            "--comment=xsedehub:u99-lost",
            "--time=5",
            "--chdir=/tmp",
            "--output=/dev/null",
            "--wrap",
            "sleep 300",
        ]
    )
    orphan = out.strip()
    assert orphan.isdigit(), out
    token = (hub.workdir / "service_token").read_text().strip()
    cfg = hub.workdir / "jupyterhub_config.py"
    lines: list[str] = []
    ada_job = in_cluster_root(["squeue", "-h", "-n", "jupyter-ada-l", "-o", "%i"]).strip()
    found = {j.job_id: j for j in find_orphans(str(cfg), c.url, token, min_age=0, out=lines.append)}
    assert orphan in found and ada_job not in found, lines
    assert found[orphan].spawn_id == "u99-lost"
    # no hub URL: the hub's own address from the config (hub_ip:hub_port), not the proxy's
    find_orphans(str(cfg), None, token, cancel=True, min_age=0, out=lines.append)
    time.sleep(1)
    assert in_cluster_root(["squeue", "-h", "-j", orphan, "-o", "%T"]).strip() in (
        "",
        "CANCELLED",
        "COMPLETING",
    )
    # ada's server is known to the hub: untouched
    assert c.server_api("ada-l", c.user_token("ada-l"), "/status").status_code == 200
    c.stop("ada-l")


def test_orphans_cancels_the_jobs_a_failed_stop_left(hub, cluster, monkeypatch, tmp_path):
    """The hub's list of jobs it could not cancel at stop: `orphans --cancel` cancels
    them however young, drops them from the list, and leaves a job that now carries a
    listed id but another spawn's comment (job ids are reused) alone."""
    from xsedehub.spawner import pending_cancel

    # the hub's configuration with a list of this test's own (the running hub's polls
    # retry the hub's list too), named relative to the working directory, as by default
    cfg = tmp_path / "jupyterhub_config.py"
    cfg.write_text(
        (hub.workdir / "jupyterhub_config.py").read_text()
        + '\nc.SlurmSSHSpawner.pending_cancel_file = "test_pending_cancels.json"\n'
    )
    monkeypatch.chdir(tmp_path)
    path = "test_pending_cancels.json"
    mine, reused = _lost_job("u98-failedstop"), _lost_job("u97-someone")
    where = dict(
        login_host=cluster.login_ip, login_port=cluster.login_port, ssh_user=cluster.gateway_user
    )
    pending_cancel.add(path, pending_cancel.PendingCancel(mine, spawn_id="u98-failedstop", **where))
    pending_cancel.add(path, pending_cancel.PendingCancel(reused, spawn_id="u1-gone", **where))
    token = (hub.workdir / "service_token").read_text().strip()
    lines: list[str] = []
    try:
        found = find_orphans(
            str(cfg),
            hub.client.url,
            token,
            cancel=True,
            out=lines.append,
        )
        assert [j.job_id for j in found] == [mine], lines
        assert f"{mine}\tgateway" in "\n".join(lines) and "cancelled" in "\n".join(lines)
        assert in_cluster_root(["squeue", "-h", "-j", mine, "-o", "%T"]).strip() in (
            "",
            "CANCELLED",
            "COMPLETING",
        )
        assert in_cluster_root(["squeue", "-h", "-j", reused, "-o", "%T"]).strip() in (
            "RUNNING",
            "PENDING",
        )
        assert pending_cancel.read(path) == []  # both settled: one cancelled, one not ours
    finally:
        in_cluster_root(["scancel", mine, reused])
        Path(path).unlink(missing_ok=True)


def _lost_job(spawn_id: str) -> str:
    """A job of the gateway account with xsedehub's comment that no server holds."""
    out = in_cluster_root(
        [
            "sbatch",
            "--parsable",
            "--uid=gateway",
            "--gid=gateway",
            f"--comment=xsedehub:{spawn_id}",
            "--time=5",
            "--chdir=/tmp",
            "--output=/dev/null",
            "--wrap",
            "sleep 300",
        ]
    )
    assert out.strip().isdigit(), out
    return out.strip()


def _orphans_cli(hub, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "JUPYTERHUB_API_TOKEN"}
    if token:
        env["JUPYTERHUB_API_TOKEN"] = (hub.workdir / "service_token").read_text().strip()
    cfg = str(hub.workdir / "jupyterhub_config.py")
    argv = [sys.executable, "-m", "xsedehub.cli", "orphans", "-f", cfg, *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def _job_state(job: str) -> str:
    return in_cluster_root(["squeue", "-h", "--states=all", "-j", job, "-o", "%T"]).strip()


def test_orphans_command_leaves_a_job_submitted_a_moment_ago(hub, cluster):
    """The hub may have submitted a job and not yet recorded its id: ``--cancel`` lists
    it but leaves it alone; ``--min-age 0`` cancels it.  The token comes from the
    environment (without one: exit status 2)."""
    no_token = _orphans_cli(hub, "--cancel", token=False)
    assert no_token.returncode == 2 and "JUPYTERHUB_API_TOKEN" in no_token.stderr
    fresh = _lost_job("u98-fresh")
    try:
        r = _orphans_cli(hub, "--cancel")
        print(r.stdout)
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(fresh + "\t"))
        assert "left alone (younger than 60 s)" in line
        assert _job_state(fresh) in ("PENDING", "RUNNING")
        r = _orphans_cli(hub, "--cancel", "--min-age", "0")
        assert r.returncode == 0, r.stderr
        assert f"{fresh}\tgateway\t" in r.stdout and "cancelled" in r.stdout
        assert _job_state(fresh) in ("CANCELLED", "COMPLETING", "")
    finally:
        in_cluster_root(["scancel", fresh])


def test_orphans_command_fails_when_squeue_fails(hub, cluster):
    """munge is down, so squeue on the login node cannot authenticate: exit status 1 and
    what failed, never "no orphaned jobs"."""
    localcluster.stop_daemon("munged")
    try:
        r = _orphans_cli(hub)
    finally:
        localcluster.up()
    print(r.returncode, r.stdout, r.stderr)
    assert r.returncode == 1
    assert "squeue failed on the login node" in r.stderr
    assert "no orphaned jobs" not in r.stdout
