"""Several clusters in one hub (SlurmSSHSpawner.clusters), no cluster needed: the model
and its path-named problems, the one-entry default, the spawner taking a server's
cluster (from its profile, from its state), the form grouped by cluster, and what must
stay per cluster (job watches: job ids repeat between clusters)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from traitlets.config import Config
from xsedehub.spawner import clusters as cl
from xsedehub.spawner import form
from xsedehub.spawner import validate as v
from xsedehub.spawner.services import HubServices
from xsedehub.spawner.spawner import SlurmSSHSpawner

BASE = {
    "login_host": "",
    "login_port": 22,
    "known_hosts": "/etc/xsedehub/known_hosts",
    "slurm_bin_dir": "/usr/bin",
    "partition": "compute",
    "partitions": {"compute": {"max_cores": 8}},
    "accounts": [],
    "account": "",
    "qos": "",
    "tunnel_host": "hub.example.org",
    "tunnel_port": 22,
    "tunnel_known_hosts": "/etc/xsedehub/hub_known_hosts",
    "tunnel_authorized_keys": "/etc/xsedehub/tunnelbot_authorized_keys",
    "tunnel_port_range": (20000, 29999),
    "cmd": ["jupyterhub-singleuser"],
    "gitpuller": "gitpuller",
    "walltime_extend_command": [],
    "job_python": "python3",
    "job_dir_root": ".xsedehub/jobs",
    "gateway_workdir_root": "workshop",
    "xsede_workdir": ".",
    "gateway_user": "gateway",
    "gateway_key": "/etc/xsedehub/gateway_key",
    "site_user": "",
    "site_key": "",
}
CLUSTERS = {
    "expanse": {
        "display_name": "Expanse (SDSC)",
        "login_host": "login.expanse.example.org",
        "known_hosts": "/etc/xsedehub/expanse_known_hosts",
        "partitions": {"shared": {"max_cores": 16}, "gpu-shared": {"max_gpus": 1}},
        "partition": "shared",
        "accounts": ["abc123"],
    },
    "delta": {
        "login_host": "login.delta.example.org",
        "gateway_user": "deltagw",
        "tunnel_authorized_keys": "/etc/xsedehub/delta_tunnel_keys",
        "tunnel_port_range": [30000, 39999],
        "job_dir_root": ".xh/jobs",
        "cmd": ["/sw/jupyter/bin/jupyterhub-singleuser"],
    },
}


def test_clusters_parse_and_take_what_they_leave_out_from_the_top_level():
    expanse, delta = cl.parse_clusters(CLUSTERS, BASE)
    assert (expanse.name, expanse.display_name, delta.display_name) == (
        "expanse",
        "Expanse (SDSC)",
        "delta",
    )
    assert [p.name for p in expanse.partition_specs] == ["shared", "gpu-shared"]
    assert expanse.partition_specs[1].max_gpus == 1
    assert expanse.accounts == ("abc123",) and delta.accounts == ()
    # delta leaves its partitions and host keys out: the top-level ones
    assert [p.name for p in delta.partition_specs] == ["compute"]
    assert delta.known_hosts == BASE["known_hosts"]
    assert delta.settings()["tunnel_port_range"] == (30000, 39999)
    assert delta.settings()["gateway_user"] == "deltagw"
    assert expanse.settings()["tunnel_port_range"] == (20000, 29999)
    assert set(expanse.settings()) == set(cl.SETTINGS)


def test_without_clusters_the_top_level_settings_are_the_one_cluster():
    (only,) = cl.parse_clusters({}, {**BASE, "login_host": "login.example.org"})
    assert only.name == cl.DEFAULT
    assert only.login_host == "login.example.org"
    assert only.settings()["partitions"] == BASE["partitions"]


def problems(clusters: dict, mode: str = "gateway") -> list[str]:
    with pytest.raises(cl.ClusterProblems) as e:
        cl.parse_clusters(clusters, BASE, mode)
    return [p.field for p in e.value.problems]


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"expanse": {"partitions": {"gpu": {"max_gpus": "many"}}}}, "partitions.gpu.max_gpus"),
        (
            {"expanse": {"partitions": {"gpu": {"max_walltime": "forever"}}}},
            "partitions.gpu.max_walltime",
        ),
        ({"expanse": {"partitions": {"gpu": {"gpus": 1}}}}, "partitions.gpu"),
        (
            {"expanse": {"partitions": {"gpu": {"default_cores": 9, "max_cores": 2}}}},
            "partitions.gpu.default_cores",
        ),
        ({"expanse": {"partitions": {"bad name": {}, "bad-name": {}}}}, "partitions['bad name']"),
        ({"expanse": {"login_host": ""}}, "login_host"),
        ({"expanse": {"login_host": "a host; rm"}}, "login_host"),
        ({"expanse": {"login_port": 70000}}, "login_port"),
        ({"expanse": {"known_hosts": "relative/file"}}, "known_hosts"),
        ({"expanse": {"slurm_bin_dir": "bin"}}, "slurm_bin_dir"),
        ({"expanse": {"partition": "nope"}}, "partition"),
        ({"expanse": {"accounts": ["ok", "not ok"]}}, "accounts[1]"),
        ({"expanse": {"accounts": "abc123"}}, "accounts"),
        ({"expanse": {"tunnel_port_range": [2000, 1999]}}, "tunnel_port_range"),
        ({"expanse": {"tunnel_port_range": [80, 90]}}, "tunnel_port_range[0]"),
        ({"expanse": {"job_dir_root": "/abs"}}, "job_dir_root"),
        ({"expanse": {"cmd": "jupyterhub-singleuser"}}, "cmd"),
        ({"expanse": {"cmd": []}}, "cmd"),
        ({"expanse": {"walltime_extend_command": ["sudo", ""]}}, "walltime_extend_command"),
        ({"expanse": {"gateway_user": "Not A User"}}, "gateway_user"),
        ({"expanse": {"gateway_key": ""}}, "gateway_key"),
        ({"expanse": {"site_user": "watcher"}}, "site_key"),
        ({"expanse": {"issuer_url": "https://issuer.example.org/v1/certificate"}}, "issuer_url"),
        ({"expanse": {"login_hots": "x"}}, ""),  # unknown key: the cluster itself
        ({"expanse": "login.example.org"}, ""),
    ],
)
def test_each_problem_is_named_with_its_path(change, expected):
    entry = change["expanse"]
    if isinstance(entry, dict):
        entry = {**CLUSTERS["expanse"], **entry}
        if "partitions" in change["expanse"]:  # their own partition, the default
            entry["partition"] = next(iter(change["expanse"]["partitions"])).replace(" ", "-")
    found = problems({"expanse": entry, "delta": CLUSTERS["delta"]})
    assert found == ["clusters.expanse" + (f".{expected}" if expected else "")], found


def test_xsede_issuer_goes_with_its_secret_and_must_be_https():
    found = problems(
        {"a": {**CLUSTERS["expanse"], "issuer_url": "http://issuer.example.org/v1/certificate"}},
        "xsede",
    )
    assert found.count("clusters.a.issuer_url") == 1 and "clusters.a.issuer_secret_file" in found


def test_clusters_may_not_share_a_login_node_nor_overlap_tunnel_ports():
    both = {
        "a": CLUSTERS["expanse"],
        "b": {**CLUSTERS["expanse"], "tunnel_port_range": [20500, 20600]},
        "c": {**CLUSTERS["delta"], "tunnel_port_range": [29000, 30500]},
    }
    found = problems(both)
    assert "clusters.b.login_host" in found  # a's login node
    assert "clusters.b.tunnel_port_range" in found  # a's key file, another range
    assert "clusters.c.tunnel_port_range" in found  # its own file, overlapping a's


def test_every_problem_of_every_cluster_is_reported_at_once():
    found = problems(
        {
            "a": {**CLUSTERS["expanse"], "login_port": 0, "job_python": ""},
            "b": {**CLUSTERS["delta"], "partitions": {"x": {"max_gpus": -1}}, "partition": "x"},
        }
    )
    assert found == [
        "clusters.a.login_port",
        "clusters.a.job_python",
        "clusters.b.partitions.x.max_gpus",
    ]


# ---------------------------------------------------------------- the spawner
PROFILES = {
    "expanse-cpu": {"cluster": "expanse", "partition": "shared", "max_cores": 4},
    "expanse-gpu": {"cluster": "expanse", "partition": "gpu-shared", "default_gpus": 1},
    "delta-cpu": {"cluster": "delta"},
    "first-cpu": {"partition": "shared"},  # no cluster: the first one
}


def spawner(tmp_path, clusters=CLUSTERS, profiles=PROFILES, **top) -> SlurmSSHSpawner:
    c = Config()
    for k, val in {**BASE, **top}.items():
        setattr(c.SlurmSSHSpawner, k, val)
    c.SlurmSSHSpawner.clusters = clusters
    c.SlurmSSHSpawner.profiles = profiles
    c.SlurmSSHSpawner.pending_cancel_file = str(tmp_path / "pending.json")
    user = SimpleNamespace(name="ada", id=7, groups=[], url="/user/ada/")
    return SlurmSSHSpawner(config=c, user=user)


def test_the_profile_chooses_the_cluster_and_its_settings(tmp_path):
    sp = spawner(tmp_path)
    r = sp.validate_options({"profile": "delta-cpu"})
    assert (sp.cluster_name, sp.login_host, sp.gateway_user) == (
        "delta",
        "login.delta.example.org",
        "deltagw",
    )
    assert (r.partition, sp.job_dir_root, tuple(sp.tunnel_port_range), sp.cmd) == (
        "compute",
        ".xh/jobs",
        (30000, 39999),
        ["/sw/jupyter/bin/jupyterhub-singleuser"],
    )
    r = sp.validate_options({"profile": "expanse-gpu"})
    assert (sp.cluster_name, sp.login_host, r.partition, r.gpus) == (
        "expanse",
        "login.expanse.example.org",
        "gpu-shared",
        1,
    )
    # everything the delta server had set is expanse's again
    assert sp.cmd == ["jupyterhub-singleuser"]
    assert (sp.gateway_user, sp.job_dir_root, sp.accounts) == (
        "gateway",
        ".xsedehub/jobs",
        ["abc123"],
    )
    sp.validate_options({"profile": "first-cpu"})
    assert sp.cluster_name == "expanse"
    with pytest.raises(v.InvalidValue, match="at most 4"):
        sp.validate_options({"profile": "expanse-cpu", "cores": 5})


def test_a_profile_is_checked_against_its_own_clusters_partitions(tmp_path):
    sp = spawner(tmp_path, profiles={"x": {"cluster": "delta", "partition": "shared"}})
    with pytest.raises(v.InvalidValue) as e:
        form.profile_list(sp, [])
    assert [p.field for p in e.value.problems] == ["profiles.x.partition"]
    sp = spawner(tmp_path, profiles={"x": {"cluster": "nowhere"}})
    with pytest.raises(v.InvalidValue) as e:
        form.profile_list(sp, [])
    assert [p.field for p in e.value.problems] == ["profiles.x.cluster"]


def test_a_profile_naming_a_cluster_on_a_hub_without_clusters_is_refused(tmp_path):
    sp = spawner(tmp_path, clusters={}, profiles={"x": {"cluster": "delta"}})
    with pytest.raises(v.InvalidValue, match="no clusters"):
        form.profile_list(sp, form.partition_specs(sp))


def test_state_records_the_cluster_and_restores_it(tmp_path):
    sp = spawner(tmp_path)
    sp.validate_options({"profile": "delta-cpu"})
    sp.job_id, sp.hub_port, sp.spawn_id = "42", 20001, "7-abc"
    state = sp.get_state()
    assert state["cluster"] == "delta" and state["version"] == 2
    again = spawner(tmp_path)
    again.load_state(state)
    assert (again.cluster_name, again.login_host) == ("delta", "login.delta.example.org")
    # a server with a job stays on its cluster, whatever its options say
    again.validate_options({"profile": "expanse-cpu"})
    assert again.login_host == "login.delta.example.org"


def test_a_state_from_before_clusters_is_the_old_login_nodes_cluster(tmp_path):
    old = {"version": 1, "job_id": "42", "hub_port": 20001, "spawn_id": "7-abc", "ssh_user": "gw"}
    sp = spawner(tmp_path, login_host="login.expanse.example.org")
    sp.load_state(old)
    assert (sp.cluster_name, sp.login_host) == ("expanse", "login.expanse.example.org")


async def test_a_job_on_a_cluster_no_longer_configured_is_kept_and_never_cancelled_elsewhere(
    tmp_path,
):
    sp = spawner(tmp_path)
    sp.load_state({"version": 2, "job_id": "42", "spawn_id": "7-abc", "cluster": "gone"})
    assert await sp.poll() is None  # kept: its tunnel may still serve it
    await sp.stop()  # no scancel of job 42 on another cluster's login node
    assert sp.job_id == "" and not (tmp_path / "pending.json").exists()


async def test_ending_a_job_leaves_the_same_job_id_on_another_cluster_watched(tmp_path):
    """Job ids repeat between clusters: stopping job 42 on delta must not stop the hub
    watching job 42 on expanse (it would no longer learn that that job ended)."""
    pool = HubServices.shared().pool
    sp = spawner(tmp_path)
    watched = []
    for name in ("expanse", "delta"):
        c = sp.use_cluster(name)
        conn = pool.get(sp.login_node(c), _identity(name))
        conn.status._watched["42"] = object()
        watched.append(conn)
    sp.job_id = "42"  # on delta; its cancel fails (no key file) and is recorded
    await sp._end_job(None, attempts=1)
    assert "42" in watched[0].status._watched
    assert "42" not in watched[1].status._watched
    for conn in watched:
        conn.status._watched.clear()


def _identity(name: str):
    import asyncssh
    from xsedehub.spawner.ssh import SSHIdentity

    return SSHIdentity(name, asyncssh.generate_private_key("ssh-ed25519"), label="test")


# ---------------------------------------------------------------- the form
def test_the_form_groups_profile_cards_by_cluster_and_says_which_is_unavailable(tmp_path):
    sp = spawner(tmp_path)
    avail = form.parse_sinfo("shared*|up|2-00:00:00|4|8/24/0/32|(null)\n")
    status = [
        form.ClusterStatus("expanse", "Expanse (SDSC)", "", avail),
        form.ClusterStatus("delta", "delta", "", None, "its login node does not answer (down)"),
    ]
    html = form.form_for(sp, {}, None, status)
    exp, delta = (
        html.index('data-cluster="expanse" data-available="yes"'),
        html.index('data-cluster="delta" data-available="no"'),
    )
    assert (
        exp
        < html.index('data-profile="first-cpu"')
        < delta
        < html.index('data-profile="delta-cpu"')
    )
    assert "24 of 32 cores idle" in html  # expanse's availability on its cards
    assert "unavailable" in html and "does not answer (down)" in html


def test_the_hub_does_not_start_with_a_bad_cluster_or_several_without_profiles(tmp_path):
    from xsedehub import config as xc

    from .test_config import ENV, good

    for name in ("known_hosts", "expanse_known_hosts"):
        (tmp_path / name).write_text("@cert-authority * ssh-ed25519 AAAA\n")
    (tmp_path / "gateway_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "gateway_key").chmod(0o600)
    c = good(tmp_path)
    clusters = {
        "expanse": {
            **CLUSTERS["expanse"],
            "known_hosts": str(tmp_path / "expanse_known_hosts"),
            "partitions": {"gpu": {"max_gpus": -1}},
            "partition": "gpu",
        },
        "delta": {**CLUSTERS["delta"], "known_hosts": str(tmp_path / "missing")},
    }
    c.SlurmSSHSpawner.clusters = clusters
    found = [p.setting for p in xc.check(c, "gateway", environ=ENV)]
    assert found == ["SlurmSSHSpawner.clusters.expanse.partitions.gpu.max_gpus"], found
    clusters["expanse"]["partitions"] = {"gpu": {"max_gpus": 1}}
    found = [p.setting for p in xc.check(c, "gateway", environ=ENV)]
    assert found == ["SlurmSSHSpawner.clusters.delta.known_hosts", "SlurmSSHSpawner.profiles"]
    clusters["delta"]["known_hosts"] = str(tmp_path / "known_hosts")
    c.SlurmSSHSpawner.profiles = {"a": {"cluster": "expanse"}, "b": {"cluster": "delta"}}
    assert xc.check(c, "gateway", environ=ENV) == []
