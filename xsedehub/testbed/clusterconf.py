"""The local cluster's layout and the files its daemons read.

Addresses, ports and accounts of the mini-Comet; the accounts themselves, the SSH keys
and certificates, ``slurm.conf``, the two sshd configurations, the wrappers that count
SLURM commands on the login node, and the workshop repository.  Every step is
idempotent.  :mod:`~xsedehub.testbed.localcluster` starts the daemons that read them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .. import gatewaysetup
from ..tunnelsetup import match_block

ROOT = Path(os.environ.get("XSEDEHUB_CLUSTER_ROOT", "/var/lib/xsedehub/localcluster"))
#: where scripts/install.sh installs (the job environment, the proxy, the hub's venv)
PREFIX = Path(os.environ.get("XSEDEHUB_PREFIX", "/opt/xsedehub"))
JOB_ENV = Path(os.environ.get("XSEDEHUB_JOB_ENV", str(PREFIX / "job-env")))
HUB_NS, CLUSTER_NS = "xh-hub", "xh-cluster"
HUB_IP, LOGIN_IP = "10.200.0.1", "10.200.0.2"
VETH_HUB, VETH_CLUSTER = "xh-veth-h", "xh-veth-c"
SSH_PORT = 22
HUB_API_PORT = 8081
NODES = {"node1": 17001, "node2": 17002}
# declared, not real (SlurmdParameters=config_overrides): 1,024 one-CPU jobs fit, which
# benchmarks/scale.py needs for its 1,000 servers; memory is not a consumable resource
# (CR_Core), so RealMemory only bounds what one job may ask for
NODE_CPUS, NODE_MEM_MB = 512, 64000
RESEARCHERS = ("alice", "bob")
GATEWAY_USER = "gateway"
TUNNEL_USER = "tunnelbot"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by xsedehub cluster up"


class ClusterError(RuntimeError):
    pass


def run(argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
    kw.setdefault("check", True)
    kw.setdefault("text", True)
    kw.setdefault("capture_output", True)
    try:
        return subprocess.run(argv, **kw)
    except subprocess.CalledProcessError as e:
        raise ClusterError(f"{' '.join(argv)} failed ({e.returncode}): {e.stderr.strip()}") from e


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pieces
def ensure_users() -> None:
    for user in (GATEWAY_USER, *RESEARCHERS):
        if subprocess.run(["id", user], capture_output=True, check=False).returncode:
            run(["useradd", "-m", "-s", "/bin/bash", user])
        run(["usermod", "-p", "*", user])  # unlocked, no password
        home = Path(f"/home/{user}")
        home.chmod(0o700)
    # the shared account's login shell reads no start-up file (xsedehub gateway setup)
    run(["usermod", "-s", "/bin/sh", GATEWAY_USER])
    if subprocess.run(["id", TUNNEL_USER], capture_output=True, check=False).returncode:
        run(["useradd", "-m", "-s", "/usr/sbin/nologin", TUNNEL_USER])
    run(["usermod", "-p", "*", "-s", "/usr/sbin/nologin", TUNNEL_USER])


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def ensure_keys(root: Path) -> dict[str, Path]:
    keys = root / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    keys.chmod(0o711)
    k = {
        "user_ca": keys / "user_ca",
        "host_ca": keys / "host_ca",
        "login_host": keys / "login_host_ed25519",
        "hub_host": keys / "hub_host_ed25519",
        "gateway": keys / "gateway_ed25519",
    }
    for name, path in k.items():
        _keygen(path, f"xsedehub-localcluster-{name}")
        path.chmod(0o600)
    for name, principals in (("login_host", LOGIN_IP), ("hub_host", HUB_IP)):
        cert = Path(f"{k[name]}-cert.pub")
        if not cert.exists():
            run(
                [
                    "ssh-keygen",
                    "-q",
                    "-s",
                    str(k["host_ca"]),
                    "-h",
                    "-I",
                    name,
                    "-n",
                    principals,
                    "-V",
                    "-5m:+520w",
                    f"{k[name]}.pub",
                ]
            )
    host_ca_pub = Path(f"{k['host_ca']}.pub").read_text().strip()
    kh = root / "known_hosts"
    kh.write_text(f"@cert-authority {LOGIN_IP},{HUB_IP} {host_ca_pub}\n")
    kh.chmod(0o644)
    # the hub's own key for the shared workshop account, set up as `xsedehub gateway
    # setup` tells a cluster's admins: a root-owned file, the only one sshd reads for
    # that account (attendees share it and could edit ~/.ssh/authorized_keys)
    gw_pub = Path(f"{k['gateway']}.pub").read_text()
    keys_file = gateway_keys_file(root)
    keys_file.parent.mkdir(mode=0o755, exist_ok=True)
    keys_file.write_text(gatewaysetup.keys_line(gw_pub, HUB_IP) + "\n")
    keys_file.chmod(0o644)
    Path(f"/home/{GATEWAY_USER}/.ssh/authorized_keys").unlink(missing_ok=True)
    return k


def gateway_keys_file(root: Path) -> Path:
    return root / "etc" / f"{GATEWAY_USER}.keys"


def write_slurm_conf(root: Path) -> None:
    if SLURM_CONF.exists() and MARK not in SLURM_CONF.read_text():
        raise ClusterError(
            f"{SLURM_CONF} exists and was not written by xsedehub: refusing to replace it "
            "(this command is for a scratch machine)"
        )
    run = root / "run"
    lines = [
        MARK,
        "ClusterName=minicomet",
        "SlurmctldHost=localhost",
        "SlurmUser=slurm",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"StateSaveLocation={root}/slurmctld",
        f"SlurmdSpoolDir={root}/slurmd/%n",
        f"SlurmctldPidFile={run}/slurmctld.pid",
        f"SlurmdPidFile={run}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MinJobAge=120",
        "KillWait=5",
        # a job runs at the nice value of the sbatch that submitted it (never at a
        # higher priority than slurmd's): benchmarks/burst.py --hub-apart
        "PropagatePrioProcess=1",
        "InactiveLimit=0",
        "SchedulerParameters=sched_min_interval=100000",
        # SLURM's default, written out: benchmarks/scale.py holds 1,000 jobs at once
        "MaxJobCount=10000",
        # SLURM's default, written out: a command waits this long for a slurmctld that
        # does not answer (tests/test_connections.py holds slurmctld past a job check)
        "MessageTimeout=10",
    ]
    for node, port in NODES.items():
        lines.append(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={NODE_CPUS} RealMemory={NODE_MEM_MB} State=UNKNOWN"
        )
    nodes = ",".join(NODES)
    lines += [
        f"PartitionName=compute Nodes={nodes} Default=YES MaxTime=08:00:00 State=UP",
        f"PartitionName=debug Nodes={nodes} MaxTime=00:30:00 State=UP",
    ]
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text("\n".join(lines) + "\n")


def sshd_conf(root: Path, keys: dict[str, Path], side: str) -> Path:
    run = root / "run"
    if side == "login":
        ip, host, extra = (
            LOGIN_IP,
            keys["login_host"],
            [
                # SLURM's commands go through counting wrappers (see command_wrappers)
                f"SetEnv PATH={root}/bin:/usr/local/bin:/usr/bin:/bin",
                f"TrustedUserCAKeys {keys['user_ca']}.pub",
                "AuthorizedKeysFile .ssh/authorized_keys",
                f"AllowUsers {GATEWAY_USER} {' '.join(RESEARCHERS)}",
                "Subsystem sftp internal-sftp",
                "AllowTcpForwarding no",
                "X11Forwarding no",
                # benchmarks/burst.py's baseline opens one connection per command, a
                # hundred at once in a burst; sshd's default (10:30:100) dropped a third
                # to a half of them, and those spawns failed (the spawner holds one)
                "MaxStartups 1000:30:2000",
                # last: a Match block runs to the end of the file
                *gatewaysetup.sshd_block(GATEWAY_USER, str(gateway_keys_file(root))).splitlines(),
            ],
        )
    else:
        ip, host, extra = (
            HUB_IP,
            keys["hub_host"],
            [
                f"AllowUsers {TUNNEL_USER}",
                "AuthorizedKeysFile none",
                # every job holds one connection here; benchmarks/scale.py's 1,000 jobs
                # open up to a few hundred at once while they start
                "MaxStartups 1000:30:2000",
                *match_block(
                    TUNNEL_USER,
                    f"{root}/hub/tunnelbot_authorized_keys",
                    f"127.0.0.1:{HUB_API_PORT}",
                ).splitlines(),
            ],
        )
    conf = root / f"sshd_{side}.conf"
    conf.write_text(
        "\n".join(
            [
                f"Port {SSH_PORT}",
                f"ListenAddress {ip}",
                f"HostKey {host}",
                f"HostCertificate {host}-cert.pub",
                f"PidFile {run}/sshd_{side}.pid",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM yes",
                "PermitRootLogin no",
                "LogLevel VERBOSE",
                *extra,
            ]
        )
        + "\n"
    )
    return conf


COUNTED = ("sbatch", "squeue", "scancel", "sinfo", "sacct", "scontrol")


def command_wrappers(root: Path) -> None:
    """Wrappers that log each SLURM command run over SSH on the login node to
    ``log/commands.log`` (time, account, command), then run it: benchmarks count them.
    ``sbatch`` runs at the nice value in :func:`jobs_nice_file`, if there is one."""
    bindir = root / "bin"
    bindir.mkdir(exist_ok=True)
    bindir.chmod(0o755)
    log = root / "log" / "commands.log"
    log.touch()
    log.chmod(0o622)  # every account appends; only root reads
    for cmd in COUNTED:
        w = bindir / cmd
        run = f'exec /usr/bin/{cmd} "$@"\n'
        if cmd == "sbatch":  # the jobs' nice value, when a benchmark asks for one
            run = (
                f"n=$(cat {jobs_nice_file(root)} 2>/dev/null)\n"
                f'case "$n" in [0-9]|1[0-9]) exec nice -n "$n" /usr/bin/sbatch "$@";; esac\n' + run
            )
        tmp = bindir / f".{cmd}.new"  # replaced whole: an sbatch running now reads either
        tmp.write_text(
            "#!/bin/sh\n"
            f'printf "%s %s {cmd}\\n" "$(date +%s.%N)" "$(id -un)" >> {log} 2>/dev/null\n' + run
        )
        tmp.chmod(0o755)
        tmp.replace(w)
    # a benchmark that was killed may have left its jobs' nice value: the cluster's own
    # jobs (tests, the demo) run as SLURM starts them
    jobs_nice_file(root).unlink(missing_ok=True)


def jobs_nice_file(root: Path = ROOT) -> Path:
    """Where a benchmark puts the nice value (0-19) at which the login node's ``sbatch``
    runs, and so, through SLURM's ``PropagatePrioProcess=1``, the jobs it submits: the
    jobs can be niced without the login node's sshd and the other commands."""
    return root / "jobs_nice"


