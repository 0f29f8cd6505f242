"""Who the hub is on each cluster (security review of several clusters, findings 4 and
6-10): each cluster's certificate comes from its own issuer (or, by the admin's say-so,
is the login's), is kept with the issuer and login node it is for, is used while valid
when its renewal fails, is asked for only to start a server (never to show the form);
each issuer has its own secret; a lost job's tunnel key is revoked wherever it may be."""

from __future__ import annotations

import time
from types import SimpleNamespace

import asyncssh
import pytest
from xsedehub.auth.issuer_client import Credential
from xsedehub.spawner import clusters as cl
from xsedehub.spawner import identity
from xsedehub.spawner.errors import CredentialExpired, SpawnError

from xsedehub import config as xc

from .test_clusters_unit import BASE, CLUSTERS, spawner

ISSUER = "https://issuer.delta.example.org/v1/certificate"


def issuing(**delta) -> dict:
    return {
        "expanse": {**CLUSTERS["expanse"], "login_certificate": True},
        "delta": {
            **CLUSTERS["delta"],
            "issuer_url": ISSUER,
            "issuer_secret_file": "/etc/xsedehub/delta_secret",
            **delta,
        },
    }


def problems(config: dict, mode: str) -> list[str]:
    try:
        cl.parse_clusters(config, BASE, mode)
    except cl.ClusterProblems as e:
        return [p.field for p in e.problems]
    return []


# ---------------------------------------------------------------- 6: login certificate
def test_xsede_a_cluster_takes_the_login_certificate_only_when_told_to():
    assert problems(issuing(), "xsede") == []
    no_say = {"expanse": CLUSTERS["expanse"], "delta": issuing()["delta"]}
    assert problems(no_say, "xsede") == ["clusters.expanse.issuer_url"]
    both = issuing(login_certificate=True)
    assert problems(both, "xsede") == ["clusters.delta.login_certificate"]
    assert problems({"a": {**CLUSTERS["expanse"], "login_certificate": True}}, "gateway") == [
        "clusters.a.login_certificate"
    ]
    assert problems({"a": {**CLUSTERS["expanse"], "login_certificate": "yes"}}, "xsede") == [
        "clusters.a.login_certificate"
    ]
    # a hub without clusters: the login's certificate, as before
    assert cl.parse_clusters({}, BASE, "xsede")[0].login_certificate


# ---------------------------------------------------------------- 7: issuer secrets
def test_each_certificate_issuer_has_its_own_secret(tmp_path):
    login, a, b = (tmp_path / n for n in ("login", "a", "b"))
    login.write_text("11" * 32 + "\n")
    a.write_text("22" * 32 + "\n")
    b.write_text("11" * 32)  # the login issuer's, in another file

    def found(secret_a, secret_b) -> list[tuple[str, str]]:
        specs = cl.parse_clusters(
            {
                "expanse": issuing()["expanse"],
                "delta": issuing(issuer_secret_file=str(secret_a))["delta"],
                "c": {
                    **CLUSTERS["expanse"],
                    "login_host": "login.c.example",
                    "issuer_url": ISSUER,
                    "issuer_secret_file": str(secret_b),
                },
            },
            BASE,
            "xsede",
        )
        return [(p.setting, p.message) for p in xc._shared_secrets(specs, str(login))]

    assert found(a, tmp_path / "c") == []
    ((setting, why),) = found(a, b)
    assert setting == "SlurmSSHSpawner.clusters.c.issuer_secret_file"
    assert why == "holds the same secret as XSEDECILogonAuthenticator.issuer_secret_file"
    ((setting, why),) = found(a, a)
    assert setting == "SlurmSSHSpawner.clusters.c.issuer_secret_file"
    assert why == f"is {a}, as is SlurmSSHSpawner.clusters.delta.issuer_secret_file"


# ---------------------------------------------------------------- 8, 10: kept certificates
def credential(name: str, lifetime: float) -> Credential:
    ca = asyncssh.generate_private_key("ssh-ed25519")
    key = asyncssh.generate_private_key("ssh-ed25519")
    now = time.time()
    cert = ca.generate_user_certificate(
        key, "k", principals=[name], valid_after=int(now) - 60, valid_before=int(now + lifetime)
    )
    return Credential(
        key.export_private_key().decode(),
        cert.export_certificate().decode(),
        name,
        1,
        now - 60,
        now + lifetime,
    )


class User:
    """What the spawner reads of a JupyterHub user: no ID token (it has expired)."""

    name = "ada"

    def __init__(self, kept: dict):
        self.state = {identity.CLUSTER_STATE_KEY: kept}
        self.reads = 0

    async def get_auth_state(self):
        self.reads += 1
        return dict(self.state)

    async def save_auth_state(self, state):
        self.state = state


def delta_spec() -> cl.ClusterSpec:
    return cl.parse_clusters(issuing(), BASE, "xsede")[1]


def kept(cred: Credential, spec: cl.ClusterSpec, **change) -> dict:
    return {
        spec.name: {
            **cred.to_state(),
            "issuer_url": spec.issuer_url,
            "login_node": [spec.login_host, spec.login_port],
            **change,
        }
    }


async def test_a_failed_renewal_keeps_the_valid_certificate_then_says_expired():
    spec = delta_spec()
    near = credential("bob", identity.CLUSTER_RENEW_MARGIN / 2)  # to renew; no ID token
    ident = await identity.cluster_certificate_identity(User(kept(near, spec)), spec)
    assert ident.username == "bob"
    gone = credential("bob", -10)
    with pytest.raises(CredentialExpired, match="has expired and could not be renewed"):
        await identity.cluster_certificate_identity(User(kept(gone, spec)), spec)


