"""The attendee sandbox on the real local cluster (gateway mode, bubblewrap from Debian):
two attendees at once, each probing the other from a kernel and from a terminal.

One hub for the module; one pair of spawns for the isolation tests, one failed spawn for
a node without unprivileged user namespaces."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urljoin

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from xsedehub.check import run_check
from xsedehub.testbed import localhub

from .audit import ArgvScanner, audit, job_dir, server_env
from .conftest import make_hub, stop_hub_and_proxy
from .test_gateway import job_id_of

pytestmark = pytest.mark.cluster

A, B = "ada-l", "grace"  # GitHub logins (the provider's subs: ada, grace)
GW_HOME = "/home/gateway"


@pytest.fixture(scope="module")
def hub(cluster, provider, tmp_path_factory):
    h = make_hub(tmp_path_factory.mktemp("sandboxhub"), cluster, provider, poll_interval=5)
    yield h
    stop_hub_and_proxy(h)


def server_pid(job: str) -> int:
    """Host PID of the job's jupyterhub-singleuser process (inside the sandbox, not bwrap)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if argv and b"bwrap" in argv[0]:
            continue
        if any(b"jupyterhub-singleuser" in a for a in argv[:2]) and (
            f"SLURM_JOB_ID={job}\0".encode() in env
        ):
            return int(pid)
    raise AssertionError(f"no server process of job {job}")


async def terminal(hub, name: str, token: str, commands: str, timeout: float = 60) -> str:
    """Open a JupyterLab terminal on ``name``'s server, type ``commands``, return what the
    terminal printed between two markers."""
    c = hub.client
    r = c.server_api(name, token, "/terminals", "POST")
    r.raise_for_status()
    term = r.json()["name"]
    ws_url = urljoin(
        c.url.replace("http", "ws", 1) + "/", f"user/{name}/terminals/websocket/{term}"
    )
    ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {token}"}))
    # the typed line echoes as XH-""BEGIN; only the output reads XH-BEGIN
    ws.write_message(json.dumps(["stdin", f'echo XH-""BEGIN; {commands}; echo XH-""END\r']))
    out = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and "XH-END" not in out:
            raw = await ws.read_message()
            if raw is None:
                break
            msg = json.loads(raw)
            if msg[0] == "stdout":
                out += msg[1]
    finally:
        ws.close()
        c.server_api(name, token, f"/terminals/{term}", "DELETE")
    assert "XH-END" in out, out
    return out.split("XH-BEGIN", 1)[1].split("XH-END", 1)[0].replace("\r", "")


PROBE = r"""
import json, os, signal, socket
res = {}
def attempt(name, fn):
    try:
        res[name] = ["ok", fn()]
    except Exception as e:
        res[name] = ["err", type(e).__name__]
def connect(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(3); s.connect(path); s.close(); return True
attempt("b_folder", lambda: os.listdir(B_FOLDER))
attempt("b_owner", lambda: open(B_FOLDER + "/.xsedehub-owner").read())
attempt("list_home", lambda: sorted(os.listdir("/home")))
attempt("list_gw_home", lambda: sorted(os.listdir(GW_HOME)))
attempt("list_workshops", lambda: sorted(os.listdir(GW_HOME + "/workshop")))
attempt("bashrc", lambda: open(GW_HOME + "/.bashrc").read())
attempt("ssh_dir", lambda: os.listdir(GW_HOME + "/.ssh"))
attempt("authorized_keys", lambda: open(GW_HOME + "/.ssh/authorized_keys").read())
attempt("jobs", lambda: sorted(os.listdir(GW_HOME + "/.xsedehub/jobs")))
attempt("own_job_dir", lambda: sorted(os.listdir(A_JOB)))
attempt("own_env", lambda: open(A_JOB + "/env").read())
attempt("own_key", lambda: open(A_JOB + "/tunnel_key").read())
attempt("b_env", lambda: open(B_JOB + "/env").read())
attempt("b_key", lambda: open(B_JOB + "/tunnel_key").read())
attempt("b_socket", lambda: connect(B_JOB + "/sock/server.sock"))
attempt("b_socket_link", lambda: connect(B_JOB + "/server.sock"))
attempt("kill_b", lambda: os.kill(B_PID, signal.SIGTERM))
attempt("signal0_b", lambda: os.kill(B_PID, 0))
def cmdlines():
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                out.append(open(f"/proc/{p}/cmdline").read().replace("\0", " "))
            except OSError:
                pass
    return out
attempt("procs", cmdlines)
attempt("home", lambda: os.environ["HOME"])
attempt("cwd", os.getcwd)
attempt("checkout", lambda: sorted(os.listdir("workshop")))
def write_own():
    with open("mine.txt", "w") as f:
        f.write("A was here")
    return open(os.path.expanduser("~/mine.txt")).read()
attempt("write_own", write_own)
attempt("write_tmp", lambda: open(TMP_FILE, "w").write("x"))
attempt("tmp_listing", lambda: sorted(os.listdir("/tmp")))
def pool():
    import multiprocessing
    with multiprocessing.Pool(2) as p:
        return sum(p.map(abs, range(-1000, 0)))
attempt("workload", pool)
print(json.dumps(res))
"""

