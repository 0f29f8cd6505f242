"""Clusters: the systems one hub starts servers on (``SlurmSSHSpawner.clusters``).

A cluster is what today's single-cluster settings describe: its login node (host, port,
host-key file, SLURM's command directory), its partitions with their limits, its
accounts, the hub's tunnel as that cluster's compute nodes reach it (host, port, host
key, the tunnel account's key file and port range), the job's Python and directories,
and who the hub logs in as there (gateway mode: the gateway account and key; xsede
mode: optionally a site account, and the certificate issuer that maps a person to
their account on that cluster).

Pure: :func:`parse_clusters` turns the configuration into :class:`ClusterSpec` objects
or raises :class:`ClusterProblems`, which names every problem with its path
(``clusters.expanse.partitions.gpu.max_gpus``).  Every key a cluster leaves out is the
spawner's top-level setting of the same name, so shared settings are written once;
without ``clusters`` the top-level settings are the one cluster, :data:`DEFAULT`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from . import validate as v
from .form import PartitionSpec

#: the name of the one cluster of a hub configured without ``clusters``
DEFAULT = "default"

#: per-cluster settings: each a ``SlurmSSHSpawner`` trait of the same name, its default
SETTINGS = (
    "login_host",
    "login_port",
    "known_hosts",
    "slurm_bin_dir",
    "partition",
    "partitions",
    "accounts",
    "account",
    "qos",
    "tunnel_host",
    "tunnel_port",
    "tunnel_known_hosts",
    "tunnel_authorized_keys",
    "tunnel_port_range",
    "cmd",
    "gitpuller",
    "walltime_extend_command",
    "job_python",
    "job_dir_root",
    "gateway_workdir_root",
    "xsede_workdir",
    "gateway_user",
    "gateway_key",
    "site_user",
    "site_key",
)
#: what only a cluster entry has (no top-level trait)
OWN_KEYS = (
    "display_name",
    "description",
    "issuer_url",
    "issuer_secret_file",
    "login_certificate",
)
KEYS = (*OWN_KEYS, *SETTINGS)
#: partition keys (``SlurmSSHSpawner.partitions``)
PARTITION_KEYS = tuple(f.name for f in fields(PartitionSpec) if f.name != "name")


class ClusterProblems(v.InvalidValue):
    """Every problem of ``SlurmSSHSpawner.clusters`` (``problems``), each naming its path."""

    def __init__(self, problems: Sequence[v.InvalidValue]):
        super().__init__(problems[0].field, "; ".join(str(p) for p in problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class ClusterSpec:
    """One cluster, every setting checked.  :meth:`settings` gives them by trait name."""

    name: str
    display_name: str
    description: str
    login_host: str
    login_port: int
    known_hosts: str
    slurm_bin_dir: str
    partition: str
    partitions: Mapping[str, Any]  # as configured; :attr:`partition_specs` checked
    partition_specs: tuple[PartitionSpec, ...]
    accounts: tuple[str, ...]
    account: str
    qos: str
    tunnel_host: str
    tunnel_port: int
    tunnel_known_hosts: str
    tunnel_authorized_keys: str
    tunnel_port_range: tuple[int, int]
    cmd: tuple[str, ...]
    gitpuller: str
    walltime_extend_command: tuple[str, ...]
    job_python: str
    job_dir_root: str
    gateway_workdir_root: str
    xsede_workdir: str
    gateway_user: str
    gateway_key: str
    site_user: str
    site_key: str
    issuer_url: str = ""
    issuer_secret_file: str = ""
    #: xsede mode, no issuer of its own: the login's certificate is presented here
    #: (the login issuer's account names are this cluster's too), by the admin's say-so
    login_certificate: bool = False

    def settings(self) -> dict[str, Any]:
        """The spawner traits this cluster sets, by name (see :data:`SETTINGS`)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in SETTINGS}
        out["partitions"] = dict(self.partitions)
        for key in ("accounts", "cmd", "walltime_extend_command"):
            out[key] = list(getattr(self, key))
        return out


def _int(value: object, at: str, low: int, high: int) -> int:
    return v.positive_int(value, at, low=low, high=high)


