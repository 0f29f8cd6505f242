"""Profiles: named choices an administrator defines (``SlurmSSHSpawner.profiles``).

A profile is a partition with its own defaults and limits (within the partition's), a
software environment (shell files to source, modules to load, a conda environment or a
Python venv to activate, a container command to run the server in), optionally a SLURM
reservation, and who may use it (JupyterHub groups, user names; neither: everyone).

Pure: :func:`parse_profiles` turns the configuration into :class:`Profile` objects or
raises :class:`ProfileProblems`, which names every problem with its path
(``profiles.gpu-workshop.max_gpus``); the form (:mod:`.form`) offers the profiles a user
may use and checks the options against them; :meth:`Environment.prologue` gives the
job's argv lists.  On a hub with several clusters (:mod:`.clusters`) each profile
names its ``cluster`` (default: the first) and is checked against that cluster's
partitions (:func:`.form.profile_list`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from . import validate as v

if TYPE_CHECKING:
    from .form import PartitionSpec

#: a module as Lmod or Environment Modules name it: ``gcc/12.2.0``, ``py-numpy/1.26``
_MODULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}(?:/[A-Za-z0-9_.+-]{1,128}){0,4}$")
#: a conda environment's name (``conda activate NAME``)
_CONDA_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: one word of a container command: no quotes, spaces, ``$``, ``;``, glob characters
_CONTAINER_WORD = re.compile(r"^[A-Za-z0-9_./:=@+,%-]{1,256}$")

#: what a profile sets besides its environment and who may use it
LIMIT_KEYS = (
    "default_walltime",
    "default_cores",
    "default_memory",
    "default_gpus",
    "max_walltime",
    "max_cores",
    "max_memory",
    "max_gpus",
)
KEYS = (
    "display_name",
    "description",
    "cluster",
    "partition",
    *LIMIT_KEYS,
    "environment",
    "reservation",
    "groups",
    "users",
)
ENVIRONMENT_KEYS = ("source", "modules", "conda", "venv", "container")


class ProfileProblems(v.InvalidValue):
    """Every problem of ``SlurmSSHSpawner.profiles`` (``problems``), each naming its path."""

    def __init__(self, problems: Sequence[v.InvalidValue]):
        super().__init__(problems[0].field, "; ".join(str(p) for p in problems))
        self.problems = list(problems)


def profile_name(value: object, field: str = "profile") -> str:
    """A profile's name: like a partition's (letters, digits, ``_``, ``.``, ``-``)."""
    return v.slurm_name(value, field)


def module_name(value: object, field: str) -> str:
    val = v._text(field, value, 512)
    if not _MODULE.match(val) or any(part in (".", "..") for part in val.split("/")):
        raise v.InvalidValue(field, f"{val!r} is not a module name (like gcc/12.2.0)")
    return val


def conda_env(value: object, field: str) -> str:
    """A conda environment: its name, or the absolute path of its prefix."""
    val = v._text(field, value, 1024)
    if val.startswith("/"):
        return v.absolute_path(val, field)
    if not _CONDA_NAME.match(val):
        raise v.InvalidValue(field, f"{val!r} is not a conda environment name or an absolute path")
    return val


def container_word(value: object, field: str) -> str:
    val = v._text(field, value, 256)
    if not _CONTAINER_WORD.match(val):
        raise v.InvalidValue(
            field,
            f"{val!r} is not a plain word (letters, digits and _ . / : = @ + , % - only)",
        )
    return val


def _names(value: object, field: str, check: Callable[[object, str], str]) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise v.InvalidValue(field, "must be a list")
    return tuple(check(item, f"{field}[{i}]") for i, item in enumerate(value))


@dataclass(frozen=True)
class Environment:
    """A profile's software environment, set up in the job's shell before the server
    starts (in this order): ``source`` (absolute paths of shell files, e.g. Lmod's or
    conda's shell set-up), ``modules`` (``module load``), ``conda`` (``conda activate``),
    ``venv`` (its ``bin/activate``); ``container`` is an argv the server's command is
    appended to (``apptainer exec --nv /images/pytorch.sif``)."""

    source: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    conda: str = ""
    venv: str = ""
    container: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, value: object, field: str) -> Environment:
        if not isinstance(value, Mapping):
            raise v.InvalidValue(field, "must be a dict with keys " + ", ".join(ENVIRONMENT_KEYS))
        unknown = sorted(str(k) for k in value if k not in ENVIRONMENT_KEYS)
        if unknown:
            raise v.InvalidValue(
                field, f"unknown keys {unknown} (known: {', '.join(ENVIRONMENT_KEYS)})"
            )
        for key in ("conda", "venv"):
            if key in value and not str(value[key]).strip():
                raise v.InvalidValue(f"{field}.{key}", "is empty (leave the key out instead)")
        env = cls(
            source=_names(value.get("source", []), f"{field}.source", v.absolute_path),
            modules=_names(value.get("modules", []), f"{field}.modules", module_name),
            conda=conda_env(value["conda"], f"{field}.conda") if "conda" in value else "",
            venv=v.absolute_path(value["venv"], f"{field}.venv") if "venv" in value else "",
            container=_names(value.get("container", []), f"{field}.container", container_word),
        )
        if env.container and env.container[0].startswith("-"):
            raise v.InvalidValue(f"{field}.container[0]", "must be a command, not an option")
        return env

    def prologue(self) -> list[list[str]]:
        """The argv lists the job's shell runs (each in the shell itself: ``.`` and
        ``module`` / ``conda`` functions change its environment, which the server gets)."""
        lines = [[".", path] for path in self.source]
        if self.modules:
            lines.append(["module", "load", *self.modules])
        if self.conda:
            lines.append(["conda", "activate", self.conda])
        if self.venv:
            lines.append([".", f"{self.venv.rstrip('/')}/bin/activate"])
        return lines

    def summary(self) -> str:
        """One line for the form's card: what the profile loads."""
        parts = []
        if self.modules:
            parts.append("modules " + " ".join(self.modules))
        if self.conda:
            parts.append(f"conda {self.conda}")
        if self.venv:
            parts.append(f"venv {self.venv}")
        if self.container:
            parts.append("container " + " ".join(self.container))
        return "; ".join(parts)


