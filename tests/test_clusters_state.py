"""Which cluster a server's job is on, after a restart or a change of the configuration
(security review of several clusters, findings 1-3): a job is polled and cancelled only
on the login node it was submitted on, never on another whose same job id is someone
else's job; a spawn never mixes the top-level settings with a cluster's."""

from __future__ import annotations

from xsedehub import orphans

from .test_clusters_unit import CLUSTERS as CLUSTERS_
from .test_clusters_unit import spawner

OLD = {"version": 1, "job_id": "42", "hub_port": 20001, "spawn_id": "7-abc", "ssh_user": "gw"}


def test_a_state_from_before_clusters_is_the_cluster_of_the_old_login_node(tmp_path):
    clusters = {"new": {"login_host": "login.new.example"}, "old": {}}
    profiles = {"a": {"cluster": "new"}, "b": {"cluster": "old"}}
    sp = spawner(tmp_path, clusters, profiles, login_host="login.old.example")
    sp.load_state(OLD)
    assert (sp.cluster_name, sp.login_host, sp._lost_cluster) == ("old", "login.old.example", "")


async def test_a_state_from_before_clusters_whose_login_node_is_gone_is_lost(tmp_path):
    clusters = {"new": {"login_host": "login.new.example"}}
    sp = spawner(tmp_path, clusters, {}, login_host="login.old.example")
    sp.load_state(OLD)
    assert sp._lost_cluster == "login.old.example:22"
    assert await sp.poll() is None  # kept, never polled on login.new
    # saved again as it was: a restart does not take it for login.new's
    state = sp.get_state()
    assert (state["login_host"], state.get("cluster")) == ("login.old.example", None)
    again = spawner(tmp_path, clusters, {}, login_host="login.old.example")
    again.load_state(state)
    assert again._lost_cluster == "login.old.example:22"
    await sp.stop()  # no scancel of job 42 on login.new, not even recorded for later
    assert sp.job_id == "" and not (tmp_path / "pending.json").exists()


def test_the_state_records_the_login_node_and_a_changed_one_is_lost(tmp_path):
    sp = spawner(tmp_path)
    sp.validate_options({"profile": "delta-cpu"})
    sp.job_id, sp.spawn_id = "42", "7-abc"
    state = sp.get_state()
    assert (state["login_host"], state["login_port"]) == ("login.delta.example.org", 22)
    moved = spawner(
        tmp_path, {**CLUSTERS_, "delta": {**CLUSTERS_["delta"], "login_host": "login.b.example"}}
    )
    moved.load_state(state)
    assert moved._lost_cluster == "delta" and moved.login_host != "login.b.example"


def test_a_state_naming_a_cluster_on_a_hub_without_clusters_is_lost(tmp_path):
    sp = spawner(tmp_path, {}, {}, login_host="login.expanse.example.org")
    sp.load_state({"version": 2, "job_id": "42", "spawn_id": "7-abc", "cluster": "delta"})
    assert sp._lost_cluster == "delta"
    assert sp.get_state()["cluster"] == "delta"
    # a hub without clusters whose login node changed: lost too
    sp = spawner(tmp_path, {}, {}, login_host="login.expanse.example.org")
    sp.load_state({**OLD, "version": 2, "login_host": "login.other.example", "login_port": 22})
    assert sp._lost_cluster == "login.other.example:22"
    # the same login node: the job's
    sp = spawner(tmp_path, {}, {}, login_host="login.other.example")
    sp.load_state({**OLD, "version": 2, "login_host": "login.other.example", "login_port": 22})
    assert sp._lost_cluster == "" and sp.login_host == "login.other.example"


def test_one_named_cluster_without_profiles_is_the_spawns_cluster(tmp_path):
    only = {
        "only": {
            "login_host": "login.only.example",
            "partitions": {"p1": {"max_cores": 2}},
            "partition": "p1",
        }
    }
    sp = spawner(tmp_path, only, {}, login_host="login.top.example")
    r = sp.validate_options({})
    assert (sp.cluster_name, sp.login_host, r.partition) == ("only", "login.only.example", "p1")
    assert sp.login_node().host == sp.cluster().login_host
    sp.job_id = "42"
    state = sp.get_state()
    assert (state["cluster"], state["login_host"]) == ("only", "login.only.example")


def test_orphans_count_a_state_without_cluster_for_any_cluster_it_may_be_on():
    v1 = {"job_id": "42"}
    v2 = {"job_id": "42", "login_host": "login.a", "login_port": 22}
    assert orphans._may_be_on(v1, "a", ("login.a", 22))
    assert orphans._may_be_on(v1, "b", ("login.b", 22))  # may be: never cancelled as orphan
    assert orphans._may_be_on(v2, "a", ("login.a", 22))
    assert not orphans._may_be_on(v2, "b", ("login.b", 22))
    assert not orphans._may_be_on({**v2, "cluster": "a"}, "b", ("login.a", 22))
