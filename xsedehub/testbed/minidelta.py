"""The second local cluster, "minidelta": independent of the mini-Comet in every part.

One hub, several clusters (issue 16) needs a second site to drive.  ``xsedehub cluster
up`` brings this one up next to the mini-Comet, and ``down`` takes it away with it:

* network namespace ``xh-cluster2`` (10.200.1.2), joined to the hub's namespace by its
  own veth pair (the hub's end is 10.200.1.1); one host route leads to the hub's sshd
  (10.200.0.1) and nothing leads to the mini-Comet: namespaces do not forward;
* a mount namespace, kept at ``/run/xsedehub-mntns/xh-cluster2``, that this cluster's
  slurmctld, slurmd and sshd (and so every login session and job) run in (its munged
  runs on the host, with its own key and socket, which the namespace's
  ``/run/munge`` shows).  It shows this cluster's
  own ``/home`` and ``/tmp`` (both under ``<root>/minidelta/private``, a root-only
  directory on the host, so the mini-Comet's accounts cannot open them either), its own
  ``/etc/slurm`` and its own ``/run/munge``.  The accounts (``gateway``, ``alice``,
  ``bob``) are the machine's, as the mini-Comet's are: the same names, as the hub
  expects, with homes of their own;
* its own munge key and munged (socket ``<root>/minidelta/run/munge/munge.socket.2``,
  named in ``slurm.conf`` as ``AuthInfo=socket=...``), slurmctld (``ClusterName=
  minidelta``, port 6917, its own state, spool and logs), one slurmd (``dnode1``), and a
  login sshd with its own host key (a plain key: the mini-Comet presents a certificate)
  whose sessions get ``SLURM_CONF`` and the PATH of this cluster's counting wrappers.

The hub's tunnel sshd, its host certificate and its tunnel account are the hub's own and
serve both clusters.  The user CA and the hub's key for the shared ``gateway`` account
are the ones the mini-Comet trusts: one issuer and one hub key, registered at each site.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .. import gatewaysetup
from .clusterconf import GATEWAY_USER, HUB_IP, HUB_NS, RESEARCHERS, SSH_PORT, command_wrappers
from .clusterconf import run as _run
from .netns import netns_path

NAME = "minidelta"
NS = "xh-cluster2"
HUB_SIDE_IP, LOGIN_IP = "10.200.1.1", "10.200.1.2"
VETH_HUB, VETH_CLUSTER = "xh-veth-h2", "xh-veth-c2"
SLURMCTLD_PORT = 6917
NODES = {"dnode1": 17101}
NODE_CPUS, NODE_MEM_MB = 64, 16000
#: partition -> MaxTime; the first is the default
PARTITIONS = {"shared": "04:00:00", "debug": "00:30:00"}
#: a private mount that holds the mount namespace's file (unshare refuses a shared one)
MNT_DIR = Path("/run/xsedehub-mntns")
MNT_NS = MNT_DIR / NS


def site_root(root: Path) -> Path:
    return root / NAME


def slurm_conf_path(root: Path) -> Path:
    return site_root(root) / "etc" / "slurm" / "slurm.conf"


def munge_socket(root: Path) -> Path:
    return site_root(root) / "run" / "munge" / "munge.socket.2"


def home_root(root: Path) -> Path:
    """Where this cluster's homes are on the host (its ``/home`` inside)."""
    return site_root(root) / "private" / "home"


def gateway_keys_file(root: Path) -> Path:
    return site_root(root) / "etc" / f"{GATEWAY_USER}.keys"


def host_key(root: Path) -> Path:
    return site_root(root) / "keys" / "login_host_ed25519"


def known_hosts(root: Path) -> Path:
    return site_root(root) / "known_hosts"


def pid_files(root: Path) -> dict[str, Path]:
    """Keys are ``minidelta:<daemon>``, as ``stop_daemon`` takes them."""
    run = site_root(root) / "run"
    files = {
        f"{NAME}:munged": run / "munge" / "munged.pid",
        f"{NAME}:slurmctld": run / "slurmctld.pid",
        f"{NAME}:sshd_login": run / "sshd_login.pid",
    }
    for node in NODES:
        files[f"{NAME}:slurmd_{node}"] = run / f"slurmd-{node}.pid"
    return files


