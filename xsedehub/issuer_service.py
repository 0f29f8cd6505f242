"""The reference certificate issuer ("the XSEDE API"): ``xsedehub issuer``.

A small HTTP service a site runs next to its login nodes.  For ``POST /v1/certificate``
it

1. authenticates the **hub**: ``Authorization: Bearer <hub secret>``, the secret both sides
   read from a 0600 file, compared in constant time; anyone else gets 401;
2. checks that the **login happened at this hub**: the request carries the user's OpenID
   Connect ID token, whose signature (the provider's JWKS), issuer, audience (this hub's
   client id, and ``azp`` when there are several), expiry and ``idp`` claim it verifies;
   an access token or an ID token issued to another client of the same provider mints
   nothing;
3. maps the identity, keyed on (identity provider, claim), to a cluster account: an
   explicit mapping first, else the claim with one domain stripped, for the one identity
   provider that owns that domain; refuses system accounts (a deny list, and any local
   account with a uid below ``min_uid``);
4. signs the presented public key with the site's user CA: one principal, a bounded
   lifetime, no pty, no forwarding, no agent or X11, no user rc: what submitting and
   watching a batch job needs, nothing more;
5. writes one audit line per request: what it issued, or what it refused and why (never
   a token, a secret or a key).

Login nodes trust the CA with ``TrustedUserCAKeys``.  Bad requests get a 4xx with a JSON
body ``{"error": ..., "message": ...}``; only a failing identity provider gives a 502.
"""

from __future__ import annotations

import hmac
import json
import logging
import pwd
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import asyncssh
import jwt
from tornado import httpclient, httpserver, ioloop, web

from .spawner.validate import InvalidValue, is_loopback, posix_username

log = logging.getLogger("xsedehub.issuer")
audit = logging.getLogger("xsedehub.issuer.audit")

MAX_BODY = 8 * 1024  # an ID token is 1-3 kB, a public key 100 bytes
ALLOWED_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384")
#: signature algorithms accepted on ID tokens (asymmetric only: never "none" or HS*)
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]
#: accounts never issued, whatever maps to them (besides any local uid below min_uid)
DEFAULT_DENY = (
    "root", "daemon", "bin", "sys", "adm", "sync", "games", "man", "lp", "mail", "news",
    "uucp", "proxy", "www-data", "backup", "list", "irc", "nobody", "sshd", "slurm",
    "munge", "postfix", "messagebus", "systemd-network", "systemd-resolve",
)  # fmt: skip
MIN_SECRET = 32


class ConfigProblem(ValueError):
    """The issuer's own configuration is unusable: it does not start."""


@dataclass
class IssuerConfig:
    ca_key: str
    #: the OpenID provider's issuer URL (the ``iss`` of its ID tokens)
    oidc_issuer: str
    #: the hub's OAuth client id at that provider: the ID token's required audience
    client_id: str
    #: the secret the hub authenticates with (the contents of --hub-secret-file)
    hub_secret: str
    allowed_idps: list[str]
    jwks_url: str = ""
    lifetime: int = 4 * 3600
    claim: str = "eppn"
    #: (identity provider, domain): ``name@domain`` from that provider is account ``name``
    strip_domain: tuple[str, str] | None = None
    #: (identity provider, claim value) -> account, checked first
    mapping: dict[tuple[str, str], str] = field(default_factory=dict)
    deny_accounts: list[str] = field(default_factory=lambda: list(DEFAULT_DENY))
    min_uid: int = 1000
    source_addresses: list[str] = field(default_factory=list)
    http_timeout: float = 10.0
    validate_cert: bool = True
    leeway: int = 30

    def check(self) -> None:
        """Raise :class:`ConfigProblem` for a configuration the issuer must not run with."""
        if not self.allowed_idps:
            raise ConfigProblem("name at least one identity provider (--allowed-idp)")
        if not self.client_id:
            raise ConfigProblem("set the hub's client id (--client-id)")
        if len(self.hub_secret) < MIN_SECRET:
            raise ConfigProblem(f"the hub secret must be at least {MIN_SECRET} characters")
        for what, url in (("--oidc-issuer", self.oidc_issuer), ("--jwks-url", self.jwks_url)):
            if url and not _https_or_loopback(url):
                raise ConfigProblem(f"{what} {url}: use https (plain http only on loopback)")
        if self.strip_domain and self.strip_domain[0] not in self.allowed_idps:
            raise ConfigProblem(
                f"--strip-domain names {self.strip_domain[0]!r}, which is not an --allowed-idp"
            )
        for idp, _ in self.mapping:
            if idp not in self.allowed_idps:
                raise ConfigProblem(f"the mapping names {idp!r}, which is not an --allowed-idp")


def _https_or_loopback(url: str) -> bool:
    u = urlparse(url)
    return u.scheme == "https" or (u.scheme == "http" and is_loopback(u.hostname or ""))


