"""The reference certificate issuer ("the XSEDE API"): ``xsedehub issuer``.

A small HTTP service a site runs next to its login nodes.  For ``POST /v1/certificate``
it

1. takes the caller's access token (``Authorization: Bearer``) and asks the identity
   provider's userinfo endpoint who it belongs to (the token is never logged or kept);
2. maps that identity to a cluster account: an explicit mapping file first, else the
   configured claim with one of the configured domains stripped; refuses otherwise;
3. signs the presented public key with the site's user CA: one principal, a bounded
   lifetime, no pty, no forwarding, no agent or X11, no user rc: what submitting and
   watching a batch job needs, nothing more;
4. writes one audit line (who, principal, serial, validity, key fingerprint).

Login nodes trust the CA with ``TrustedUserCAKeys``.  Bad requests get a 4xx with a JSON
body ``{"error": ..., "message": ...}``; only a failing identity provider gives a 502.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
from tornado import httpclient, httpserver, ioloop, web

from .spawner.validate import InvalidValue, posix_username

log = logging.getLogger("xsedehub.issuer")
audit = logging.getLogger("xsedehub.issuer.audit")

MAX_BODY = 8 * 1024
ALLOWED_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384")


@dataclass
class IssuerConfig:
    ca_key: str
    userinfo_url: str
    lifetime: int = 4 * 3600
    claim: str = "eppn"
    strip_domains: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)
    allowed_idps: list[str] = field(default_factory=list)
    source_addresses: list[str] = field(default_factory=list)
    userinfo_timeout: float = 10.0
    validate_cert: bool = True


class Refusal(web.HTTPError):
    """A request the issuer will not serve: a 4xx (or 502) with a JSON explanation."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(status)
        self.status, self.error, self.message = status, error, message


def map_identity(cfg: IssuerConfig, userinfo: dict) -> str:
    """The cluster account for ``userinfo``, or :class:`Refusal` (403)."""
    if cfg.allowed_idps:
        idp = userinfo.get("idp")
        if idp not in cfg.allowed_idps:
            raise Refusal(403, "idp_not_allowed", f"identity provider {idp!r} is not accepted")
    value = userinfo.get(cfg.claim)
    if not isinstance(value, str) or not value:
        raise Refusal(403, "unmapped_identity", f"the identity has no {cfg.claim!r} claim")
    account = cfg.mapping.get(value)
    if account is None and "@" in value:
        local, _, domain = value.rpartition("@")
        if domain.lower() in (d.lower() for d in cfg.strip_domains):
            account = local
    if account is None:
        raise Refusal(
            403,
            "unmapped_identity",
            f"the identity {value!r} is not mapped to an account on this cluster",
        )
    try:
        return posix_username(account.lower(), "cluster account")
    except InvalidValue as e:
        raise Refusal(
            403, "unmapped_identity", f"{value!r} maps to no valid account: {e}"
        ) from None


