"""``xsedehub check``: a deployment, step by step, with the fix for each failure.

The steps follow the path a spawn takes: the login node is reachable and its host key
trusted; the hub can log in (gateway key, or a certificate from the issuer); SLURM's
commands are there; the job environment has a compatible ``jupyterhub-singleuser``; a
test job on a compute node opens the tunnel back to the hub.

A failed step does not end the check: every step that can still run does.  Only the
steps that need an earlier one are left out: nothing after a login that failed (or, in
xsede mode without ``--certificate``, could not be tried: that is reported as a skip,
with how to get a test certificate), nothing after missing SLURM commands, no test job
without the tunnel account.  Every message the command can print is in :data:`MESSAGES`;
``docs/howto/troubleshooting.md`` (hand-written) has an entry for each, and a test
checks that none is missing.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import asyncssh
from traitlets.config import Config, PyFileConfigLoader

from . import gatewaysetup
from .spawner import sandbox as sandbox_mod
from .spawner import slurm, versions
from .spawner import validate as v
from .spawner.ssh import ClusterUnreachable, Connection, LoginNode, SSHIdentity
from .spawner.tunnel import TunnelKeys

#: id -> (what went wrong, how to fix it); ``{placeholders}`` are filled in
MESSAGES: dict[str, tuple[str, str]] = {
    "config": (
        "The hub configuration has problems:\n{detail}",
        "Fix each setting named above in jupyterhub_config.py (or with tljh-config).",
    ),
    "login-unreachable": (
        "The login node {host}:{port} cannot be reached: {detail}",
        "Check SlurmSSHSpawner.login_host and login_port, DNS, and that firewalls let the "
        "hub reach that port.",
    ),
    "login-hostkey": (
        "The login node's host key is not vouched for by {known_hosts}",
        "Add the login node's host key (ssh-keyscan -p PORT HOST, compared with what the "
        "centre publishes) or an '@cert-authority' line for its host CA to that file.",
    ),
    "gateway-key": (
        "The gateway key {path} cannot be read: {detail}",
        "Point SlurmSSHSpawner.gateway_key at the hub's private key (mode 600).",
    ),
    "gateway-refused": (
        "The login node refused the hub's key for the account {user}",
        "Have the cluster's admins put the hub's key in {user}'s root-owned keys file "
        "(xsedehub gateway setup prints the lines), or correct SlurmSSHSpawner.gateway_user.",
    ),
    "issuer-unreachable": (
        "The certificate issuer at {url} cannot be reached: {detail}",
        "Start the issuer (xsedehub issuer ...) or correct "
        "XSEDECILogonAuthenticator.issuer_url; check TLS and firewalls.",
    ),
    "certificate-refused": (
        "The login node refused the certificate for {user}",
        "Make the login node's sshd trust the issuer's CA (TrustedUserCAKeys) and check "
        "that the certificate's principal is the user's account.",
    ),
    "slurm-missing": (
        "{commands} not found on the login node",
        "Set SlurmSSHSpawner.slurm_bin_dir to the directory of SLURM's client commands on "
        "the login node (`command -v sbatch` there shows it), or install them.",
    ),
    "singleuser-missing": (
        "{cmd} does not run on the login node: {detail}",
        "Point SlurmSSHSpawner.cmd at jupyterhub-singleuser in a Python environment that "
        "the login and compute nodes share.",
    ),
    "singleuser-version": (
        "The job environment has jupyterhub {remote}; the hub runs {local}: {why}",
        "Install jupyterhub=={local} in the job environment (its pip: "
        "PYTHONNOUSERSITE=1 /path/to/job-env/bin/pip install 'jupyterhub=={local}'), or "
        "run the hub on the job environment's version; the major versions must match.",
    ),
    "singleuser-minor": (
        "The job environment has jupyterhub {remote}; the hub runs {local}: the same major "
        "version works, but what the newer side added stays off",
        "Install jupyterhub=={local} in the job environment when convenient (not a failure).",
    ),
    "gateway-shell": (
        "The gateway account {user}'s login shell {shell} lets attendees steer the hub: {detail}",
        "Run the lines of `xsedehub gateway setup` on the login node (usermod -s /bin/sh "
        "{user}; terminals get bash through SlurmSSHSpawner.environment).",
    ),
    "gateway-env": (
        "The gateway account's SSH sessions carry variables an attendee can set: {names}",
        "Remove them (~/.pam_environment, ~/.ssh/environment) and stop sshd reading them: "
        "pam_env user_readenv=0 in /etc/pam.d/sshd, PermitUserEnvironment no "
        "(see `xsedehub gateway setup`).",
    ),
    "tunnel-sshd-version": (
        "The hub's sshd is {version}; tunnel keys need OpenSSH {minimum} or later "
        '(expiry-time in UTC, "...Z")',
        "Upgrade the hub's OpenSSH server (Debian 12 and Ubuntu 24.04 have 9.2 and 9.6).",
    ),
    "tunnel-account": (
        "The tunnel account {user} does not exist on the hub",
        "Run: xsedehub tunnel setup --apply",
    ),
    "test-job-refused": (
        "sbatch refused the test job: {detail}",
        "Check SlurmSSHSpawner.partition, account and walltime against the cluster's limits.",
    ),
    "tunnel-failed": (
        "A test job on {node} did not open the tunnel back to the hub within {seconds} s.\n"
        "Its log says:\n{log}",
        "From a compute node, the hub's sshd must be reachable at tunnel_host:tunnel_port "
        "with tunnel_known_hosts vouching for it; the sshd Match block must let the "
        "tunnel account listen on loopback (xsedehub tunnel setup).",
    ),
    "test-job-queued": (
        "The test job {job} was still queued after {seconds} s ({reason})",
        "The cluster is busy: run the check again later or with a longer --job-timeout.",
    ),
    "sandbox-login": (
        "The attendee sandbox ({runtime}) does not start on the login node: {detail}",
        "Install the runtime (Debian/Ubuntu/RHEL package bubblewrap, or Apptainer) and "
        "allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0; on Ubuntu "
        "23.10 and newer also an AppArmor profile for bwrap); or set "
        "SlurmSSHSpawner.sandbox to the runtime the site has.  Setting it to 'none' runs "
        "attendees unsandboxed: they can then read each other's folders.",
    ),
    "sandbox-compute": (
        "The attendee sandbox ({runtime}) does not start on the compute node {node}; the "
        "test job's log says:\n{log}",
        "The compute nodes need what the login node needs for the sandbox: the runtime on "
        "the job's PATH (or SlurmSSHSpawner.sandbox_command) and unprivileged user "
        "namespaces (sysctl user.max_user_namespaces > 0).  Until they have it, every "
        "spawn fails with this message.",
    ),
    # a skip, not a failure: printed as SKIP, with "how:" instead of "fix:"
    "certificate-needed": (
        "xsede mode without a user certificate: check cannot log in, so it skipped the "
        "login, the SLURM commands, the job environment and the test job's tunnel",
        "On the host that holds the user CA's private key (the issuer's --ca-key), sign a "
        "one-hour test certificate for a cluster account, with the issuer's restrictions: "
        "{commands}  (CA_KEY: that private key; ACCOUNT: the account).  Copy xh-check and "
        "xh-check-cert.pub to the hub, run: xsedehub check -f {config} --key xh-check "
        "--certificate xh-check-cert.pub, and delete both files afterwards.",
    ),
}

#: the commands of the ``certificate-needed`` hint (a test runs them as printed)
TEST_CERTIFICATE_COMMANDS = (
    "ssh-keygen -q -t ed25519 -N '' -f xh-check && "
    "ssh-keygen -s CA_KEY -I xsedehub-check -n ACCOUNT -V +1h -O clear xh-check.pub"
)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out: Callable[[str], None] = print

    def ok(self, text: str) -> None:
        self.lines.append(f"ok    {text}")
        self.out(self.lines[-1])

    def fail(self, msg_id: str, **kw: object) -> None:
        what, fix = MESSAGES[msg_id]
        self.failed.append(msg_id)
        self.lines.append(f"FAIL  {what.format(**kw)}\n      fix: {fix.format(**kw)}")
        self.out(self.lines[-1])

    def skip(self, msg_id: str, **kw: object) -> None:
        """Steps that could not be tried (not a failure: the exit status stays 0)."""
        what, how = MESSAGES[msg_id]
        self.skipped.append(msg_id)
        self.lines.append(f"SKIP  {what.format(**kw)}\n      how: {how.format(**kw)}")
        self.out(self.lines[-1])

    def note(self, msg_id: str, **kw: object) -> None:
        """Worth knowing, not a failure (the exit status stays 0)."""
        what, how = MESSAGES[msg_id]
        self.notes.append(msg_id)
        self.lines.append(f"NOTE  {what.format(**kw)}\n      how: {how.format(**kw)}")
        self.out(self.lines[-1])

    def summary(self) -> str:
        """The last line ``xsedehub check`` prints."""
        if self.failed:
            return f"{len(self.failed)} problem(s)"
        if self.skipped:
            return "no problem found, but steps were skipped (SKIP above): not fully checked"
        return "all checks passed"


def load_config(path: str) -> Config:
    """Execute a jupyterhub_config.py the way JupyterHub does (``apply`` included, so the
    hub's encryption key is checked too: from XSEDEHub.crypt_key_file, or from
    JUPYTERHUB_CRYPT_KEY in this command's environment)."""
    loader = PyFileConfigLoader(Path(path).name, str(Path(path).parent))
    return loader.load_config()


def tljh_config_file() -> str:
    """The jupyterhub_config.py of The Littlest JupyterHub: it lives inside the ``tljh``
    package of the hub environment (``xsedehub check --tljh``)."""
    import importlib.util

    spec = importlib.util.find_spec("tljh")
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "the tljh package is not in this Python environment: run the xsedehub of TLJH's "
            "hub environment (/opt/tljh/hub/bin/xsedehub)"
        )
    return str(Path(spec.origin).parent / "jupyterhub_config.py")