def partition_spec(name: object, spec: object, at: str) -> tuple[PartitionSpec, list]:
    """One partition, each value checked with its path (``<at>.<name>.<key>``)."""
    problems: list[v.InvalidValue] = []
    try:
        pname = v.slurm_name(name, at)
    except v.InvalidValue as e:
        return PartitionSpec("invalid"), [v.InvalidValue(f"{at}[{str(name)[:40]!r}]", e.message)]
    here = f"{at}.{pname}"
    if not isinstance(spec, Mapping):
        return PartitionSpec(pname), [v.InvalidValue(here, "must be a dict")]
    unknown = sorted(str(k) for k in spec if k not in PARTITION_KEYS)
    if unknown:
        problems.append(
            v.InvalidValue(here, f"unknown keys {unknown} (known: {', '.join(PARTITION_KEYS)})")
        )
    kw: dict[str, Any] = {"name": pname}
    for key in PARTITION_KEYS:
        if key not in spec:
            continue
        val, where = spec[key], f"{here}.{key}"
        try:
            if key == "description":
                kw[key] = v._text(where, val, 1024)
            elif key.endswith("walltime"):
                kw[key] = v.walltime_minutes(val, where)
            elif key.endswith("memory"):
                kw[key] = v.memory_mb(val, where)
            else:
                kw[key] = v.positive_int(val, where, low=0, high=1 << 20)
        except v.InvalidValue as e:
            problems.append(e)
    part = PartitionSpec(**kw)
    for what in ("walltime", "cores", "memory"):
        if getattr(part, f"default_{what}") > getattr(part, f"max_{what}"):
            problems.append(v.InvalidValue(f"{here}.default_{what}", f"is above {here}.max_{what}"))
    return part, problems


