"""The plugin inside The Littlest JupyterHub itself, following docs/howto/tljh.md.

Real parts only: TLJH's package installed from its source snapshot into a throwaway
prefix (every dependency from the wheelhouse ``scripts/install.sh`` fetched: nothing is
downloaded here), TLJH's own installer functions and plugin manager, its real
``tljh-config`` (schema validation included) and its real ``jupyterhub_config.py``,
started the way TLJH's systemd unit starts it; a real JupyterHub and
configurable-http-proxy, the local cluster and the local OpenID Connect provider.

Two things of the host are the test machine's own, and say so: ``/etc/xsedehub`` is a
throwaway folder (``XSEDEHUB_ETC``), and the tunnel account is the local cluster's
``tunnelbot`` (the plugin's post-install finds it and leaves it as it is).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from xsedehub.testbed import localhub, localtljh
from xsedehub.testbed.localcluster import INSTALL_HINT

from .conftest import PROVIDER, in_cluster, listening, stop_all_servers
from .hubclient import Hub, LoginRefused

ROOT = Path(__file__).resolve().parents[1]
HOWTO = ROOT / "docs" / "howto" / "tljh.md"
SNAPSHOT = localtljh.source()
HUB_URL = "http://127.0.0.1:8000"

NO_SOURCE = f"no TLJH source at {SNAPSHOT}: {localtljh.SOURCE_HINT}"
#: in CI a missing TLJH source fails the tests (the ``tljh`` fixture), never skips them
IN_CI = os.environ.get("CI") == "true"

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not SNAPSHOT.exists() and not IN_CI, reason=NO_SOURCE),
]

#: TLJH's ``jupyterhub_config.d`` escape hatch: only what cannot exist on this machine.
ESCAPE_HATCH = """# Written by tests/test_tljh.py: what cannot exist on the test machine,
# replacing lines of TLJH's own jupyterhub_config.py (which loads this file last).
c = get_config()  # noqa