#: a minimal wheel, made in A's folder by the kernel, for an offline `pip install --user`
MAKE_WHEEL = r"""
import base64, hashlib, zipfile
name = "xhsandboxdemo-1.0-py3-none-any.whl"
files = {
    "xhsandboxdemo.py": "WHO = 'installed in my own folder'\n",
    "xhsandboxdemo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: xhsandboxdemo\nVersion: 1.0\n",
    "xhsandboxdemo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: x\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(name, "w") as z:
    for path, text in files.items():
        data = text.encode()
        z.writestr(path, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append("xhsandboxdemo-1.0.dist-info/RECORD,,")
    z.writestr("xhsandboxdemo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
print(name)
"""  # noqa: E501


def _remove_leftovers() -> None:
    """What an earlier run of the test below left in the attendees' folders: gone, so
    that nothing it checks can pass on an earlier run's files."""
    import shutil

    for folder in (f"{GW_HOME}/workshop/{A}", f"{GW_HOME}/workshop/{B}"):
        for name in ("mine.txt", "secret.txt"):
            Path(folder, name).unlink(missing_ok=True)
        for found in Path(folder).glob(".local/lib/python3*/site-packages/xhsandboxdemo*"):
            shutil.rmtree(found) if found.is_dir() else found.unlink()


async def test_two_attendees_cannot_reach_each_other(hub, cluster):
    _remove_leftovers()
    c = hub.client
    for sub in ("ada", "grace"):
        c.login(sub)
    with ArgvScanner() as scan:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            for r in ex.map(c.start, [A, B]):
                assert r.status_code in (201, 202), r.text
            list(ex.map(c.wait_ready, [A, B]))
    jobs = {n: job_id_of(hub, n) for n in (A, B)}
    dirs = {n: job_dir(jobs[n]) for n in (A, B)}
    tok_a, tok_b = c.user_token(A), c.user_token(B)
    b_pid = server_pid(jobs[B])
    a_folder, b_folder = f"{GW_HOME}/workshop/{A}", f"{GW_HOME}/workshop/{B}"
    # B leaves something in its folder that A must not see
    assert c.server_api(
        B,
        tok_b,
        "/contents/secret.txt",
        "PUT",
        json={"type": "file", "format": "text", "content": "B's own"},
    ).status_code in (200, 201)

    # ---- from A's kernel
    tmp_file = f"/tmp/xh-sandbox-{secrets.token_hex(4)}"  # written in A's private /tmp
    code = (
        f"B_FOLDER={b_folder!r}; GW_HOME={GW_HOME!r}; A_JOB={str(dirs[A])!r}; "
        f"B_JOB={str(dirs[B])!r}; B_PID={b_pid}; TMP_FILE={tmp_file!r}\n" + PROBE
    )
    res = json.loads((await c.execute(A, tok_a, code)).strip().splitlines()[-1])
    print(json.dumps(res, indent=1)[:3000])
    # B's folder, the account's home and dotfiles, keys, job files: not there at all
    for key in ("b_folder", "b_owner", "bashrc", "ssh_dir", "authorized_keys"):
        assert res[key] == ["err", "FileNotFoundError"], (key, res[key])
    for key in ("own_env", "own_key", "b_env", "b_key", "b_socket", "b_socket_link"):
        assert res[key] == ["err", "FileNotFoundError"], (key, res[key])
    # what A can list is only the path down to its own folder and its server's socket
    assert res["list_home"] == ["ok", ["gateway"]]
    assert res["list_workshops"] == ["ok", [A]]
    assert res["list_gw_home"] == ["ok", [".xsedehub", "workshop"]]
    assert res["jobs"] == ["ok", [dirs[A].name]]
    # its server's socket, and the JupyterLab page config the job wrote for it
    # (lab_disabled_plugins: no secret in it)
    assert res["own_job_dir"] == ["ok", ["jupyter", "server.sock"]]
    # B's processes: not visible, no signal reaches them
    assert res["kill_b"] == ["err", "ProcessLookupError"]
    assert res["signal0_b"] == ["err", "ProcessLookupError"]
    procs = res["procs"][1]
    assert procs and not any(B in p or "ssh " in p or "tunnel_key" in p for p in procs), procs
    assert not any(dirs[B].name in p for p in procs)
    # A's own work goes on: home is its folder, the checkout, writes, /tmp, a workload
    assert res["home"] == ["ok", a_folder] and res["cwd"] == ["ok", a_folder]
    assert {"01-where-am-i.ipynb", "02-cores.ipynb"} <= set(res["checkout"][1])
    assert res["write_own"] == ["ok", "A was here"]
    assert Path(a_folder, "mine.txt").read_text() == "A was here"
    assert res["write_tmp"][0] == "ok" and Path(tmp_file).name in res["tmp_listing"][1]
    assert not Path(tmp_file).exists()  # A's /tmp is its own
    assert res["workload"] == ["ok", sum(range(1, 1001))]
    # B is unharmed
    assert c.server_api(B, tok_b, "/status").status_code == 200
    os.kill(b_pid, 0)

    # ---- from A's terminal (a real tty in the sandbox)
    out = await terminal(
        hub,
        A,
        tok_a,
        f"tty; ls -a /home/gateway/workshop; cat {b_folder}/secret.txt; "
        f"cat /home/gateway/.bashrc; ls /home/gateway/.ssh; ls {dirs[B]}; "
        f"kill -9 {b_pid}; scancel {jobs[B]}; echo scancel=$?; id -un",
    )
    print(out)
    assert "/dev/pts/" in out  # terminals work: a tty of the sandbox's own devpts
    assert f"cat: {b_folder}/secret.txt: No such file or directory" in out
    assert "cat: /home/gateway/.bashrc: No such file or directory" in out
    assert "ls: cannot access '/home/gateway/.ssh': No such file or directory" in out
    assert f"ls: cannot access '{dirs[B]}': No such file or directory" in out
    # bash says "kill: (PID) - No such process", dash "kill: No such process"
    assert re.search(rf"kill: (\({b_pid}\) - )?No such process", out), out
    # no SLURM command from inside (munge's socket is hidden): no scancel of B's job
    assert "scancel=0" not in out and "scancel=" in out
    assert B not in out.replace(f"{b_folder}/secret.txt", "").replace(str(dirs[B]), "")
    assert "gateway" in out  # still the one shared account, only walled off
    os.kill(b_pid, 0)
    assert c.server_api(B, tok_b, "/status").status_code == 200

    # ---- pip install --user lands in A's own folder (offline: a wheel made there).
    # The job environment is a venv without system site-packages, where pip refuses any
    # --user install, sandbox or not: the attendee's `pip install --user` is the system
    # Python's (Debian's: --break-system-packages for PEP 668).
    wheel = (await c.execute(A, tok_a, MAKE_WHEEL)).strip()
    out = await terminal(
        hub,
        A,
        tok_a,
        f"/usr/bin/python3 -m pip install -q --user --no-index --break-system-packages {wheel}"
        " && /usr/bin/python3 -c 'import xhsandboxdemo as m; print(m.__file__, m.WHO)'",
        timeout=120,
    )
    assert f"{a_folder}/.local/lib/python3" in out and "installed in my own folder" in out, out
    assert list(Path(a_folder, ".local/lib").glob("python3*/site-packages/xhsandboxdemo.py"))
    assert not Path(GW_HOME, ".local/lib").exists() or not list(
        Path(GW_HOME, ".local/lib").glob("python3*/site-packages/xhsandboxdemo.py")
    )

    # ---- the notebooks through the hub still work
    r = c.server_api(A, tok_a, "/contents/workshop/01-where-am-i.ipynb")
    assert r.status_code == 200 and r.json()["type"] == "notebook"

    # the secrets audit still holds (argv, logs, job scripts, file modes)
    assert audit(scan, list(jobs.values()), hub.log) >= 6
    assert "server sandboxed (bubblewrap)" in (dirs[A] / "job.log").read_text()
    for n in (A, B):
        assert server_env(jobs[n])["HOME"] in (GW_HOME, f"{GW_HOME}/workshop/{n}")
        assert (dirs[n] / "sock").stat().st_mode & 0o777 == 0o700
    for n in (A, B):
        c.stop(n)
    Path(a_folder, "mine.txt").unlink()


