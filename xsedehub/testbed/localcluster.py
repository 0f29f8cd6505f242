"""A local "mini-Comet": real SLURM, munge and OpenSSH in network namespaces.

``xsedehub cluster up`` (as root, on Debian/Ubuntu) installs what it needs with apt and
brings up, idempotently:

* namespace ``xh-cluster`` (10.200.0.2): munge-authenticated slurmctld, compute nodes
  ``node1``/``node2`` (slurmd), and the login node's sshd, which trusts a user CA and
  presents a host certificate; accounts ``gateway``, ``alice``, ``bob``;
* namespace ``xh-hub`` (10.200.0.1): the hub side's sshd, where the no-shell ``tunnelbot``
  account may only open the forwards a job's tunnel needs;
* a veth pair joining the two, so tunnels cross a real link;
* a world-readable Python environment with jupyterhub and jupyterlab that jobs run;
* a bare git repository with workshop notebooks;
* ``cluster.json``: a machine-readable description of all of the above.

``down`` stops exactly what ``up`` started, by pid file, and removes the namespaces.  The
layout and the files the daemons read are made by :mod:`~xsedehub.testbed.clusterconf`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from . import minidelta
from .clusterconf import (
    CLUSTER_NS,
    GATEWAY_USER,
    HUB_API_PORT,
    HUB_IP,
    HUB_NS,
    JOB_ENV,
    LOGIN_IP,
    NODE_CPUS,
    NODES,
    PREFIX,
    RESEARCHERS,
    ROOT,
    SLURM_CONF,
    SSH_PORT,
    TUNNEL_USER,
    VETH_CLUSTER,
    VETH_HUB,
    ClusterError,
    command_counts,
    command_wrappers,
    ensure_keys,
    ensure_users,
    ensure_workshop_repo,
    gateway_keys_file,
    jobs_nice_file,
    sshd_conf,
    write_slurm_conf,
)
from .clusterconf import log as _log  # the names this module has always used
from .clusterconf import run as _run
from .netns import nsenter_argv

__all__ = ["ClusterError", "ClusterInfo", "command_counts", "down", "status", "stop_daemon", "up"]

APT_PACKAGES = [
    "slurm-wlm",
    "munge",
    "openssh-server",
    "openssh-client",
    "iproute2",
    "util-linux",
    "git",
    "python3-venv",
    "bubblewrap",  # the attendee sandbox of gateway-mode jobs
    "sudo",  # the site command that extends a job's walltime (extend_command)
]
JOB_PACKAGES = ["jupyterlab>=4,<5", "nbgitpuller>=1.2"]
#: xsedehub's job-side extension (jobext/: the walltime in JupyterLab), built into a wheel
#: by this script (npm registry, at install time) and installed into the job environment
JOBEXT_BUILD = Path(__file__).resolve().parents[2] / "scripts" / "build-jobext.sh"
JOBEXT_MARK = "xsedehub-jobext.wheel"  # in the job env: the wheel installed there


@dataclass
class SiteInfo:
    """One cluster as a spawner configuration needs it (an entry of ``ClusterInfo.clusters``).

    ``hub_ip`` is where the cluster's jobs reach the hub's tunnel sshd; ``hub_seen_as``
    the address the hub's connections come from as the login node sees them (the
    ``from=`` of the gateway account's key); ``mount_ns`` is None for a cluster that
    shares the machine's mounts (the mini-Comet)."""

    name: str
    netns: str
    mount_ns: str | None
    login_ip: str
    login_port: int
    hub_ip: str
    hub_seen_as: str
    known_hosts: str
    host_key: str
    user_ca_key: str
    gateway_user: str
    gateway_key: str
    gateway_keys_file: str
    researchers: list[str]
    slurm_conf: str
    slurm_bin: str
    munge_socket: str
    home_root: str
    partitions: dict[str, dict[str, object]]
    default_partition: str
    nodes: list[str]
    pid_files: dict[str, str]
    commands_log: str

    def run_argv(self, *argv: str) -> list[str]:
        """argv that runs a command as root inside this cluster (its compute nodes' view:
        network, mounts, ``SLURM_CONF``)."""
        ns = ["nsenter", f"--net=/run/netns/{self.netns}"]
        if self.mount_ns:
            ns.append(f"--mount={self.mount_ns}")
        return [*ns, "env", f"SLURM_CONF={self.slurm_conf}", *argv]


