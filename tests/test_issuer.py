"""The reference certificate issuer against the real sshd and the local provider."""

from __future__ import annotations

import json
import time

import asyncssh
import pytest
import requests
from xsedehub.auth.issuer_client import IssuerRefused, obtain_credential

from xsedehub.testbed import localhub

from .conftest import IDENTITIES, provider_token

pytestmark = pytest.mark.cluster

URL = "http://127.0.0.1:8700/v1/certificate"


def pub() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


@pytest.fixture(scope="module")
def alice_token(provider):
    return provider_token("cilogon-alice")


@pytest.mark.parametrize(
    "case,headers,body,status,error",
    [
        ("no token", {}, {"public_key": "KEY"}, 401, "missing_token"),
        (
            "basic auth",
            {"Authorization": "Basic YWxpY2U6eA=="},
            {"public_key": "KEY"},
            401,
            "missing_token",
        ),
        (
            "unknown token",
            {"Authorization": "Bearer not-a-token"},
            {"public_key": "KEY"},
            401,
            "invalid_token",
        ),
        ("not json", "TOKEN", b"public_key=ssh-ed25519", 400, "bad_request"),
        ("no key", "TOKEN", {"key": "KEY"}, 400, "bad_request"),
        ("key not text", "TOKEN", {"public_key": ["KEY"]}, 400, "bad_request"),
        ("garbage key", "TOKEN", {"public_key": "ssh-ed25519 AAAA$$$"}, 400, "bad_key"),
        ("private key", "TOKEN", {"public_key": "PRIVATE"}, 400, "bad_key"),
        ("rsa key", "TOKEN", {"public_key": "RSA"}, 400, "bad_key_type"),
        ("oversized", "TOKEN", {"public_key": "x" * 20000}, 413, "too_large"),
    ],
)
def test_bad_requests_get_a_clear_4xx(issuer, alice_token, case, headers, body, status, error):
    if headers == "TOKEN":
        headers = {"Authorization": f"Bearer {alice_token}"}
    if isinstance(body, dict):
        val = body.get("public_key")
        if val == "KEY":
            body = {"public_key": pub()}
        elif val == "PRIVATE":
            body = {
                "public_key": asyncssh.generate_private_key("ssh-ed25519")
                .export_private_key()
                .decode()
            }
        elif val == "RSA":
            body = {
                "public_key": asyncssh.generate_private_key("ssh-rsa", key_size=2048)
                .export_public_key()
                .decode()
            }
        data = json.dumps(body).encode()
    else:
        data = body
    r = requests.post(
        URL, data=data, headers={**headers, "Content-Type": "application/json"}, timeout=15
    )
    assert r.status_code == status, (case, r.text)
    assert r.json()["error"] == error
    assert r.json()["message"]


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


def test_huge_body_is_refused_before_reading(issuer, alice_token):
    head = (
        "POST /v1/certificate HTTP/1.1\r\nHost: issuer\r\n"
        f"Authorization: Bearer {alice_token}\r\nContent-Type: application/json\r\n"
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


def test_unmapped_and_foreign_idp_identities_are_refused(issuer, provider):
    r = requests.post(
        URL,
        json={"public_key": pub()},
        headers={"Authorization": f"Bearer {provider_token('cilogon-mallory')}"},
        timeout=15,
    )
    assert r.status_code == 403 and r.json()["error"] == "unmapped_identity"
    localhub.put_user(
        provider,
        "other-idp-alice",
        {**IDENTITIES["cilogon-alice"], "idp": "https://evil.example/idp"},
    )
    r = requests.post(
        URL,
        json={"public_key": pub()},
        headers={"Authorization": f"Bearer {provider_token('other-idp-alice')}"},
        timeout=15,
    )
    assert r.status_code == 403 and r.json()["error"] == "idp_not_allowed"


async def test_certificate_permissions_and_audit(issuer, alice_token, cluster):
    cred = await obtain_credential(URL, alice_token)
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
    assert alice_token not in log and cred.certificate.split()[1] not in log


async def test_expired_certificate_is_refused_by_sshd(cluster, provider, tmp_path):
    proc = localhub.start_issuer(tmp_path, cluster, port=8701, provider_url=provider, lifetime="4s")
    try:
        cred = await obtain_credential(
            "http://127.0.0.1:8701/v1/certificate", provider_token("cilogon-bob")
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


async def test_client_reports_refusal_in_words(issuer, provider):
    with pytest.raises(IssuerRefused) as e:
        await obtain_credential(URL, provider_token("cilogon-mallory"))
    assert "not mapped to an account" in e.value.message
