"""A hub wired to the local cluster: the demo runs it, and so do the end-to-end tests.

:func:`write_config` writes an ordinary ``jupyterhub_config.py`` for the local cluster
(``cluster.json``) and a local OpenID Connect provider standing in for GitHub or
CILogon; :func:`run_provider` and :func:`start_hub` start the processes in the hub
namespace.  Nothing in here replaces product code: the hub runs the real
authenticator and spawner classes.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .clusterconf import PREFIX
from .localcluster import INSTALL_HINT, ClusterError, ClusterInfo
from .netns import nsenter_argv

CHP = Path(
    os.environ.get(
        "XSEDEHUB_CHP", str(PREFIX / "chp" / "node_modules" / ".bin" / "configurable-http-proxy")
    )
)


def ensure_chp() -> str:
    """The configurable-http-proxy ``scripts/install.sh`` installed; never downloads
    (this runs inside the hub's namespace, which has no route out)."""
    if not CHP.exists():
        raise ClusterError(f"configurable-http-proxy is not installed at {CHP}: {INSTALL_HINT}")
    return str(CHP)


def _culler_config(culler: tuple[int, int] | None) -> str:
    """jupyterhub-idle-culler as the product configures it (``timeout``, ``every``)."""
    if culler is None:
        return ""
    timeout, every = culler
    return (
        "from xsedehub.config import idle_culler  # noqa: E402\n\n"
        f"idle_culler(c, timeout={int(timeout)}, every={int(every)})\n"
    )


def write_config(
    workdir: Path,
    info: ClusterInfo,
    *,
    mode: str = "gateway",
    provider_url: str = "http://127.0.0.1:9400",
    public_port: int = 8000,
    callback_port: int | None = None,
    allowed_users: list[str] | None = None,
    poll_interval: int = 30,
    idle_culler: tuple[int, int] | None = None,
    issuer_url: str = "http://127.0.0.1:8700/v1/certificate",
    issuer_secret_file: str | None = None,
    extra: str = "",
    post: str = "",
) -> Path:
    """A jupyterhub_config.py for the local cluster in ``workdir`` (0600 with its secrets).

    ``callback_port``: the port the browser reaches the hub on, when a bridge maps it to
    ``public_port`` (the demo); default ``public_port``.  ``idle_culler``: run
    jupyterhub-idle-culler with this ``(timeout, every)`` in seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    job_env = info.job_env
    cfg = f"""# jupyterhub_config.py for the local mini-Comet, written by xsedehub.testbed.localhub
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{public_port}"
c.JupyterHub.hub_ip = "{info.hub_api_ip}"
c.JupyterHub.hub_port = {info.hub_api_port}
c.JupyterHub.db_url = "sqlite:///{workdir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{workdir}/cookie_secret"
c.JupyterHub.cleanup_proxy = False
c.ConfigurableHTTPProxy.command = [{ensure_chp()!r}]
c.ConfigurableHTTPProxy.pid_file = "{workdir}/proxy.pid"
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{public_port + 1}"
c.JupyterHub.last_activity_interval = 60

c.XSEDEHub.mode = "{mode}"
c.XSEDEHub.crypt_key_file = "{workdir}/crypt_key"  # 0600: the hub's auth_state key
c.SlurmSSHSpawner.login_host = "{info.login_ip}"
c.SlurmSSHSpawner.login_port = {info.login_port}
c.SlurmSSHSpawner.known_hosts = "{info.known_hosts}"
c.SlurmSSHSpawner.gateway_user = "{info.gateway_user}"
c.SlurmSSHSpawner.gateway_key = "{info.gateway_key}"
c.SlurmSSHSpawner.slurm_bin_dir = "{info.slurm_bin}"
c.SlurmSSHSpawner.environment = {{"SHELL": "/bin/bash"}}  # terminals (the account's is sh)
c.SlurmSSHSpawner.partition = "compute"
c.SlurmSSHSpawner.walltime = "01:00:00"
c.SlurmSSHSpawner.memory = "512M"
c.SlurmSSHSpawner.partitions = {{
    "compute": {{"description": "CPU nodes", "max_walltime": "08:00:00", "max_cores": 8,
                "max_memory": "16G", "default_walltime": "01:00:00", "default_cores": 1,
                "default_memory": "512M"}},
    "debug": {{"description": "quick tests", "max_walltime": "00:30:00", "max_cores": 2,
              "max_memory": "4G", "default_walltime": "00:15:00", "default_cores": 1,
              "default_memory": "512M"}},
}}
c.SlurmSSHSpawner.cmd = ["{job_env}/bin/jupyterhub-singleuser"]
c.SlurmSSHSpawner.default_url = "/lab"
c.SlurmSSHSpawner.job_python = "{job_env}/bin/python"
c.SlurmSSHSpawner.gitpuller = "{job_env}/bin/gitpuller"
c.SlurmSSHSpawner.workshop_repo = "{info.workshop_repo}"
c.SlurmSSHSpawner.workshop_branch = "main"
c.SlurmSSHSpawner.tunnel_host = "{info.hub_ip}"
c.SlurmSSHSpawner.tunnel_port = {info.hub_ssh_port}
c.SlurmSSHSpawner.tunnel_user = "{info.tunnel_user}"
c.SlurmSSHSpawner.tunnel_known_hosts = "{info.known_hosts}"
c.SlurmSSHSpawner.tunnel_authorized_keys = "{info.tunnel_authorized_keys}"
c.SlurmSSHSpawner.poll_interval = {poll_interval}
c.SlurmSSHSpawner.start_timeout = 300
c.SlurmSSHSpawner.http_timeout = 90

{_auth_config(mode, provider_url, issuer_url, issuer_secret_file or hub_secret_file(info))}
_a.authorize_url = "{provider_url}/oauth2/authorize"
_a.token_url = "{provider_url}/oauth2/token"
_a.userdata_url = "{provider_url}/userinfo"
_a.client_id = "{HUB_CLIENT_ID}"
_a.client_secret = "local-secret"
_a.oauth_callback_url = "http://127.0.0.1:{callback_port or public_port}/hub/oauth_callback"
_a.enable_auth_state = True
_a.allow_all = {allowed_users is None}
_a.allowed_users = set({sorted(allowed_users or [])!r})
_a.admin_users = {{"admin"}}
c.JupyterHub.load_roles = [{{"name": "tester", "scopes": ["admin:users", "admin:servers",
    "tokens", "read:users", "access:servers", "admin:auth_state",
    "admin:server_state", "read:metrics"], "services": ["tester"]}}]
c.JupyterHub.services = [
    {{"name": "tester", "api_token": open("{workdir}/service_token").read().strip()}}
]
{_culler_config(idle_culler)}{extra}
from xsedehub.config import apply  # noqa: E402

apply(c)  # picks the authenticator and spawner for the mode, or stops with the problems
{post}
"""
    (workdir / "service_token").write_text(secrets.token_hex(32))
    (workdir / "service_token").chmod(0o600)
    crypt = workdir / "crypt_key"
    if not crypt.exists():
        crypt.write_text(secrets.token_hex(32))
    crypt.chmod(0o600)
    path = workdir / "jupyterhub_config.py"
    path.write_text(cfg)
    path.chmod(0o600)
    return path


def two_clusters_config(
    info: ClusterInfo, *, profiles: bool = True, login_certificate: bool = False
) -> str:
    """Configuration lines for a hub on both local clusters (issue 16): the mini-Comet
    (the top-level settings :func:`write_config` writes, first, so the default) and
    minidelta (its own login node, host key, SLURM commands and partition; the same
    tunnel sshd, gateway key and job environment), with a profile on each partition.
    ``login_certificate`` (xsede mode): both take the login's certificate (one issuer
    serves both local clusters, with the same accounts)."""
    delta = info.site("minidelta")
    part = delta.default_partition
    clusters = {
        "minicomet": {"display_name": "mini-Comet", "description": "the first local cluster"},
        "minidelta": {
            "display_name": "minidelta",
            "description": "the second local cluster",
            "login_host": delta.login_ip,
            "login_port": delta.login_port,
            "known_hosts": delta.known_hosts,
            "slurm_bin_dir": delta.slurm_bin,
            "gateway_user": delta.gateway_user,
            "gateway_key": delta.gateway_key,
            "tunnel_host": delta.hub_ip,
            "partition": part,
            "partitions": {
                part: {
                    "description": "minidelta's CPU node",
                    "max_walltime": "01:00:00",
                    "max_cores": 4,
                    "max_memory": "4G",
                    "default_memory": "512M",
                }
            },
        },
    }
    if login_certificate:
        for entry in clusters.values():
            entry["login_certificate"] = True
    lines = f"c.SlurmSSHSpawner.clusters = {clusters!r}\n"
    if profiles:
        choices = {
            "comet-compute": {
                "display_name": "CPU session",
                "cluster": "minicomet",
                "partition": "compute",
                "max_cores": 2,
            },
            "comet-debug": {
                "display_name": "Quick test",
                "cluster": "minicomet",
                "partition": "debug",
            },
            "delta-shared": {
                "display_name": "CPU session",
                "cluster": "minidelta",
                "partition": part,
            },
        }
        lines += f"c.SlurmSSHSpawner.profiles = {choices!r}\n"
    return lines


#: the identity provider the local provider plays in xsede mode (CILogon's ACCESS IdP)
ACCESS_IDP = "https://access-ci.org/idp"
#: the hub's OAuth client id at the local provider: the audience of its users' ID tokens
HUB_CLIENT_ID = "xsedehub-local"


def hub_secret_file(info: ClusterInfo) -> str:
    """The secret the local hubs and issuers share (0600, made on first use): the same
    secret a site puts in ``--hub-secret-file`` and ``issuer_secret_file``."""
    path = Path(info.root) / "issuer-hub-secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return str(path)


def _auth_config(mode: str, provider_url: str, issuer_url: str, secret_file: str) -> str:
    if mode == "gateway":
        return """_a = c.GatewayGitHubAuthenticator
