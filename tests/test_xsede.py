"""mode=xsede end to end: CILogon-like login at the local provider, a certificate from
the reference issuer, jobs that run as the user's own Unix account."""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import pytest
import requests

from xsedehub.testbed import localhub

from .audit import ArgvScanner, audit, job_dir, private_key_needles
from .conftest import PROVIDER, make_hub, stop_hub_and_proxy
from .hubclient import LoginRefused

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def hub(cluster, provider, issuer, tmp_path_factory):
    h = make_hub(
        tmp_path_factory.mktemp("xsedehub"), cluster, provider, mode="xsede", poll_interval=5
    )
    h.started = time.time()
    yield h
    stop_hub_and_proxy(h)


def credential(hub, name: str) -> dict:
    r = hub.client.get(f"/users/{name}")
    r.raise_for_status()
    return r.json()["auth_state"]["xsedehub_credential"]


async def test_researchers_run_as_themselves(hub, cluster, issuer):
    c = hub.client
    for sub in ("cilogon-alice", "cilogon-bob"):
        c.login(sub)
    names = ["alice", "bob"]
    for name in names:
        cred = credential(hub, name)
        assert cred["principal"] == name
        assert cred["certificate"].startswith("ssh-ed25519-cert-v01@openssh.com ")
        assert cred["valid_before"] - time.time() <= 3600 + 5
    with ArgvScanner() as scan, concurrent.futures.ThreadPoolExecutor(2) as ex:
        for r in ex.map(c.start, names):
            assert r.status_code in (201, 202), r.text
        list(ex.map(c.wait_ready, names))
    for name in names:
        tok = c.user_token(name)
        out = await c.execute(
            name,
            tok,
            "import os, subprocess\n"
            "open('written-by-kernel.txt', 'w').write('x')\n"
            "print(subprocess.run(['id', '-un'], capture_output=True, text=True).stdout.strip(),"
            " os.environ['SLURMD_NODENAME'], os.getcwd())",
        )
        who, node, cwd = out.split()
        assert who == name
        assert node in cluster.nodes
        assert cwd == f"/home/{name}"
        f = Path(f"/home/{name}/written-by-kernel.txt")
        assert f.owner() == name
        f.unlink()
    # both ran at once, each under its own account
    from .test_gateway import in_cluster_root

    q = in_cluster_root(["squeue", "-h", "-o", "%u %T"])
    assert {"alice RUNNING", "bob RUNNING"} <= set(q.splitlines())
    # the secrets audit, with the users' own keys and certificates among the secrets
    jobs = [
        in_cluster_root(["squeue", "-h", "-u", n, "-t", "RUNNING", "-o", "%i"]).split()[0]
        for n in names
    ]
    user_secrets = []
    for name in names:
        cred = credential(hub, name)
        user_secrets += private_key_needles(cred["private_key"])
    assert audit(scan, jobs, hub.log, user_secrets) >= 8
    for name, job in zip(names, jobs, strict=True):
        assert str(job_dir(job)).startswith(f"/home/{name}/")
    # the issuer wrote one audit line per certificate, and no token or key
    issuer_log = (issuer / "issuer.log").read_text()
    assert "issued serial=" in issuer_log
    assert "principal=alice" in issuer_log and "principal=bob" in issuer_log
    assert "PRIVATE KEY" not in issuer_log
    for name in names:
        state = c.get(f"/users/{name}").json()["auth_state"]
        assert state["token_response"]["access_token"] not in issuer_log
        assert state["xsedehub_credential"]["certificate"].split()[1][48:120] not in issuer_log
    for name in names:
        c.stop(name)


def test_unmapped_identity_cannot_log_in(hub):
    with pytest.raises(LoginRefused) as e:
        hub.client.login("cilogon-mallory")
    assert e.value.status == 403
    assert "not mapped to an account on this cluster" in e.value.body


def test_certificate_near_expiry_is_renewed_before_a_spawn(hub):
    c = hub.client
    c.login("cilogon-alice")
    state = c.get("/users/alice").json()["auth_state"]
    old = state["xsedehub_credential"]
    # pretend the certificate expires in a minute (inside the 300 s renewal margin)
    state["xsedehub_credential"] = dict(old, valid_before=time.time() + 60)
    r = c.api.patch(f"{c.url}/hub/api/users/alice", json={"auth_state": state}, timeout=30)
    assert r.status_code == 200, r.text
    assert credential(hub, "alice")["valid_before"] < time.time() + 120  # the hub took it
    r = c.start("alice")
    assert r.status_code in (201, 202), r.text
    c.wait_ready("alice")
    new = credential(hub, "alice")
    assert new["serial"] != old["serial"]
    assert new["valid_before"] > time.time() + 3000
    c.stop("alice")