def in_cluster(argv: list[str], root: Path) -> list[str]:
    """argv prefix that runs a command inside this cluster (its network and mounts)."""
    return [
        "nsenter",
        f"--net={netns_path(NS)}",
        f"--mount={MNT_NS}",
        "env",
        f"SLURM_CONF={slurm_conf_path(root)}",
        *argv,
    ]


# --------------------------------------------------------------------------- files
def _install_dirs(owner: str, mode: str, *paths: Path) -> None:
    _run(["install", "-d", "-o", owner, "-g", owner, "-m", mode, *map(str, paths)])


def prepare(root: Path, keys: dict[str, Path]) -> None:
    """Every file this cluster's daemons read (idempotent): directories, homes, munge
    key, host key, known_hosts, the gateway account's keys file, slurm.conf, sshd config
    and the counting wrappers.  ``keys`` are the mini-Comet's (user CA, hub key)."""
    r = site_root(root)
    for d in ("etc/slurm", "keys", "run", "log", "slurmd", "lib"):
        (r / d).mkdir(parents=True, exist_ok=True)
    for d in (r, r / "etc", r / "etc" / "slurm", r / "run", r / "log", r / "lib"):
        d.chmod(0o755)
    _install_dirs("root", "700", r / "private")
    _install_dirs("root", "755", home_root(root))
    _install_dirs("root", "1777", r / "private" / "tmp")
    for user in (GATEWAY_USER, *RESEARCHERS):
        _install_dirs(user, "700", home_root(root) / user)
    _install_dirs("munge", "700", r / "etc" / "munge", r / "log" / "munge")
    _install_dirs("munge", "711", r / "lib" / "munge")
    _install_dirs("munge", "755", r / "run" / "munge")
    _install_dirs("slurm", "755", r / "slurmctld")
    for node in NODES:
        (r / "slurmd" / node).mkdir(parents=True, exist_ok=True)
    key = r / "etc" / "munge" / "munge.key"
    if not key.exists():
        _run(["mungekey", "--create", f"--keyfile={key}"])
        _run(["chown", "munge:munge", str(key)])
        key.chmod(0o600)
    hk = host_key(root)
    if not hk.exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{NAME}-login", "-f", str(hk)])
    hk.chmod(0o600)
    (r / "keys").chmod(0o711)
    pub = Path(f"{hk}.pub").read_text().split()
    kh = known_hosts(root)
    kh.write_text(f"{LOGIN_IP} {pub[0]} {pub[1]}\n")
    kh.chmod(0o644)
    # the hub's key for the shared account, from the address this cluster sees it at
    gw_pub = Path(f"{keys['gateway']}.pub").read_text()
    gk = gateway_keys_file(root)
    gk.write_text(gatewaysetup.keys_line(gw_pub, HUB_SIDE_IP) + "\n")
    gk.chmod(0o644)
    write_slurm_conf(root)
    sshd_conf(root, keys)
    command_wrappers(r)


def write_slurm_conf(root: Path) -> None:
    r = site_root(root)
    run = r / "run"
    lines = [
        "# written by xsedehub cluster up: the second local cluster",
        f"ClusterName={NAME}",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={SLURMCTLD_PORT}",
        "SlurmUser=slurm",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={munge_socket(root)}",
        "CredType=cred/munge",
        f"StateSaveLocation={r}/slurmctld",
        f"SlurmdSpoolDir={r}/slurmd/%n",
        f"SlurmctldPidFile={run}/slurmctld.pid",
        f"SlurmdPidFile={run}/slurmd-%n.pid",
        f"SlurmctldLogFile={r}/log/slurmctld.log",
        f"SlurmdLogFile={r}/log/slurmd-%n.log",
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
        "InactiveLimit=0",
        "SchedulerParameters=sched_min_interval=100000",
    ]
    for node, port in NODES.items():
        lines.append(
            f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={NODE_CPUS} RealMemory={NODE_MEM_MB} State=UNKNOWN"
        )
    nodes = ",".join(NODES)
    for i, (part, max_time) in enumerate(PARTITIONS.items()):
        default = " Default=YES" if i == 0 else ""
        lines.append(f"PartitionName={part} Nodes={nodes}{default} MaxTime={max_time} State=UP")
    slurm_conf_path(root).write_text("\n".join(lines) + "\n")
    slurm_conf_path(root).chmod(0o644)