def command_counts(root: Path = ROOT, since: float = 0.0) -> dict[str, int]:
    """How many times each wrapped SLURM command ran since ``since`` (epoch seconds)."""
    counts = dict.fromkeys(COUNTED, 0)
    path = root / "log" / "commands.log"
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and float(parts[0]) >= since and parts[2] in counts:
            counts[parts[2]] += 1
    return counts


def ensure_workshop_repo(root: Path) -> Path:
    bare = root / "workshop.git"
    # job users clone a root-owned repository: tell git that is fine (scratch machine)
    safe = subprocess.run(
        ["git", "config", "--system", "--get-all", "safe.directory"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if str(bare) not in safe:
        run(["git", "config", "--system", "--add", "safe.directory", str(bare)])
    if (bare / "HEAD").exists():
        return bare
    src = Path(__file__).parent / "localcluster_data" / "workshop"
    work = root / "workshop-src"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    git = [
        "git",
        "-C",
        str(work),
        "-c",
        "user.name=xsedehub",
        "-c",
        "user.email=demo@xsedehub.invalid",
    ]
    run(git[:3] + ["init", "-q", "-b", "main"])
    run(git + ["add", "."])
    run(git + ["commit", "-q", "-m", "Workshop notebooks"])
    run(["git", "clone", "-q", "--bare", str(work), str(bare)])
    shutil.rmtree(work)
    run(["chmod", "-R", "a+rX", str(bare)])
    return bare
