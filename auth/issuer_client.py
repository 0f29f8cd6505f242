"""Client side of "the XSEDE API": an HTTP service that signs a short-lived OpenSSH user
certificate for the holder of an identity provider's access token.

The protocol (served by ``xsedehub issuer``, see :mod:`xsedehub.issuer_service`)::

    POST /v1/certificate
    Authorization: Bearer <the hub's secret, shared with the issuer through a 0600 file>
    Content-Type: application/json
    {"public_key": "ssh-ed25519 AAAA...", "id_token": "<the user's OpenID Connect ID token>"}

    200 {"certificate": "ssh-ed25519-cert-v01@openssh.com AAAA...", "principal": "alice",
         "serial": 123, "valid_after": 1764151200, "valid_before": 1764165600}
    4xx {"error": "unmapped_identity", "message": "..."}

The private key never leaves the hub: only its public half is sent.  The principal
(the cluster account) is decided by the issuer, never by the hub.  The ID token is the
proof that the user logged in at this hub (its audience is the hub's client id); the
secret proves the request comes from the hub.
"""

from __future__ import annotations

import asyncio
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import asyncssh
import requests
from xsedehub.spawner.validate import InvalidValue, is_loopback, posix_username


class IssuerError(Exception):
    """The issuer did not produce a certificate; ``message`` is fit for the user."""

    def __init__(self, message: str, *, status: int | None = None, code: str = ""):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


class IssuerRefused(IssuerError):
    """The issuer answered, and said no (4xx): logging in again will not help."""


class IssuerUnavailable(IssuerError):
    """The issuer could not be reached or failed (network, 5xx): try again later."""


@dataclass(frozen=True)
class Credential:
    """What lives in the user's encrypted auth_state (and nowhere else on the hub)."""

    private_key: str = field(repr=False)  # never printed: reprs end up in logs
    certificate: str
    principal: str
    serial: int
    valid_after: float
    valid_before: float

    def expires_within(self, seconds: float) -> bool:
        return self.valid_before - time.time() <= seconds

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, data: dict | None) -> Credential | None:
        if not data:
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


def issuer_url_problems(url: str, verify: bool | str = True) -> list[str]:
    """Why the hub must not talk to the issuer at ``url`` this way (empty: it may).

    The issuer gets the hub's secret and the user's ID token: ``url`` must be https unless
    it is on this machine's loopback, and TLS verification may be off only for a loopback
    issuer (a test set-up, or a TLS proxy on the same host): a real deployment cannot
    switch it off by accident."""
    u = urlparse(url or "")
    if u.scheme not in ("http", "https") or not u.hostname:
        return [f"{url!r} is not an http(s) URL"]
    problems = []
    loop = is_loopback(u.hostname)
    if u.scheme == "http" and not loop:
        problems.append(f"{url} is plain http: use https (http only on loopback)")
    if verify is not True and not loop:
        # requests takes any false value (False, "", 0) as "no verification", and a
        # string as a CA bundle: only True or an existing bundle, off loopback
        if not verify or not isinstance(verify, str):
            problems.append("issuer_verify = False is allowed only for a loopback issuer_url")
        elif not Path(verify).exists():
            problems.append(f"issuer_verify: the CA bundle {verify} does not exist")
    return problems


def read_hub_secret(path: str) -> str:
    """The hub's issuer secret from ``path`` (a 0600 file); IssuerError if unusable."""
    p = Path(path or "")
    if not path or not p.is_file():
        raise IssuerUnavailable(f"the hub's issuer secret file {path!r} does not exist")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IssuerUnavailable(f"the hub's issuer secret file {path} is readable by others")
    secret = p.read_text().strip()
    if not secret:
        raise IssuerUnavailable(f"the hub's issuer secret file {path} is empty")
    return secret


def request_certificate(
    url: str,
    hub_secret: str,
    id_token: str,
    public_key: str,
    *,
    timeout: float = 15,
    verify: bool | str = True,
) -> dict:
    """One blocking HTTP call to the issuer (run it off the event loop)."""
    problems = issuer_url_problems(url, verify)
    if problems:
        raise IssuerUnavailable("; ".join(problems))
    try:
        r = requests.post(
            url,
            json={"public_key": public_key, "id_token": id_token},
            headers={"Authorization": f"Bearer {hub_secret}"},
            timeout=timeout,
            verify=verify,
            allow_redirects=False,
        )
    except requests.RequestException as e:
        raise IssuerUnavailable(
            f"the certificate service at {url} cannot be reached ({type(e).__name__})"
        ) from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code >= 500 or r.status_code in (404, 405, 429):
        raise IssuerUnavailable(
            f"the certificate service failed (HTTP {r.status_code}): {body.get('message', '')}",
            status=r.status_code,
        )
    if r.status_code != 200:
        raise IssuerRefused(
            body.get("message") or f"the certificate service refused (HTTP {r.status_code})",
            status=r.status_code,
            code=body.get("error", ""),
        )
    return body


async def obtain_credential(
    url: str,
    id_token: str,
    *,
    hub_secret: str,
    timeout: float = 15,
    verify: bool | str = True,
) -> Credential:
    """Generate a key pair on the hub, have its public half signed, check the result."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    public = key.export_public_key("openssh").decode().strip()
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(
        None,
        lambda: request_certificate(
            url, hub_secret, id_token, public, timeout=timeout, verify=verify
        ),
    )
    try:
        cert = asyncssh.import_certificate(body["certificate"])
        principal = posix_username(body["principal"], "certificate principal")
    except (KeyError, TypeError, ValueError, asyncssh.KeyImportError, InvalidValue) as e:
        raise IssuerUnavailable(f"the certificate service sent an unusable answer: {e}") from None
    if cert.key.public_data != key.public_data:
        raise IssuerUnavailable("the certificate service signed a different key")
    if principal not in cert.principals:
        raise IssuerUnavailable("the certificate does not carry the principal it was issued for")
    # asyncssh keeps the validity window private: read it, and cross-check the answer
    valid_after = float(getattr(cert, "_valid_after", body.get("valid_after", 0)))
    valid_before = float(getattr(cert, "_valid_before", body.get("valid_before", 0)))
    if valid_before <= time.time():
        raise IssuerUnavailable("the certificate service issued an already expired certificate")
    return Credential(
        private_key=key.export_private_key("openssh").decode(),
        certificate=cert.export_certificate("openssh").decode().strip(),
        principal=principal,
        serial=int(body.get("serial", 0)),
        valid_after=valid_after,
        valid_before=valid_before,
    )
