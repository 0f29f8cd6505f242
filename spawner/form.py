"""The spawn form: partitions with their limits, live availability, and validation.

Pure functions (no I/O): :func:`validate_options` is the one gate every spawn goes
through, whether its options come from the form, the URL's query or the REST API
(:func:`validate_for` applies it with a spawner's settings); :func:`render_form` builds
the HTML (:func:`form_for`: with a spawner's settings, or no form when there is nothing
to choose); :func:`parse_sinfo` reads availability.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from . import profiles as prof
from . import slurm
from . import validate as v

#: the options a spawn may have ("profile" only on a hub with profiles)
FIELDS = ("profile", "partition", "walltime", "cores", "memory", "gpus", "account")


@dataclass(frozen=True)
class PartitionSpec:
    """What a partition allows and what the form proposes (from ``SlurmSSHSpawner.partitions``)."""

    name: str
    description: str = ""
    max_walltime: int = 8 * 60  # minutes
    max_cores: int = 16
    max_memory: int = 64 * 1024  # MB
    max_gpus: int = 0
    default_walltime: int = 60
    default_cores: int = 1
    default_memory: int = 2048

    @classmethod
    def from_config(cls, name: str, spec: Mapping[str, object]) -> PartitionSpec:
        v.slurm_name(name, "partitions")
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = set(spec) - known
        if unknown:
            raise v.InvalidValue(f"partitions[{name!r}]", f"unknown keys {sorted(unknown)}")
        kw: dict[str, object] = {"name": name}
        for key, val in spec.items():
            if key == "description":
                kw[key] = str(val)
            elif key.endswith("walltime"):
                kw[key] = v.walltime_minutes(val, f"partitions[{name!r}].{key}")
            elif key.endswith("memory"):
                kw[key] = v.memory_mb(val, f"partitions[{name!r}].{key}")
            else:
                kw[key] = v.positive_int(val, f"partitions[{name!r}].{key}", low=0)
        return cls(**kw)  # type: ignore[arg-type]


def validate_options(
    options: Mapping[str, object],
    partitions: Sequence[PartitionSpec],
    *,
    default_partition: str,
    accounts: Sequence[str] = (),
    allow_account: bool = False,
    default_account: str | None = None,
    qos: str | None = None,
    profiles: Sequence[prof.Profile] = (),
    user: str | None = None,
    groups: Sequence[str] = (),
) -> slurm.JobResources:
    """``user_options`` -> job resources, or :class:`~.validate.InvalidValue` naming the field."""
    return choose(
        options,
        partitions,
        default_partition=default_partition,
        accounts=accounts,
        allow_account=allow_account,
        default_account=default_account,
        qos=qos,
        profiles=profiles,
        user=user,
        groups=groups,
    ).resources


@dataclass(frozen=True)
class Choice:
    """What a spawn's options come to: the job's resources, the profile chosen (None on a
    hub without profiles) and the limits they were checked against."""

    resources: slurm.JobResources
    profile: prof.Profile | None
    spec: PartitionSpec


def _profile(
    options: Mapping[str, object],
    profiles: Sequence[prof.Profile],
    user: str | None,
    groups: Sequence[str],
) -> prof.Profile:
    """The profile ``options`` name (or the first one the user may use): refused alike
    when it does not exist and when the user may not use it (others' profiles stay
    unseen)."""
    mine = prof.allowed(profiles, user, groups)
    val = options.get("profile")
    if val in ("", None):
        if not mine:
            raise v.InvalidValue("profile", "no profile of this hub is open to you")
        return mine[0]
    name = prof.profile_name(val, "profile")
    for p in mine:
        if p.name == name:
            return p
    raise v.InvalidValue(
        "profile", f"{name!r} is not one of your profiles ({[p.name for p in mine]})"
    )


def choose(
    options: Mapping[str, object],
    partitions: Sequence[PartitionSpec],
    *,
    default_partition: str,
    accounts: Sequence[str] = (),
    allow_account: bool = False,
    default_account: str | None = None,
    qos: str | None = None,
    profiles: Sequence[prof.Profile] = (),
    user: str | None = None,
    groups: Sequence[str] = (),
) -> Choice:
    """:func:`validate_options`, with the profile chosen.  With ``profiles`` the options
    name one (``profile``; default: the first the user may use) and its defaults and
    limits apply; a ``partition`` option must then be the profile's."""
    if not isinstance(options, Mapping):
        raise v.InvalidValue("options", "must be an object")
    fields = FIELDS if profiles else FIELDS[1:]
    unknown = sorted(set(options) - set(fields), key=str)
    if unknown:
        name = repr(unknown[0])[:40]
        raise v.InvalidValue("options", f"{name} is not an option this hub offers ({fields})")
    profile = None
    if profiles:
        profile = _profile(options, profiles, user, groups)
        p = profile.spec
        pname = p.name
        asked = options.get("partition")
        if asked not in ("", None) and v.slurm_name(asked, "partition") != pname:
            raise v.InvalidValue(
                "partition", f"profile {profile.name} runs in partition {pname}, not {asked!r}"
            )
        where = f"profile {profile.name}"
    else:
        by_name = {p.name: p for p in partitions}
        pname = v.slurm_name(options.get("partition", default_partition), "partition")
        if pname not in by_name:
            raise v.InvalidValue(
                "partition", f"{pname!r} is not offered (choose from {sorted(by_name)})"
            )
        p = by_name[pname]
        where = f"partition {pname}"

    def get(field: str, default: object) -> object:
        val = options.get(field, default)
        return default if val in ("", None) else val

    walltime = v.walltime_minutes(get("walltime", p.default_walltime))
    if walltime > p.max_walltime:
        raise v.InvalidValue("walltime", f"at most {v.format_walltime(p.max_walltime)} in {where}")
    cores = v.positive_int(get("cores", p.default_cores), "cores")
    if cores > p.max_cores:
        raise v.InvalidValue("cores", f"at most {p.max_cores} in {where}")
    memory = v.memory_mb(get("memory", p.default_memory))
    if memory > p.max_memory:
        raise v.InvalidValue("memory", f"at most {_memory_text(p.max_memory)} in {where}")
    gpus_default = profile.default_gpus if profile else 0
    gpus = v.positive_int(get("gpus", gpus_default), "gpus", low=0, high=64)
    if gpus > p.max_gpus:
        raise v.InvalidValue("gpus", f"at most {p.max_gpus} in {where}")
    account = options.get("account") or None
    if account is not None:
        if not allow_account:
            raise v.InvalidValue("account", "is not chosen by users on this hub")
        account = v.slurm_name(account, "account")
        if accounts and account not in accounts:
            raise v.InvalidValue("account", f"{account!r} is not one of {list(accounts)}")
    resources = slurm.JobResources(
        partition=pname,
        walltime_minutes=walltime,
        cpus=cores,
        memory_mb=memory,
        gpus=gpus,
        account=account or default_account,
        qos=qos,
        reservation=profile.reservation if profile else None,
    )
    return Choice(resources, profile, p)


