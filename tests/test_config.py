"""Mode selection, start-up validation and the TLJH plugin's hooks, called directly
(tests/test_tljh.py runs them inside The Littlest JupyterHub itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from traitlets.config import Config

from xsedehub import config as xc
from xsedehub import tljh


@pytest.fixture
def files(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("@cert-authority * ssh-ed25519 AAAA\n")
    key = tmp_path / "gateway_key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    secret = tmp_path / "issuer_secret"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    return tmp_path


def good(files, mode="gateway") -> Config:
    c = Config()
    c.XSEDEHub.mode = mode
    sp = c.SlurmSSHSpawner
    sp.login_host = "login.example.org"
    sp.known_hosts = str(files / "known_hosts")
    sp.tunnel_host = "hub.example.org"
    sp.tunnel_known_hosts = str(files / "known_hosts")
    sp.gateway_key = str(files / "gateway_key")
    c.XSEDECILogonAuthenticator.issuer_url = "https://issuer.example.org/v1/certificate"
    c.XSEDECILogonAuthenticator.idps = {"https://idp": {"username_derivation": {}}}
    c.XSEDECILogonAuthenticator.issuer_secret_file = str(files / "issuer_secret")
    return c


ENV = {"JUPYTERHUB_CRYPT_KEY": "x" * 64}


@pytest.mark.parametrize("mode", ["gateway", "xsede"])
def test_apply_wires_the_mode(files, mode, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "x" * 64)
    c = good(files, mode)
    assert xc.apply(c) == mode
    assert c.JupyterHub.authenticator_class == xc.AUTHENTICATORS[mode]
    assert c.JupyterHub.spawner_class == xc.SPAWNER
    assert c.SlurmSSHSpawner.mode == mode
    assert c.JupyterHub.cleanup_servers is False


@pytest.mark.parametrize(
    "mode,breakage,setting",
    [
        ("gateway", lambda c, f: c.SlurmSSHSpawner.pop("login_host"), "SlurmSSHSpawner.login_host"),
        (
            "gateway",
            lambda c, f: c.SlurmSSHSpawner.pop("tunnel_host"),
            "SlurmSSHSpawner.tunnel_host",
        ),
        (
            "gateway",
            lambda c, f: setattr(c.SlurmSSHSpawner, "known_hosts", "/nonexistent"),
            "SlurmSSHSpawner.known_hosts",
        ),
        ("gateway", lambda c, f: (f / "gateway_key").chmod(0o644), "SlurmSSHSpawner.gateway_key"),
        (
            "gateway",
            lambda c, f: c.SlurmSSHSpawner.pop("gateway_key"),
            "SlurmSSHSpawner.gateway_key",
        ),
        (
            "gateway",
            lambda c, f: setattr(c.SlurmSSHSpawner, "mode", "xsede"),
            "SlurmSSHSpawner.mode",
        ),
        (
            "gateway",
            lambda c, f: setattr(c.JupyterHub, "authenticator_class", "xsedehub-cilogon"),
            "JupyterHub.authenticator_class",
        ),
        (
            "gateway",
            lambda c, f: setattr(c.SlurmSSHSpawner, "login_port", "twenty-two"),
            "SlurmSSHSpawner",
        ),
        (
            "xsede",
            lambda c, f: c.XSEDECILogonAuthenticator.pop("issuer_url"),
            "XSEDECILogonAuthenticator.issuer_url",
        ),
        (
            "xsede",
            lambda c, f: c.XSEDECILogonAuthenticator.pop("issuer_secret_file"),
            "XSEDECILogonAuthenticator.issuer_secret_file",
        ),
        (
            "xsede",
            lambda c, f: (f / "issuer_secret").chmod(0o640),
            "XSEDECILogonAuthenticator.issuer_secret_file",
        ),
        (
            "xsede",
            lambda c, f: setattr(
                c.XSEDECILogonAuthenticator,
                "issuer_url",
                "http://issuer.example.org/v1/certificate",
            ),
            "XSEDECILogonAuthenticator.issuer_url",
        ),
        (
            "xsede",
            lambda c, f: setattr(c.XSEDECILogonAuthenticator, "issuer_verify", False),
            "XSEDECILogonAuthenticator.issuer_url",
        ),
        (
            "xsede",
            lambda c, f: c.XSEDECILogonAuthenticator.pop("idps"),
            "XSEDECILogonAuthenticator.idps",
        ),
        (
            "xsede",
            lambda c, f: setattr(c.XSEDECILogonAuthenticator, "enable_auth_state", False),
            "XSEDECILogonAuthenticator.enable_auth_state",
        ),
        ("nonsense", lambda c, f: None, "XSEDEHub.mode"),
    ],
)
def test_problems_name_the_setting_and_the_fix(files, mode, breakage, setting):
    c = good(files, mode)
    breakage(c, files)
    problems = xc.check(c, mode, environ=ENV)
    assert [p.setting for p in problems] == [setting]
    assert problems[0].fix


@pytest.mark.parametrize(
    "url,verify",
    [
        ("http://127.0.0.1:8700/v1/certificate", True),
        ("http://localhost:8700/v1/certificate", False),
        ("https://[::1]:8443/v1/certificate", False),
        ("https://issuer.example.org/v1/certificate", "/etc/ssl/certs"),  # a CA folder
    ],
)
def test_issuer_url_plain_http_and_unverified_only_on_loopback(files, url, verify):
    c = good(files, "xsede")
    c.XSEDECILogonAuthenticator.issuer_url = url
    c.XSEDECILogonAuthenticator.issuer_verify = verify
    assert xc.check(c, "xsede", environ=ENV) == []


def test_missing_crypt_key_and_mode(files):
    problems = xc.check(good(files), "gateway", environ={})
    assert [p.setting for p in problems] == ["JUPYTERHUB_CRYPT_KEY"]
    assert "crypt_key_file" in problems[0].fix and "openssl rand -hex 32" in problems[0].fix
    with pytest.raises(xc.ConfigError) as e:
        xc.apply(Config())
    assert "XSEDEHub.mode" in str(e.value)


@pytest.mark.parametrize(
    "content,mode,says",
    [
        (None, 0o600, "does not exist"),
        ("ab" * 32, 0o644, "is readable by others (mode 644)"),
        ("not a key", 0o600, "does not hold a 32-byte key"),
    ],
)
def test_crypt_key_file_problems(files, content, mode, says):
    key = files / "crypt_key"
    if content is not None:
        key.write_text(content + "\n")
        key.chmod(mode)
    c = good(files)
    c.XSEDEHub.crypt_key_file = str(key)
    problems = xc.check(c, "gateway", environ=ENV)  # the file, when named, is what counts
    assert [p.setting for p in problems] == ["XSEDEHub.crypt_key_file"]
    assert says in problems[0].message


def test_crypt_key_file_is_the_hubs_key(files, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY", raising=False)
    key = files / "crypt_key"
    key.write_text("cd" * 32 + "\n")
    key.chmod(0o600)
    c = good(files)
    c.XSEDEHub.crypt_key_file = str(key)
    assert xc.apply(c) == "gateway"
    from jupyterhub.crypto import CryptKeeper

    ck = CryptKeeper(config=c)  # what the hub's encryption uses
    assert ck.keys == [bytes.fromhex("cd" * 32)]


def test_check_command_names_a_missing_crypt_key(files, tmp_path, monkeypatch):
    """`xsedehub check` stops at the configuration when the hub could not start for want
    of its key (it used to skip that check and pass)."""
    from xsedehub.check import run_check

    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY", raising=False)
    cfg = tmp_path / "jupyterhub_config.py"
    cfg.write_text(
        "c.XSEDEHub.mode = 'gateway'\n"
        "c.SlurmSSHSpawner.login_host = 'login.example.org'\n"
        "c.SlurmSSHSpawner.tunnel_host = 'hub.example.org'\n"
        f"c.SlurmSSHSpawner.known_hosts = {str(files / 'known_hosts')!r}\n"
        f"c.SlurmSSHSpawner.tunnel_known_hosts = {str(files / 'known_hosts')!r}\n"
        f"c.SlurmSSHSpawner.gateway_key = {str(files / 'gateway_key')!r}\n"
        "from xsedehub.config import apply\napply(c)\n"
    )
    lines: list[str] = []
    report = run_check(str(cfg), out=lines.append)
    assert report.failed == ["config"]
    assert "JUPYTERHUB_CRYPT_KEY: is not in the environment" in lines[0]


def test_check_tljh_names_tljhs_config_file():
    """`xsedehub check --tljh` finds TLJH's jupyterhub_config.py inside the tljh package
    (here TLJH is not installed: the command says so and which xsedehub to run)."""
    r = subprocess.run(
        [sys.executable, "-m", "xsedehub.cli", "check", "--tljh"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert "the tljh package is not in this Python environment" in r.stderr
    assert "/opt/tljh/hub/bin/xsedehub" in r.stderr


def test_hub_stops_at_start_up_with_the_message(files, tmp_path):
    cfg = tmp_path / "jupyterhub_config.py"
    cfg.write_text(
        "c.XSEDEHub.mode = 'gateway'\n"
        f"c.SlurmSSHSpawner.known_hosts = {str(files / 'known_hosts')!r}\n"
        "from xsedehub.config import apply\napply(c)\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "jupyterhub", "-f", str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "SlurmSSHSpawner.login_host: is not set" in out
    assert "fix: set it to the login node's host name" in out
    assert "Traceback" not in out


def test_entry_points_give_short_names():
    eps = metadata.entry_points()
    auths = {e.name: e.value for e in eps.select(group="jupyterhub.authenticators")}
    spawners = {e.name: e.value for e in eps.select(group="jupyterhub.spawners")}
    assert auths["xsedehub-github"] == "xsedehub.auth.github:GatewayGitHubAuthenticator"
    assert auths["xsedehub-cilogon"] == "xsedehub.auth.cilogon:XSEDECILogonAuthenticator"
    assert spawners["xsedehub"] == "xsedehub.spawner.spawner:SlurmSSHSpawner"
    (plugin,) = [e for e in eps.select(group="tljh") if e.name == "xsedehub"]
    assert plugin.load() is tljh


# ---------------------------------------------------------------------------- TLJH
def test_tljh_settings_translate(files, monkeypatch):
    """Values as tljh-config stores them: numbers and booleans guessed from the text,
    everything else a string (a list or a dict as JSON text), lists from add-item."""
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "x" * 64)
    c = tljh.settings_to_config(
        {
            "mode": "gateway",
            "spawner": {
                "login_host": "login.example.org",
                "login_port": 2222,
                "gateway_user": 1234,  # `tljh-config set ... 1234` stores a number
                "cmd": '["/env/bin/jupyterhub-singleuser", "--debug"]',  # set: JSON text
                "tunnel_port_range": [21000, 21999],  # add-item: a list
                "partitions": '{"compute": {"max_cores": 8}}',
                "show_availability": False,
            },
            "authenticator": {"client_id": "abc", "allowed_organizations": ["my-org"]},
        }
    )
    sp = c.SlurmSSHSpawner
    assert c.XSEDEHub.mode == "gateway"
    assert sp.login_port == 2222
    assert sp.gateway_user == "1234"
    assert sp.cmd == ["/env/bin/jupyterhub-singleuser", "--debug"]
    assert sp.partitions == {"compute": {"max_cores": 8}}
    assert sp.show_availability is False
    assert c.GatewayGitHubAuthenticator.client_id == "abc"
    assert c.GatewayGitHubAuthenticator.allowed_organizations == {"my-org"}
    assert "crypt_key_file" not in c.XSEDEHub  # the hub has JUPYTERHUB_CRYPT_KEY
    monkeypatch.delenv("JUPYTERHUB_CRYPT_KEY")
    c = tljh.settings_to_config({"mode": "gateway"})
    assert c.XSEDEHub.crypt_key_file == str(tljh.ETC / "crypt_key")
    assert c.SlurmSSHSpawner.known_hosts == str(tljh.ETC / "known_hosts")


@pytest.mark.parametrize(
    "settings,setting",
    [
        ({}, "xsedehub.mode"),
        ({"mode": "cluster"}, "xsedehub.mode"),
        ({"mode": "gateway", "spawner": {"login_hots": "x"}}, "xsedehub.spawner.login_hots"),
        ({"mode": "gateway", "spawner": {"login_port": "ssh"}}, "xsedehub.spawner.login_port"),
        ({"mode": "gateway", "spawner": {"cmd": ["a", 1]}}, "xsedehub.spawner.cmd"),
        ({"mode": "gateway", "spawner": {"partitions": "[1"}}, "xsedehub.spawner.partitions"),
        ({"mode": "gateway", "spawner": {"login_host": ["a"]}}, "xsedehub.spawner.login_host"),
        ({"mode": "gateway", "spawner": "login"}, "xsedehub.spawner"),
        ({"mode": "xsede", "authenticator": {"no_such": 1}}, "xsedehub.authenticator.no_such"),
        ({"mode": "gateway", "spawer": {}}, "xsedehub.spawer"),
    ],
)
def test_tljh_bad_settings_are_named(settings, setting):
    with pytest.raises(xc.ConfigError) as e:
        tljh.settings_to_config(settings)
    assert [p.setting for p in e.value.problems] == [setting]
    assert "Traceback" not in str(e.value) and "_cross_validation_lock" not in str(e.value)


def test_tljh_bad_secret_is_not_shown():
    with pytest.raises(xc.ConfigError) as e:
        tljh.settings_to_config(
            {"mode": "gateway", "authenticator": {"client_secret": ["s3cr3t-value"]}}
        )
    assert [p.setting for p in e.value.problems] == ["xsedehub.authenticator.client_secret"]
    assert "s3cr3t-value" not in str(e.value)


def test_tljh_custom_config_hook(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLJH_INSTALL_PREFIX", str(tmp_path))
    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "x" * 64)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(
        yaml.safe_dump({"users": {"admin": ["me"]}, "services": {"cull": {"timeout": 3600}}})
    )
    c = Config()
    tljh.tljh_custom_jupyterhub_config(c)  # not configured yet: leaves TLJH alone
    assert "authenticator_class" not in c.JupyterHub
    assert "not configured" in capsys.readouterr().err
    (tmp_path / "config" / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "users": {"admin": ["me"]},
                "xsedehub": {
                    "mode": "gateway",
                    "spawner": {
                        "login_host": "login.example.org",
                        "known_hosts": str(files / "known_hosts"),
                        "tunnel_host": "hub.example.org",
                        "tunnel_known_hosts": str(files / "hub_known_hosts"),
                        "gateway_key": str(files / "gateway_key"),
                    },
                },
            }
        )
    )
    with pytest.raises(xc.ConfigError) as e:  # named as the admin sets it
        tljh.tljh_custom_jupyterhub_config(Config())
    assert [p.setting for p in e.value.problems] == ["xsedehub.spawner.tunnel_known_hosts"]
    assert "point xsedehub.spawner.tunnel_known_hosts elsewhere" in e.value.problems[0].fix
    (files / "hub_known_hosts").write_text("@cert-authority * ssh-ed25519 AAAA\n")
    tljh.tljh_custom_jupyterhub_config(c)
    assert c.JupyterHub.authenticator_class == xc.AUTHENTICATORS["gateway"]
    assert c.JupyterHub.spawner_class == xc.SPAWNER  # replaces TLJH's user-creating spawner
    assert c.JupyterHub.cleanup_servers is False


def test_tljh_post_install_config_sizes_the_culler_and_nothing_else():
    fresh: dict = {}
    tljh.tljh_config_post_install(fresh)
    assert fresh == {"services": {"cull": {"timeout": 3600, "every": 300}}}
    assert "xsedehub" not in fresh  # "not configured yet" stays true until the admin acts
    mine = {"services": {"cull": {"timeout": 7200}}, "users": {"admin": ["me"]}}
    tljh.tljh_config_post_install(mine)
    assert mine["services"]["cull"] == {"timeout": 7200, "every": 300}
    assert mine["users"] == {"admin": ["me"]}


def test_tljh_post_install_makes_a_crypt_key_once(tmp_path):
    key = tmp_path / "crypt_key"
    assert tljh.ensure_crypt_key(key) is True
    first = key.read_text()
    assert len(bytes.fromhex(first.strip())) == 32
    assert key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)
    assert tljh.ensure_crypt_key(key) is False  # never replaced: it decrypts auth_state
    assert key.read_text() == first and key.stat().st_mode & 0o777 == 0o600


def test_tljh_pip_packages_leave_jupyterhub_to_tljh():
    pkgs = tljh.tljh_extra_hub_pip_packages()
    assert any(p.startswith("asyncssh") for p in pkgs)
    assert any(p.startswith("batchspawner") for p in pkgs)
    assert not any(p.startswith("jupyterhub") for p in pkgs)
    assert not any("extra ==" in p for p in pkgs)


@pytest.mark.cluster  # needs root, like the cluster tests
def test_tljh_post_install_is_idempotent(tmp_path, monkeypatch):
    """Runs TLJH's post-install hook twice against copies of the account files (useradd
    --prefix): the host's own accounts are never touched."""
    if os.geteuid() != 0:
        pytest.fail("useradd needs root: run as root, or deselect with -m 'not cluster'")
    import shutil

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        shutil.copy2(f"/etc/{name}", root / "etc" / name)
    host_passwd = Path("/etc/passwd").read_bytes()
    monkeypatch.setattr(tljh, "ETC", tmp_path / "etc")
    monkeypatch.setattr(tljh, "ACCOUNTS_ROOT", root)
    tljh.tljh_post_install()
    (tmp_path / "etc" / "tunnelbot_authorized_keys").write_text("kept\n")
    tljh.tljh_post_install()
    assert (tmp_path / "etc" / "tunnelbot_authorized_keys").read_text() == "kept\n"
    bots = [
        ln
        for ln in (root / "etc" / "passwd").read_text().splitlines()
        if ln.startswith("tunnelbot:")
    ]
    assert len(bots) == 1 and bots[0].endswith(":/usr/sbin/nologin"), bots
    shadow = (root / "etc" / "shadow").read_text().splitlines()
    assert [ln.split(":")[1] for ln in shadow if ln.startswith("tunnelbot:")] == ["*"]
    assert Path("/etc/passwd").read_bytes() == host_passwd


@pytest.mark.parametrize("order", ["site appends first", "site sets a list first", "culler first"])
def test_idle_culler_goes_with_a_sites_own_services_in_any_order(order):
    """docs/howto/metrics.md appends a Prometheus service and role; idle_culler(c) before
    or after that must keep both (it raised TypeError on traitlets' lazy value)."""
    from jupyterhub.app import JupyterHub
    from traitlets.config import Config

    from xsedehub.config import idle_culler

    c = Config()
    if order == "site appends first":
        c.JupyterHub.services.append({"name": "prometheus"})
        c.JupyterHub.load_roles.append({"name": "prometheus", "services": ["prometheus"]})
    elif order == "site sets a list first":
        c.JupyterHub.services = [{"name": "prometheus"}]
    idle_culler(c)
    if order == "culler first":
        c.JupyterHub.services.append({"name": "prometheus"})
    app = JupyterHub(config=c)
    assert sorted(s["name"] for s in app.services) == ["idle-culler", "prometheus"]
    assert "idle-culler" in [r["name"] for r in app.load_roles]