def _one(name: object, entry: object, base: Mapping[str, Any], mode: str) -> ClusterSpec:
    """One cluster entry, its missing keys taken from ``base`` (the top-level settings)."""
    try:
        cname = v.slurm_name(name, "clusters")
    except v.InvalidValue as e:
        raise ClusterProblems(
            [v.InvalidValue(f"clusters[{str(name)[:40]!r}]", e.message)]
        ) from None
    at = f"clusters.{cname}"
    if not isinstance(entry, Mapping):
        raise ClusterProblems([v.InvalidValue(at, "must be a dict")])
    problems: list[v.InvalidValue] = []
    unknown = sorted(str(k) for k in entry if k not in KEYS)
    if unknown:
        problems.append(v.InvalidValue(at, f"unknown keys {unknown} (known: {', '.join(KEYS)})"))
    raw = {k: entry.get(k, base.get(k)) for k in SETTINGS}
    out: dict[str, Any] = {"name": cname}

    def check(key: str, fn: Any) -> None:
        try:
            out[key] = fn(raw[key] if key in raw else entry.get(key, ""), f"{at}.{key}")
        except v.InvalidValue as e:
            problems.append(e)
        except (TypeError, ValueError) as e:  # a value of the wrong type
            problems.append(v.InvalidValue(f"{at}.{key}", str(e)))

    def text(limit: int) -> Any:
        return lambda val, where: v._text(where, "" if val is None else val, limit)

    def required(fn: Any) -> Any:
        def inner(val: object, where: str) -> Any:
            if val in ("", None):
                raise v.InvalidValue(where, "is not set")
            return fn(val, where)

        return inner

    def optional(fn: Any) -> Any:
        return lambda val, where: "" if val in ("", None) else fn(val, where)

    check("display_name", lambda val, where: v._text(where, val or cname, 128) or cname)
    check("description", text(1024))
    check("login_host", required(v.host))
    check("login_port", lambda val, where: _int(val, where, 1, 65535))
    check("known_hosts", required(v.absolute_path))
    check("slurm_bin_dir", v.absolute_path)
    check("tunnel_host", required(v.host))
    check("tunnel_port", lambda val, where: _int(val, where, 1, 65535))
    check("tunnel_known_hosts", required(v.absolute_path))
    check("tunnel_authorized_keys", required(v.absolute_path))
    check("job_python", required(text(1024)))
    check("job_dir_root", lambda val, where: v.relative_path(val, where, hidden=True))
    check("gateway_workdir_root", lambda val, where: v.relative_path(val, where, hidden=True))
    check(
        "xsede_workdir",
        lambda val, where: val if val in ("", ".") else v.relative_path(val, where, hidden=True),
    )
    check("gateway_user", v.posix_username)
    check("gateway_key", required(v.absolute_path) if mode == "gateway" else optional(text(1024)))
    check("site_user", optional(v.posix_username))
    check("site_key", optional(v.absolute_path))
    check("issuer_url", optional(text(2048)))
    check("issuer_secret_file", optional(v.absolute_path))
    check("qos", optional(lambda val, where: v.slurm_name(val, where)))
    check("account", optional(lambda val, where: v.slurm_name(val, where)))

    def port_range(val: object, where: str) -> tuple[int, int]:
        if isinstance(val, str) or not isinstance(val, list | tuple) or len(val) != 2:
            raise v.InvalidValue(where, "must be two ports [first, last]")
        lo = _int(val[0], f"{where}[0]", 1024, 65535)
        hi = _int(val[1], f"{where}[1]", 1024, 65535)
        if lo > hi:
            raise v.InvalidValue(where, f"first port {lo} is above last port {hi}")
        return lo, hi

    check("tunnel_port_range", port_range)

    def accounts(val: object, where: str) -> tuple[str, ...]:
        if isinstance(val, str) or not isinstance(val, list | tuple):
            raise v.InvalidValue(where, "must be a list")
        return tuple(v.slurm_name(a, f"{where}[{i}]") for i, a in enumerate(val))

    check("accounts", accounts)

    def argv(val: object, where: str) -> tuple[str, ...]:
        if isinstance(val, str) or not isinstance(val, list | tuple):
            raise v.InvalidValue(where, "must be a list (an argv)")
        words = tuple(v._text(f"{where}[{i}]", w, 1024) for i, w in enumerate(val))
        if any(not w for w in words):
            raise v.InvalidValue(where, "has an empty word")
        return words

    def command(val: object, where: str) -> tuple[str, ...]:
        words = argv(val, where)
        if not words:
            raise v.InvalidValue(where, "is empty")
        return words

    check("cmd", command)
    check("gitpuller", required(text(1024)))
    check("walltime_extend_command", argv)
    if mode == "xsede" and bool(out.get("issuer_url")) != bool(out.get("issuer_secret_file")):
        problems.append(v.InvalidValue(f"{at}.issuer_secret_file", "issuer_url and it go together"))
    own = entry.get("login_certificate", False)
    if not isinstance(own, bool):
        problems.append(v.InvalidValue(f"{at}.login_certificate", "must be True or False"))
    elif mode != "xsede" and own:
        problems.append(v.InvalidValue(f"{at}.login_certificate", "is for xsede mode only"))
    elif mode == "xsede" and own and out.get("issuer_url"):
        problems.append(
            v.InvalidValue(f"{at}.login_certificate", "and issuer_url exclude each other")
        )
    elif mode == "xsede" and not own and not out.get("issuer_url"):
        # a person's account name at one site may be another person's at the next
        problems.append(
            v.InvalidValue(
                f"{at}.issuer_url",
                "is not set: give the cluster its own certificate issuer, or set "
                "login_certificate: True if the login certificate's account names are "
                "this cluster's too",
            )
        )
    out["login_certificate"] = own is True
    if mode != "xsede" and out.get("issuer_url"):
        problems.append(v.InvalidValue(f"{at}.issuer_url", "is for xsede mode only"))
    if mode == "xsede" and out.get("issuer_url"):
        from xsedehub.auth.issuer_client import issuer_url_problems

        for why in issuer_url_problems(out["issuer_url"], True):
            problems.append(v.InvalidValue(f"{at}.issuer_url", why))
    if bool(out.get("site_user")) != bool(out.get("site_key")):
        problems.append(v.InvalidValue(f"{at}.site_key", "site_user and site_key go together"))

    # partitions: as the top level's (its own, or the top level's when left out)
    parts = raw["partitions"] or {}
    specs: list[PartitionSpec] = []
    if not isinstance(parts, Mapping):
        problems.append(v.InvalidValue(f"{at}.partitions", "must be a dict"))
        parts = {}
    for pname, pspec in parts.items():
        part, found = partition_spec(pname, pspec, f"{at}.partitions")
        specs.append(part)
        problems += found
    try:
        default = v.slurm_name(raw["partition"], f"{at}.partition")
        if parts and default not in parts and "partition" in entry:
            problems.append(
                v.InvalidValue(f"{at}.partition", f"{default!r} is not one of {sorted(parts)}")
            )
        out["partition"] = default
    except v.InvalidValue as e:
        problems.append(e)
    if problems:
        raise ClusterProblems(problems)
    return ClusterSpec(
        partitions=dict(parts), partition_specs=tuple(specs), qos=out.pop("qos") or "", **out
    )