# ---------------------------------------------------------------------------- last choices
@dataclass(frozen=True)
class Prefill:
    """The form's values from a server's last accepted options: each one checked again
    against today's limits (``values``, as the form shows them), and a note for each
    one that no longer passes and was left out (``notes``)."""

    values: Mapping[str, str]
    notes: Sequence[str]


def _memory_text(mb: int) -> str:
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


def prefill(
    last: object,
    partitions: Sequence[PartitionSpec],
    *,
    default_partition: str,
    accounts: Sequence[str] = (),
    allow_account: bool = False,
    default_account: str | None = None,
    qos: str | None = None,
    profiles: Sequence[prof.Profile] = (),
    user: str | None = None,
    groups: Sequence[str] = (),
) -> Prefill:
    """What the form proposes after ``last`` (the options of the server's last start).

    Every value goes through :func:`validate_options` again, one at a time, with today's
    partitions (or profiles) and limits: a value that passes is proposed (in its
    canonical form), one that no longer does is left out with a note, so the form falls
    back on the default for it and never submits it unseen.  Values are checked against
    the partition (profile) proposed: the last one if still offered (and open to the
    user), else the default one."""
    if not isinstance(last, Mapping) or not last:
        return Prefill({}, ())
    kw: dict[str, Any] = dict(
        default_partition=default_partition,
        accounts=accounts,
        allow_account=allow_account,
        default_account=default_account,
        qos=qos,
        profiles=profiles,
        user=user,
        groups=groups,
    )
    values: dict[str, str] = {}
    notes: list[str] = []
    fields = FIELDS if profiles else FIELDS[1:]

    def shown(val: object) -> str:
        return repr(val if isinstance(val, str | int) else str(val))[:40]

    for key in sorted((k for k in last if k not in fields), key=str)[:3]:
        notes.append(f"{shown(key)} is not an option this hub offers: left out")
    # each value is checked on its own: the others at their least, never a default (a
    # partition's default may be above a limit the admin lowered since)
    least = {"walltime": 1, "cores": 1, "memory": 1, "gpus": 0}
    choice = "profile" if profiles else "partition"
    if last.get(choice) not in ("", None):
        try:
            c = choose({**least, choice: last[choice]}, partitions, **kw)
            values[choice] = c.profile.name if c.profile else c.resources.partition
        except v.InvalidValue as e:
            instead = "the first of yours" if profiles else default_partition
            notes.append(
                f"{choice} {shown(last[choice])}: {e.message}; {instead} is proposed instead"
            )
    base: dict[str, object] = dict(least)
    if profiles:
        if "profile" in values:
            base["profile"] = values["profile"]
    else:
        base["partition"] = values.get("partition", default_partition)
    for field in ("walltime", "cores", "memory", "gpus", "account"):
        val = last.get(field)
        if val in ("", None):
            continue
        try:
            r = validate_options({**base, field: val}, partitions, **kw)
        except v.InvalidValue as e:
            notes.append(f"{field} {shown(val)}: {e.message}; the default is proposed instead")
            continue
        values[field] = {
            "walltime": v.format_walltime(r.walltime_minutes),
            "cores": str(r.cpus),
            "memory": _memory_text(r.memory_mb),
            "gpus": str(r.gpus),
            "account": r.account or "",
        }[field]
    return Prefill(values, tuple(notes))