@web.stream_request_body
class CertificateHandler(web.RequestHandler):
    """``POST /v1/certificate``.  The body is streamed: a request whose Content-Length is
    over :data:`MAX_BODY` is refused from its headers, before a byte of it is read, and
    a body that grows past the limit is cut off."""

    def initialize(self, cfg: IssuerConfig, ca: asyncssh.SSHKey) -> None:
        self.cfg, self.ca = cfg, ca
        self._body = bytearray()

    def prepare(self) -> None:
        length = self.request.headers.get("Content-Length", "0")
        if not length.isascii() or not length.isdigit() or int(length) > MAX_BODY:
            self._fail(413, "too_large", f"request body larger than {MAX_BODY} bytes")

    def data_received(self, chunk: bytes) -> None:
        if self._finished:
            return
        self._body += chunk
        if len(self._body) > MAX_BODY:
            too_large = Refusal(413, "too_large", f"request body larger than {MAX_BODY} bytes")
            log.info("refused 413: %s", too_large.message)
            self.send_error(413, exc_info=(Refusal, too_large, None))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Refusal):
            body = {"error": exc.error, "message": exc.message}
        elif isinstance(exc, web.HTTPError):
            body = {"error": "bad_request", "message": exc.reason or "bad request"}
        else:
            body = {"error": "internal", "message": "the issuer failed; see its log"}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, Refusal):
            log.info("refused %s: %s", value.status, value.message)
        else:
            super().log_exception(typ, value, tb)

    def _fail(self, status: int, error: str, message: str):
        raise Refusal(status, error, message)

    async def post(self) -> None:
        if self._finished:  # refused while the body streamed in
            return
        auth = self.request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._fail(401, "missing_token", "send the identity provider's access token as Bearer")
        try:
            body = json.loads(bytes(self._body) or b"")
            public = body["public_key"]
            if not isinstance(public, str) or len(public) > 4096:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._fail(400, "bad_request", 'expected JSON {"public_key": "<OpenSSH public key>"}')
        if "PRIVATE KEY" in public or not public.startswith(("ssh-", "ecdsa-")):
            # asyncssh would derive a public key from a private one: refuse to touch it
            self._fail(400, "bad_key", "public_key must be one OpenSSH public key line")
        try:
            key = asyncssh.import_public_key(public)
        except (asyncssh.KeyImportError, ValueError):
            self._fail(400, "bad_key", "public_key is not an OpenSSH public key")
        if key.get_algorithm() not in ALLOWED_KEY_TYPES:
            self._fail(
                400, "bad_key_type", f"key type must be one of {', '.join(ALLOWED_KEY_TYPES)}"
            )
        userinfo = await self._userinfo(token.strip())
        principal = map_identity(self.cfg, userinfo)
        now = int(time.time())
        serial = secrets.randbits(63)
        cert = self.ca.generate_user_certificate(
            key,
            f"xsedehub:{principal}:{serial}",
            serial=serial,
            principals=[principal],
            valid_after=now - 60,
            valid_before=now + self.cfg.lifetime,
            source_address=self.cfg.source_addresses or None,
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=False,
            permit_pty=False,
            permit_user_rc=False,
            touch_required=False,
        )
        audit.info(
            "issued serial=%d principal=%s sub=%s idp=%s key=%s valid=%s..%s client=%s",
            serial,
            principal,
            json.dumps(str(userinfo.get("sub", ""))),
            json.dumps(str(userinfo.get("idp", ""))),
            key.get_fingerprint(),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + self.cfg.lifetime)),
            self.request.remote_ip,
        )
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(
            json.dumps(
                {
                    "certificate": cert.export_certificate("openssh").decode().strip(),
                    "principal": principal,
                    "serial": serial,
                    "valid_after": now - 60,
                    "valid_before": now + self.cfg.lifetime,
                }
            )
        )

    async def _userinfo(self, token: str) -> dict:
        client = httpclient.AsyncHTTPClient()
        try:
            r = await client.fetch(
                self.cfg.userinfo_url,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                request_timeout=self.cfg.userinfo_timeout,
                validate_cert=self.cfg.validate_cert,
            )
        except httpclient.HTTPClientError as e:
            if e.code in (400, 401, 403):
                self._fail(401, "invalid_token", "the identity provider does not know this token")
            self._fail(502, "idp_unavailable", f"the identity provider failed (HTTP {e.code})")
        except OSError as e:
            self._fail(502, "idp_unavailable", f"the identity provider cannot be reached: {e}")
        try:
            info = json.loads(r.body)
            if not isinstance(info, dict):
                raise ValueError
            return info
        except ValueError:
            self._fail(502, "idp_unavailable", "the identity provider sent no JSON")
        raise AssertionError("unreachable")


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


def make_app(cfg: IssuerConfig) -> web.Application:
    ca = asyncssh.read_private_key(cfg.ca_key)
    return web.Application(
        [
            (r"/v1/certificate", CertificateHandler, {"cfg": cfg, "ca": ca}),
            (r"/health", HealthHandler),
        ],
        log_function=_log_request,
    )


def _log_request(handler: web.RequestHandler) -> None:
    # method, path, status and time only: never headers (tokens) or bodies (keys)
    log.info(
        "%d %s %s %.1fms",
        handler.get_status(),
        handler.request.method,
        handler.request.path,
        1000 * handler.request.request_time(),
    )


def load_mapping(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f"{path}: expected a JSON object of identity -> account")
    return data


def serve(
    cfg: IssuerConfig,
    host: str,
    port: int,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> None:
    """Run the issuer until interrupted."""
    ssl_options = None
    if certfile:
        import ssl

        ssl_options = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_options.load_cert_chain(certfile, keyfile)
    app = make_app(cfg)
    server = httpserver.HTTPServer(app, ssl_options=ssl_options, max_body_size=1024 * 1024)
    server.listen(port, host)
    log.info("xsedehub issuer on %s:%d (certificates valid %ds)", host, port, cfg.lifetime)
    try:
        ioloop.IOLoop.current().start()
    except KeyboardInterrupt:
        pass