@dataclass
class ClusterInfo:
    """What ``up`` started: read by the tests, the demo and ``status``."""

    root: str
    hub_netns: str
    cluster_netns: str
    hub_ip: str
    login_ip: str
    login_port: int
    hub_ssh_port: int
    hub_api_ip: str
    hub_api_port: int
    gateway_user: str
    researchers: list[str]
    tunnel_user: str
    known_hosts: str
    user_ca_key: str
    gateway_key: str
    tunnel_authorized_keys: str
    job_env: str
    workshop_repo: str
    partitions: dict[str, dict[str, object]]
    nodes: list[str]
    pid_files: dict[str, str] = field(default_factory=dict)
    #: SLURM's commands as the hub runs them (the counting wrappers; slurm_bin_dir)
    slurm_bin: str = "/usr/bin"
    #: every cluster by name, the mini-Comet (the fields above) first (see SiteInfo)
    clusters: dict[str, dict[str, object]] = field(default_factory=dict)

    def site(self, name: str) -> SiteInfo:
        """The cluster ``name`` (``minicomet`` or ``minidelta``)."""
        if name not in self.clusters:
            raise ClusterError(f"no cluster {name!r} in cluster.json: {sorted(self.clusters)}")
        return SiteInfo(**self.clusters[name])

    @classmethod
    def load(cls, root: Path = ROOT) -> ClusterInfo:
        path = root / "cluster.json"
        if not path.exists():
            raise ClusterError(f"{path} not found: run `xsedehub cluster up` first")
        return cls(**json.loads(path.read_text()))


def _in_cluster(argv: list[str]) -> list[str]:
    return nsenter_argv(CLUSTER_NS) + argv


def _in_hub(argv: list[str]) -> list[str]:
    return nsenter_argv(HUB_NS) + argv


def _pid_alive(pid_file: Path) -> bool:
    """The daemon of ``pid_file`` runs (not a zombie, not a stranger with a reused pid)."""
    try:
        pid = int(pid_file.read_text().split()[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, IndexError):
        return False
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    daemon = pid_file.name.split(".")[0].split("-")[0].split("_")[0]  # sshd_hub.pid -> sshd
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and comm.startswith(daemon)


def _pid_files(root: Path) -> dict[str, Path]:
    run = root / "run"
    files = {
        "munged": run / "munge" / "munged.pid",
        "slurmctld": run / "slurmctld.pid",
        "sshd_login": run / "sshd_login.pid",
        "sshd_hub": run / "sshd_hub.pid",
    }
    for node in NODES:
        files[f"slurmd_{node}"] = run / f"slurmd-{node}.pid"
    files.update(minidelta.pid_files(root))
    return files


def _reset_nice(root: Path) -> None:
    """The daemons at nice 0: a benchmark ended by SIGKILL leaves nothing lower for the
    next run's jobs (SLURM's PropagatePrioProcess; ``burst.py --hub-apart`` used to
    renice the login node's sshd; it now has the login node's ``sbatch`` run niced, see
    :func:`~.clusterconf.jobs_nice_file`, which :func:`command_wrappers` removes)."""
    for pid_file in _pid_files(root).values():
        try:
            os.setpriority(os.PRIO_PROCESS, int(pid_file.read_text().split()[0]), 0)
        except (OSError, ValueError, IndexError):
            continue


# --------------------------------------------------------------------------- install
#: how a missing piece is installed (``scripts/install.sh`` runs ``xsedehub cluster install``)
INSTALL_HINT = "run `bash scripts/install.sh` (as root, with network access) first"


def install() -> None:
    """Install every piece the cluster needs: Debian packages and the job environment.

    Runs from ``scripts/install.sh``, in the host's namespace, where the package
    registries are reachable; ``up`` never downloads anything."""
    install_packages()
    ensure_job_env()


def install_packages() -> None:
    missing = [p for p in APT_PACKAGES if not _dpkg_installed(p)]
    if not missing:
        return
    _log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], env=env)
    _run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        env=env,
    )