@dataclass(frozen=True)
class Profile:
    """One profile: its partition's limits narrowed to the profile's (:attr:`spec`)."""

    name: str
    display_name: str
    description: str
    spec: PartitionSpec  # the partition, with the profile's defaults and limits
    default_gpus: int = 0
    environment: Environment = field(default_factory=Environment)
    reservation: str | None = None
    groups: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()
    cluster: str = ""  # the cluster it runs on ("": the hub's only one)

    @property
    def partition(self) -> str:
        return self.spec.name

    def allows(self, user: str | None, groups: Iterable[str] = ()) -> bool:
        """Whether ``user`` (with JupyterHub ``groups``) may use it: everyone when the
        profile names no group and no user."""
        if not self.groups and not self.users:
            return True
        return (user is not None and user in self.users) or bool(self.groups & set(groups))


def _limits(
    name: str, spec: Mapping[str, object], part: PartitionSpec, problems: list[v.InvalidValue]
) -> tuple[PartitionSpec, int]:
    """The partition's spec with the profile's defaults and limits, each checked against
    the partition's limits (and each default against the profile's own limit)."""
    at = f"profiles.{name}"
    kw: dict[str, int] = {}
    for key in LIMIT_KEYS:
        if key not in spec:
            continue
        val, where = spec[key], f"{at}.{key}"
        try:
            if key.endswith("walltime"):
                kw[key] = v.walltime_minutes(val, where)
            elif key.endswith("memory"):
                kw[key] = v.memory_mb(val, where)
            else:
                kw[key] = v.positive_int(val, where, low=0 if key.endswith("gpus") else 1)
        except v.InvalidValue as e:
            problems.append(e)
    for what in ("walltime", "cores", "memory", "gpus"):
        ceiling = getattr(part, f"max_{what}")
        limit = kw.get(f"max_{what}", ceiling)
        if limit > ceiling:
            problems.append(
                v.InvalidValue(
                    f"{at}.max_{what}",
                    f"{_shown(what, limit)} is above partition {part.name}'s "
                    f"{_shown(what, ceiling)}",
                )
            )
            limit = ceiling
        kw[f"max_{what}"] = limit
    for what in ("walltime", "cores", "memory", "gpus"):
        key = f"default_{what}"
        if key not in kw:  # the partition's default, within the profile's limit
            kw[key] = min(getattr(part, key, 0), kw[f"max_{what}"])
        elif kw[key] > kw[f"max_{what}"]:
            problems.append(
                v.InvalidValue(
                    f"{at}.{key}",
                    f"{_shown(what, kw[key])} is above the profile's limit "
                    f"{_shown(what, kw[f'max_{what}'])}",
                )
            )
    gpus = kw.pop("default_gpus")
    for key in ("default_walltime", "default_cores", "default_memory"):
        kw[key] = max(kw[key], 1)  # a zero limit is caught above; keep the spec valid
    return replace(part, **kw), gpus  # type: ignore[arg-type]


