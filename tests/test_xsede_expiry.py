"""xsede mode: a certificate that expires while the server runs."""

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
    extra = (
        "c.XSEDECILogonAuthenticator.certificate_renew_margin = 0\n"
        "c.XSEDECILogonAuthenticator.refresh_pre_stop = False\n"
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


def test_server_outlives_its_certificate_and_stop_still_cancels(hub):
    c = hub.client
    c.login("cilogon-alice")
    c.start("alice")
    c.wait_ready("alice")
    tok = c.user_token("alice")
    cred = c.get("/users/alice").json()["auth_state"]["xsedehub_credential"]
    job = in_cluster_root(["squeue", "-h", "-u", "alice", "-t", "RUNNING", "-o", "%i"]).split()
    assert len(job) == 1
    # wait past the certificate's end, with polls going on (every 3 s)
    time.sleep(max(0, cred["valid_before"] - time.time()) + 8)
    assert cred["valid_before"] < time.time()
    assert c.user("alice")["servers"][""]["ready"]
    assert c.server_api("alice", tok, "/status").status_code == 200
    c.stop("alice")
    state = in_cluster_root(["squeue", "-h", "-j", job[0], "-o", "%T"]).strip()
    assert state in ("", "CANCELLED", "COMPLETING"), state