#: stands in for bwrap on a node whose kernel allows no unprivileged user namespaces:
#: the kernel's own per-namespace limit (user.max_user_namespaces) set to 0, then the real
#: bwrap.  Root on this machine cannot write the initial namespace's limit (EACCES), so
#: the limit is set in a user namespace around bwrap; the kernel refuses bwrap's
#: namespace exactly as on such a node.
NO_USERNS_BWRAP = """#!/bin/sh
exec unshare --user --map-root-user sh -c \\
    'echo 0 > /proc/sys/user/max_user_namespaces && exec bwrap "$@"' bwrap "$@"
"""


def test_node_without_user_namespaces_fails_the_spawn_clearly(hub, cluster, provider):
    """A node that cannot make the sandbox: the spawn fails with a message that says so,
    no server runs unsandboxed; `xsedehub check` names it too.  (Last in the module: it
    restarts the module's hub with the stand-in runtime.)"""
    where = Path(tempfile.mkdtemp(prefix="xh-nouserns-", dir="/tmp"))
    try:
        where.chmod(0o755)
        runtime = where / "bwrap"
        runtime.write_text(NO_USERNS_BWRAP)
        runtime.chmod(0o755)
        extra = f'c.SlurmSSHSpawner.sandbox_command = "{runtime}"\n'
        cfg = localhub.write_config(
            hub.workdir, cluster, provider_url=provider, poll_interval=5, extra=extra
        )
        token = (hub.workdir / "service_token").read_text().strip()
        hub.client.api.headers["Authorization"] = f"token {token}"
        hub.restart()
        c = hub.client
        c.login("ada")
        # the job fails within seconds, so the REST call itself may already carry the
        # failure (JupyterHub: 500 within slow_spawn_timeout) or return 202 first
        r = c.start(A)
        assert r.status_code in (201, 202, 500), r.text
        deadline = time.monotonic() + 120
        while c.user(A).get("pending") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not c.user(A)["servers"], "a server started without its sandbox"
        # what the attendee's progress page shows
        events = c.get(f"/users/{A}/server/progress").text
        failed = [ln for ln in events.splitlines() if '"failed": true' in ln]
        assert failed and "cannot start on this node" in failed[-1], events
        log = hub.log
        assert "the attendee sandbox (bubblewrap) cannot start on this node" in log
        assert "max_*_namespaces exceeded" in log  # the kernel's own refusal, passed on
        assert "xsedehub will not start the server without its sandbox" in log
        # the job stopped before its server: its log says so, and no server line follows
        job_logs = sorted(
            Path(GW_HOME, ".xsedehub/jobs").glob("u*/job.log"), key=lambda p: p.stat().st_mtime
        )
        failed = [p.read_text() for p in job_logs if "cannot start on this node" in p.read_text()]
        assert failed and "starting the single-user server" not in failed[-1], failed[-1:]

        lines: list[str] = []
        report = run_check(str(cfg), out=lines.append, job_timeout=30)
        text = "\n".join(lines)
        print(text)
        assert report.failed == ["sandbox-login", "sandbox-compute"], text
        assert "does not start on the login node" in text and "max_user_namespaces" in text
    finally:
        shutil.rmtree(where, ignore_errors=True)
