"""Gateway mode: workshop attendees log in with GitHub.

oauthenticator's GitHub authenticator does the OAuth dance and the allow-lists
(``allowed_users``, ``allowed_organizations`` with ``org:team``).  On top of it this
class makes sure that

* the login is a syntactically valid GitHub login before it becomes a hub user (it
  later names a folder on the cluster);
* auth_state is on, because the spawner binds each attendee's folder to the numeric
  GitHub id kept there (logins can be renamed and re-registered by someone else).
"""

from __future__ import annotations

from oauthenticator.github import GitHubOAuthenticator
from tornado import web
from traitlets import default
from xsedehub.spawner.validate import InvalidValue, github_login


class GatewayGitHubAuthenticator(GitHubOAuthenticator):
    """GitHub login for the shared gateway account (mode=gateway)."""

    @default("enable_auth_state")
    def _enable_auth_state_default(self) -> bool:
        return True

    def user_info_to_username(self, user_info: dict) -> str:
        raw = super().user_info_to_username(user_info)
        try:
            login = github_login(raw)
        except InvalidValue as e:
            self.log.warning("refusing login: %s", e)
            raise web.HTTPError(403, f"This GitHub account cannot use the workshop hub: {e}") from e
        if not str(user_info.get("id", "")).isdigit():
            self.log.warning("refusing login %r: no numeric GitHub id in user info", login)
            raise web.HTTPError(403, "GitHub did not report a numeric account id for this login")
        return login