# Replaces `c.JupyterHub.proxy_class = "traefik_file"` and `c.TraefikProxy.should_start =
# False`: TLJH's installer downloads traefik and runs it as a systemd unit; neither is
# here, so the hub starts configurable-http-proxy (installed by scripts/install.sh).
c.JupyterHub.proxy_class = "configurable-http-proxy"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:8001"
c.ConfigurableHTTPProxy.pid_file = {pid_file!r}
# Replaces traefik's `http.port` 80 on every address: the hub namespace's loopback.
c.JupyterHub.bind_url = "http://127.0.0.1:8000"
# Replaces `c.JupyterHub.hub_port = 15001`: the local cluster's tunnel account may forward
# only to 127.0.0.1:8081 (its sshd's PermitOpen, fixed when the cluster is set up).
c.JupyterHub.hub_ip = {api_ip!r}
c.JupyterHub.hub_port = {api_port}
"""


@dataclass
class TLJH:
    prefix: Path
    etc: Path
    tljh_dir: Path  # the tljh package inside the hub environment
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    runs: int = 0
    client: Hub | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def python(self) -> str:
        return str(self.prefix / "hub" / "bin" / "python")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # from the prefix: in the repository, `import xsedehub` would find the source tree
        r = subprocess.run(
            argv, env=self.env, cwd=self.prefix, capture_output=True, text=True, check=False
        )
        if check and r.returncode:
            raise AssertionError(f"{argv} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def tljh_config(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.prefix / "hub" / "bin" / "tljh-config"), *args, check=check)

    def tljh_config_lines(self, lines: list[list[str]]) -> None:
        """Several ``tljh-config`` command lines through TLJH's own ``tljh.config.main``
        (what the ``tljh-config`` script runs), in one process of TLJH's environment: a
        Python start per line would cost about a second each.  A failing line fails,
        named."""
        program = (
            "import json, sys\n"
            "from tljh.config import main\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        main(args)\n"
            "    except BaseException as e:\n"
            "        sys.exit(f'tljh-config {args} failed: {e!r}')\n"
        )
        self.run(self.python, "-c", program, json.dumps(lines))

    def config_yaml(self) -> dict:
        return yaml.safe_load((self.prefix / "config" / "config.yaml").read_text()) or {}

    # -- the hub, as TLJH's systemd unit runs it
    def unit(self) -> tuple[list[str], dict[str, str], Path]:
        """ExecStart, Environment and WorkingDirectory of TLJH's unit, filled in as
        ``tljh.installer.ensure_jupyterhub_service`` fills them in."""
        text = (self.tljh_dir / "systemd-units" / "jupyterhub.service").read_text()
        text = text.format(
            python_interpreter_path=self.python,
            jupyterhub_config_path=str(self.tljh_dir / "jupyterhub_config.py"),
            install_prefix=str(self.prefix),
        )
        fields: dict[str, list[str]] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith("#"):
                fields.setdefault(key.strip(), []).append(value.strip())
        env = dict(v.split("=", 1) for v in fields["Environment"])
        return shlex.split(fields["ExecStart"][0]), env, Path(fields["WorkingDirectory"][0])

    def start_hub(self) -> subprocess.Popen:
        """Start the hub (``tljh-config reload`` restarts the unit); return once it
        answers or has exited."""
        assert self.proc is None or self.proc.poll() is not None
        argv, unit_env, cwd = self.unit()
        # a service's environment: the unit's lines, the user's basics, nothing inherited
        # (no JUPYTERHUB_CRYPT_KEY: TLJH's unit has none); /etc/xsedehub is a temp folder
        env = {**unit_env, "HOME": "/root", "USER": "root", "LOGNAME": "root"}
        env["XSEDEHUB_ETC"] = str(self.etc)
        self.runs += 1
        log = open(self.prefix / f"hub-{self.runs}.log", "wb")
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 120  # guards a hang; the hub takes a few seconds
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                if requests.get(f"{HUB_URL}/hub/api", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        return self.proc

    @property
    def log(self) -> str:
        return (self.prefix / f"hub-{self.runs}.log").read_text(errors="replace")

    def stop_hub(self) -> None:
        if self.client is not None and self.proc is not None and self.proc.poll() is None:
            try:
                stop_all_servers(self)  # type: ignore[arg-type]
            except Exception as e:  # the hub may be what failed: still stop it
                print(f"stopping servers failed: {e}")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        localhub.stop_proxy(self.prefix / "state")
        deadline = time.monotonic() + 15
        while _listening(8000) and time.monotonic() < deadline:
            time.sleep(0.1)


def _listening(port: int) -> bool:
    return listening(port)


# ------------------------------------------------------------------------- 1. install
@pytest.fixture(scope="module")
def tljh(cluster, tmp_path_factory) -> TLJH:
    if not SNAPSHOT.exists():  # only in CI: elsewhere pytestmark skipped the module
        pytest.fail(f"{NO_SOURCE} (CI must run the TLJH tests)", pytrace=False)
    missing = localtljh.missing_pieces()
    if missing:
        pytest.fail(f"{'; '.join(missing)}: {INSTALL_HINT}", pytrace=False)
    busy = [p for p in (8000, 8001, cluster.hub_api_port) if _listening(p)]
    if busy:
        pytest.fail(f"ports {busy} are taken on the hub side (a hub left from an earlier run?)")
    base = tmp_path_factory.mktemp("tljh")
    prefix, etc = base / "opt-tljh", base / "etc-xsedehub"
    env = {
        **{k: v for k, v in os.environ.items() if k != "JUPYTERHUB_CRYPT_KEY"},
        "TLJH_INSTALL_PREFIX": str(prefix),
        "XSEDEHUB_ETC": str(etc),
        # pip as TLJH runs it, but from the wheelhouse only (this namespace has no route out)
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(localtljh.WHEELHOUSE),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    t0 = time.monotonic()
    # bootstrap.py: `python3 -m venv /opt/tljh/hub`, `pip install --upgrade <TLJH spec>`
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(prefix / "hub")], check=True)
    prefix.mkdir(exist_ok=True)
    t = TLJH(prefix, etc, Path(), env)
    t.run(t.python, "-m", "pip", "install", "-q", "--upgrade", str(SNAPSHOT))
    # tljh.installer.main, minus what needs systemd, apt, conda or a download (user
    # environment, traefik, units): the same functions, in the same order
    t.run(
        t.python,
        "-c",
        f"""
import os
from tljh import conda, installer
from tljh.config import HUB_ENV_PREFIX
from tljh.log import init_logging

