"""What keeps secrets out of reprs, attendees away from the hub's commands, and the hub's
sshd able to read the tunnel keys (no cluster needed; the end-to-end attendee test is
tests/test_gateway.py::test_an_attendee_cannot_steer_the_hubs_commands)."""

from __future__ import annotations

import subprocess
import sys
import time

import asyncssh
import pytest
from traitlets.config import Config
from xsedehub.auth.issuer_client import Credential
from xsedehub.spawner import validate as v
from xsedehub.spawner.ssh import LoginNode
from xsedehub.spawner.tunnel import TunnelGrant

from xsedehub import check, gatewaysetup


def _key() -> tuple[str, str]:
    k = asyncssh.generate_private_key("ssh-ed25519")
    return k.export_private_key("openssh").decode(), k.export_public_key().decode()


def test_reprs_hold_no_private_key():
    private, _ = _key()
    cred = Credential(private, "ssh-ed25519-cert-v01@openssh.com AAAA", "alice", 7, 0.0, 1.0)
    grant = TunnelGrant("spawn1", 40001, private, time.time() + 60)
    for obj in (cred, grant):
        text = repr(obj) + str(obj)
        assert "PRIVATE KEY" not in text and private.splitlines()[1] not in text
    assert "alice" in repr(cred) and "40001" in repr(grant)


def test_slurm_commands_run_by_absolute_path():
    node = LoginNode("login", 22, "/etc/kh", "/opt/slurm/bin")
    assert node.argv(["squeue", "--noheader"]) == ["/opt/slurm/bin/squeue", "--noheader"]
    assert node.argv(["sacct", "-j", "1"])[0] == "/opt/slurm/bin/sacct"
    assert node.argv(["/usr/bin/env"]) == ["/usr/bin/env"]
    assert LoginNode("login", 22, "/etc/kh").argv(["sbatch"]) == ["/usr/bin/sbatch"]


@pytest.mark.parametrize("value", ["bin", "/opt/../bin", "/opt/slurm bin", "$HOME/bin", ""])
def test_slurm_bin_dir_must_be_an_absolute_plain_path(value):
    from xsedehub.config import check as config_check

    c = Config()
    c.SlurmSSHSpawner.slurm_bin_dir = value
    problems = [str(p) for p in config_check(c, "gateway") if "slurm_bin_dir" in str(p)]
    assert problems, f"{value!r} was accepted"


def test_keys_line_and_sshd_block():
    _, public = _key()
    line = gatewaysetup.keys_line(public, "203.0.113.10")
    assert line.startswith('from="203.0.113.10",restrict ssh-ed25519 ')
    assert line.split()[2] == public.split()[1]
    assert gatewaysetup.sshd_block("workshop01", "/etc/ssh/xsedehub/workshop01.keys") == (
        "Match User workshop01\n    AuthorizedKeysFile /etc/ssh/xsedehub/workshop01.keys\n"
    )
    for bad in ('1.2.3.4",command="sh', "a b", ""):
        with pytest.raises(v.InvalidValue):
            gatewaysetup.keys_line(public, bad)
    with pytest.raises(v.InvalidValue):
        gatewaysetup.keys_line("not a key", "203.0.113.10")
    with pytest.raises(v.InvalidValue):
        gatewaysetup.sshd_block("Work shop", "/etc/k")
    with pytest.raises(v.InvalidValue):
        gatewaysetup.sshd_block("ws", "relative/keys")


def test_login_shells_and_session_variables():
    assert gatewaysetup.shell_problem("/bin/sh") is None
    assert gatewaysetup.shell_problem("/bin/dash") is None
    for shell in ("/bin/bash", "/usr/bin/zsh", "/bin/tcsh"):
        assert "start-up files" in gatewaysetup.shell_problem(shell)
    env = "HOME=/home/gw\nPATH=/usr/bin:/bin\nLANG=C.UTF-8\n"
    assert gatewaysetup.env_problems(env, "/home/gw") == []
    bad = env + "LD_PRELOAD=/home/gw/x.so\nBASH_ENV=/home/gw/.x\n"
    assert gatewaysetup.env_problems(bad, "/home/gw") == ["LD_PRELOAD", "BASH_ENV"]
    for path in ("/home/gw/bin:/usr/bin", "/usr/bin::/bin", ".:/usr/bin"):
        found = gatewaysetup.env_problems(f"PATH={path}\n", "/home/gw")
        assert found == ["PATH (a folder the account can write)"], path


def test_gateway_setup_command_prints_the_lines(tmp_path):
    private, public = _key()
    key = tmp_path / "gw"
    key.write_text(private)
    key.chmod(0o600)
    argv = [sys.executable, "-m", "xsedehub.cli", "gateway", "setup", "--user", "ws01"]
    r = subprocess.run(
        [*argv, "--key", str(key), "--hub-address", "203.0.113.10"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert gatewaysetup.keys_line(public, "203.0.113.10") in out
    assert "Match User ws01\n    AuthorizedKeysFile /etc/ssh/xsedehub/ws01.keys" in out
    assert "usermod -s /bin/sh ws01" in out and "user_readenv=0" in out
    assert "PRIVATE" not in out and private.splitlines()[1] not in out
    # a hostile address is refused with a clear message, and nothing is printed
    r = subprocess.run(
        [*argv, "--key", str(key), "--hub-address", "203.0.113.10;rm -rf /"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "hub address" in r.stderr and not r.stdout


def test_check_knows_the_hubs_sshd_version(tmp_path):
    real = check.sshd_version("/usr/sbin/sshd")
    assert real is not None and real >= check.MIN_OPENSSH, real
    # an sshd older than 9.1 (its usage text names the version): check fails, naming it
    old = tmp_path / "sshd"
    old.write_text("#!/bin/sh\necho 'unknown option -- V' >&2\necho 'OpenSSH_8.9p1 Ubuntu' >&2\n")
    old.chmod(0o755)
    assert check.sshd_version(str(old)) == (8, 9)
    c = Config()
    c.SlurmSSHSpawner.tunnel_user = "root"
    report = check.Report(out=lambda _line: None)
    assert not check.Checker(c, report, sshd=str(old)).tunnel_account()
    assert report.failed == ["tunnel-sshd-version"]
    assert "OpenSSH 9.1 or later" in "\n".join(report.lines)
    report = check.Report(out=lambda _line: None)
    assert check.Checker(c, report, sshd="/usr/sbin/sshd").tunnel_account()
    assert not report.failed