_LISTS = ("accounts", "cmd", "walltime_extend_command")


def _base_spec(base: Mapping[str, Any], mode: str) -> ClusterSpec:
    """The one cluster of a hub without ``clusters``: the top-level settings as they are
    (checked where the spawner uses them, as before)."""
    return ClusterSpec(
        name=DEFAULT,
        display_name=str(base.get("login_host") or DEFAULT),
        description="",
        login_certificate=True,
        partition_specs=(),
        **{k: base.get(k) for k in SETTINGS if k not in _LISTS},
        **{k: tuple(base.get(k) or ()) for k in _LISTS},
    )


def parse_clusters(
    config: Mapping[str, object], base: Mapping[str, Any], mode: str = "gateway"
) -> list[ClusterSpec]:
    """``SlurmSSHSpawner.clusters`` -> clusters, in the configuration's order (the first
    is the default one), or :class:`ClusterProblems` with every problem found.  Empty:
    the one cluster the top-level settings (``base``, trait name -> value) describe."""
    if not isinstance(config, Mapping):
        raise ClusterProblems([v.InvalidValue("clusters", "must be a dict")])
    if not config:
        return [_base_spec(base, mode)]
    out: list[ClusterSpec] = []
    problems: list[v.InvalidValue] = []
    for name, entry in config.items():
        try:
            out.append(_one(name, entry, base, mode))
        except ClusterProblems as e:
            problems += e.problems
    problems += _across(out)
    if problems:
        raise ClusterProblems(problems)
    return out


def _across(clusters: Sequence[ClusterSpec]) -> list[v.InvalidValue]:
    """What two clusters may not share: a login node (the hub's records of jobs name the
    cluster by it), or overlapping tunnel ports in different key files (each file hands
    out its ports without seeing the other's)."""
    problems: list[v.InvalidValue] = []
    for i, b in enumerate(clusters):
        for a in clusters[:i]:
            if (a.login_host, a.login_port) == (b.login_host, b.login_port):
                problems.append(
                    v.InvalidValue(
                        f"clusters.{b.name}.login_host",
                        f"{b.login_host}:{b.login_port} is cluster {a.name}'s login node too",
                    )
                )
            if a.tunnel_authorized_keys == b.tunnel_authorized_keys:
                if a.tunnel_port_range != b.tunnel_port_range:
                    problems.append(
                        v.InvalidValue(
                            f"clusters.{b.name}.tunnel_port_range",
                            f"differs from cluster {a.name}'s, which shares its key file "
                            f"{a.tunnel_authorized_keys}",
                        )
                    )
            elif (
                a.tunnel_port_range[0] <= b.tunnel_port_range[1]
                and b.tunnel_port_range[0] <= a.tunnel_port_range[1]
            ):
                problems.append(
                    v.InvalidValue(
                        f"clusters.{b.name}.tunnel_port_range",
                        f"overlaps cluster {a.name}'s ({a.tunnel_port_range[0]}-"
                        f"{a.tunnel_port_range[1]}), whose keys are in another file",
                    )
                )
    return problems


def by_name(clusters: Sequence[ClusterSpec], name: object, field: str = "cluster") -> ClusterSpec:
    """The cluster called ``name`` (empty: the first), or :class:`~.validate.InvalidValue`."""
    if name in ("", None):
        return clusters[0]
    for c in clusters:
        if c.name == name:
            return c
    names = [c.name for c in clusters]
    raise v.InvalidValue(field, f"{str(name)[:40]!r} is not one of the clusters ({names})")
