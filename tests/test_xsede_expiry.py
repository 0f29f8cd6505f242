"""xsede mode: certificates that expire while the servers run."""

from __future__ import annotations

import time

import pytest

from xsedehub.testbed import localhub

from .conftest import make_hub, stop_hub_and_proxy
from .test_gateway import in_cluster_root

pytestmark = pytest.mark.cluster

LIFETIME = 25


@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    wd = tmp_path_factory.mktemp("short-issuer")
    issuer = localhub.start_issuer(
        wd, cluster, port=8702, provider_url=provider, lifetime=f"{LIFETIME}s"
    )
    # no renewal margin and no refresh before stop: the spawner is on its own
    # the gateway account stands in for a site account that may watch users' jobs
    extra = (
        "c.XSEDECILogonAuthenticator.certificate_renew_margin = 0\n"
        "c.XSEDECILogonAuthenticator.refresh_pre_stop = False\n"
        f"c.SlurmSSHSpawner.site_user = {cluster.gateway_user!r}\n"
        f"c.SlurmSSHSpawner.site_key = {cluster.gateway_key!r}\n"
    )
    h = make_hub(
        tmp_path_factory.mktemp("xsede-expiry"),
        cluster,
        provider,
        mode="xsede",
        poll_interval=3,
        issuer_url="http://127.0.0.1:8702/v1/certificate",
        extra=extra,
    )
    yield h
    stop_hub_and_proxy(h)
    issuer.terminate()
    issuer.wait(10)


def test_servers_outlive_their_certificates_and_are_still_seen_to_end(hub):
    """alice's stop cancels over the connection opened while her certificate was valid;
    bob's job, after a hub restart has left no such connection, is watched through the
    site account, so its end is still noticed."""
    c = hub.client
    for name in ("alice", "bob"):
        c.login(f"cilogon-{name}")
        c.start(name)
    c.wait_ready("alice")
    c.wait_ready("bob")
    tok = c.user_token("alice")
    cred = "xsedehub_credential"
    ends = [c.get(f"/users/{n}").json()["auth_state"][cred] for n in ("alice", "bob")]
    jobs = {}
    for name in ("alice", "bob"):
        out = in_cluster_root(["squeue", "-h", "-u", name, "-t", "RUNNING", "-o", "%i"]).split()
        assert len(out) == 1
        jobs[name] = out[0]
    # wait past the certificates' end, with polls going on (every 3 s)
    time.sleep(max(0, max(e["valid_before"] for e in ends) - time.time()) + 8)
    assert max(e["valid_before"] for e in ends) < time.time()
    assert c.user("alice")["servers"][""]["ready"]
    assert c.server_api("alice", tok, "/status").status_code == 200
    c.stop("alice")
    state = in_cluster_root(["squeue", "-h", "-j", jobs["alice"], "-o", "%T"]).strip()
    assert state in ("", "CANCELLED", "COMPLETING"), state

    hub.restart()  # bob's live connection is gone with the old hub
    assert c.user("bob")["servers"][""]["ready"]
    in_cluster_root(["scancel", jobs["bob"]])  # the job ends (as at its walltime)
    c.wait_stopped("bob", timeout=60)