def sshd_conf(root: Path, keys: dict[str, Path]) -> Path:
    r = site_root(root)
    hk = host_key(root)
    conf = r / "sshd_login.conf"
    conf.write_text(
        "\n".join(
            [
                f"Port {SSH_PORT}",
                f"ListenAddress {LOGIN_IP}",
                f"HostKey {hk}",
                f"PidFile {r}/run/sshd_login.pid",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM yes",
                "PermitRootLogin no",
                "LogLevel VERBOSE",
                # this cluster's SLURM, through its own counting wrappers
                f"SetEnv PATH={r}/bin:/usr/local/bin:/usr/bin:/bin "
                f"SLURM_CONF={slurm_conf_path(root)}",
                f"TrustedUserCAKeys {keys['user_ca']}.pub",
                "AuthorizedKeysFile .ssh/authorized_keys",
                f"AllowUsers {GATEWAY_USER} {' '.join(RESEARCHERS)}",
                "Subsystem sftp internal-sftp",
                "AllowTcpForwarding no",
                "X11Forwarding no",
                *gatewaysetup.sshd_block(GATEWAY_USER, str(gateway_keys_file(root))).splitlines(),
            ]
        )
        + "\n"
    )
    return conf


# --------------------------------------------------------------------------- namespaces
def setup_namespaces(root: Path) -> None:
    """The network namespace with its veth pair to the hub, then the mount namespace."""
    if not Path(netns_path(NS)).exists():
        _run(["ip", "netns", "add", NS])
    have = subprocess.run(
        ["ip", "-n", HUB_NS, "link", "show", VETH_HUB], capture_output=True, check=False
    )
    if have.returncode:
        # made in the hub's namespace whatever namespace the caller is in (a test's is
        # the hub's), the peer straight in this cluster's
        _run(
            ["ip", "-n", HUB_NS, "link", "add", VETH_HUB, "type", "veth"]
            + ["peer", "name", VETH_CLUSTER, "netns", NS]
        )
        _run(["ip", "-n", HUB_NS, "addr", "add", f"{HUB_SIDE_IP}/24", "dev", VETH_HUB])
        _run(["ip", "-n", NS, "addr", "add", f"{LOGIN_IP}/24", "dev", VETH_CLUSTER])
    _run(["ip", "-n", NS, "link", "set", "lo", "up"])
    _run(["ip", "-n", NS, "link", "set", VETH_CLUSTER, "up"])
    _run(["ip", "-n", HUB_NS, "link", "set", VETH_HUB, "up"])
    # the hub's sshd (reverse tunnels) and nothing else: no default route
    _run(["ip", "-n", NS, "route", "replace", f"{HUB_IP}/32", "via", HUB_SIDE_IP])
    setup_mount_ns(root)


def _dir_bound() -> bool:
    """MNT_DIR is a mount point (os.path.ismount misses a directory bound onto itself:
    the same device)."""
    points = (ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines())
    return str(MNT_DIR) in points


def mounted() -> bool:
    """The mount namespace's file is there (an nsfs file: another device than its
    directory's; the path as it resolves now, not a mount hidden under another)."""
    return os.path.ismount(MNT_NS)


