"""Several servers per user and "start again as last time", without the cluster: server
names, spawn ids, job names, the orphans line, the form's pre-fill and the relaunch gate
(tests/test_named_servers.py runs them on the local cluster and in the browser)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from xsedehub.spawner import form, job, slurm, tunnel
from xsedehub.spawner import validate as v

from xsedehub import orphans

PARTS = [
    form.PartitionSpec.from_config(
        "compute", {"max_walltime": "08:00:00", "max_cores": 8, "max_memory": "16G"}
    ),
    form.PartitionSpec.from_config(
        "gpu", {"max_walltime": "02:00:00", "max_cores": 4, "max_memory": "32G", "max_gpus": 2}
    ),
]


def prefill(last, parts=PARTS, **kw):
    kw.setdefault("default_partition", "compute")
    return form.prefill(last, parts, **kw)


# ---------------------------------------------------------------- server names and ids
@pytest.mark.parametrize("name", ["", "gpu", "cpu-1", "GPU_2.a", "a" * 30])
def test_server_names_that_pass(name):
    assert v.server_name(name) == name


@pytest.mark.parametrize(
    "name", ["-x", "a b", "a/b", "../x", "x;id", "x\n", "a" * 31, "é", "$(id)", 3, None]
)
def test_server_names_refused_with_a_clear_error(name):
    with pytest.raises(v.InvalidValue) as e:
        v.server_name(name)
    assert e.value.field == "server name"


def test_each_server_has_its_own_spawn_id_that_names_it():
    ids = {slurm.new_spawn_id(7, s) for s in ("", "cpu", "gpu", "gpu")}
    assert len(ids) == 4  # a fresh id per spawn, whatever the server
    for sid in ids:
        v.slurm_name(sid, "spawn id")  # fits a --comment, a folder name, a key comment
        assert tunnel.SPAWN_ID_FORMAT.match(sid)
        assert sid.startswith("u7-")
    assert slurm.server_of(slurm.new_spawn_id(7, "gpu-1")) == "gpu-1"
    assert slurm.server_of(slurm.new_spawn_id(7)) == ""
    assert slurm.server_of("u7-0123456789ab") == ""  # ids from before named servers
    assert slurm.server_of("check-0123") is None and slurm.server_of("u99-lost") is None
    with pytest.raises(v.InvalidValue):
        slurm.new_spawn_id(7, "a/../b")


def test_job_name_carries_the_server():
    def sp(mode, user, name):
        return SimpleNamespace(mode=mode, user=SimpleNamespace(name=user), name=name)

    assert job.job_name(sp("gateway", "ada-l", "")) == "jupyter-ada-l"
    assert job.job_name(sp("gateway", "ada-l", "gpu")) == "jupyter-ada-l-gpu"
    assert job.job_name(sp("xsede", "alice", "")) == "jupyterhub"
    assert job.job_name(sp("xsede", "alice", "cpu")) == "jupyterhub-cpu"
    long = job.job_name(sp("gateway", "a" * 39, "b" * 30))
    assert long.endswith("-" + "b" * 30)  # never cut off: the server stays readable
    v.job_name(long)
    with pytest.raises(v.InvalidValue):
        job.job_name(sp("gateway", "ada-l", "x y"))


def test_orphans_line_names_the_server():
    def st(comment):
        return slurm.JobStatus("42", "RUNNING", "node1", "None", "", "gateway", comment)

    assert orphans.describe(st("xsedehub:u7-gpu-0123456789ab")).split("\t") == [
        "42",
        "gateway",
        "RUNNING",
        "node1",
        "u7-gpu-0123456789ab",
        "server gpu",
    ]
    assert orphans.describe(st("xsedehub:u7-0123456789ab")).endswith("\tdefault server")
    assert orphans.describe(st("xsedehub:u99-lost")).endswith("\t-")


# ---------------------------------------------------------------- pre-fill
def test_no_last_choices_no_prefill():
    assert prefill({}) == form.Prefill({}, ())
    assert prefill(None) == form.Prefill({}, ())
    html = form.render_form(PARTS, default_partition="compute", prefilled=prefill({}))
    assert "xh-prefill" not in html


def test_last_choices_fill_the_form_in_canonical_form():
    last = {"partition": "gpu", "walltime": "90", "cores": "3", "memory": "4096", "gpus": "1"}
    p = prefill(last)
    assert p.notes == ()
    assert dict(p.values) == {
        "partition": "gpu",
        "walltime": "01:30:00",
        "cores": "3",
        "memory": "4G",
        "gpus": "1",
    }
    html = form.render_form(PARTS, default_partition="compute", prefilled=p)
    assert re.search(r'value="gpu" checked', html)
    assert 'id="xh-walltime" name="walltime" value="01:30:00"' in html
    assert 'value="3" required' in html and 'value="4G"' in html
    assert "Filled in with your last choices" in html


def test_a_value_no_longer_allowed_is_dropped_with_a_note():
    # the gpu partition now allows less than when the server was last started
    today = [PARTS[0], form.PartitionSpec.from_config("gpu", {"max_walltime": "01:00:00"})]
    last = {"partition": "gpu", "walltime": "01:30:00", "cores": "3", "gpus": "1"}
    p = prefill(last, today)
    assert dict(p.values) == {"partition": "gpu", "cores": "3"}  # still within 16
    assert len(p.notes) == 2  # walltime and gpus
    assert any(n.startswith("walltime '01:30:00': at most 01:00:00") for n in p.notes)
    html = form.render_form(today, default_partition="compute", prefilled=p)
    # the partition's defaults are proposed instead, and the page says why
    assert 'name="walltime" value="01:00:00"' in html and "01:30:00" in html
    assert "xh-prefill-notes" in html and "no longer all fit" in html


def test_a_partition_no_longer_offered_falls_back_to_the_default():
    p = prefill({"partition": "old", "cores": "8"})
    assert dict(p.values) == {"cores": "8"}  # checked against compute, the default
    assert p.notes[0].startswith("partition 'old': 'old' is not offered")


def test_prefill_never_lets_hostile_values_through():
    last = {"partition": "<script>", "walltime": "1;id", 'x"><b>': "1", "account": "a b"}
    p = prefill(last, allow_account=True)
    assert p.values == {}
    html = form.render_form(PARTS, default_partition="compute", prefilled=p)
    plain = form.render_form(PARTS, default_partition="compute")
    # the form's own script elements, and not one more: the hostile values are escaped
    assert html.count("<script") == plain.count("<script") > 0
    assert html.count("<script>") == plain.count("<script>")
    assert "&lt;script&gt;" in html and "<b>" not in html and 'x"><b>' not in html


def test_account_prefill_checks_today_list():
    p = prefill({"account": "abc"}, allow_account=True, accounts=["abc", "def"])
    assert p.values == {"account": "abc"}
    p = prefill({"account": "gone"}, allow_account=True, accounts=["abc"])
    assert p.values == {} and "is not one of" in p.notes[0]
    p = prefill({"account": "abc"}, allow_account=False)
    assert p.values == {} and "not chosen by users" in p.notes[0]


# ---------------------------------------------------------------- relaunch
def settings(**kw):
    base = dict(
        mode="gateway",
        partitions={"compute": {"max_cores": 8}, "debug": {"max_walltime": "00:30:00"}},
        partition="compute",
        walltime="01:00:00",
        cores=1,
        memory="2G",
        gpus=0,
        accounts=[],
        account="",
        allow_account_choice=None,
        qos="",
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_relaunch_takes_the_last_choices_when_they_all_pass():
    last = {"partition": "debug", "walltime": "00:20:00", "cores": "1"}
    opts = form.relaunch_options(settings(), last)
    assert opts == {"partition": "debug", "walltime": "00:20:00", "cores": "1"}
    form.validate_for(settings(), opts)  # and they pass the one gate


def test_relaunch_refuses_what_no_longer_fits_and_says_what():
    tighter = settings(partitions={"compute": {}, "debug": {"max_walltime": "00:10:00"}})
    with pytest.raises(v.InvalidValue) as e:
        form.relaunch_options(tighter, {"partition": "debug", "walltime": "00:20:00"})
    assert "walltime '00:20:00': at most 00:10:00" in e.value.message
    with pytest.raises(v.InvalidValue) as e:
        form.relaunch_options(settings(), {})
    assert "no earlier choices" in e.value.message


# ---------------------------------------------------------------- the home page
def test_apply_adds_the_home_page_after_the_sites_templates(tmp_path, monkeypatch):
    from xsedehub import config as xc

    from .test_config import good

    monkeypatch.setenv("JUPYTERHUB_CRYPT_KEY", "x" * 64)
    kh = tmp_path / "known_hosts"
    kh.write_text("@cert-authority * ssh-ed25519 AAAA\n")
    key = tmp_path / "gateway_key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    c = good(tmp_path)
    c.JupyterHub.template_paths = ["/etc/site/templates"]
    xc.apply(c)
    assert c.JupyterHub.template_paths == ["/etc/site/templates", xc.HUB_TEMPLATES]
    xc.apply(c)  # applied twice: listed once
    assert c.JupyterHub.template_paths.count(xc.HUB_TEMPLATES) == 1


def render_home_part(spawners) -> str:
    """xsedehub-relaunch.html as JupyterHub's loader and settings render it."""
    import jinja2
    from jupyterhub.app import JupyterHub

    from xsedehub.config import HUB_TEMPLATES

    base = JupyterHub()._template_paths_default()[0]
    loader = jinja2.ChoiceLoader(
        [
            jinja2.PrefixLoader({"templates": jinja2.FileSystemLoader([base])}, "/"),
            jinja2.FileSystemLoader([HUB_TEMPLATES, base]),
        ]
    )
    env = jinja2.Environment(loader=loader, autoescape=True)
    env.get_template("home.html")  # extends JupyterHub's own: it must resolve
    user = SimpleNamespace(
        escaped_name="ada-l", all_spawners=lambda include_default=True: iter(spawners)
    )
    return env.get_template("xsedehub-relaunch.html").render(
        user=user, base_url="/hub/", xsrf_token="t"
    )


def test_home_page_offers_start_again_for_stopped_servers_only():
    orm = SimpleNamespace  # a stopped server is JupyterHub's orm object: no .active
    html = render_home_part(
        [
            orm(name="", user_options={}, server=None),  # never started with options
            orm(name="gpu", user_options={"partition": "debug", "walltime": "20"}, server=None),
            SimpleNamespace(  # running: JupyterHub's Spawner wrapper
                name="cpu",
                active=True,
                server=object(),
                orm_spawner=orm(user_options={"partition": "compute"}),
                user_options={"partition": "compute"},
            ),
        ]
    )
    assert 'id="xh-relaunch-gpu"' in html and "xh-relaunch-cpu" not in html
    assert 'href="/hub/spawn/ada-l/gpu?opt-relaunch=last"' in html
    assert "partition debug, walltime 20" in html
    assert "xh-relaunch-default" not in html
    assert render_home_part([orm(name="", user_options={}, server=None)]).strip() == ""


def test_home_page_escapes_what_it_shows():
    html = render_home_part(
        [SimpleNamespace(name="x", user_options={"partition": "<b>x</b>"}, server=None)]
    )
    assert "<b>" not in html and "&lt;b&gt;" in html