def options_from_form(formdata: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Form fields (lists of strings) -> ``user_options`` (strings); nothing else kept."""
    out: dict[str, str] = {}
    for field in FIELDS:
        values = formdata.get(field)
        if values and str(values[0]).strip():
            out[field] = str(values[0]).strip()
    return out


# ---------------------------------------------------------------------------- settings
class FormSettings(Protocol):
    """The spawner's options the form is made of (``SlurmSSHSpawner`` has them)."""

    mode: str
    partitions: dict
    partition: str
    walltime: str
    cores: int
    memory: str
    gpus: int
    accounts: list
    account: str
    allow_account_choice: bool | None
    qos: str


def partition_specs(s: FormSettings) -> list[PartitionSpec]:
    """The partitions offered: :attr:`partitions`, or else :attr:`partition` alone with the
    default resources as its only choice."""
    if s.partitions:
        return [PartitionSpec.from_config(n, spec) for n, spec in s.partitions.items()]
    return _single_partition(s, s.partition)


def _single_partition(s: FormSettings, partition: str) -> list[PartitionSpec]:
    wall = v.walltime_minutes(s.walltime)
    mem = v.memory_mb(s.memory)
    return [
        PartitionSpec(
            name=v.slurm_name(partition, "partition"),
            max_walltime=wall,
            max_cores=s.cores,
            max_memory=mem,
            max_gpus=s.gpus,
            default_walltime=wall,
            default_cores=s.cores,
            default_memory=mem,
        )
    ]


def account_choice(s: FormSettings) -> bool:
    """Whether users choose the account (default: in xsede mode only)."""
    if s.allow_account_choice is None:
        return s.mode == "xsede"
    return s.allow_account_choice


def _default_partition(s: FormSettings, specs: Sequence[PartitionSpec]) -> str:
    return s.partition if any(p.name == s.partition for p in specs) else specs[0].name


def profile_list(s: FormSettings, specs: Sequence[PartitionSpec]) -> list[prof.Profile]:
    """The settings' profiles (:attr:`profiles`; none: the partitions are the choice).
    On a hub with several clusters (``cluster_list``) each profile is checked against
    the partitions of the cluster it names (``cluster``, default: the first one)."""
    config = getattr(s, "profiles", None) or {}
    if not config:
        return []
    if not isinstance(config, Mapping):
        raise prof.ProfileProblems([v.InvalidValue("profiles", "must be a dict")])
    cluster_list = getattr(s, "cluster_list", None)
    if not getattr(s, "clusters", None) or cluster_list is None:
        named = [n for n, spec in config.items() if isinstance(spec, Mapping) and "cluster" in spec]
        if named:
            raise prof.ProfileProblems(
                [
                    v.InvalidValue(f"profiles.{str(n)[:40]}.cluster", "this hub has no clusters")
                    for n in named
                ]
            )
        return prof.parse_profiles(config, specs, _default_partition(s, specs))
    clusters = cluster_list()
    names = [c.name for c in clusters]
    groups: dict[str, dict[object, object]] = {n: {} for n in names}
    problems: list[v.InvalidValue] = []
    for name, spec in config.items():
        where = isinstance(spec, Mapping) and spec.get("cluster")
        if where in ("", None, False):
            where = names[0]
        if where not in groups:
            problems.append(
                v.InvalidValue(
                    f"profiles.{str(name)[:40]}.cluster",
                    f"{str(where)[:40]!r} is not one of the clusters ({names})",
                )
            )
            continue
        groups[where][name] = spec
    by_profile: dict[object, prof.Profile] = {}
    for c in clusters:
        if not groups[c.name]:
            continue
        cspecs = cluster_partition_specs(s, c)
        default = c.partition if any(p.name == c.partition for p in cspecs) else cspecs[0].name
        try:
            for pr in prof.parse_profiles(groups[c.name], cspecs, default):
                by_profile[pr.name] = replace(pr, cluster=c.name)
        except prof.ProfileProblems as e:
            problems += e.problems
    if problems:
        raise prof.ProfileProblems(problems)
    return [by_profile[n] for n in config if n in by_profile]


def cluster_partition_specs(s: FormSettings, cluster: Any) -> list[PartitionSpec]:
    """A cluster's partitions (:class:`.clusters.ClusterSpec`): its own, or else its
    default partition with the settings' default resources as the only choice."""
    if cluster.partitions:
        return [PartitionSpec.from_config(n, spec) for n, spec in cluster.partitions.items()]
    return _single_partition(s, cluster.partition)


def user_of(s: FormSettings) -> tuple[str | None, list[str]]:
    """The name and JupyterHub groups of the user the settings' spawner is for."""
    user = getattr(s, "user", None)
    if user is None:
        return None, []
    return getattr(user, "name", None), sorted(g.name for g in getattr(user, "groups", None) or ())


def _limits(s: FormSettings, specs: Sequence[PartitionSpec]) -> dict[str, Any]:
    """What the settings allow besides the partitions: the checks' keyword arguments."""
    user, groups = user_of(s)
    return {
        "default_partition": _default_partition(s, specs),
        "accounts": s.accounts,
        "allow_account": account_choice(s),
        "default_account": s.account or None,
        "qos": s.qos or None,
        "profiles": profile_list(s, specs),
        "user": user,
        "groups": groups,
    }


def choose_for(s: FormSettings, options: Mapping[str, object]) -> Choice:
    """:func:`choose` with the settings' partitions, profiles, accounts and QOS, for the
    settings' user."""
    specs = partition_specs(s)
    return choose(options, specs, **_limits(s, specs))


def validate_for(s: FormSettings, options: Mapping[str, object]) -> slurm.JobResources:
    """:func:`validate_options` with the settings' partitions, profiles, accounts and QOS."""
    return choose_for(s, options).resources


def prefill_for(s: FormSettings, last: object) -> Prefill:
    """:func:`prefill` with the settings' partitions, profiles, accounts and QOS."""
    specs = partition_specs(s)
    return prefill(last, specs, **_limits(s, specs))


#: the option of the home page's "Start again as last time" link (``?opt-relaunch=last``
#: on the server's spawn page; JupyterHub passes it to ``options_from_form``)
RELAUNCH_FIELD = "relaunch"


def relaunch_options(s: FormSettings, last: object) -> dict[str, str]:
    """The options of "start again as last time": the server's last options, if every
    one of them still passes today's limits; otherwise :class:`~.validate.InvalidValue`
    saying what no longer fits (the form then shows them, pre-filled, with the notes)."""
    p = prefill_for(s, last)
    if not p.values:
        raise v.InvalidValue("relaunch", "this server has no earlier choices to start with")
    if p.notes:
        raise v.InvalidValue(
            "relaunch",
            "your last choices no longer all fit this hub's limits ("
            + "; ".join(p.notes)
            + "): check the form and press Start",
        )
    return dict(p.values)


def offers_choice(s: FormSettings) -> bool:
    """Whether the form has anything to choose (no form otherwise).  With profiles there
    is always a form: its cards say what each one gives."""
    specs = partition_specs(s)
    return (
        bool(getattr(s, "profiles", None))
        or len(specs) > 1
        or account_choice(s)
        or any(
            p.max_walltime > p.default_walltime
            or p.max_cores > p.default_cores
            or p.max_memory > p.default_memory
            or p.max_gpus
            for p in specs
        )
    )


def form_for(
    s: FormSettings,
    availability: Mapping[str, Availability],
    last: object = None,
    clusters: Sequence[ClusterStatus] = (),
) -> str:
    """:func:`render_form` with the settings' partitions and accounts, pre-filled from
    ``last`` (the server's last options, see :func:`prefill`); ``clusters``: the state
    of each cluster of a hub with several."""
    specs = partition_specs(s)
    limits = _limits(s, specs)
    return render_form(
        specs,
        default_partition=limits["default_partition"],
        availability=availability,
        accounts=s.accounts,
        allow_account=limits["allow_account"],
        default_account=s.account,
        prefilled=prefill(last, specs, **limits),
        profiles=prof.allowed(limits["profiles"], limits["user"], limits["groups"]),
        with_profiles=bool(limits["profiles"]),
        clusters=clusters,
    )


# ---------------------------------------------------------------------------- sinfo
SINFO_ARGV = ["sinfo", "--noheader", "--format=%P|%a|%l|%D|%C|%G"]


@dataclass(frozen=True)
class Availability:
    partition: str
    state: str
    timelimit: str
    nodes: int
    cpus_idle: int
    cpus_total: int
    gres: str


def parse_sinfo(text: str) -> dict[str, Availability]:
    out: dict[str, Availability] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6:
            continue
        name, state, limit, nodes, cpus, gres = parts
        name = name.rstrip("*")
        try:
            _alloc, idle, _other, total = (int(x) for x in cpus.split("/"))
            out[name] = Availability(name, state, limit, int(nodes), idle, total, gres)
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------------------- HTML
@dataclass(frozen=True)
class ClusterStatus:
    """A cluster as the form shows it: its availability now (None: it did not answer,
    ``note`` says so)."""

    name: str
    display_name: str
    description: str = ""
    availability: Mapping[str, Availability] | None = None
    note: str = ""


def script_json(value: object) -> str:
    """JSON for a ``<script type="application/json">`` element: raw JSON (a script's text
    is not HTML-decoded, so HTML escapes would break ``JSON.parse``) with ``<``, ``>`` and
    ``&`` as ``\\u`` escapes, so no value can end the element or open a comment."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_form(
    partitions: Sequence[PartitionSpec],
    *,
    default_partition: str,
    availability: Mapping[str, Availability] | None = None,
    accounts: Sequence[str] = (),
    allow_account: bool = False,
    default_account: str = "",
    prefilled: Prefill | None = None,
    profiles: Sequence[prof.Profile] = (),
    with_profiles: bool = False,
    clusters: Sequence[ClusterStatus] = (),
) -> str:
    """The form's HTML: a table of the partitions, or (``with_profiles``) a card for each
    of ``profiles`` (those open to the user), then the resources within the choice's
    limits, pre-filled from ``prefilled``.  With ``clusters`` (a hub with several) the
    cards are grouped by cluster, each group headed by its cluster's name and whether it
    answers now (each card's availability is its own cluster's)."""
    e = html.escape
    chosen = prefilled.values if prefilled else {}
    notes = prefilled.notes if prefilled else ()
    default_account = chosen.get("account", default_account)
    avail = availability or {}

    def limits(p: PartitionSpec) -> dict[str, Any]:
        return {
            "max_walltime": v.format_walltime(p.max_walltime),
            "max_cores": p.max_cores,
            "max_memory": p.max_memory // 1024 or 1,
            "max_gpus": p.max_gpus,
            "default_walltime": v.format_walltime(p.default_walltime),
            "default_cores": p.default_cores,
            "default_memory": max(1, p.default_memory // 1024),
        }

    status = {c.name: c for c in clusters}

    def now(partition: str, cluster: str = "") -> str:
        here = avail
        if cluster in status:
            here = status[cluster].availability or {}
        a = here.get(partition)
        return f"{a.cpus_idle} of {a.cpus_total} cores idle on {a.nodes} nodes" if a else "—"

    if with_profiles:
        if not profiles:
            return (
                '<div class="xsedehub-form"><div class="alert alert-warning xh-no-profile">'
                "No profile of this hub is open to you: ask its administrators to add you "
                "to one.</div></div>"
            )
        field = "profile"
        specs = {
            pr.name: {
                **limits(pr.spec),
                "default_memory_text": _memory_text(pr.spec.default_memory),
                "default_gpus": pr.default_gpus,
            }
            for pr in profiles
        }
        first_name = chosen.get("profile", profiles[0].name)
        first_profile = next((pr for pr in profiles if pr.name == first_name), profiles[0])
        first_name = first_profile.name
        cards = []
        shown_cluster = None
        order = [c.name for c in clusters]
        in_order = sorted(profiles, key=lambda pr: order.index(pr.cluster)) if order else profiles
        for pr in in_order:
            if clusters and pr.cluster != shown_cluster:
                shown_cluster = pr.cluster
                c = status[pr.cluster]
                if c.availability is None:
                    state = (
                        '<span class="label label-danger xh-cluster-state">unavailable</span> '
                        f"<small>{e(c.note)}</small>"
                    )
                else:
                    state = '<span class="label label-success xh-cluster-state">available</span>'
                cards.append(
                    f'<h4 class="xh-cluster" data-cluster="{e(c.name)}" '
                    f'data-available="{"no" if c.availability is None else "yes"}">'
                    f"{e(c.display_name)} {state}</h4>"
                    + (
                        f'<p class="xh-cluster-description">{e(c.description)}</p>'
                        if c.description
                        else ""
                    )
                )
            checked = " checked" if pr is first_profile else ""
            sp = pr.spec
            facts = [
                f"partition {sp.name}",
                f"up to {v.format_walltime(sp.max_walltime)}, {sp.max_cores} cores, "
                f"{_memory_text(sp.max_memory)}" + (f", {sp.max_gpus} GPUs" if sp.max_gpus else ""),
            ]
            if pr.reservation:
                facts.append(f"reservation {pr.reservation}")
            if pr.environment.summary():
                facts.append(pr.environment.summary())
            cards.append(
                f'<div class="panel panel-default xh-profile" data-profile="{e(pr.name)}"'
                f' data-cluster="{e(pr.cluster)}">'
                '<div class="panel-body"><label>'
                f'<input type="radio" name="profile" value="{e(pr.name)}"{checked}> '
                f"<strong>{e(pr.display_name)}</strong></label>"
                f'<p class="xh-profile-description">{e(pr.description)}</p>'
                f'<p class="xh-profile-facts"><small>{e("; ".join(facts))}</small></p>'
                f'<p><small>Now: <span class="xh-avail" data-partition="{e(sp.name)}">'
                f"{e(now(sp.name, pr.cluster))}</span></small></p></div></div>"
            )
        choice_html = f'<div class="xh-profiles">{"".join(cards)}</div>'
        gpu_hidden = "" if any(pr.spec.max_gpus for pr in profiles) else ' style="display:none"'
    else:
        field = "partition"
        default_partition = chosen.get("partition", default_partition)
        specs = {p.name: limits(p) for p in partitions}
        first = next((p for p in partitions if p.name == default_partition), partitions[0])
        first_name = first.name
        rows = []
        for p in partitions:
            checked = " checked" if p is first else ""
            rows.append(
                f'<tr><td><label><input type="radio" name="partition" value="{e(p.name)}"'
                f"{checked}> <strong>{e(p.name)}</strong></label></td>"
                f"<td>{e(p.description)}</td>"
                f"<td>{e(v.format_walltime(p.max_walltime))}</td><td>{p.max_cores}</td>"
                f'<td class="xh-avail" data-partition="{e(p.name)}">{e(now(p.name))}</td></tr>'
            )
        choice_html = f"""<table class="table table-condensed">
<thead><tr><th>Partition</th><th></th><th>Max walltime</th><th>Max cores</th><th>Now</th>
</tr></thead>
<tbody>{"".join(rows)}</tbody>
</table>"""
        gpu_hidden = "" if any(p.max_gpus for p in partitions) else ' style="display:none"'
    account_field = ""
    if allow_account:
        if accounts:
            opts = "".join(
                f'<option value="{e(a)}"{" selected" if a == default_account else ""}>'
                f"{e(a)}</option>"
                for a in accounts
            )
            account_field = (
                '<div class="form-group"><label for="xh-account">Allocation (account)</label>'
                f'<select class="form-control" id="xh-account" name="account">{opts}</select></div>'
            )
        else:
            account_field = (
                '<div class="form-group"><label for="xh-account">Allocation (account)</label>'
                '<input class="form-control" id="xh-account" name="account" '
                f'pattern="[A-Za-z0-9][A-Za-z0-9_.\\-]{{0,63}}" value="{e(default_account)}" '
                'placeholder="your default account"></div>'
            )
    s = dict(specs[first_name])
    walltime = chosen.get("walltime", s["default_walltime"])
    cores = chosen.get("cores", str(s["default_cores"]))
    memory = chosen.get("memory", s.get("default_memory_text", f"{s['default_memory']}G"))
    gpus = chosen.get("gpus", str(s.get("default_gpus", 0)))
    banner = ""
    if notes:
        items = "".join(f"<li>{e(n)}</li>" for n in notes)
        banner = (
            '<div class="alert alert-warning xh-prefill-notes">Your last choices for this '
            f"server no longer all fit this hub's limits:<ul>{items}</ul></div>"
        )
    elif chosen:
        banner = '<p class="xh-prefill">Filled in with your last choices for this server.</p>'
    return f"""
<div class="xsedehub-form">
{banner}
{choice_html}
<div class="form-group"><label for="xh-walltime">Walltime (HH:MM:SS)</label>
<input class="form-control" id="xh-walltime" name="walltime" value="{e(walltime)}"
 pattern="(\\d+-)?\\d{{1,3}}:\\d{{2}}(:\\d{{2}})?|\\d+" required>
<small id="xh-walltime-help">at most {e(s["max_walltime"])}</small></div>
<div class="form-group"><label for="xh-cores">Cores</label>
<input class="form-control" type="number" id="xh-cores" name="cores" min="1"
 max="{s["max_cores"]}" value="{e(cores)}" required></div>
<div class="form-group"><label for="xh-memory">Memory (GB)</label>
<input class="form-control" id="xh-memory" name="memory" value="{e(memory)}"
 pattern="\\d+[KMGT]?" required></div>
<div class="form-group"{gpu_hidden}><label for="xh-gpus">GPUs</label>
<input class="form-control" type="number" id="xh-gpus" name="gpus" min="0"
 max="{s["max_gpus"]}" value="{e(gpus)}"></div>
{account_field}
<script type="application/json" id="xh-partitions">{script_json(specs)}</script>
<script>
(function () {{
  var specs = JSON.parse(document.getElementById("xh-partitions").textContent);
  function apply(name) {{
    var s = specs[name]; if (!s) return;
    document.getElementById("xh-walltime").value = s.default_walltime;
    document.getElementById("xh-walltime-help").textContent = "at most " + s.max_walltime;
    var c = document.getElementById("xh-cores"); c.max = s.max_cores; c.value = s.default_cores;
    document.getElementById("xh-memory").value = s.default_memory_text || s.default_memory + "G";
    var g = document.getElementById("xh-gpus"); g.max = s.max_gpus;
    if (s.default_gpus !== undefined) g.value = s.default_gpus;
  }}
  document.querySelectorAll('.xsedehub-form input[name="{field}"]').forEach(function (r) {{
    r.addEventListener("change", function () {{ apply(r.value); }});
  }});
}})();
</script>
</div>
"""
