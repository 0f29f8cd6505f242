"""The admin's command line without the cluster: help texts, what ``check`` prints when it
cannot try a step, and the hub URL ``orphans`` reads by default."""

from __future__ import annotations

import argparse
import socket

import asyncssh
import pytest
from traitlets.config import Config

from xsedehub.check import MESSAGES, TEST_CERTIFICATE_COMMANDS, Report, run_check
from xsedehub.cli import build_parser
from xsedehub.orphans import hub_url_from_config


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_and_flag_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helped = {a.dest for a in sub._choices_actions if a.help}
    missing = []
    for name, p in _subparsers(parser).items():
        if name not in helped:
            missing.append(name)
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


@pytest.mark.parametrize(
    "settings,url",
    [
        ({}, "http://127.0.0.1:8081"),
        ({"hub_port": 15001}, "http://127.0.0.1:15001"),  # TLJH's jupyterhub_config.py
        ({"hub_ip": "10.200.0.1", "hub_port": 8081}, "http://10.200.0.1:8081"),
        ({"hub_ip": "0.0.0.0"}, "http://127.0.0.1:8081"),  # noqa: S104
        ({"hub_bind_url": "http://127.0.0.1:9081/hub/"}, "http://127.0.0.1:9081"),
    ],
)
def test_orphans_reads_the_hub_itself_by_default(settings, url):
    c = Config()
    for k, v in settings.items():
        setattr(c.JupyterHub, k, v)
    assert hub_url_from_config(c) == url


def test_report_says_what_it_skipped():
    lines: list[str] = []
    r = Report(out=lines.append)
    r.ok("login node reachable")
    assert r.summary() == "all checks passed"
    r.skip("certificate-needed", commands=TEST_CERTIFICATE_COMMANDS, config="hub.py")
    assert r.failed == [] and r.skipped == ["certificate-needed"]
    assert lines[-1].startswith("SKIP  xsede mode without a user certificate")
    assert "\n      how: On the host that holds the user CA's private key" in lines[-1]
    assert "xsedehub check -f hub.py --key xh-check --certificate xh-check-cert.pub" in lines[-1]
    assert "skipped" in r.summary() and r.summary() != "all checks passed"
    r.fail("test-job-queued", job="1", seconds=5, reason="Priority")
    assert r.summary() == "1 problem(s)"
    assert set(MESSAGES) >= {"certificate-needed"}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_check_goes_on_after_a_failed_step_and_names_the_skip(tmp_path, monkeypatch):
    """xsede mode, no certificate, nothing listening: the issuer's failure does not end
    the check (the login node is still tried), and the skipped steps are named."""
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "ab" * 32)
    kh = tmp_path / "known_hosts"
    kh.write_text("@cert-authority * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE5vdEFSZWFsS2V5\n")
    secret = tmp_path / "issuer_secret"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    port = _free_port()
    cfg = tmp_path / "jupyterhub_config.py"
    cfg.write_text(
        f"""c = get_config()  # noqa
c.XSEDEHub.mode = "xsede"
c.SlurmSSHSpawner.login_host = "127.0.0.1"
c.SlurmSSHSpawner.login_port = {port}
c.SlurmSSHSpawner.known_hosts = "{kh}"
c.SlurmSSHSpawner.tunnel_host = "127.0.0.1"
c.SlurmSSHSpawner.tunnel_known_hosts = "{kh}"
c.XSEDECILogonAuthenticator.issuer_url = "http://127.0.0.1:{port}/v1/certificate"
c.XSEDECILogonAuthenticator.issuer_secret_file = "{secret}"
c.XSEDECILogonAuthenticator.idps = {{"https://idp.example": {{"username_derivation": {{}}}}}}
from xsedehub.config import apply
apply(c)
"""
    )
    lines: list[str] = []
    report = run_check(str(cfg), out=lines.append, job_timeout=5)
    text = "\n".join(lines)
    assert report.failed == ["issuer-unreachable", "login-unreachable"], text
    assert report.skipped == ["certificate-needed"], text
    assert f"xsedehub check -f {cfg} --key xh-check" in text
    assert report.summary() == "2 problem(s)"


def test_check_walks_every_cluster(tmp_path, monkeypatch):
    """With SlurmSSHSpawner.clusters, every step runs on each cluster in turn, under its
    name: here neither login node answers, and each is named in its own failure."""
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "ab" * 32)
    kh = tmp_path / "known_hosts"
    kh.write_text("@cert-authority * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE5vdEFSZWFsS2V5\n")
    key = tmp_path / "gateway_key"
    key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    key.chmod(0o600)
    ports = [_free_port(), _free_port()]
    clusters = {
        name: {"login_host": "127.0.0.1", "login_port": port}
        for name, port in zip(("expanse", "delta"), ports, strict=True)
    }
    profiles = {"a": {"cluster": "expanse"}, "b": {"cluster": "delta"}}
    cfg = tmp_path / "jupyterhub_config.py"
    cfg.write_text(
        f"""c = get_config()  # noqa
c.XSEDEHub.mode = "gateway"
c.SlurmSSHSpawner.known_hosts = "{kh}"
c.SlurmSSHSpawner.tunnel_host = "127.0.0.1"
c.SlurmSSHSpawner.tunnel_known_hosts = "{kh}"
c.SlurmSSHSpawner.gateway_key = "{key}"
c.SlurmSSHSpawner.clusters = {clusters!r}
c.SlurmSSHSpawner.profiles = {profiles!r}
from xsedehub.config import apply
apply(c)
"""
    )
    lines: list[str] = []
    report = run_check(str(cfg), out=lines.append, job_timeout=5)
    text = "\n".join(lines)
    assert report.failed == ["login-unreachable", "login-unreachable"], text
    first, second = text.index("cluster expanse:"), text.index("cluster delta:")
    assert first < text.index(f"127.0.0.1:{ports[0]} cannot be reached") < second
    assert second < text.index(f"127.0.0.1:{ports[1]} cannot be reached")