#: the oldest OpenSSH whose sshd reads ``expiry-time="YYYYMMDDHHMMSSZ"`` as UTC (the "Z"
#: came in 9.1, October 2022; older ones refuse the tunnel keys' lines)
MIN_OPENSSH = (9, 1)


def sshd_version(sshd: str) -> tuple[int, int] | None:
    """The version of the sshd binary ``sshd`` (None if it cannot be told)."""
    import re
    import subprocess

    try:
        r = subprocess.run([sshd, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", r.stdout + r.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


class Checker:
    def __init__(
        self,
        cfg: Config,
        report: Report,
        *,
        job_timeout: float = 120,
        certificate: tuple[str, str] | None = None,
        hub_api: str | None = None,
        config_file: str = "jupyterhub_config.py",
        sshd: str = "/usr/sbin/sshd",
        cluster: str = "",
    ):
        from .spawner.spawner import SlurmSSHSpawner

        self.cfg, self.r, self.job_timeout = cfg, report, job_timeout
        self.config_file = config_file
        self.sp = SlurmSSHSpawner(config=cfg)
        if cluster:  # that cluster's settings (SlurmSSHSpawner.clusters)
            self.sp.use_cluster(cluster)
        self.certificate = certificate
        self.sshd = sshd
        hub = cfg.JupyterHub
        self.hub_api = (
            hub_api
            or f"{hub.get('hub_ip', '127.0.0.1') or '127.0.0.1'}:{hub.get('hub_port', 8081)}"
        )

    # -- steps
    async def identity(self) -> SSHIdentity | None:
        sp = self.sp
        if sp.mode == "gateway":
            try:
                key = asyncssh.read_private_key(sp.gateway_key)
            except (OSError, asyncssh.KeyImportError) as e:
                self.r.fail("gateway-key", path=sp.gateway_key, detail=e)
                return None
            return SSHIdentity(sp.gateway_user, key, label="gateway")
        if self.certificate:
            key_path, cert_path = self.certificate
            key = asyncssh.read_private_key(key_path)
            cert = asyncssh.read_certificate(cert_path)
            return SSHIdentity(cert.principals[0], key, cert, label="certificate")
        await self.issuer()
        return None

    async def issuer(self) -> None:
        import requests

        url = self.cfg.XSEDECILogonAuthenticator.get("issuer_url", "")
        health = url.rsplit("/v1/", 1)[0] + "/health"
        try:
            r = await asyncio.get_running_loop().run_in_executor(
                None, lambda: requests.get(health, timeout=10)
            )
            r.raise_for_status()
            self.r.ok(f"certificate issuer answers at {url}")
        except requests.RequestException as e:
            self.r.fail("issuer-unreachable", url=url, detail=type(e).__name__)

    async def connect(self, ident: SSHIdentity | None) -> Connection | None:
        sp = self.sp
        node = LoginNode(sp.login_host, sp.login_port, sp.known_hosts, sp.slurm_bin_dir)
        kw = dict(known_hosts=sp.known_hosts, agent_path=None, config=None, connect_timeout=15)
        probe_key = asyncssh.generate_private_key("ssh-ed25519")
        user = ident.username if ident else "xsedehub-check"
        try:
            conn = await asyncssh.connect(
                sp.login_host,
                sp.login_port,
                username=user,
                client_keys=[
                    (ident.key, ident.certificate)
                    if ident and ident.certificate
                    else (ident.key if ident else probe_key)
                ],
                **kw,
            )
        except asyncssh.HostKeyNotVerifiable:
            self.r.fail("login-hostkey", known_hosts=sp.known_hosts)
            return None
        except asyncssh.PermissionDenied:
            self.r.ok(f"login node {sp.login_host}:{sp.login_port} reachable, host key trusted")
            if ident is None:
                return None
            if ident.certificate:
                self.r.fail("certificate-refused", user=ident.username)
            else:
                self.r.fail("gateway-refused", user=ident.username)
            return None
        except (TimeoutError, OSError, asyncssh.Error) as e:
            self.r.fail(
                "login-unreachable",
                host=sp.login_host,
                port=sp.login_port,
                detail=str(e) or type(e).__name__,
            )
            return None
        conn.close()
        self.r.ok(f"login node {sp.login_host}:{sp.login_port} reachable, host key trusted")
        if ident is None:
            return None
        self.r.ok(f"logged in as {ident.username} ({ident.label})")
        return Connection(node, ident, max_sessions=sp.ssh_max_sessions)

    async def commands(self, conn: Connection) -> bool:
        paths = [conn.node.argv([c])[0] for c in ("sbatch", "squeue", "scancel")]
        r = await conn.run(
            ["/bin/sh", "-c", 'for c; do [ -x "$c" ] || echo "$c"; done', "sh", *paths],
            timeout=30,
        )
        missing = str(r.stdout).split()
        if missing:
            self.r.fail("slurm-missing", commands=", ".join(missing))
            return False
        self.r.ok(f"sbatch, squeue and scancel found in {conn.node.slurm_bin}")
        return True

    async def singleuser(self, conn: Connection) -> None:
        cmd = list(self.sp.cmd)
        # the account's own site-packages (~/.local) must not decide what runs
        try:
            remote = await versions.job_env_version(conn, cmd)
        except RuntimeError as e:
            self.r.fail("singleuser-missing", cmd=" ".join(cmd), detail=str(e))
            return
        local = metadata.version("jupyterhub")
        mismatch = versions.compare(local, remote)
        if mismatch is not None and mismatch.major:
            self.r.fail("singleuser-version", remote=remote, local=local, why=versions.WHY_MAJOR)
            return
        if mismatch is not None:
            self.r.note("singleuser-minor", remote=remote, local=local)
            return
        self.r.ok(f"job environment has jupyterhub-singleuser {remote} (hub: {local})")

    async def gateway_account(self, conn: Connection) -> None:
        """The shared account runs the hub's commands through no file attendees can write."""
        user = self.sp.gateway_user
        r = await conn.run(["/usr/bin/getent", "passwd", user], timeout=30)
        fields = str(r.stdout).strip().split(":")
        home, shell = (fields[5], fields[6]) if len(fields) >= 7 else ("", "?")
        problem = gatewaysetup.shell_problem(shell)
        if problem:
            self.r.fail("gateway-shell", user=user, shell=shell, detail=problem)
        else:
            self.r.ok(f"gateway account {user}: login shell {shell} reads no start-up file")
        r = await conn.run(["/usr/bin/env"], timeout=30)
        bad = gatewaysetup.env_problems(str(r.stdout), home)
        if bad:
            self.r.fail("gateway-env", names=", ".join(bad))
        else:
            self.r.ok("gateway account's SSH sessions carry no variable attendees can set")

    async def sandbox(self, conn: Connection) -> None:
        """Gateway mode with a sandbox: a trivial command in it, as the shared account on
        the login node (the test job then runs its stand-in server in it on a compute
        node)."""
        sb = self.sp.sandbox_settings()
        if sb is None:
            return
        script = (
            'd=$(mktemp -d "$HOME/.xsedehub-check.XXXXXX") || exit 1\n'
            'mkdir -p "$d/work" "$d/job/sock"\n'
            'XH_WORK="$d/work" XH_DIR="$d/job"\n'
            f"{sandbox_mod.hide_line(sb)}\n"
            f"{sandbox_mod.words(sandbox_mod.argv(sb))} true </dev/null\n"
            'rc=$?; rm -rf "$d"; exit $rc\n'
        )
        # --norc: Debian's bash reads ~/.bashrc under sshd even when not a login shell
        r = await conn.run(["/bin/bash", "--norc", "--noprofile", "-c", script], timeout=60)
        if r.exit_status != 0:
            detail = (str(r.stderr).strip() or f"exit {r.exit_status}")[-300:]
            self.r.fail("sandbox-login", runtime=sb.runtime, detail=detail)
            return
        self.r.ok(f"attendee sandbox ({sb.runtime}) starts on the login node")

    def tunnel_account(self) -> bool:
        import pwd

        try:
            pwd.getpwnam(self.sp.tunnel_user)
        except KeyError:
            self.r.fail("tunnel-account", user=self.sp.tunnel_user)
            return False
        version = sshd_version(self.sshd)
        if version and version < MIN_OPENSSH:
            self.r.fail(
                "tunnel-sshd-version",
                version=".".join(map(str, version)),
                minimum=".".join(map(str, MIN_OPENSSH)),
            )
            return False
        if version:
            self.r.ok(f"hub's sshd is OpenSSH {'.'.join(map(str, version))}")
        return True

    async def test_job(self, conn: Connection) -> None:
        sp = self.sp
        host, _, port = self.hub_api.rpartition(":")
        keys = TunnelKeys.for_file(
            sp.tunnel_authorized_keys, tuple(sp.tunnel_port_range), host, int(port)
        )
        spawn_id = f"check-{secrets.token_hex(4)}"
        grant = await keys.grant(spawn_id, self.job_timeout + 600)
        job_dir = f"{v.relative_path(sp.job_dir_root, 'job_dir_root', hidden=True)}/{spawn_id}"
        sandbox = sp.sandbox_settings()
        script = slurm.build_job_script(
            slurm.JobScript(
                job_name="xsedehub-check",
                resources=slurm.JobResources(
                    partition=sp.partition,
                    walltime_minutes=5,
                    cpus=1,
                    memory_mb=256,
                    account=sp.account or None,
                ),
                job_dir=job_dir,
                # in the sandbox, the stand-in server sees a folder of its own (beside the
                # job directory: the socket folder is bound over the job directory's path)
                work_dir=f"{job_dir}-work" if sandbox else ".",
                singleuser=[sp.job_python, "-c", _STAND_IN_SERVER],
                tunnel=slurm.Tunnel(
                    host=sp.tunnel_host,
                    port=sp.tunnel_port,
                    user=sp.tunnel_user,
                    hub_port=grant.port,
                    api_host=host,
                    api_port=int(port),
                ),
                python=sp.job_python,
                spawn_id=spawn_id,
                sandbox=sandbox,
            )
        )
        job_id = ""
        hub_known_hosts = _read(sp.tunnel_known_hosts)
        try:
            sftp = await conn.sftp()
            # 0700 for every folder it creates, as the spawner does (.xsedehub/jobs included:
            # a spawn after this check finds its parent private)
            await sftp.makedirs(job_dir, attrs=asyncssh.SFTPAttrs(permissions=0o700), exist_ok=True)
            for name, content in (
                ("env", ""),
                ("tunnel_key", grant.private_key),
                ("known_hosts", hub_known_hosts),
            ):
                async with sftp.open(
                    f"{job_dir}/{name}", "w", attrs=asyncssh.SFTPAttrs(permissions=0o600)
                ) as f:
                    await f.write(content)
            r = await conn.run(slurm.sbatch_argv(), input=script, timeout=60)
            if r.exit_status:
                self.r.fail("test-job-refused", detail=str(r.stderr).strip()[:300])
                return
            job_id = slurm.parse_sbatch(str(r.stdout))
            deadline = time.monotonic() + self.job_timeout
            st = None
            while time.monotonic() < deadline:
                st = await conn.status.get(job_id, max_age=1)
                if st and st.running and _listening(grant.port):
                    where = " (its server in the attendee sandbox)" if sandbox else ""
                    self.r.ok(
                        f"test job {job_id} on {st.nodes} opened the tunnel back to the hub{where}"
                    )
                    return
                if st is None or not st.alive:
                    break
                await asyncio.sleep(0.5)
            if st is not None and st.state == "PENDING":
                self.r.fail(
                    "test-job-queued", job=job_id, seconds=int(self.job_timeout), reason=st.reason
                )
                return
            log = ""
            try:
                async with sftp.open(f"{job_dir}/job.log") as f:
                    log = "\n".join((await f.read()).splitlines()[-8:])
            except (asyncssh.SFTPError, OSError):
                pass
            if sandbox and "cannot start on this node" in log:
                self.r.fail(
                    "sandbox-compute",
                    runtime=sandbox.runtime,
                    node=st.nodes if st else "?",
                    log=log,
                )
                return
            self.r.fail(
                "tunnel-failed",
                node=st.nodes if st else "?",
                seconds=int(self.job_timeout),
                log=log or "(nothing)",
            )
        finally:
            if job_id:
                await conn.run(slurm.scancel_argv(job_id), timeout=30)
            await keys.revoke(spawn_id)

    async def run(self) -> Report:
        ident = await self.identity()
        conn = await self.connect(ident)
        if conn is None:
            if self.sp.mode == "xsede" and not self.certificate:
                self.r.skip(
                    "certificate-needed",
                    commands=TEST_CERTIFICATE_COMMANDS,
                    config=self.config_file,
                )
            return self.r
        try:
            if self.sp.mode == "gateway":
                await self.gateway_account(conn)
            if not await self.commands(conn):
                return self.r
            await self.singleuser(conn)
            await self.sandbox(conn)
            if self.tunnel_account():
                await self.test_job(conn)
        except ClusterUnreachable as e:
            self.r.fail(
                "login-unreachable", host=self.sp.login_host, port=self.sp.login_port, detail=e
            )
        finally:
            conn.close()
        return self.r


#: stands in for jupyterhub-singleuser in the test job: listens where the job script
#: tells the server to (--ServerApp.sock=...), so that the job opens its tunnel
_STAND_IN_SERVER = (
    "import socket, sys, time\n"
    "path = [a.split('=', 1)[1] for a in sys.argv if a.startswith('--ServerApp.sock=')][0]\n"
    "s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)\n"
    "time.sleep(300)\n"
)


def _read(path: str) -> str:
    return Path(path).read_text()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def cluster_choice_problem(names: list[str], cluster: str, certificate: bool) -> str:
    """Why ``--cluster`` (``cluster``) cannot be used with the hub's clusters ``names``
    ("" without clusters), or "": a certificate goes to one named cluster only."""
    if cluster and cluster not in names:
        return f"--cluster {cluster}: the hub's clusters are {[n for n in names if n]}"
    if certificate and not cluster and len(names) > 1:
        return (
            "a certificate is for one cluster's login node: name it with --cluster "
            f"(one of {names})"
        )
    return ""


def run_check(
    config_file: str,
    *,
    out: Callable[[str], None] = print,
    job_timeout: float = 120,
    certificate: tuple[str, str] | None = None,
    hub_api: str | None = None,
    cluster: str = "",
) -> Report:
    """Check the hub of ``config_file`` step by step, on each of its clusters (only
    ``cluster``, when named; with ``certificate`` on a hub with several, it must be: a
    certificate is one site's, never presented to another's login node)."""
    from .config import ConfigError

    report = Report(out=out)
    try:
        cfg = load_config(config_file)
    except ConfigError as e:
        report.fail("config", detail="\n".join(str(p) for p in e.problems))
        return report
    return asyncio.run(
        _check_every_cluster(cfg, report, config_file, job_timeout, certificate, hub_api, cluster)
    )


async def _check_every_cluster(
    cfg: Config,
    report: Report,
    config_file: str,
    job_timeout: float,
    certificate: tuple[str, str] | None,
    hub_api: str | None,
    cluster: str = "",
) -> Report:
    """Every step on each cluster of ``SlurmSSHSpawner.clusters`` in turn (one cluster,
    the top-level settings, without it), all in one report."""
    from .spawner.spawner import SlurmSSHSpawner

    sp = SlurmSSHSpawner(config=cfg)
    names = [c.name for c in sp.cluster_list()] if sp.clusters else [""]
    problem = cluster_choice_problem(names, cluster, certificate is not None)
    if problem:
        report.fail("config", detail=problem)
        return report
    names = [cluster] if cluster else names
    for name in names:
        if name:
            report.lines.append(f"cluster {name}:")
            report.out(report.lines[-1])
        checker = Checker(
            cfg,
            report,
            job_timeout=job_timeout,
            certificate=certificate,
            hub_api=hub_api,
            config_file=config_file,
            cluster=name,
        )
        await checker.run()
    return report