class Refusal(web.HTTPError):
    """A request the issuer will not serve: a 4xx (or 502) with a JSON explanation."""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(status)
        self.status, self.error, self.message = status, error, message


def map_identity(cfg: IssuerConfig, claims: dict) -> str:
    """The cluster account for verified ID-token ``claims``, or :class:`Refusal` (403)."""
    idp = claims.get("idp")
    if idp not in cfg.allowed_idps:
        raise Refusal(403, "idp_not_allowed", f"identity provider {idp!r} is not accepted")
    value = claims.get(cfg.claim)
    if not isinstance(value, str) or not value:
        raise Refusal(403, "unmapped_identity", f"the identity has no {cfg.claim!r} claim")
    account = cfg.mapping.get((idp, value))
    if account is None and cfg.strip_domain and cfg.strip_domain[0] == idp and "@" in value:
        local, _, domain = value.rpartition("@")
        if domain.lower() == cfg.strip_domain[1].lower():
            account = local
    if account is None:
        raise Refusal(
            403,
            "unmapped_identity",
            f"the identity {value!r} from {idp!r} is not mapped to an account on this cluster",
        )
    try:
        account = posix_username(account.lower(), "cluster account")
    except InvalidValue as e:
        raise Refusal(
            403, "unmapped_identity", f"{value!r} maps to no valid account: {e}"
        ) from None
    if account in cfg.deny_accounts:
        raise Refusal(403, "system_account", f"{value!r} maps to {account!r}, a system account")
    try:
        uid = pwd.getpwnam(account).pw_uid
    except KeyError:
        uid = None  # not known here (the issuer may run apart from the login nodes)
    if uid is not None and uid < cfg.min_uid:
        raise Refusal(
            403,
            "system_account",
            f"{value!r} maps to {account!r}, a system account (uid {uid} < {cfg.min_uid})",
        )
    return account