def _dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
    )
    return r.returncode == 0 and "install ok installed" in r.stdout


def job_env_problem(path: Path = JOB_ENV, jupyterhub: str | None = None) -> str | None:
    """Why the job environment at ``path`` cannot serve jobs of this hub (or of a hub
    running ``jupyterhub`` of that version), or None."""
    want = jupyterhub or metadata.version("jupyterhub")
    py = path / "bin" / "python"
    if not py.exists():
        return f"the job environment {path} does not exist"
    # found, not imported: importing them took 2.5 s, nearly all of `cluster up`
    check = (
        "import sys, importlib.util as u, importlib.metadata as m\n"
        "for n in ('jupyterhub', 'jupyterlab', 'nbgitpuller', 'xsedehub_jobext'):\n"
        "    if u.find_spec(n) is None:\n"
        "        sys.exit(f'ModuleNotFoundError: No module named {n!r}')\n"
        "print(m.version('jupyterhub'))\n"
    )
    r = subprocess.run(
        [str(py), "-c", check],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        return f"the job environment {path} is incomplete: {r.stderr.strip()[-300:]}"
    if r.stdout.strip() != want:
        return f"the job environment {path} has jupyterhub {r.stdout.strip()}, the hub {want}"
    return None


def ensure_job_env(path: Path = JOB_ENV, jupyterhub: str | None = None) -> None:
    """World-readable venv from the system Python with the same jupyterhub as the hub
    (or ``jupyterhub``: the version another hub runs, e.g. TLJH's)."""
    problem = job_env_problem(path, jupyterhub)
    if problem is None or "xsedehub_jobext" in problem:
        ensure_jobext(path)
        drop_slow_validator(path)
        return
    want = jupyterhub or metadata.version("jupyterhub")
    _log(f"building the job environment {path} (jupyterhub=={want})")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o755)  # noqa: S103 (jobs of every user run this environment)
    _run(["/usr/bin/python3", "-m", "venv", "--clear", str(path)])
    _run([str(path / "bin/pip"), "install", "-q", "--upgrade", "pip"])
    _run([str(path / "bin/pip"), "install", "-q", f"jupyterhub=={want}", *JOB_PACKAGES])
    ensure_jobext(path)
    drop_slow_validator(path)


#: jsonschema's IRI format checker that builds 35 Earley parsers at import: every
#: Jupyter server imports it (jupyter_events), and no Jupyter schema uses those formats
SLOW_VALIDATOR = "rfc3987-syntax"


def drop_slow_validator(path: Path) -> None:
    """Uninstall :data:`SLOW_VALIDATOR` from the job environment (nothing is
    downloaded).  It took 2.3 s of CPU of every single-user server's start here
    (``python -X importtime``; jupyter_server issue 1559); without it, jsonschema leaves
    the ``iri`` formats unchecked, which no Jupyter schema uses."""
    if (
        subprocess.run(
            [
                str(path / "bin/python"),
                "-c",
                "import importlib.util as u, sys; sys.exit(u.find_spec('rfc3987_syntax') is None)",
            ],
            check=False,
        ).returncode
        == 0
    ):
        _log(f"uninstalling {SLOW_VALIDATOR} from {path} (slow to import, not needed)")
        _run([str(path / "bin/pip"), "uninstall", "-q", "-y", SLOW_VALIDATOR])


