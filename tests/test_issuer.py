"""The reference certificate issuer against the real sshd and the local provider.

The threat model these tests encode (docs/explanation/security.md): the issuer serves only
the hub (its secret), only for a login that happened at the hub (an ID token issued to the
hub's client id, signed by the provider), maps identities keyed on (identity provider,
claim), never issues a system account, and audits every refusal without the token."""

from __future__ import annotations

import json
import time

import asyncssh
import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from xsedehub.auth.issuer_client import IssuerRefused, obtain_credential

from xsedehub.testbed import localhub

from .conftest import IDENTITIES, hub_id_token, hub_secret, provider_tokens

pytestmark = pytest.mark.cluster

URL = "http://127.0.0.1:8700/v1/certificate"


def pub() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


@pytest.fixture(scope="module")
def secret(cluster):
    return hub_secret(cluster)


@pytest.fixture(scope="module")
def alice_id(provider):
    return hub_id_token("cilogon-alice")


def post(url: str = URL, *, secret: str | None, id_token: str | None, **body) -> requests.Response:
    """One request as the hub makes it: its secret as Bearer, the user's ID token."""
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    data = {"public_key": pub(), **body}
    if id_token is not None:
        data["id_token"] = id_token
    return requests.post(url, json=data, headers=headers, timeout=15)


@pytest.mark.parametrize(
    "case,headers,body,status,error",
    [
        ("no hub secret", {}, {"public_key": "KEY"}, 401, "hub_unauthenticated"),
        (
            "basic auth",
            {"Authorization": "Basic YWxpY2U6eA=="},
            {"public_key": "KEY"},
            401,
            "hub_unauthenticated",
        ),
        (
            "wrong hub secret",
            {"Authorization": "Bearer " + "0" * 64},
            {"public_key": "KEY"},
            401,
            "hub_unauthenticated",
        ),
        ("no id token", "HUB", {"public_key": "KEY"}, 400, "bad_request"),
        (
            "id token not a JWT",
            "HUB",
            {"public_key": "KEY", "id_token": "x"},
            401,
            "invalid_id_token",
        ),
        ("not json", "HUB", b"public_key=ssh-ed25519", 400, "bad_request"),
        ("no key", "HUB", {"key": "KEY", "id_token": "ID"}, 400, "bad_request"),
        ("key not text", "HUB", {"public_key": ["KEY"], "id_token": "ID"}, 400, "bad_request"),
        (
            "garbage key",
            "HUB",
            {"public_key": "ssh-ed25519 AAAA$$$", "id_token": "ID"},
            400,
            "bad_key",
        ),
        ("private key", "HUB", {"public_key": "PRIVATE", "id_token": "ID"}, 400, "bad_key"),
        ("rsa key", "HUB", {"public_key": "RSA", "id_token": "ID"}, 400, "bad_key_type"),
        ("oversized", "HUB", {"public_key": "x" * 20000, "id_token": "ID"}, 413, "too_large"),
    ],
)
def test_bad_requests_get_a_clear_4xx(issuer, secret, alice_id, case, headers, body, status, error):
    if headers == "HUB":
        headers = {"Authorization": f"Bearer {secret}"}
    if isinstance(body, dict):
        if body.get("id_token") == "ID":
            body["id_token"] = alice_id
        val = body.get("public_key")
        if val == "KEY":
            body["public_key"] = pub()
        elif val == "PRIVATE":
            body["public_key"] = (
                asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
            )
        elif val == "RSA":
            body["public_key"] = (
                asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_public_key().decode()
            )
        data = json.dumps(body).encode()
    else:
        data = body
    r = requests.post(
        URL, data=data, headers={**headers, "Content-Type": "application/json"}, timeout=15
    )
    assert r.status_code == status, (case, r.text)
    assert r.json()["error"] == error
    assert r.json()["message"]


def test_a_token_issued_to_another_client_is_refused(issuer, secret, provider):
    """Another gateway of the same provider (or whoever holds a leaked token) cannot mint
    a certificate: its tokens are not proof of a login at this hub."""
    other = provider_tokens("cilogon-alice", client_id="another-gateway")
    r = post(secret=secret, id_token=other["id_token"])
    assert (r.status_code, r.json()["error"]) == (403, "wrong_audience"), r.text
    # the access tokens, of either client, are no proof at all (they are not signed JWTs)
    mine = provider_tokens("cilogon-alice", client_id=localhub.HUB_CLIENT_ID)
    for access in (other["access_token"], mine["access_token"]):
        r = post(secret=secret, id_token=access)
        assert (r.status_code, r.json()["error"]) == (401, "invalid_id_token"), r.text
    # what the issuer once accepted: the access token as Bearer, no hub credential
    r = requests.post(
        URL,
        json={"public_key": pub()},
        headers={"Authorization": f"Bearer {other['access_token']}"},
        timeout=15,
    )
    assert (r.status_code, r.json()["error"]) == (401, "hub_unauthenticated"), r.text


