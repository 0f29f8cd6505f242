"""Talk to a running hub as a browser and as an admin service would (plain HTTP)."""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urljoin

import requests
from tornado.websocket import websocket_connect


class Hub:
    def __init__(self, url: str, service_token: str, provider: str):
        self.url = url.rstrip("/")
        self.provider = provider
        self.api = requests.Session()
        self.api.headers["Authorization"] = f"token {service_token}"

    # ---- as a browser
    def login(self, sub: str) -> requests.Session:
        """The whole OAuth dance: hub -> provider's authorize page -> callback."""
        s = requests.Session()
        r = s.get(f"{self.url}/hub/oauth_login", allow_redirects=False, timeout=30)
        assert r.status_code == 302, r.text
        authorize = r.headers["Location"]
        assert authorize.startswith(self.provider), authorize
        # the user picks their identity on the provider's page and submits the form
        r = s.post(authorize, data={"sub": sub}, allow_redirects=False, timeout=30)
        assert r.status_code == 302, r.text
        callback = r.headers["Location"]
        r = s.get(callback, allow_redirects=False, timeout=60)
        if r.status_code != 302:
            raise LoginRefused(r.status_code, r.text)
        s.headers["Referer"] = self.url + "/hub/home"
        return s

    def start_as_user(self, session: requests.Session, name: str, options: dict | None = None):
        """Press Start as the logged-in user would (cookie + XSRF token)."""
        session.get(f"{self.url}/hub/home", timeout=30)
        xsrf = session.cookies.get("_xsrf", path="/hub/") or session.cookies.get("_xsrf")
        return session.post(
            f"{self.url}/hub/api/users/{name}/server",
            json=options or {},
            headers={"X-XSRFToken": xsrf},
            timeout=120,
        )

    # ---- as the admin service
    def get(self, path: str, **kw):
        return self.api.get(f"{self.url}/hub/api{path}", timeout=60, **kw)

    def post(self, path: str, **kw):
        return self.api.post(f"{self.url}/hub/api{path}", timeout=120, **kw)

    def delete(self, path: str, **kw):
        return self.api.delete(f"{self.url}/hub/api{path}", timeout=120, **kw)

    def user(self, name: str) -> dict:
        r = self.get(f"/users/{name}")
        r.raise_for_status()
        return r.json()

    def user_token(self, name: str) -> str:
        r = self.post(
            f"/users/{name}/tokens",
            json={"scopes": [f"access:servers!user={name}"], "expires_in": 3600},
        )
        r.raise_for_status()
        return r.json()["token"]

    def start(self, name: str, options: dict | None = None) -> requests.Response:
        return self.post(f"/users/{name}/server", json=options or {})

    def wait_ready(self, name: str, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            u = self.user(name)
            srv = u["servers"].get("")
            if srv and srv.get("ready"):
                return srv
            if not srv and not u.get("pending"):
                raise RuntimeError(f"{name}'s server is gone: {u}")
            time.sleep(0.5)
        raise TimeoutError(f"{name}'s server not ready after {timeout}s")

    def wait_stopped(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            u = self.user(name)
            if not u["servers"] and not u.get("pending"):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{name}'s server still listed after {timeout}s: {self.user(name)}")

    def stop(self, name: str) -> None:
        r = self.delete(f"/users/{name}/server")
        assert r.status_code in (202, 204), r.text
        self.wait_stopped(name)

    # ---- the user's server, through the proxy
    def server_api(self, name: str, token: str, path: str, method: str = "GET", **kw):
        return requests.request(
            method,
            f"{self.url}/user/{name}/api{path}",
            headers={"Authorization": f"token {token}"},
            timeout=60,
            **kw,
        )

    async def execute(self, name: str, token: str, code: str, timeout: float = 90) -> str:
        """Run ``code`` in a new kernel on the user's server; return its stdout."""
        r = self.server_api(name, token, "/kernels", "POST", json={"name": "python3"})
        r.raise_for_status()
        kid = r.json()["id"]
        ws_url = urljoin(
            self.url.replace("http", "ws", 1) + "/", f"user/{name}/api/kernels/{kid}/channels"
        )
        from tornado.httpclient import HTTPRequest

        ws = await websocket_connect(
            HTTPRequest(ws_url, headers={"Authorization": f"token {token}"})
        )
        msg_id = uuid.uuid4().hex
        ws.write_message(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": name,
                        "session": uuid.uuid4().hex,
                        "msg_type": "execute_request",
                        "version": "5.3",
                        "date": "",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "channel": "shell",
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": False,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "buffers": [],
                }
            )
        )
        out = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                raw = await ws.read_message()
                if raw is None:
                    break
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                t = msg["msg_type"]
                if t == "stream":
                    out.append(msg["content"]["text"])
                elif t == "error":
                    raise RuntimeError("\n".join(msg["content"]["traceback"]))
                elif t == "status" and msg["content"]["execution_state"] == "idle":
                    break
        finally:
            ws.close()
            self.server_api(name, token, f"/kernels/{kid}", "DELETE")
        return "".join(out)


class LoginRefused(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"login refused with {status}")
        self.status, self.body = status, body