init_logging()
pm = installer.setup_plugins([{str(ROOT)!r}])  # --plugin <this repository>
installer.ensure_config_yaml(pm)  # the plugins' tljh_config_post_install
installer.ensure_admins([["admin"]])  # --admin admin
conda.ensure_pip_requirements(  # ensure_jupyterhub_package, minus its apt-get
    HUB_ENV_PREFIX,
    os.path.join(os.path.dirname(installer.__file__), "requirements-hub-env.txt"),
    upgrade=True,
)
installer.run_plugin_actions(pm)  # the plugins' hub pip packages, tljh_post_install
""",
    )
    t.timings["install"] = time.monotonic() - t0
    print(f"TLJH installed from the wheelhouse in {t.timings['install']:.1f}s")
    t.tljh_dir = Path(
        t.run(
            t.python, "-c", "import os, tljh; print(os.path.dirname(tljh.__file__))"
        ).stdout.strip()
    )
    yield t
    t.stop_hub()


def test_tljh_installs_and_finds_the_plugin(tljh):
    # TLJH's plugin manager finds the plugin through its entry point
    names = tljh.run(
        tljh.python,
        "-c",
        "from tljh.utils import get_plugin_manager\n"
        "print(sorted(n for n, _ in get_plugin_manager().list_name_plugin()))",
    ).stdout
    assert "'xsedehub'" in names, names
    # post-install: HPC-sized idle culler, nothing under xsedehub (not configured yet)
    cfg = tljh.config_yaml()
    assert cfg["services"]["cull"] == {"timeout": 3600, "every": 300}
    assert "xsedehub" not in cfg
    assert cfg["users"]["admin"] == ["admin"]
    # the installer pip-installed the plugin's requirements into TLJH's hub environment;
    # they resolve there and leave TLJH's JupyterHub alone
    log = (tljh.prefix / "installer.log").read_text()
    m = re.search(r"Installing \d+ hub pip packages collected from plugins: (.*)", log)
    assert m, log
    names = {re.split(r"[<>=!~;\[ ]", spec)[0] for spec in m.group(1).split()}
    assert names >= {"asyncssh", "batchspawner", "oauthenticator"}, names
    assert "jupyterhub" not in names  # TLJH owns the hub's version
    tljh.run(tljh.python, "-m", "pip", "check")
    version = tljh.run(tljh.python, "-m", "jupyterhub", "--version").stdout.strip()
    assert version == localtljh.jupyterhub_version() and version.startswith("5.")
    # tljh_post_install: the key the hub's auth_state is encrypted with, root only
    key = tljh.etc / "crypt_key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32


def test_unconfigured_plugin_leaves_tljh_alone(tljh, cluster):
    """The installer starts the hub before the admin configured anything: TLJH's own
    hub comes up (its authenticator and user-creating spawner), it does not crash-loop."""
    _write_escape_hatch(tljh, cluster)
    proc = tljh.start_hub()
    try:
        assert proc.poll() is None, tljh.log
        assert "xsedehub: the plugin is installed but not configured" in tljh.log
        assert "firstuseauthenticator" in tljh.log.lower()
        assert "SlurmSSHSpawner" not in tljh.log
    finally:
        tljh.stop_hub()


def _write_escape_hatch(tljh: TLJH, cluster) -> None:
    d = tljh.prefix / "config" / "jupyterhub_config.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / "local-cluster.py").write_text(
        ESCAPE_HATCH.format(
            chp=localhub.ensure_chp(),
            pid_file=str(tljh.prefix / "state" / "proxy.pid"),
            api_ip=cluster.hub_api_ip,
            api_port=cluster.hub_api_port,
        )
    )


def shell_lines(page: Path) -> list[str]:
    """The ``sudo tljh-config ...`` lines of a page's shell blocks, in order, without
    ``sudo tljh-config`` (placeholders like ``<login node>`` still in them)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.splitlines():
            if line.startswith("sudo tljh-config "):
                out.append(line.removeprefix("sudo tljh-config "))
    return out


def docs_commands() -> dict[str, list[str]]:
    """Every ``sudo tljh-config set|add-item|unset`` line of the docs' shell blocks."""
    pages = [p for p in sorted((ROOT / "docs").rglob("*.md")) if "_build" not in p.parts]
    out: dict[str, list[str]] = {}
    for page in pages:
        for line in shell_lines(page):
            if line.split()[0] in ("set", "add-item", "unset"):
                out.setdefault(str(page.relative_to(ROOT)), []).append(line)
    return out


def test_every_tljh_config_line_in_the_docs_works(tljh, tmp_path):
    """Each page's settings, through TLJH's real tljh-config (its schema included) into a
    config.yaml of their own, then through the plugin's translation in TLJH's hub
    environment: every value converts (lists as JSON text, add-item lists, numbers)."""
    pages = docs_commands()
    assert {"docs/tutorial.md", "docs/howto/tljh.md"} <= set(pages), pages
    for page, lines in pages.items():
        scratch = tmp_path / (page.replace("/", "_") + ".yaml")
        tljh.tljh_config_lines(
            [
                ["--config-path", str(scratch), *shlex.split(re.sub(r"<[^>]+>", "placeholder", ln))]
                for ln in lines
            ]
        )
        if "xsedehub" not in (yaml.safe_load(scratch.read_text()) or {}):
            continue
        r = tljh.run(
            tljh.python,
            "-c",
            "import sys\nfrom pathlib import Path\n"
            "from xsedehub.tljh import load_tljh_settings, settings_to_config\n"
            "settings_to_config(load_tljh_settings(Path(sys.argv[1])))\nprint('ok')",
            str(scratch),
            check=False,
        )
        assert r.stdout.strip() == "ok", f"{page}: {r.stdout}{r.stderr}"