def ensure_jobext(path: Path) -> None:
    """Build the xsedehub-jobext wheel for the job environment at ``path`` (skipped when
    built for the same sources and JupyterLab) and install it there if it is not yet."""
    wheel = (
        _run(
            ["bash", str(JOBEXT_BUILD), str(path / "bin/python"), str(PREFIX / "wheels" / "jobext")]
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    mark = path / JOBEXT_MARK
    if not mark.exists() or mark.read_text().strip() != wheel:
        _log(f"installing {wheel} into {path}")
        pip = [str(path / "bin/pip"), "install", "-q", "--no-deps", "--force-reinstall"]
        _run([*pip, wheel])
        mark.write_text(wheel + "\n")
    _run(["chmod", "-R", "a+rX", str(path), str(PREFIX / "wheels" / "jobext")])


def missing_pieces() -> list[str]:
    """What ``install`` would still have to install (empty when everything is there)."""
    out = [f"Debian package {p}" for p in APT_PACKAGES if not _dpkg_installed(p)]
    problem = job_env_problem()
    if problem:
        out.append(problem)
    return out


def _setup_netns() -> None:
    existing = _run(["ip", "netns", "list"]).stdout
    for ns in (HUB_NS, CLUSTER_NS):
        if ns not in existing.split():
            _run(["ip", "netns", "add", ns])
    have_link = subprocess.run(
        ["ip", "-n", HUB_NS, "link", "show", VETH_HUB], capture_output=True, check=False
    )
    if have_link.returncode:
        _run(["ip", "link", "add", VETH_HUB, "type", "veth", "peer", "name", VETH_CLUSTER])
        _run(["ip", "link", "set", VETH_HUB, "netns", HUB_NS])
        _run(["ip", "link", "set", VETH_CLUSTER, "netns", CLUSTER_NS])
        _run(["ip", "-n", HUB_NS, "addr", "add", f"{HUB_IP}/24", "dev", VETH_HUB])
        _run(["ip", "-n", CLUSTER_NS, "addr", "add", f"{LOGIN_IP}/24", "dev", VETH_CLUSTER])
    for ns, dev in ((HUB_NS, VETH_HUB), (CLUSTER_NS, VETH_CLUSTER)):
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "link", "set", dev, "up"])
    hosts = Path(f"/etc/netns/{HUB_NS}/hosts")
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(f"127.0.0.1 localhost\n{LOGIN_IP} login\n")


def _wait(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _start_daemons(root: Path, keys: dict[str, Path]) -> None:
    pids = _pid_files(root)
    run = root / "run"
    # munge: one munged in the root namespace serves the mini-Comet's namespace (its socket
    # is a file); the second cluster has its own (minidelta.start)
    if not Path("/etc/munge/munge.key").exists():
        _run(["mungekey", "--create"])
        _run(["chown", "munge:munge", "/etc/munge/munge.key"])
    _run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", "/run/munge"])
    _run(
        [
            "install",
            "-d",
            "-o",
            "munge",
            "-g",
            "munge",
            "-m",
            "711",
            "/var/lib/munge",
            "/var/log/munge",
        ]
    )
    _run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "755", str(run / "munge")])
    if not _pid_alive(pids["munged"]):
        _run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                "--force",
                f"--pid-file={pids['munged']}",
            ]
        )
    _run(["install", "-d", "-o", "slurm", "-g", "slurm", str(root / "slurmctld")])
    for node in NODES:
        (root / "slurmd" / node).mkdir(parents=True, exist_ok=True)
    if not _pid_alive(pids["slurmctld"]):
        _run(_in_cluster(["/usr/sbin/slurmctld"]))  # recovers saved jobs
    for node in NODES:
        if not _pid_alive(pids[f"slurmd_{node}"]):
            _run(_in_cluster(["/usr/sbin/slurmd", "-N", node]))
    Path("/run/sshd").mkdir(exist_ok=True)
    for side, wrap in (("login", _in_cluster), ("hub", _in_hub)):
        conf = sshd_conf(root, keys, side)
        if _pid_alive(run / f"sshd_{side}.pid"):
            os.kill(int((run / f"sshd_{side}.pid").read_text().split()[0]), signal.SIGHUP)
        else:
            _run(
                wrap(
                    [
                        "/usr/sbin/sshd",
                        "-f",
                        str(conf),
                        "-E",
                        str(root / "log" / f"sshd_{side}.log"),
                    ]
                )
            )

    # the second cluster starts before either is waited for: both settle together
    minidelta.start(root, _pid_alive)
    clusters = [
        (_in_cluster, NODES, lambda node: _run(_in_cluster(["/usr/sbin/slurmd", "-N", node]))),
        (
            lambda argv: minidelta.in_cluster(argv, root),
            minidelta.NODES,
            lambda node: minidelta.restart_slurmd(root, node),
        ),
    ]

    # A node slurmctld failed to ping (munge was down, say) stays "not responding" (its
    # state ends in "*") until the next ping, up to SlurmdTimeout/3 = 100 s later.  A
    # slurmd that starts registers at once, so those nodes' slurmd start again; the jobs
    # on them live on in their slurmstepd.
    for inside, _nodes, _restart in clusters:
        _wait(lambda inside=inside: _node_states(inside) is not None, "slurmctld to answer")
    for inside, nodes, restart in clusters:
        for node, state in (_node_states(inside) or {}).items():
            if state.endswith("*") and node in nodes:
                _log(f"{node} is not responding to slurmctld: restarting its slurmd")
                name = f"slurmd_{node}" if nodes is NODES else f"{minidelta.NAME}:slurmd_{node}"
                stop_daemon(name, root)
                restart(node)
    for inside, _nodes, _restart in clusters:
        _wait(lambda inside=inside: _nodes_idle(inside), "compute nodes to come up")


