"""Profiles (SlurmSSHSpawner.profiles), table-driven, no cluster: their validation, who
may use them, the one gate (form, URL, REST), the form's cards, prefill and relaunch,
and the job script they make."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

import pytest
from xsedehub.spawner import form, slurm
from xsedehub.spawner import profiles as prof
from xsedehub.spawner import validate as v

PARTITIONS = {
    "compute": {"max_walltime": "08:00:00", "max_cores": 8, "max_memory": "16G"},
    "gpu": {"max_walltime": "04:00:00", "max_cores": 16, "max_memory": "64G", "max_gpus": 4},
}
PROFILES = {
    "cpu-small": {
        "display_name": "Small CPU session",
        "description": "one core, two hours",
        "partition": "compute",
        "default_walltime": "00:30:00",
        "max_walltime": "02:00:00",
        "max_cores": 2,
        "default_memory": "1G",
        "max_memory": "4G",
        "environment": {"modules": ["gcc/12.2.0", "python/3.11"]},
    },
    "gpu-workshop": {
        "display_name": "GPU workshop <b>",
        "partition": "gpu",
        "default_gpus": 1,
        "max_gpus": 1,
        "max_walltime": "01:00:00",
        "default_walltime": "01:00:00",
        "reservation": "ws-tue",
        "groups": ["workshop"],
        "environment": {
            "source": ["/etc/profile.d/conda.sh"],
            "conda": "pytorch",
            "container": ["apptainer", "exec", "--nv", "/images/pytorch.sif"],
        },
    },
    "grace-only": {"partition": "compute", "users": ["grace"], "environment": {"venv": "/opt/v"}},
}


def settings(profiles=PROFILES, user="ada", groups=(), **kw):
    base = dict(
        mode="gateway",
        partitions=PARTITIONS,
        profiles=profiles,
        partition="compute",
        walltime="01:00:00",
        cores=1,
        memory="2G",
        gpus=0,
        accounts=[],
        account="",
        allow_account_choice=None,
        qos="",
        user=SimpleNamespace(name=user, groups=[SimpleNamespace(name=g) for g in groups]),
    )
    base.update(kw)
    return SimpleNamespace(**base)


def problems(config: dict) -> list[str]:
    specs = [form.PartitionSpec.from_config(n, s) for n, s in PARTITIONS.items()]
    with pytest.raises(prof.ProfileProblems) as e:
        prof.parse_profiles(config, specs, "compute")
    return [str(p) for p in e.value.problems]


# ---------------------------------------------------------------- validation at start-up
def test_good_profiles_parse_with_limits_within_the_partitions():
    specs = form.partition_specs(settings())
    ps = {p.name: p for p in form.profile_list(settings(), specs)}
    small = ps["cpu-small"]
    assert (small.partition, small.spec.max_cores, small.spec.max_memory) == ("compute", 2, 4096)
    assert (small.spec.default_walltime, small.spec.default_cores) == (30, 1)
    gpu = ps["gpu-workshop"]
    assert (gpu.spec.max_gpus, gpu.default_gpus, gpu.reservation) == (1, 1, "ws-tue")
    assert gpu.spec.max_cores == 16  # the partition's, where the profile says nothing
    assert gpu.groups == {"workshop"} and not gpu.users


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({"partition": "gpu", "max_gpus": 8}, "profiles.p.max_gpus: 8 is above partition gpu's 4"),
        ({"max_cores": 9}, "profiles.p.max_cores: 9 is above partition compute's 8"),
        ({"max_walltime": "09:00:00"}, "profiles.p.max_walltime: 09:00:00 is above partition"),
        ({"max_memory": "1T"}, "profiles.p.max_memory: 1024G is above partition compute's 16G"),
        ({"max_cores": 2, "default_cores": 3}, "profiles.p.default_cores: 3 is above the profile"),
        ({"default_gpus": 1}, "profiles.p.default_gpus: 1 is above the profile's limit 0"),
        ({"max_cores": 0}, "profiles.p.max_cores: must be between 1 and"),
        ({"partition": "nope"}, "profiles.p.partition: 'nope' is not one of the partitions"),
        ({"partition": "gpu\n#SBATCH --uid=0"}, "profiles.p.partition: contains control"),
        ({"reservation": "ws;id"}, "profiles.p.reservation: 'ws;id' is not a valid name"),
        ({"colour": "red"}, "profiles.p: unknown keys ['colour']"),
        ({"groups": "workshop"}, "profiles.p.groups: must be a list"),
        ({"users": ["ok", 3]}, "profiles.p.users[1]: must be text"),
        ({"display_name": "a\nb"}, "profiles.p.display_name: contains control"),
        ({"environment": ["x"]}, "profiles.p.environment: must be a dict"),
        ({"environment": {"lmod": []}}, "profiles.p.environment: unknown keys ['lmod']"),
        ({"environment": {"modules": ["gcc/12 ; id"]}}, "environment.modules[0]: 'gcc/12 ; id'"),
        ({"environment": {"modules": ["$(id)"]}}, "profiles.p.environment.modules[0]"),
        ({"environment": {"modules": ["x/../../etc"]}}, "profiles.p.environment.modules[0]"),
        ({"environment": {"conda": ""}}, "profiles.p.environment.conda"),
        ({"environment": {"venv": ""}}, "profiles.p.environment.venv"),
        ({"reservation": ""}, "profiles.p.reservation"),
        ({"environment": {"modules": "gcc"}}, "profiles.p.environment.modules: must be a list"),
        ({"environment": {"conda": "my env"}}, "profiles.p.environment.conda: 'my env' is not"),
        ({"environment": {"conda": "/opt/../etc"}}, "profiles.p.environment.conda"),
        ({"environment": {"venv": "envs/ml"}}, "profiles.p.environment.venv: 'envs/ml' must be"),
        ({"environment": {"venv": "/opt/v`id`"}}, "profiles.p.environment.venv"),
        ({"environment": {"source": ["~/.bashrc"]}}, "profiles.p.environment.source[0]"),
        ({"environment": {"container": ["a b"]}}, "profiles.p.environment.container[0]: 'a b'"),
        ({"environment": {"container": ["--nv"]}}, "container[0]: must be a command"),
        ({"environment": {"container": ["x", "$HOME"]}}, "profiles.p.environment.container[1]"),
    ],
)
def test_each_problem_is_named_with_its_path(spec, expected):
    found = problems({"p": spec})
    assert any(expected in p for p in found), found


def test_every_problem_of_every_profile_is_reported_at_once():
    found = problems(
        {
            "a": {"partition": "gpu", "max_gpus": 9, "reservation": "x y"},
            "ok": {},
            "b": {"environment": {"venv": "rel"}},
            "bad name!": {},
        }
    )
    assert [p.split(":")[0] for p in found] == [
        "profiles.a.reservation",
        "profiles.a.max_gpus",
        "profiles.b.environment.venv",
        "profiles['bad name!']",
    ]


def test_the_hub_does_not_start_with_a_bad_profile(tmp_path):
    from xsedehub import config as xc

    from .test_config import ENV, good

    (tmp_path / "known_hosts").write_text("@cert-authority * ssh-ed25519 AAAA\n")
    (tmp_path / "gateway_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "gateway_key").chmod(0o600)
    c = good(tmp_path)
    c.SlurmSSHSpawner.partitions = PARTITIONS
    c.SlurmSSHSpawner.profiles = {"gpu-workshop": {"partition": "gpu", "max_gpus": 8}}
    found = [str(p) for p in xc.check(c, "gateway", environ=ENV)]
    assert any("SlurmSSHSpawner.profiles.gpu-workshop.max_gpus" in p for p in found), found
    c.SlurmSSHSpawner.profiles = PROFILES
    assert xc.check(c, "gateway", environ=ENV) == []


# ---------------------------------------------------------------- who may use which
@pytest.mark.parametrize(
    "user,groups,mine",
    [
        ("ada", [], ["cpu-small"]),
        ("ada", ["workshop"], ["cpu-small", "gpu-workshop"]),
        ("grace", [], ["cpu-small", "grace-only"]),
        ("grace", ["other"], ["cpu-small", "grace-only"]),
    ],
)
def test_users_get_only_their_profiles(user, groups, mine):
    s = settings(user=user, groups=groups)
    ps = form.profile_list(s, form.partition_specs(s))
    assert [p.name for p in prof.allowed(ps, user, groups)] == mine
    page = form.form_for(s, {})
    for name in PROFILES:
        assert (f'name="profile" value="{name}"' in page) == (name in mine), name


@pytest.mark.parametrize(
    "opts",
    [
        {"profile": "gpu-workshop"},  # exists, but not open to ada
        {"profile": "grace-only", "walltime": "00:10:00"},
        {"profile": "nope"},  # refused with the same words: others' profiles stay unseen
    ],
)
def test_a_profile_not_open_to_the_user_is_refused(opts):
    with pytest.raises(v.InvalidValue) as e:
        form.validate_for(settings(), opts)
    assert e.value.field == "profile"
    assert e.value.message == f"{opts['profile']!r} is not one of your profiles (['cpu-small'])"


def test_no_profile_open_to_the_user():
    s = settings(profiles={"ws": {"groups": ["workshop"]}})
    with pytest.raises(v.InvalidValue, match="no profile of this hub is open to you"):
        form.validate_for(s, {})
    assert "No profile of this hub is open to you" in form.form_for(s, {})
    assert form.offers_choice(s)


# ---------------------------------------------------------------- the one gate
def test_defaults_and_overrides_within_the_profile():
    r = form.validate_for(settings(), {})  # the first profile open to ada
    assert (r.partition, r.walltime_minutes, r.cpus, r.memory_mb, r.gpus) == (
        "compute",
        30,
        1,
        1024,
        0,
    )
    assert r.reservation is None
    r = form.validate_for(settings(), {"profile": "cpu-small", "walltime": "02:00:00", "cores": 2})
    assert (r.walltime_minutes, r.cpus) == (120, 2)
    ws = settings(groups=["workshop"])
    r = form.validate_for(ws, {"profile": "gpu-workshop", "partition": "gpu"})
    assert (r.partition, r.gpus, r.reservation, r.walltime_minutes) == ("gpu", 1, "ws-tue", 60)
    assert "#SBATCH --reservation=ws-tue" in slurm.sbatch_directives(job(r))


@pytest.mark.parametrize(
    "opts,message",
    [
        ({"profile": "cpu-small", "walltime": "03:00:00"}, "at most 02:00:00 in profile cpu-small"),
        ({"profile": "cpu-small", "cores": 3}, "at most 2 in profile cpu-small"),
        ({"profile": "cpu-small", "memory": "5G"}, "at most 4G in profile cpu-small"),
        ({"profile": "cpu-small", "gpus": 1}, "at most 0 in profile cpu-small"),
        ({"profile": "gpu-workshop", "gpus": 2}, "at most 1 in profile gpu-workshop"),
        ({"profile": "gpu-workshop", "partition": "compute"}, "runs in partition gpu"),
        ({"profile": "cpu-small\n#SBATCH --uid=0"}, "contains control characters"),
        ({"profile": ["cpu-small"]}, "must be text"),
        ({"profile": "cpu-small", "reservation": "x"}, "'reservation' is not an option"),
    ],
)
def test_overrides_beyond_the_profile_are_refused(opts, message):
    with pytest.raises(v.InvalidValue) as e:
        form.validate_for(settings(groups=["workshop"]), opts)
    assert message in str(e.value)


def test_profile_is_no_option_on_a_hub_without_profiles():
    with pytest.raises(v.InvalidValue, match="'profile' is not an option"):
        form.validate_for(settings(profiles={}), {"profile": "cpu-small"})


def test_the_form_posts_the_profile():
    formdata = {"profile": ["gpu-workshop"], "walltime": ["00:20:00"], "junk": ["x"]}
    assert form.options_from_form(formdata) == {"profile": "gpu-workshop", "walltime": "00:20:00"}


# ---------------------------------------------------------------- the form
def test_the_form_shows_cards_with_escaped_text_and_availability():
    avail = form.parse_sinfo("gpu|up|4:00:00|2|1/7/0/8|gpu:2\ncompute*|up|8:00:00|2|0/8/0/8|")
    page = form.form_for(settings(groups=["workshop"]), avail)
    assert page.count('class="panel panel-default xh-profile"') == 2
    assert "GPU workshop &lt;b&gt;" in page
    assert "GPU workshop <b>" not in page
    assert "reservation ws-tue" in page and "modules gcc/12.2.0 python/3.11" in page
    assert "7 of 8 cores idle on 2 nodes" in page  # the gpu partition's, live
    assert 'name="partition"' not in page
    # the first card is chosen, its defaults are in the fields
    assert 'value="cpu-small" checked' in page
    assert 'id="xh-walltime" name="walltime" value="00:30:00"' in page
    assert 'name="memory" value="1G"' in page


def test_prefill_and_relaunch_keep_the_profile():
    ws = settings(groups=["workshop"])
    last = {"profile": "gpu-workshop", "walltime": "00:40:00", "gpus": "1"}
    assert form.relaunch_options(ws, last) == {
        "profile": "gpu-workshop",
        "walltime": "00:40:00",
        "gpus": "1",
    }
    page = form.form_for(ws, {}, last)
    assert 'value="gpu-workshop" checked' in page and 'value="00:40:00"' in page
    # out of the group since: not relaunched, the form says why and proposes another
    with pytest.raises(v.InvalidValue, match="is not one of your profiles"):
        form.relaunch_options(settings(), last)
    p = form.prefill_for(settings(), last)
    assert "profile" not in p.values and "is not one of your profiles" in p.notes[0]
    # a limit lowered since
    tighter = dict(PROFILES, **{"gpu-workshop": {**PROFILES["gpu-workshop"], "max_gpus": 0}})
    tighter["gpu-workshop"]["default_gpus"] = 0
    with pytest.raises(v.InvalidValue, match="gpus '1': at most 0 in profile gpu-workshop"):
        form.relaunch_options(settings(profiles=tighter, groups=["workshop"]), last)


# ---------------------------------------------------------------- the job
def job(resources: slurm.JobResources, **kw) -> slurm.JobScript:
    return slurm.JobScript(
        job_name="jupyter-ada",
        resources=resources,
        job_dir=".xsedehub/jobs/u1-0123456789ab",
        work_dir="workshop/ada",
        singleuser=["/opt/env/bin/jupyterhub-singleuser"],
        tunnel=slurm.Tunnel("10.0.0.1", 22, "tunnelbot", 20001, "127.0.0.1", 8081),
        python="/opt/env/bin/python",
        **kw,
    )


def test_the_environment_is_the_jobs_prologue_and_the_container_its_prefix():
    env = prof.Environment(
        source=("/etc/profile.d/lmod.sh",),
        modules=("gcc/12.2.0", "python/3.11"),
        conda="/opt/conda/envs/ml",
        venv="/opt/venvs/ml/",
        container=("apptainer", "exec", "--nv", "/images/pytorch.sif"),
    )
    assert env.prologue() == [
        [".", "/etc/profile.d/lmod.sh"],
        ["module", "load", "gcc/12.2.0", "python/3.11"],
        ["conda", "activate", "/opt/conda/envs/ml"],
        [".", "/opt/venvs/ml/bin/activate"],
    ]
    r = slurm.JobResources(partition="gpu", walltime_minutes=30, reservation="ws-tue")
    script = slurm.build_job_script(
        job(r, environment=env.prologue(), server_prefix=list(env.container))
    )
    lines = script.splitlines()
    at = lines.index("set +u")
    assert lines[at + 1].startswith(". /etc/profile.d/lmod.sh || { { set +x +v; } 2>/dev/null;")
    assert lines[at + 2].startswith("module load gcc/12.2.0 python/3.11 || {")
    assert lines[at + 5 : at + 7] == ["{ set +x +v; } 2>/dev/null", "set -u"]
    assert lines[at + 7].startswith("xh_absolute_only : PATH LD_LIBRARY_PATH ")
    assert lines[at + 8] == "xh_absolute_only ': ' LD_PRELOAD"
    assert lines[at + 9] == 'log "profile environment ready"'
    # before the server's environment (the API token) is read, and before the script
    # enters the work folder (an attendee's, in gateway mode)
    assert lines.index("set +u") < lines.index('. "$XH_DIR/env"')
    assert lines.index("set +u") < lines.index('mkdir -p "$XH_WORK" && cd "$XH_WORK" || exit 2')
    server = next(line for line in lines if "--ServerApp.sock=" in line)
    assert server.startswith(
        "apptainer exec --nv /images/pytorch.sif /opt/env/bin/jupyterhub-singleuser "
    )
    assert "#SBATCH --reservation=ws-tue" in lines


def test_the_environment_runs_outside_the_sandbox_before_it():
    from xsedehub.spawner import sandbox as sb

    env = prof.Environment(modules=("python/3.11",), venv="/opt/v")
    r = slurm.JobResources(partition="compute", walltime_minutes=30)
    script = slurm.build_job_script(
        job(r, environment=env.prologue(), sandbox=sb.Sandbox(runtime="bubblewrap"))
    )
    lines = script.splitlines()
    load = next(i for i, line in enumerate(lines) if line.startswith("module load"))
    trial = next(i for i, line in enumerate(lines) if "XH_SANDBOX_ERR=$(" in line)
    assert load < trial


@pytest.mark.parametrize("word", ["a'b", "$(id)", "x\ny", "a b"])
def test_environment_words_are_quoted_even_if_they_got_past_validation(word):
    lines = slurm.environment_lines([["module", "load", word]])
    assert lines[1].startswith(f"module load {shlex.quote(word)} || ")


def test_the_home_page_names_the_last_profile():
    from .test_named_relaunch_unit import render_home_part

    last = {"profile": "gpu-workshop", "walltime": "00:40:00"}
    html = render_home_part([SimpleNamespace(name="", user_options=last, server=None)])
    assert "profile gpu-workshop, walltime 00:40:00" in html
