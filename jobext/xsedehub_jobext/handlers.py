"""``GET <base_url>xsedehub/walltime``: the job's time left, as the hub knows it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

#: how long one answer of the hub serves (the hub itself refreshes every poll interval)
CACHE_SECONDS = 15.0


class HubWalltime:
    """The hub's answer, cached; ``seconds_left`` is counted down locally meanwhile."""

    def __init__(self, env: dict[str, str]) -> None:
        self.api_url = env.get("JUPYTERHUB_API_URL", "").rstrip("/")
        self.token = env.get("JUPYTERHUB_API_TOKEN", "")
        self.server_name = env.get("JUPYTERHUB_SERVER_NAME", "")
        self._answer: dict[str, Any] | None = None
        self._at = 0.0

    @property
    def configured(self) -> bool:
        return bool(self.api_url and self.token)

    @property
    def url(self) -> str:
        return f"{self.api_url}/xsedehub/walltime/{quote(self.server_name, safe='')}"

    async def get(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._answer is None or now - self._at > CACHE_SECONDS:
            r = await AsyncHTTPClient().fetch(
                self.url, headers={"Authorization": f"token {self.token}"}, request_timeout=20
            )
            self._answer = json.loads(r.body)
            self._at = now
        return self._counted_down(now)

    async def extend(self) -> dict[str, Any]:
        """Ask the hub to extend the job; its answer (with SLURM's word) replaces the cache."""
        r = await AsyncHTTPClient().fetch(
            self.url,
            method="POST",
            body="{}",
            headers={"Authorization": f"token {self.token}"},
            request_timeout=90,
        )
        self._answer = json.loads(r.body)
        self._at = time.monotonic()
        return self._counted_down(self._at)

    def _counted_down(self, now: float) -> dict[str, Any]:
        assert self._answer is not None
        answer = dict(self._answer)
        left = answer.get("seconds_left")
        if isinstance(left, (int, float)):
            answer["seconds_left"] = max(0.0, left - (now - self._at))
        return answer


class WalltimeHandler(APIHandler):
    #: JupyterLab asks every 30 s, open tab or not: that is not the user's activity, or
    #: an abandoned tab would keep the server (and its allocation) from ever idling out
    #: (ServerApp.shutdown_no_activity_timeout, the hub's idle culler).  Extending is.
    _track_activity = False

    def initialize(self, source: HubWalltime) -> None:
        self.source = source

    @web.authenticated
    async def get(self) -> None:
        await self._relay(self.source.get)

    @web.authenticated
    async def post(self) -> None:
        """Extend the job (where the site allows it): ``{"ok", "message", ...}``."""
        self._track_activity = True  # a user's click
        await self._relay(self.source.extend)

    async def _relay(self, ask: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """The hub's answer to ``ask``, or why there is none."""
        if not self.source.configured:
            raise web.HTTPError(404, "not running under JupyterHub")
        try:
            answer = await ask()
        except (HTTPClientError, OSError, ValueError) as e:
            raise web.HTTPError(502, f"the hub did not answer: {e}") from None
        self.finish(json.dumps(answer))


def setup_handlers(serverapp: Any) -> None:
    source = HubWalltime(dict(os.environ))
    route = url_path_join(serverapp.web_app.settings["base_url"], "xsedehub", "walltime")
    serverapp.web_app.add_handlers(".*$", [(route, WalltimeHandler, {"source": source})])