def _node_states(inside) -> dict[str, str] | None:
    """Node -> state as the cluster that ``inside`` (an argv wrapper) runs commands in
    sees it, or None while its slurmctld does not answer."""
    r = subprocess.run(
        inside(["sinfo", "-h", "-N", "-o", "%N %t"]), capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        return None
    return dict(line.split()[:2] for line in r.stdout.splitlines() if line.strip())


def _nodes_idle(inside) -> bool:
    states = _node_states(inside)
    return bool(states) and set(states.values()) <= {"idle", "mix", "alloc"}


EXTEND_SOURCE = Path(__file__).resolve().parents[2] / "scripts" / "site"
EXTEND_NAME = "xsedehub-extend-walltime"
SUDOERS = Path("/etc/sudoers.d/xsedehub-localcluster")


def extend_command(root: Path = ROOT) -> list[str]:
    """``SlurmSSHSpawner.walltime_extend_command`` for this cluster: the site command
    (scripts/site/xsedehub-extend-walltime) through sudo, as a centre would set it up."""
    return ["/usr/bin/sudo", "-n", str(root / "bin" / EXTEND_NAME)]


def ensure_extend_command(root: Path) -> None:
    """The walltime extension's site command (root-owned, 0755) and the sudoers rule that
    lets the cluster's accounts run it, and nothing else, as root."""
    bindir = root / "bin"
    bindir.mkdir(mode=0o755, exist_ok=True)
    target = bindir / EXTEND_NAME
    shutil.copyfile(EXTEND_SOURCE / EXTEND_NAME, target)
    target.chmod(0o755)
    users = ",".join([GATEWAY_USER, *RESEARCHERS])
    rule = (
        "# xsedehub's local cluster: users may lengthen their own running jobs\n"
        f"{users} ALL=(root) NOPASSWD: {target}\n"
    )
    if not SUDOERS.exists() or SUDOERS.read_text() != rule:
        tmp = SUDOERS.with_name(".xsedehub-localcluster.new")
        tmp.write_text(rule)
        tmp.chmod(0o440)
        _run(["visudo", "-c", "-q", "-f", str(tmp)])
        tmp.replace(SUDOERS)


def _comet_site(root: Path, keys: dict[str, Path]) -> dict[str, object]:
    """The mini-Comet's entry in ``ClusterInfo.clusters`` (the shape of :class:`SiteInfo`)."""
    return {
        "name": "minicomet",
        "netns": CLUSTER_NS,
        "mount_ns": None,
        "login_ip": LOGIN_IP,
        "login_port": SSH_PORT,
        "hub_ip": HUB_IP,
        "hub_seen_as": HUB_IP,
        "known_hosts": str(root / "known_hosts"),
        "host_key": f"{keys['login_host']}-cert.pub",
        "user_ca_key": str(keys["user_ca"]),
        "gateway_user": GATEWAY_USER,
        "gateway_key": str(keys["gateway"]),
        "gateway_keys_file": str(gateway_keys_file(root)),
        "researchers": list(RESEARCHERS),
        "slurm_conf": str(SLURM_CONF),
        "slurm_bin": str(root / "bin"),
        "munge_socket": "/run/munge/munge.socket.2",
        "home_root": "/home",
        "partitions": {
            "compute": {"max_walltime": "08:00:00", "cpus_per_node": NODE_CPUS},
            "debug": {"max_walltime": "00:30:00", "cpus_per_node": NODE_CPUS},
        },
        "default_partition": "compute",
        "nodes": list(NODES),
        "pid_files": {k: str(v) for k, v in _pid_files(root).items() if ":" not in k},
        "commands_log": str(root / "log" / "commands.log"),
    }


def _info(root: Path, keys: dict[str, Path], workshop: Path) -> ClusterInfo:
    return ClusterInfo(
        root=str(root),
        hub_netns=HUB_NS,
        cluster_netns=CLUSTER_NS,
        hub_ip=HUB_IP,
        login_ip=LOGIN_IP,
        login_port=SSH_PORT,
        hub_ssh_port=SSH_PORT,
        hub_api_ip="127.0.0.1",
        hub_api_port=HUB_API_PORT,
        gateway_user=GATEWAY_USER,
        researchers=list(RESEARCHERS),
        tunnel_user=TUNNEL_USER,
        known_hosts=str(root / "known_hosts"),
        user_ca_key=str(keys["user_ca"]),
        gateway_key=str(keys["gateway"]),
        tunnel_authorized_keys=str(root / "hub" / "tunnelbot_authorized_keys"),
        job_env=str(JOB_ENV),
        workshop_repo=str(workshop),
        partitions={
            "compute": {"max_walltime": "08:00:00", "cpus_per_node": NODE_CPUS},
            "debug": {"max_walltime": "00:30:00", "cpus_per_node": NODE_CPUS},
        },
        nodes=list(NODES),
        pid_files={k: str(v) for k, v in _pid_files(root).items()},
        slurm_bin=str(root / "bin"),
        clusters={
            "minicomet": _comet_site(root, keys),
            minidelta.NAME: minidelta.info(root, keys),
        },
    )


# --------------------------------------------------------------------------- commands
def healthy(root: Path = ROOT) -> bool:
    if not (root / "cluster.json").exists():
        return False
    if not all(_pid_alive(p) for p in _pid_files(root).values()):
        return False
    if not all(Path(f"/run/netns/{ns}").exists() for ns in (HUB_NS, CLUSTER_NS, minidelta.NS)):
        return False
    if not minidelta.mounted():
        return False
    return _nodes_idle(_in_cluster) and _nodes_idle(lambda argv: minidelta.in_cluster(argv, root))


def up(root: Path = ROOT) -> ClusterInfo:
    """Bring the cluster up (idempotent).  Installs nothing: a missing piece stops it at
    once with the piece named and the command that installs it."""
    if os.geteuid() != 0:
        raise ClusterError("`xsedehub cluster up` must run as root")
    t0 = time.monotonic()
    missing = missing_pieces()
    if missing:
        raise ClusterError(f"not installed: {'; '.join(missing)}: {INSTALL_HINT}")
    if healthy(root):
        _log("already up")
        command_wrappers(root)  # as this version writes them (sbatch un-niced)
        _reset_nice(root)
        return ClusterInfo.load(root)
    # every step below is idempotent: a partly running cluster is completed, not rebuilt
    for d in ("run", "log", "hub", "slurmd"):
        (root / d).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    (root / "hub").chmod(0o755)
    tak = root / "hub" / "tunnelbot_authorized_keys"
    if not tak.exists():
        tak.write_text("")
    tak.chmod(0o644)
    ensure_users()
    keys = ensure_keys(root)
    minidelta.prepare(root, keys)
    write_slurm_conf(root)
    command_wrappers(root)
    ensure_extend_command(root)
    workshop = ensure_workshop_repo(root)
    _setup_netns()
    minidelta.setup_namespaces(root)
    _start_daemons(root, keys)
    info = _info(root, keys, workshop)
    (root / "cluster.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    _log(
        f"up in {time.monotonic() - t0:.1f}s: login nodes {LOGIN_IP}:{SSH_PORT} (minicomet), "
        f"{minidelta.LOGIN_IP}:{SSH_PORT} ({minidelta.NAME}), hub side {HUB_IP}"
    )
    return info


def down(root: Path = ROOT) -> None:
    if os.geteuid() != 0:
        raise ClusterError("`xsedehub cluster down` must run as root")
    jobs_nice_file(root).unlink(missing_ok=True)
    pids = _pid_files(root)
    daemons = ["sshd_login", *(f"slurmd_{n}" for n in NODES), "slurmctld", "munged"]
    delta = ["sshd_login", *(f"slurmd_{n}" for n in minidelta.NODES), "slurmctld", "munged"]
    order = ["sshd_hub", *daemons, *(f"{minidelta.NAME}:{d}" for d in delta)]
    for name in order:
        f = pids[name]
        if not f.exists():
            continue
        try:
            pid = int(f.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass
    deadline = time.monotonic() + 15
    for name in order:
        while _pid_alive(pids[name]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pids[name]):
            os.kill(int(pids[name].read_text().split()[0]), signal.SIGKILL)
        pids[name].unlink(missing_ok=True)
    # minidelta's mount namespace goes with the last of its processes (killed below)
    try:
        minidelta.remove_mount_ns()
    except ClusterError as e:  # the namespaces go all the same
        _log(f"minidelta's mount namespace: {e}")
    for ns in (HUB_NS, CLUSTER_NS, minidelta.NS):
        if Path(f"/run/netns/{ns}").exists():
            # processes still inside (jobs' leftovers, a test's hub) go with the namespace
            r = subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
            )
            spare = _ancestors()
            for pid in r.stdout.split():
                if int(pid) in spare:
                    continue
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], check=False)
    shutil.rmtree(f"/etc/netns/{HUB_NS}", ignore_errors=True)
    shutil.rmtree(root / "slurmctld", ignore_errors=True)
    shutil.rmtree(root / "slurmd", ignore_errors=True)
    for d in ("slurmctld", "slurmd"):
        shutil.rmtree(minidelta.site_root(root) / d, ignore_errors=True)
    (root / "cluster.json").unlink(missing_ok=True)
    tak = root / "hub" / "tunnelbot_authorized_keys"
    if tak.exists():
        tak.write_text("")
    _log("down")


