"""xsede mode: researchers log in with CILogon and get a short-lived cluster credential.

oauthenticator's ``CILogonOAuthenticator`` does the login, the per-IdP username
derivation (``idps``) and the allow rules.  This class adds one step after a login
has been accepted, and one on refresh:

* **login** (:meth:`run_post_auth_hook`): generate a key pair on the hub, send the public
  half and the user's ID token (the proof that the login happened at this hub) to the
  certificate issuer, authenticated with the hub's secret (:attr:`issuer_secret_file`);
  keep key and certificate in the encrypted auth_state (nowhere else);
* **refresh** (:meth:`refresh_user`, forced before every spawn and stop): if the
  certificate expires within :attr:`certificate_renew_margin`, refresh the tokens
  (refresh token) and get a new certificate with the newest ID token; when that is
  impossible (the ID token expired and the provider issued no new one), ask the user to
  log in again.
"""

from __future__ import annotations

from oauthenticator.cilogon import CILogonOAuthenticator
from tornado import web
from traitlets import Bool, Float, Unicode, Union, default

from .issuer_client import (
    Credential,
    IssuerError,
    IssuerRefused,
    issuer_url_problems,
    obtain_credential,
    read_hub_secret,
)

STATE_KEY = "xsedehub_credential"


def _patch_refresh_auth_default() -> None:
    """JupyterHub 6.1's ``BaseHandler.refresh_auth`` reads ``self._token_authenticated``,
    which only token-authenticated requests set: when a refresh fails for a user who
    pressed Start in the browser, the hub answers 500 instead of "login again".  A class
    default of False restores the intended behaviour (cookie requests are not token
    requests); it changes nothing where the attribute is already defined."""
    from jupyterhub.handlers.base import BaseHandler

    if not hasattr(BaseHandler, "_token_authenticated"):
        BaseHandler._token_authenticated = False


_patch_refresh_auth_default()


def _unavailable(e: IssuerError) -> web.HTTPError:
    return web.HTTPError(
        503, f"The cluster's certificate service is unavailable, try again later ({e.message})"
    )


class XSEDECILogonAuthenticator(CILogonOAuthenticator):
    """CILogon login + a short-lived SSH certificate per user (mode=xsede)."""

    issuer_url = Unicode(
        config=True,
        help="""URL of the certificate issuer's ``/v1/certificate`` endpoint (the site's
        "XSEDE API"; ``xsedehub issuer`` is the reference implementation).  Must be https,
        except on this machine's loopback (127.0.0.1, ::1, localhost).""",
    )
    issuer_secret_file = Unicode(
        config=True,
        help="""File (mode 0600) holding the secret the hub authenticates to the issuer
        with, sent as ``Authorization: Bearer``; the issuer's ``--hub-secret-file`` holds
        the same secret.  Make it with ``openssl rand -hex 32``.  Read at every request,
        so it can be rotated without a restart.""",
    )
    issuer_timeout = Float(15.0, config=True, help="Seconds to wait for the issuer.")
    issuer_verify = Union(
        [Bool(), Unicode()],
        default_value=True,
        config=True,
        help="""Verify the issuer's TLS certificate: True, or a CA bundle path.  False is
        accepted only when issuer_url is on loopback (a test set-up or a TLS proxy on the
        hub itself); the hub refuses to start otherwise.""",
    )
    certificate_renew_margin = Float(
        900.0,
        config=True,
        help="""Renew the certificate before a spawn or stop when it expires within this
        many seconds.""",
    )

    @default("enable_auth_state")
    def _enable_auth_state_default(self) -> bool:
        return True  # the credential lives there; the hub refuses to start without a key

    @default("refresh_pre_stop")
    def _refresh_pre_stop_default(self) -> bool:
        return True

    # ------------------------------------------------------------------ issuing
    async def _issue(self, id_token: str) -> Credential:
        if not self.issuer_url:
            raise web.HTTPError(500, "xsedehub: XSEDECILogonAuthenticator.issuer_url is not set")
        if not id_token:
            raise IssuerRefused(
                "the identity provider sent no ID token (the hub must ask for the openid scope)"
            )
        problems = issuer_url_problems(self.issuer_url, self.issuer_verify)
        if problems:
            raise web.HTTPError(500, f"xsedehub: {'; '.join(problems)}")
        return await obtain_credential(
            self.issuer_url,
            id_token,
            hub_secret=read_hub_secret(self.issuer_secret_file),
            timeout=self.issuer_timeout,
            verify=self.issuer_verify,
        )

    @staticmethod
    def _id_token(auth_state: dict) -> str:
        """The newest ID token: a refresh may have brought a new one."""
        return (auth_state.get("token_response") or {}).get("id_token") or auth_state.get(
            "id_token", ""
        )

    async def run_post_auth_hook(self, handler, auth_model):
        """After the allow checks: attach a fresh credential to the login."""
        state = auth_model.get("auth_state") or {}
        try:
            cred = await self._issue(self._id_token(state))
        except IssuerRefused as e:
            self.log.warning("issuer refused %s: %s", auth_model.get("name"), e.message)
            raise web.HTTPError(403, f"No cluster account for this identity: {e.message}") from None
        except IssuerError as e:
            self.log.error("issuer unavailable for %s: %s", auth_model.get("name"), e.message)
            raise _unavailable(e) from None
        state[STATE_KEY] = cred.to_state()
        auth_model["auth_state"] = state
        self.log.info(
            "certificate for %s: principal %s, serial %d",
            auth_model["name"],
            cred.principal,
            cred.serial,
        )
        return await super().run_post_auth_hook(handler, auth_model)

    async def refresh_user(self, user, handler=None, **kwargs):
        state = await user.get_auth_state() or {}
        cred = Credential.from_state(state.get(STATE_KEY))
        if cred is not None and not cred.expires_within(self.certificate_renew_margin):
            return True
        self.log.info("renewing the cluster certificate of %s", user.name)
        refreshed = await super().refresh_user(user, handler, **kwargs)
        if not refreshed:
            return False  # the identity provider wants a new login
        if refreshed is True:
            refreshed = {"name": user.name, "auth_state": state}
        new_state = refreshed.get("auth_state") or state
        try:
            new = await self._issue(self._id_token(new_state))
        except IssuerRefused as e:
            self.log.warning("issuer refused renewal for %s: %s", user.name, e.message)
            return False
        except IssuerError as e:
            raise _unavailable(e) from None
        new_state[STATE_KEY] = new.to_state()
        refreshed["auth_state"] = new_state
        return refreshed