async def test_a_kept_certificate_is_only_for_the_issuer_and_login_node_it_was_got_for():
    spec = delta_spec()
    cred = credential("bob", 3600)
    assert (await identity.cluster_certificate_identity(User(kept(cred, spec)), spec)).username
    for change in ({"issuer_url": "https://other.example/v1/certificate"}, {"login_node": None}):
        user = User(kept(cred, spec, **change))
        with pytest.raises(SpawnError, match="No login token"):  # asks anew, not reused
            await identity.cluster_certificate_identity(user, spec)
    old_format = {spec.name: cred.to_state()}  # saved without what it is for
    with pytest.raises(SpawnError, match="No login token"):
        await identity.cluster_certificate_identity(User(old_format), spec)


# ---------------------------------------------------------------- 4: the form
async def test_the_form_sends_no_login_token_to_any_issuer_and_asks_only_my_clusters(tmp_path):
    sp = spawner(
        tmp_path,
        issuing(),
        {"e": {"cluster": "expanse", "users": ["someone-else"]}, "d": {"cluster": "delta"}},
    )
    sp.mode = "xsede"
    sp.user = user = SimpleNamespace(
        name="ada", id=7, groups=[], url="/user/ada/", get_auth_state=None
    )
    reads = []

    async def get_auth_state():
        reads.append(1)
        return {"id_token": "secret-token"}

    user.get_auth_state = get_auth_state
    status = {s.name: s for s in await sp.cluster_status()}
    assert reads == []  # no certificate asked for: no token sent anywhere
    # delta (its own issuer, no site account): no availability rather than a certificate
    assert status["delta"].availability == {}
    # expanse: none of ada's profiles is on it, so it is not asked
    assert status["expanse"].availability == {}


# ---------------------------------------------------------------- 9: lost job's tunnel key
async def test_stopping_a_job_of_a_removed_cluster_revokes_its_tunnel_key(tmp_path):
    line = "restrict,port-forwarding ssh-ed25519 AAAA xsedehub:7-abc\n"
    other = "restrict,port-forwarding ssh-ed25519 BBBB xsedehub:7-def\n"
    recorded, top = tmp_path / "gone_keys", tmp_path / "top_keys"
    for f in (recorded, top):
        f.write_text(line + other)
    sp = spawner(tmp_path, CLUSTERS, {}, tunnel_authorized_keys=str(top))
    sp.load_state(
        {
            "version": 2,
            "job_id": "42",
            "spawn_id": "7-abc",
            "cluster": "gone",
            "tunnel_authorized_keys": str(recorded),
        }
    )
    assert sp.get_state()["tunnel_authorized_keys"] == str(recorded)
    await sp.stop()
    assert recorded.read_text() == other and top.read_text() == other


# ---------------------------------------------------------------- 5: admin certificates
def test_an_admin_certificate_goes_to_the_one_cluster_named(tmp_path):
    from xsedehub.check import run_check
    from xsedehub.orphans import OrphansError, find_orphans

    config = tmp_path / "jupyterhub_config.py"
    config.write_text(
        "c.XSEDEHub.mode = 'gateway'\n"
        f"for k, v in {BASE!r}.items(): setattr(c.SlurmSSHSpawner, k, v)\n"
        f"c.SlurmSSHSpawner.clusters = {CLUSTERS!r}\n"
        "c.SlurmSSHSpawner.profiles = {'a': {'cluster': 'expanse'}, 'b': {'cluster': 'delta'}}\n"
    )
    cert = (str(tmp_path / "key"), str(tmp_path / "key-cert.pub"))
    lines: list[str] = []
    report = run_check(str(config), out=lines.append, certificate=cert)
    assert report.failed and "name it with --cluster" in "\n".join(report.lines)
    assert not any(line.startswith("cluster ") for line in report.lines)  # no cluster asked
    with pytest.raises(OrphansError, match="name it with --cluster"):
        find_orphans(str(config), "http://127.0.0.1:9", "t", certificate=cert, out=lines.append)
    report = run_check(str(config), out=lines.append, cluster="nowhere")
    assert report.failed and "--cluster nowhere" in "\n".join(report.lines)


def test_the_hub_does_not_start_when_a_cluster_issuer_shares_the_logins_secret(tmp_path):
    from .test_config import ENV, good

    (tmp_path / "known_hosts").write_text("@cert-authority * ssh-ed25519 AAAA\n")
    secret = tmp_path / "issuer_secret"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    c = good(tmp_path, "xsede")
    c.SlurmSSHSpawner.clusters = {
        "expanse": {"login_certificate": True},
        "delta": {
            "login_host": "login.delta.example.org",
            "issuer_url": ISSUER,
            "issuer_secret_file": str(secret),  # the login issuer's
        },
    }
    c.SlurmSSHSpawner.profiles = {"a": {"cluster": "expanse"}, "b": {"cluster": "delta"}}
    found = [(p.setting, p.message) for p in xc.check(c, "xsede", environ=ENV)]
    assert found == [
        (
            "SlurmSSHSpawner.clusters.delta.issuer_secret_file",
            f"is {secret}, as is XSEDECILogonAuthenticator.issuer_secret_file",
        )
    ], found