class KeySet:
    """The identity provider's signing keys (JWKS), fetched once and again when a token
    names a key id not seen yet (at most once a minute: a rotation, not a flood)."""

    def __init__(self, cfg: IssuerConfig):
        self.cfg = cfg
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched = 0.0

    async def _get_json(self, url: str) -> dict:
        r = await httpclient.AsyncHTTPClient().fetch(
            url,
            headers={"Accept": "application/json"},
            request_timeout=self.cfg.http_timeout,
            validate_cert=self.cfg.validate_cert,
        )
        data = json.loads(r.body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    async def refresh(self) -> None:
        url = self.cfg.jwks_url
        if not url:
            meta = await self._get_json(
                self.cfg.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
            )
            url = str(meta.get("jwks_uri", ""))
            if not _https_or_loopback(url):
                raise ValueError(f"the provider's jwks_uri {url!r} is not https")
        jwks = jwt.PyJWKSet.from_dict(await self._get_json(url))
        self.keys = {k.key_id or "": k for k in jwks.keys}
        self.fetched = time.monotonic()

    async def key_for(self, kid: str) -> jwt.PyJWK | None:
        if kid not in self.keys and time.monotonic() - self.fetched > 60:
            await self.refresh()
        if kid in self.keys:
            return self.keys[kid]
        if not kid and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return None


def verify_id_token(cfg: IssuerConfig, token: str, key: jwt.PyJWK) -> dict:
    """The claims of ``token``, verified; :class:`Refusal` (401/403) otherwise."""
    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=ID_TOKEN_ALGORITHMS,
            audience=cfg.client_id,
            issuer=cfg.oidc_issuer,
            leeway=cfg.leeway,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError:
        raise Refusal(401, "id_token_expired", "the ID token has expired: log in again") from None
    except jwt.InvalidAudienceError:
        raise Refusal(
            403, "wrong_audience", "the ID token was issued to another client, not to this hub"
        ) from None
    except jwt.InvalidIssuerError:
        raise Refusal(
            403, "wrong_issuer", "the ID token is not from the expected provider"
        ) from None
    except jwt.InvalidTokenError as e:
        raise Refusal(401, "invalid_id_token", f"the ID token is not valid ({e})") from None
    aud = claims["aud"]
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != cfg.client_id:
        raise Refusal(
            403, "wrong_audience", "the ID token was issued to another client, not to this hub"
        )
    return claims


@web.stream_request_body
class CertificateHandler(web.RequestHandler):
    """``POST /v1/certificate``.  The body is streamed: a request whose Content-Length is
    over :data:`MAX_BODY` is refused from its headers, before a byte of it is read, and
    a body that grows past the limit is cut off."""

    def initialize(self, cfg: IssuerConfig, ca: asyncssh.SSHKey, keys: KeySet) -> None:
        self.cfg, self.ca, self.keys = cfg, ca, keys
        self._body = bytearray()
        self.claims: dict = {}

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
            self._audit_refusal(too_large)
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
            self._audit_refusal(value)
        else:
            super().log_exception(typ, value, tb)

    def _audit_refusal(self, r: Refusal) -> None:
        # the reason is the message the caller gets: it never holds a token or a secret
        audit.info(
            "refused status=%d error=%s sub=%s idp=%s client=%s reason=%s",
            r.status,
            r.error,
            json.dumps(str(self.claims.get("sub", ""))),
            json.dumps(str(self.claims.get("idp", ""))),
            self.request.remote_ip,
            json.dumps(r.message),
        )

    def _fail(self, status: int, error: str, message: str):
        raise Refusal(status, error, message)

    def _authenticate_hub(self) -> None:
        scheme, _, secret = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            self._fail(401, "hub_unauthenticated", "only the hub may ask: send its secret")
        if not hmac.compare_digest(secret.strip().encode(), self.cfg.hub_secret.encode()):
            self._fail(401, "hub_unauthenticated", "the hub secret is wrong")

    async def post(self) -> None:
        if self._finished:  # refused while the body streamed in
            return
        self._authenticate_hub()
        try:
            body = json.loads(bytes(self._body) or b"")
            public, id_token = body["public_key"], body["id_token"]
            if not isinstance(public, str) or len(public) > 4096:
                raise TypeError
            if not isinstance(id_token, str) or not id_token:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            self._fail(
                400,
                "bad_request",
                'expected JSON {"public_key": "<OpenSSH public key>", "id_token": "<JWT>"}',
            )
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
        self.claims = verify_id_token(self.cfg, id_token, await self._signing_key(id_token))
        principal = map_identity(self.cfg, self.claims)
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
            "issued serial=%d principal=%s sub=%s idp=%s %s=%s key=%s valid=%s..%s client=%s",
            serial,
            principal,
            json.dumps(str(self.claims.get("sub", ""))),
            json.dumps(str(self.claims.get("idp", ""))),
            self.cfg.claim,
            json.dumps(str(self.claims.get(self.cfg.claim, ""))),
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

    async def _signing_key(self, token: str) -> jwt.PyJWK:
        try:
            kid = jwt.get_unverified_header(token).get("kid") or ""
        except jwt.InvalidTokenError:
            self._fail(401, "invalid_id_token", "the ID token is not a JWT")
        try:
            key = await self.keys.key_for(str(kid))
        except httpclient.HTTPClientError as e:
            self._fail(502, "idp_unavailable", f"the provider's keys failed (HTTP {e.code})")
        except (OSError, ValueError, jwt.PyJWKError) as e:
            self._fail(502, "idp_unavailable", f"the provider's keys cannot be read: {e}")
        if key is None:
            self._fail(401, "invalid_id_token", "the ID token is signed by an unknown key")
        return key


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok"})


def make_app(cfg: IssuerConfig) -> web.Application:
    cfg.check()
    ca = asyncssh.read_private_key(cfg.ca_key)
    return web.Application(
        [
            (r"/v1/certificate", CertificateHandler, {"cfg": cfg, "ca": ca, "keys": KeySet(cfg)}),
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


def load_mapping(path: str | None) -> dict[tuple[str, str], str]:
    """``{identity provider: {claim value: account}}`` from a JSON file, keyed on both."""
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    ok = isinstance(data, dict) and all(
        isinstance(idp, str)
        and isinstance(m, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
        for idp, m in data.items()
    )
    if not ok:
        raise ConfigProblem(
            f"{path}: expected a JSON object {{identity provider: {{claim value: account}}}}"
        )
    return {(idp, value): account for idp, m in data.items() for value, account in m.items()}


def read_secret_file(path: str) -> str:
    """The hub secret in ``path``, which only its owner may read."""
    p = Path(path)
    if not p.is_file():
        raise ConfigProblem(f"{path} does not exist")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigProblem(
            f"{path} is readable by others (mode {stat.S_IMODE(p.stat().st_mode):o}): chmod 600"
        )
    secret = p.read_text().strip()
    if len(secret) < MIN_SECRET or any(c.isspace() for c in secret):
        raise ConfigProblem(
            f"{path}: the hub secret must be one line of at least {MIN_SECRET} characters "
            "(openssl rand -hex 32)"
        )
    return secret


def listen_problem(host: str, certfile: str | None) -> str | None:
    """Why the issuer must not listen on ``host`` this way, or None."""
    if not certfile and not is_loopback(host):
        return (
            f"listening on {host} without TLS would send the hub secret and ID tokens in "
            "clear: give --certfile/--keyfile, or listen on 127.0.0.1 behind a TLS proxy"
        )
    return None


def serve(
    cfg: IssuerConfig,
    host: str,
    port: int,
    *,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> None:
    """Run the issuer until interrupted."""
    problem = listen_problem(host, certfile)
    if problem:
        raise ConfigProblem(problem)
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