def _ancestors() -> set[int]:
    """This process and its parents (a caller inside a namespace must not be killed)."""
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def stop_daemon(name: str, root: Path = ROOT, *, sessions: bool = True) -> None:
    """Stop one daemon ``up`` started (fault-injection tests); ``up`` starts it again.

    For an sshd, ``sessions`` also ends its established connections, as a crash or
    reboot of the node would."""
    f = _pid_files(root)[name]
    pid = int(f.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _pid_alive(f) and time.monotonic() < deadline:
        time.sleep(0.05)
    if sessions and name.startswith("sshd_"):
        ns = {"sshd_login": CLUSTER_NS, "sshd_hub": HUB_NS}.get(name, minidelta.NS)
        ns_ino = os.stat(f"/run/netns/{ns}").st_ino
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if (
                    p.joinpath("comm").read_text().strip() == "sshd"
                    and os.stat(p / "ns" / "net").st_ino == ns_ino
                ):
                    os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                pass


def status(root: Path = ROOT) -> dict[str, object]:
    out: dict[str, object] = {"healthy": healthy(root)}
    out["daemons"] = {k: _pid_alive(v) for k, v in _pid_files(root).items()}
    out["namespaces"] = {
        ns: Path(f"/run/netns/{ns}").exists() for ns in (HUB_NS, CLUSTER_NS, minidelta.NS)
    }
    out["namespaces"][str(minidelta.MNT_NS)] = minidelta.mounted()
    sinfo = ["sinfo", "-h", "-N", "-o", "%N %t %C"]
    if out["namespaces"][CLUSTER_NS]:
        r = subprocess.run(_in_cluster(sinfo), capture_output=True, text=True, check=False)
        out["nodes"] = r.stdout.strip().splitlines()
    if out["namespaces"][minidelta.NS] and out["namespaces"][str(minidelta.MNT_NS)]:
        r = subprocess.run(
            minidelta.in_cluster(sinfo, root), capture_output=True, text=True, check=False
        )
        out[f"nodes_{minidelta.NAME}"] = r.stdout.strip().splitlines()
    return out