def test_certificate_that_cannot_be_renewed_asks_for_a_new_login(hub):
    c = hub.client
    session = c.login("cilogon-bob")
    state = c.get("/users/bob").json()["auth_state"]
    state["xsedehub_credential"]["valid_before"] = time.time() + 60
    r = c.api.patch(f"{c.url}/hub/api/users/bob", json={"auth_state": state}, timeout=30)
    assert r.status_code == 200, r.text
    assert credential(hub, "bob")["valid_before"] < time.time() + 120  # the hub took it
    # the identity provider forgets bob's tokens: no refresh is possible
    requests.post(f"{PROVIDER}/users/cilogon-bob/revoke-tokens", timeout=10).raise_for_status()
    r = c.start_as_user(session, "bob")  # bob presses Start
    assert r.status_code == 403, r.text
    assert "login again" in r.json()["message"]
    assert "Traceback" not in r.text
    assert not c.user("bob")["servers"]
    # a new login gets a new certificate and the spawn works
    session = c.login("cilogon-bob")
    assert credential(hub, "bob")["valid_before"] > time.time() + 3000
    r = c.start_as_user(session, "bob")
    assert r.status_code in (201, 202), r.text
    c.wait_ready("bob")
    c.stop("bob")


def test_hub_disk_holds_no_user_key_or_certificate(hub):
    """After the sessions above: nothing on the hub's disk but the encrypted auth_state."""
    creds = []
    for name in ("alice", "bob"):
        cred = credential(hub, name)
        # past the first 48 characters, which encode the type name every certificate shares
        creds += [cred["certificate"].split()[1][48:120], *private_key_needles(cred["private_key"])]
    roots = [
        hub.workdir,
        Path("/tmp"),
        Path("/var/tmp"),
        Path("/dev/shm"),
        Path("/root"),
        Path("/run"),
    ]
    hits = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if "pytest-of-" in dirpath and not str(dirpath).startswith(str(hub.workdir)):
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if d not in (".cache", "netns", "proc")]
            for fn in filenames:
                p = Path(dirpath, fn)
                try:
                    if (
                        not p.is_file()
                        or p.stat().st_mtime < hub.started - 5
                        or p.stat().st_size > 50e6
                    ):
                        continue
                    data = p.read_bytes()
                except OSError:
                    continue
                if (
                    b"-cert-v01@openssh.com" in data
                    or b"OPENSSH PRIVATE KEY" in data
                    or any(s.encode() in data for s in creds)
                ):
                    hits.append(str(p))
    assert hits == []


def test_hub_refuses_to_start_without_crypt_key(cluster, provider, tmp_path):
    import subprocess
    import sys

    localhub.write_config(tmp_path, cluster, mode="xsede", public_port=18000)
    (tmp_path / "crypt_key").unlink()  # XSEDEHub.crypt_key_file names a missing file
    env = {k: v for k, v in os.environ.items() if k != "JUPYTERHUB_CRYPT_KEY"}
    r = subprocess.run(
        [sys.executable, "-m", "jupyterhub", "-f", str(tmp_path / "jupyterhub_config.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"XSEDEHub.crypt_key_file: {tmp_path / 'crypt_key'} does not exist" in out
    assert "openssl rand -hex 32" in out


def test_issuer_down_during_login_then_back(hub):
    import signal

    from .conftest import ISSUER

    proc = ISSUER["proc"]
    proc.send_signal(signal.SIGSTOP)  # the issuer hangs: requests time out
    try:
        with pytest.raises(LoginRefused) as e:
            hub.client.login("cilogon-bob")
        assert e.value.status == 503
        assert "certificate service is unavailable, try again later" in e.value.body
        assert "Traceback" not in e.value.body
    finally:
        proc.send_signal(signal.SIGCONT)
    hub.client.login("cilogon-bob")  # a retry later works
    assert credential(hub, "bob")["principal"] == "bob"