def setup_mount_ns(root: Path) -> None:
    MNT_DIR.mkdir(mode=0o755, exist_ok=True)
    if not _dir_bound():
        _run(["mount", "--bind", str(MNT_DIR), str(MNT_DIR)])
        _run(["mount", "--make-private", str(MNT_DIR)])
    if mounted():
        return
    MNT_NS.touch()
    r = site_root(root)
    binds = [
        (slurm_conf_path(root).parent, "/etc/slurm"),
        (r / "run" / "munge", "/run/munge"),
        (home_root(root), "/home"),
        (r / "private" / "tmp", "/tmp"),
    ]
    script = " && ".join(f'mount --bind "${i * 2 + 1}" "${i * 2 + 2}"' for i in range(len(binds)))
    argv = ["unshare", f"--mount={MNT_NS}", "--propagation=slave", "--", "sh", "-c", script]
    try:
        _run([*argv, "sh", *(str(p) for pair in binds for p in pair)])
    except Exception:
        remove_mount_ns()
        raise


def remove_mount_ns() -> None:
    """Unmount the namespace's file (the namespace ends with its last process) and the
    private directory it sits in, the top mount first, as many times as each is mounted."""
    for _ in range(50):
        if mounted():
            _run(["umount", str(MNT_NS)])
        elif _dir_bound():
            _run(["umount", str(MNT_DIR)])
        else:
            break
    MNT_NS.unlink(missing_ok=True)


# --------------------------------------------------------------------------- daemons
def start(root: Path, alive) -> None:
    """Start what of this cluster does not run (``alive``: the pid-file check)."""
    r = site_root(root)
    pids = pid_files(root)
    if not alive(pids[f"{NAME}:munged"]):
        _run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                "--force",
                f"--socket={munge_socket(root)}",
                f"--key-file={r}/etc/munge/munge.key",
                f"--pid-file={pids[f'{NAME}:munged']}",
                f"--log-file={r}/log/munge/munged.log",
                f"--seed-file={r}/lib/munge/munged.seed",
            ]
        )
    conf = str(slurm_conf_path(root))
    if not alive(pids[f"{NAME}:slurmctld"]):
        _run(in_cluster(["/usr/sbin/slurmctld", "-f", conf], root))
    for node in NODES:
        if not alive(pids[f"{NAME}:slurmd_{node}"]):
            _run(in_cluster(["/usr/sbin/slurmd", "-f", conf, "-N", node], root))
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd_pid = pids[f"{NAME}:sshd_login"]
    if alive(sshd_pid):
        os.kill(int(sshd_pid.read_text().split()[0]), 1)  # SIGHUP: re-read the config
    else:
        sshd = ["/usr/sbin/sshd", "-f", str(r / "sshd_login.conf")]
        _run(in_cluster([*sshd, "-E", f"{r}/log/sshd_login.log"], root))


def restart_slurmd(root: Path, node: str) -> None:
    _run(in_cluster(["/usr/sbin/slurmd", "-f", str(slurm_conf_path(root)), "-N", node], root))


def info(root: Path, keys: dict[str, Path]) -> dict[str, object]:
    """This cluster's entry in cluster.json (the shape of :class:`SiteInfo`)."""
    r = site_root(root)
    return {
        "name": NAME,
        "netns": NS,
        "mount_ns": str(MNT_NS),
        "login_ip": LOGIN_IP,
        "login_port": SSH_PORT,
        "hub_ip": HUB_IP,
        "hub_seen_as": HUB_SIDE_IP,
        "known_hosts": str(known_hosts(root)),
        "host_key": f"{host_key(root)}.pub",
        "user_ca_key": str(keys["user_ca"]),
        "gateway_user": GATEWAY_USER,
        "gateway_key": str(keys["gateway"]),
        "gateway_keys_file": str(gateway_keys_file(root)),
        "researchers": list(RESEARCHERS),
        "slurm_conf": str(slurm_conf_path(root)),
        "slurm_bin": str(r / "bin"),
        "munge_socket": str(munge_socket(root)),
        "home_root": str(home_root(root)),
        "partitions": {
            p: {"max_walltime": t, "cpus_per_node": NODE_CPUS} for p, t in PARTITIONS.items()
        },
        "default_partition": next(iter(PARTITIONS)),
        "nodes": list(NODES),
        "pid_files": {k: str(v) for k, v in pid_files(root).items()},
        "commands_log": str(r / "log" / "commands.log"),
    }