# ------------------------------------------------------------------------ 2-5. settings
def howto_commands(values: dict[str, str]) -> list[list[str]]:
    """The how-to's ``tljh-config`` lines with the local values for their ``<...>``; its
    one ``reload`` is the hub start of :meth:`TLJH.start_hub` (systemd's restart)."""
    out = []
    lines = shell_lines(HOWTO)
    assert [ln for ln in lines if ln.split()[0] not in ("set", "add-item")] == ["reload"]
    for line in lines[: lines.index("reload")]:
        for k, v in values.items():
            line = line.replace(k, v)
        assert not re.search(r"<[^>]+>", line), f"no local value for {line}"
        out.append(shlex.split(line))
    return out


def local_values(tljh: TLJH, cluster) -> dict[str, str]:
    """The how-to's ``<...>`` parts, on the local cluster."""
    return {
        "<login node>": cluster.login_ip,
        "<gateway account>": cluster.gateway_user,
        "<job env>": str(localtljh.JOB_ENV),
        "<workshop repository>": cluster.workshop_repo,
        "<hub address>": cluster.hub_ip,
        "<client id>": "xsedehub-local",
        "<hub URL>": HUB_URL,
        "<attendee login>": "ada-l",
        "/etc/xsedehub": str(tljh.etc),
    }


#: what GitHub's place takes in the test: the local OpenID Connect provider
PROVIDER_SETTINGS = [
    ["set", "xsedehub.authenticator.authorize_url", f"{PROVIDER}/oauth2/authorize"],
    ["set", "xsedehub.authenticator.token_url", f"{PROVIDER}/oauth2/token"],
    ["set", "xsedehub.authenticator.userdata_url", f"{PROVIDER}/userinfo"],
    ["add-item", "xsedehub.authenticator.scope", "openid"],
    ["add-item", "xsedehub.authenticator.scope", "email"],
]


@pytest.fixture(scope="module")
def configured(tljh, cluster, provider) -> TLJH:
    # 2. files on the hub: the local cluster's gateway key (authorized there) and host CA
    #    (known_hosts); the local provider's client secret, pasted into a 0600 file
    shutil.copy(cluster.gateway_key, tljh.etc / "gateway_ed25519")
    (tljh.etc / "gateway_ed25519").chmod(0o600)
    shutil.copy(cluster.known_hosts, tljh.etc / "known_hosts")
    fd = os.open(tljh.etc / "oauth_client_secret", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"local-secret\n")
    os.close(fd)
    # 3. the how-to's settings, through TLJH's real tljh-config
    commands = howto_commands(local_values(tljh, cluster))
    assert len(commands) >= 14 and commands[0] == ["set", "xsedehub.mode", "gateway"]
    tljh.tljh_config_lines(commands + PROVIDER_SETTINGS)
    # 4. the local cluster's hub-side sshd already has the tunnelbot block (`xsedehub
    #    tunnel setup`); its key file is the cluster's, and its host CA vouches for it
    tljh.tljh_config(
        "set", "xsedehub.spawner.tunnel_authorized_keys", cluster.tunnel_authorized_keys
    )
    shutil.copy(cluster.known_hosts, tljh.etc / "hub_known_hosts")
    _write_escape_hatch(tljh, cluster)
    return tljh


def test_tljh_config_stores_the_how_tos_settings(configured):
    x = configured.config_yaml()["xsedehub"]
    # a list given as JSON text stays text in config.yaml; the plugin converts it
    assert x["spawner"]["cmd"] == f'["{localtljh.JOB_ENV}/bin/jupyterhub-singleuser"]'
    assert x["authenticator"]["scope"] == ["openid", "email"]  # add-item: a list
    assert configured.config_yaml()["users"]["allowed"] == ["ada-l"]


def test_tljh_schema_still_guards_tljhs_own_settings(configured):
    for args in (["set", "https.enabled", "maybe"], ["set", "limits.cpu", "-1"]):
        r = configured.tljh_config(*args, check=False)
        assert r.returncode == 1 and "Config validation error" in r.stderr, r
    assert "maybe" not in str(configured.config_yaml().get("https"))