def test_a_request_without_the_hub_credential_is_refused(issuer, secret, alice_id):
    """A valid ID token for this hub is not enough: only the hub may present it."""
    for wrong in (None, "", secret[:-1], secret + "0", "0" * len(secret)):
        r = post(secret=wrong, id_token=alice_id)
        assert (r.status_code, r.json()["error"]) == (401, "hub_unauthenticated"), r.text
    assert post(secret=secret, id_token=alice_id).status_code == 200


def test_a_forged_id_token_is_refused(issuer, secret, alice_id):
    """Signed by another key (under the provider's key id, if it names one), or not
    signed at all."""
    claims = jwt.decode(alice_id, options={"verify_signature": False})
    kid = {k: v for k, v in jwt.get_unverified_header(alice_id).items() if k == "kid"}
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, forger, algorithm="RS256", headers=kid)
    r = post(secret=secret, id_token=forged)
    assert (r.status_code, r.json()["error"]) == (401, "invalid_id_token"), r.text
    unsigned = jwt.encode(claims, None, algorithm="none", headers=kid)
    r = post(secret=secret, id_token=unsigned)
    assert (r.status_code, r.json()["error"]) == (401, "invalid_id_token"), r.text


SECOND_IDP = "https://idp.b.example/idp"


@pytest.fixture(scope="module")
def two_idp_issuer(cluster, provider, tmp_path_factory):
    """An issuer that accepts two identity providers: the ACCESS IdP, whose
    name@access-ci.org are accounts, and a second one, whose identities map only
    through the mapping file."""
    wd = tmp_path_factory.mktemp("issuer-2idp")
    (wd / "map.json").write_text(json.dumps({SECOND_IDP: {"bob@b.example": "bob"}}))
    proc = localhub.start_issuer(
        wd,
        cluster,
        port=8703,
        provider_url=provider,
        extra_args=("--allowed-idp", SECOND_IDP, "--map", str(wd / "map.json")),
    )
    for sub, claims in {
        "b-alice-access": {"idp": SECOND_IDP, "eppn": "alice@access-ci.org"},
        "b-alice": {"idp": SECOND_IDP, "eppn": "alice@b.example"},
        "b-bob": {"idp": SECOND_IDP, "eppn": "bob@b.example"},
    }.items():
        localhub.put_user(provider, sub, claims)
    yield "http://127.0.0.1:8703/v1/certificate", wd
    proc.terminate()
    proc.wait(10)


def test_two_identity_providers_never_share_an_account(two_idp_issuer, secret):
    url, _ = two_idp_issuer
    r = post(url, secret=secret, id_token=hub_id_token("cilogon-alice"))
    assert r.status_code == 200 and r.json()["principal"] == "alice", r.text
    # the second IdP asserting a name in the ACCESS IdP's domain is not that person
    r = post(url, secret=secret, id_token=hub_id_token("b-alice-access"))
    assert (r.status_code, r.json()["error"]) == (403, "unmapped_identity"), r.text
    # the same local part at the second IdP is not alice either
    r = post(url, secret=secret, id_token=hub_id_token("b-alice"))
    assert (r.status_code, r.json()["error"]) == (403, "unmapped_identity"), r.text
    # what the mapping file names, keyed on (IdP, claim), maps
    r = post(url, secret=secret, id_token=hub_id_token("b-bob"))
    assert r.status_code == 200 and r.json()["principal"] == "bob", r.text


def test_system_accounts_are_never_issued(issuer, secret, provider):
    localhub.put_user(
        provider, "cilogon-root", {**IDENTITIES["cilogon-alice"], "eppn": "root@access-ci.org"}
    )
    localhub.put_user(
        provider,
        "cilogon-tunnelbot",
        {**IDENTITIES["cilogon-alice"], "eppn": "tunnelbot@access-ci.org"},
    )
    r = post(secret=secret, id_token=hub_id_token("cilogon-root"))
    assert (r.status_code, r.json()["error"]) == (403, "system_account"), r.text
    # not on the deny list, but a local system account (uid below 1000)
    r = post(secret=secret, id_token=hub_id_token("cilogon-tunnelbot"))
    assert (r.status_code, r.json()["error"]) == (403, "system_account"), r.text
    assert "uid 999 < 1000" in r.json()["message"], r.text