_a.scope = ["openid", "email"]"""
    return f"""_a = c.XSEDECILogonAuthenticator
_a.scope = ["openid", "email", "org.cilogon.userinfo"]
_a.idps = {{
    "{ACCESS_IDP}": {{
        "username_derivation": {{
            "username_claim": "eppn", "action": "strip_idp_domain", "domain": "access-ci.org",
        }},
        "allow_all": True,
    }},
}}
_a.issuer_url = "{issuer_url}"
_a.issuer_secret_file = "{secret_file}"
_a.certificate_renew_margin = 300
_a.issuer_timeout = 5"""


def start_issuer(
    workdir: Path,
    info: ClusterInfo,
    *,
    port: int = 8700,
    provider_url: str = "http://127.0.0.1:9400",
    lifetime: str = "1h",
    in_netns: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen:
    """The reference certificate issuer, signing with the local cluster's user CA, for
    the local hub (:data:`HUB_CLIENT_ID`, :func:`hub_secret_file`); ``extra_args`` go to
    ``xsedehub issuer`` as they are (another --allowed-idp, a --map)."""
    argv = [
        sys.executable,
        "-m",
        "xsedehub.cli",
        "issuer",
        "--ca-key",
        info.user_ca_key,
        "--oidc-issuer",
        provider_url,
        "--client-id",
        HUB_CLIENT_ID,
        "--hub-secret-file",
        hub_secret_file(info),
        "--listen",
        f"127.0.0.1:{port}",
        "--lifetime",
        lifetime,
        "--claim",
        "eppn",
        "--allowed-idp",
        ACCESS_IDP,
        "--strip-domain",
        ACCESS_IDP,
        "access-ci.org",
        *extra_args,
    ]
    if in_netns:
        argv = nsenter_argv(in_netns) + argv
    log = open(workdir / "issuer.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process=proc)
    except (TimeoutError, ClusterError):
        proc.kill()
        raise ClusterError(
            f"the issuer did not start: {(workdir / 'issuer.log').read_text()[-2000:]}"
        ) from None
    return proc


def stop_proxy(workdir: Path) -> None:
    """Stop the proxy a hub in ``workdir`` started (it outlives the hub: cleanup_proxy off)."""
    pid_file = workdir / "proxy.pid"
    if pid_file.exists():
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)


def wait_http(url: str, timeout: float = 60, process: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 2xx/3xx (a 404 from a proxy without routes is not up);
    stop early when ``process``, which should answer, has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise ClusterError(f"{url}: the process exited ({process.returncode})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.2)


def start_provider(
    workdir: Path, port: int = 9400, *, in_netns: str | None = None, users: tuple[str, ...] = ()
) -> subprocess.Popen:
    """oidc-provider-mock (the local stand-in for GitHub/CILogon) on loopback; ``users``
    get one-click buttons on its login page."""
    argv = [sys.executable, "-m", "oidc_provider_mock", "--port", str(port)]
    argv += ["--token-max-age", "3600"]
    for user in users:
        argv += ["--user", user]
    if in_netns:
        argv = nsenter_argv(in_netns) + argv
    log = open(workdir / "provider.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/.well-known/openid-configuration")
    return proc


def put_user(provider_url: str, sub: str, claims: dict) -> None:
    """Declare an identity at the provider (its claims are what userinfo returns)."""
    req = urllib.request.Request(
        f"{provider_url}/users/{sub}",
        data=json.dumps(claims).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10):
        pass


def start_hub(
    workdir: Path, *, in_netns: str | None = None, debug: bool = True, public_port: int = 8000
) -> subprocess.Popen:
    # the encryption key comes from XSEDEHub.crypt_key_file, not from the environment
    env = {k: v for k, v in os.environ.items() if k != "JUPYTERHUB_CRYPT_KEY"}
    argv = [sys.executable, "-m", "jupyterhub", "-f", str(workdir / "jupyterhub_config.py")]
    if debug:
        argv.append("--debug")
    if in_netns:
        argv = nsenter_argv(in_netns) + argv
    log = open(workdir / "hub.log", "ab")
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
    )
    try:
        wait_http(f"http://127.0.0.1:{public_port}/hub/api", timeout=60)
    except TimeoutError:
        proc.kill()
        raise
    return proc
