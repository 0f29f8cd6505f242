"""Client side of "the XSEDE API": an HTTP service that signs a short-lived OpenSSH user
certificate for the holder of an identity provider's access token.

The protocol (served by ``xsedehub issuer``, see :mod:`xsedehub.issuer_service`)::

    POST /v1/certificate
    Authorization: Bearer <the user's access token from the identity provider>
    Content-Type: application/json
    {"public_key": "ssh-ed25519 AAAA..."}

    200 {"certificate": "ssh-ed25519-cert-v01@openssh.com AAAA...", "principal": "alice",
         "serial": 123, "valid_after": 1764151200, "valid_before": 1764165600}
    4xx {"error": "unmapped_identity", "message": "..."}

The private key never leaves the hub: only its public half is sent.  The principal
(the cluster account) is decided by the issuer, never by the hub.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

import asyncssh
import requests
from xsedehub.spawner.validate import InvalidValue, posix_username


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


def request_certificate(
    url: str,
    access_token: str,
    public_key: str,
    *,
    timeout: float = 15,
    verify: bool | str = True,
) -> dict:
    """One blocking HTTP call to the issuer (run it off the event loop)."""
    try:
        r = requests.post(
            url,
            json={"public_key": public_key},
            headers={"Authorization": f"Bearer {access_token}"},
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
    url: str, access_token: str, *, timeout: float = 15, verify: bool | str = True
) -> Credential:
    """Generate a key pair on the hub, have its public half signed, check the result."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    public = key.export_public_key("openssh").decode().strip()
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(
        None, lambda: request_certificate(url, access_token, public, timeout=timeout, verify=verify)
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