async def test_check_then_login_spawn_lab_stop(configured, cluster):
    t = configured
    # TLJH's own settings, set the TLJH way, keep working next to the plugin's
    t.tljh_config("set", "https.enabled", "true")
    t.tljh_config("set", "https.letsencrypt.email", "admin@example.org")
    t.tljh_config("add-item", "https.letsencrypt.domains", "hub.example.org")
    t.tljh_config("set", "limits.memory", "1G")
    # 5. `xsedehub check --tljh`: TLJH's own jupyterhub_config.py, the key from the file
    t0 = time.monotonic()
    r = t.run(str(t.prefix / "hub" / "bin" / "xsedehub"), "check", "--tljh", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"checking TLJH's {t.tljh_dir / 'jupyterhub_config.py'}" in r.stdout
    assert "opened the tunnel back to the hub" in r.stdout
    assert "all checks passed" in r.stdout
    print(f"xsedehub check --tljh took {time.monotonic() - t0:.1f}s")
    # `tljh-config reload`: the unit's command line, TLJH's config, the plugin
    proc = t.start_hub()
    assert proc.poll() is None, t.log
    assert "xsedehub.spawner.spawner.SlurmSSHSpawner" in t.log
    assert "GatewayGitHubAuthenticator" in t.log
    # the admin TLJH's installer named (--admin) logs in and gets a token for the API
    hub = Hub(HUB_URL, "", PROVIDER)
    admin = hub.login("admin")
    admin.get(f"{HUB_URL}/hub/home", timeout=30)
    xsrf = admin.cookies.get("_xsrf", path="/hub/") or admin.cookies.get("_xsrf")
    r = admin.post(
        f"{HUB_URL}/hub/api/users/admin/tokens",
        json={"expires_in": 3600, "note": "test_tljh"},
        headers={"X-XSRFToken": xsrf},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    hub = Hub(HUB_URL, r.json()["token"], PROVIDER)
    t.client = hub
    assert hub.user("admin")["admin"] is True
    # TLJH's culler runs with the plugin's values
    cull = hub.get("/services").json()["cull-idle"]["command"]
    assert "--timeout=3600" in cull and "--cull-every=300" in cull, cull
    # users.allowed: grace is not on it
    with pytest.raises(LoginRefused) as e:
        hub.login("grace")
    assert e.value.status == 403
    # ada presses Start; the job runs on the cluster; JupyterLab (TLJH's default_app)
    ada = hub.login("ada")
    r = hub.start_as_user(ada, "ada-l")
    assert r.status_code in (201, 202), r.text
    hub.wait_ready("ada-l")
    r = ada.get(f"{HUB_URL}/user/ada-l/lab", timeout=60)
    assert r.status_code == 200 and "JupyterLab" in r.text, r.text[:500]
    tok = hub.user_token("ada-l")
    out = await hub.execute(
        "ada-l",
        tok,
        "import os; e = os.environ; print(e['SLURM_JOB_ID'], e['SLURMD_NODENAME'], os.getcwd())",
    )
    job, node, cwd = out.split()
    assert node in cluster.nodes
    assert cwd == f"/home/{cluster.gateway_user}/workshop/ada-l"
    hub.stop("ada-l")
    state = in_cluster(cluster, "squeue", "-h", "-j", job, "-o", "%T").stdout.strip()
    assert state in ("", "CANCELLED", "COMPLETING", "COMPLETED"), state  # cancelled
    t.stop_hub()
    assert proc.returncode is not None


@pytest.mark.parametrize(
    "args,says,restore",
    [
        (
            ["set", "xsedehub.spawner.login_hots", "login"],
            "xsedehub.spawner.login_hots: SlurmSSHSpawner has no such setting",
            ["unset", "xsedehub.spawner.login_hots"],
        ),
        (
            ["set", "xsedehub.spawner.login_port", "ssh"],
            "xsedehub.spawner.login_port: 'ssh' is not a valid value",
            ["unset", "xsedehub.spawner.login_port"],
        ),
        (
            ["set", "xsedehub.mode", "gatway"],
            "xsedehub.mode: is 'gatway', not gateway or xsede",
            ["set", "xsedehub.mode", "gateway"],
        ),
    ],
)
def test_a_bad_setting_stops_the_hub_naming_it(configured, args, says, restore):
    t = configured
    t.tljh_config(*args)  # TLJH's schema does not know the xsedehub section: accepted
    try:
        proc = t.start_hub()
        assert proc.wait(60) != 0, t.log
        assert says in t.log, t.log
        assert "fix: " in t.log
        assert "Traceback" not in t.log
    finally:
        t.stop_hub()
        t.tljh_config(*restore)