def _shown(what: str, n: int) -> str:
    if what == "walltime":
        return v.format_walltime(n)
    if what == "memory":
        return f"{n // 1024}G" if n % 1024 == 0 else f"{n}M"
    return str(n)


def _one(
    name: object, spec: object, partitions: Mapping[str, PartitionSpec], default_partition: str
) -> Profile:
    problems: list[v.InvalidValue] = []
    try:
        pname = profile_name(name, "profiles")
    except v.InvalidValue as e:
        where = f"profiles[{str(name)[:40]!r}]"
        raise ProfileProblems([v.InvalidValue(where, e.message)]) from None
    at = f"profiles.{pname}"
    if not isinstance(spec, Mapping):
        raise ProfileProblems([v.InvalidValue(at, "must be a dict")])
    unknown = sorted(str(k) for k in spec if k not in KEYS)
    if unknown:
        problems.append(v.InvalidValue(at, f"unknown keys {unknown} (known: {', '.join(KEYS)})"))

    def text(key: str, default: str, limit: int) -> str:
        try:
            return v._text(f"{at}.{key}", spec.get(key, default), limit)
        except v.InvalidValue as e:
            problems.append(e)
            return default

    display = text("display_name", pname, 128) or pname
    description = text("description", "", 1024)
    part = None
    try:
        partition = v.slurm_name(spec.get("partition", default_partition), f"{at}.partition")
        part = partitions.get(partition)
        if part is None:
            problems.append(
                v.InvalidValue(
                    f"{at}.partition",
                    f"{partition!r} is not one of the partitions ({sorted(partitions)})",
                )
            )
    except v.InvalidValue as e:
        problems.append(e)
    reservation = None
    if "reservation" in spec:  # an empty one is refused, not ignored
        try:
            if not str(spec["reservation"]).strip():
                raise v.InvalidValue(f"{at}.reservation", "is empty (leave the key out instead)")
            reservation = v.slurm_name(spec["reservation"], f"{at}.reservation")
        except v.InvalidValue as e:
            problems.append(e)
    environment = Environment()
    if "environment" in spec:
        try:
            environment = Environment.from_config(spec["environment"], f"{at}.environment")
        except v.InvalidValue as e:
            problems.append(e)
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    for key in ("groups", "users"):
        try:
            names = _names(spec.get(key, []), f"{at}.{key}", lambda s, f: v._text(f, s, 255))
        except v.InvalidValue as e:
            problems.append(e)
            continue
        if key == "groups":
            groups = names
        else:
            users = names
    limits, gpus = (_limits(pname, spec, part, problems)) if part else (None, 0)
    if problems:
        raise ProfileProblems(problems)
    assert limits is not None
    return Profile(
        name=pname,
        display_name=display,
        description=description,
        spec=limits,
        default_gpus=gpus,
        environment=environment,
        reservation=reservation,
        groups=frozenset(groups),
        users=frozenset(users),
    )


def parse_profiles(
    config: Mapping[str, object], partitions: Sequence[PartitionSpec], default_partition: str
) -> list[Profile]:
    """``SlurmSSHSpawner.profiles`` -> profiles (in the configuration's order), or
    :class:`ProfileProblems` with every problem found, each naming its path."""
    if not isinstance(config, Mapping):
        raise ProfileProblems([v.InvalidValue("profiles", "must be a dict")])
    by_name = {p.name: p for p in partitions}
    out: list[Profile] = []
    problems: list[v.InvalidValue] = []
    for name, spec in config.items():
        try:
            out.append(_one(name, spec, by_name, default_partition))
        except ProfileProblems as e:
            problems += e.problems
    if problems:
        raise ProfileProblems(problems)
    return out


def allowed(profiles: Sequence[Profile], user: str | None, groups: Iterable[str]) -> list[Profile]:
    """The profiles ``user`` may use, in order."""
    groups = set(groups)
    return [p for p in profiles if p.allows(user, groups)]