def test_every_refusal_is_audited_with_its_reason_and_without_the_token(
    two_idp_issuer, secret, provider
):
    url, wd = two_idp_issuer
    log = wd / "issuer.log"
    before = log.read_text()
    other = provider_tokens("cilogon-alice", client_id="another-gateway")
    foreign = hub_id_token("b-alice-access")
    localhub.put_user(
        provider, "evil-idp", {**IDENTITIES["cilogon-alice"], "idp": "https://evil.example"}
    )
    evil = hub_id_token("evil-idp")
    localhub.put_user(
        provider, "cilogon-root", {**IDENTITIES["cilogon-alice"], "eppn": "root@access-ci.org"}
    )
    root = hub_id_token("cilogon-root")
    cases = [
        (None, other["id_token"], "401 error=hub_unauthenticated"),
        ("wrong-" + secret, other["id_token"], "401 error=hub_unauthenticated"),
        (secret, other["id_token"], "403 error=wrong_audience"),
        (secret, other["access_token"], "401 error=invalid_id_token"),
        (secret, foreign, "403 error=unmapped_identity"),
        (secret, evil, "403 error=idp_not_allowed"),
        (secret, root, "403 error=system_account"),
    ]
    for sec, token, _ in cases:
        assert post(url, secret=sec, id_token=token).status_code in (401, 403)
    new = log.read_text()[len(before) :]
    refusals = [ln for ln in new.splitlines() if "xsedehub.issuer.audit refused" in ln]
    assert len(refusals) == len(cases), new
    for line, (_, _, what) in zip(refusals, cases, strict=True):
        assert f"refused status={what}" in line, line
        assert "reason=" in line and 'reason=""' not in line, line
    assert 'idp="https://evil.example"' in new  # who was refused, once the token verified
    sent = [secret, other["id_token"], other["access_token"], foreign, evil, root]
    sent += [t.split(".")[2] for t in (other["id_token"], foreign, evil, root)]  # signatures
    assert [s[:12] for s in sent if s in new] == []


def _raw_post(head: bytes, body_chunks=()) -> tuple[int, dict]:
    """POST over a plain socket: headers, then only ``body_chunks``; the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", 8700), 5) as s:
        s.settimeout(10)  # an issuer waiting for the rest of the body would time out here
        s.sendall(head)
        for chunk in body_chunks:
            s.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            part = s.recv(65536)
            if not part:
                break
            data += part
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[-1] or b"{}")


def test_huge_body_is_refused_before_reading(issuer, secret):
    head = (
        "POST /v1/certificate HTTP/1.1\r\nHost: issuer\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
    )
    # 200 kB announced, not one byte sent: answered from the headers alone
    status, body = _raw_post((head + "Content-Length: 200000\r\n\r\n").encode())
    assert (status, body["error"]) == (413, "too_large"), body
    # no length announced (chunked): cut off once the body passes the limit, without
    # waiting for the rest of it
    chunk = b"x" * 4096
    chunks = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 3
    status, body = _raw_post((head + "Transfer-Encoding: chunked\r\n\r\n").encode(), chunks)
    assert (status, body["error"]) == (413, "too_large"), body


def test_unmapped_and_foreign_idp_identities_are_refused(issuer, secret, provider):
    r = post(secret=secret, id_token=hub_id_token("cilogon-mallory"))
    assert r.status_code == 403 and r.json()["error"] == "unmapped_identity"
    localhub.put_user(
        provider,
        "other-idp-alice",
        {**IDENTITIES["cilogon-alice"], "idp": "https://evil.example/idp"},
    )
    r = post(secret=secret, id_token=hub_id_token("other-idp-alice"))
    assert r.status_code == 403 and r.json()["error"] == "idp_not_allowed"


async def test_certificate_permissions_and_audit(issuer, secret, alice_id, cluster):
    cred = await obtain_credential(URL, alice_id, hub_secret=secret)
    assert cred.principal == "alice"
    cert = asyncssh.import_certificate(cred.certificate)
    assert cert.principals == ["alice"]
    # only what a job submission needs: no pty, no forwarding of any kind, no user rc
    out = (
        __import__("subprocess")
        .run(
            ["ssh-keygen", "-L", "-f", "/dev/stdin"],
            input=cred.certificate,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout
    )
    assert "permit-pty" not in out and "permit-port-forwarding" not in out
    assert "permit-agent-forwarding" not in out and "permit-X11-forwarding" not in out
    assert "permit-user-rc" not in out
    log = (issuer / "issuer.log").read_text()
    assert f"serial={cred.serial} principal=alice" in log
    assert 'eppn="alice@access-ci.org"' in log
    assert alice_id.split(".")[2] not in log and secret not in log
    assert cred.certificate.split()[1] not in log


async def test_expired_certificate_is_refused_by_sshd(cluster, provider, secret, tmp_path):
    proc = localhub.start_issuer(tmp_path, cluster, port=8701, provider_url=provider, lifetime="4s")
    try:
        cred = await obtain_credential(
            "http://127.0.0.1:8701/v1/certificate",
            hub_id_token("cilogon-bob"),
            hub_secret=secret,
        )
    finally:
        proc.terminate()
        proc.wait(10)
    key = asyncssh.import_private_key(cred.private_key)
    cert = asyncssh.import_certificate(cred.certificate)
    kw = dict(
        username="bob",
        client_keys=[(key, cert)],
        known_hosts=cluster.known_hosts,
        agent_path=None,
        config=None,
        connect_timeout=10,
    )
    async with asyncssh.connect(cluster.login_ip, cluster.login_port, **kw) as conn:
        assert (await conn.run("id -un", check=True)).stdout.strip() == "bob"
    time.sleep(max(0, cred.valid_before - time.time()) + 1.5)
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(cluster.login_ip, cluster.login_port, **kw)


async def test_client_reports_refusal_in_words(issuer, provider, secret):
    with pytest.raises(IssuerRefused) as e:
        await obtain_credential(URL, hub_id_token("cilogon-mallory"), hub_secret=secret)
    assert "not mapped to an account" in e.value.message
