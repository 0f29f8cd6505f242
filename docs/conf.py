"""Sphinx configuration: MyST pages; the configuration and command-line references are
generated from the code at every build, so they cannot drift from it."""

from __future__ import annotations

import inspect
import io
import os
import re
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

project = "xsedehub"
author = "xsedehub developers"
copyright = "2026, xsedehub developers"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "reference/config-generated.md", "explanation/bench-results.md"]
html_theme = "alabaster"
html_static_path: list[str] = []
autodoc_typehints = "none"
suppress_warnings = ["myst.header"]
# every cross-reference must resolve (the test suite builds with -W -n)
nitpicky = True

HERE = Path(__file__).parent


def _cli_reference() -> None:
    """reference/cli-generated.txt: the real --help of every subcommand."""
    from xsedehub.cli import build_parser

    parser = build_parser()
    out = io.StringIO()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    with redirect_stdout(out), _columns(100):
        parser.print_help()
        for name, p in sub.choices.items():
            print(f"\n\n$ xsedehub {name} --help\n")
            p.print_help()
    (HERE / "reference" / "cli-generated.txt").write_text(out.getvalue())


class _columns:
    """argparse wraps --help to $COLUMNS: make the generated text the same everywhere."""

    def __init__(self, n: int):
        self.n, self.old = str(n), None

    def __enter__(self):
        self.old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = self.n

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = self.old


# ------------------------------------------------------------------ configuration reference
#: what the reference adds to an option's own help text: only what the code shows (the
#: test suite checks that every name here is a configurable option of its class)
NOTES: dict[str, dict[str, str]] = {
    "SlurmSSHSpawner": {
        "cmd": "A path on the cluster: ``jupyterhub-singleuser`` in the job's Python "
        "environment, on a filesystem the login and compute nodes share.  The job adds "
        "``--ServerApp.sock=<job dir>/server.sock --ServerApp.sock_mode=0600`` after it.",
        "start_timeout": "Counts the time the job waits in SLURM's queue.  When it runs "
        "out, JupyterHub stops the server, which cancels the job (``scancel``).",
        "http_timeout": "Starts once the job runs: how long its server may take to answer "
        "through the tunnel.  A hub restarted while a job still waits in the queue gives "
        "that job ``start_timeout`` instead.",
        "poll_interval": "The shared ``squeue`` that watches running servers runs every "
        "``status_interval`` (0: this interval).",
        "env_keep": "The hub's own variables (``PATH``, ``PYTHONPATH``...) mean nothing on "
        "a compute node.",
        "options_form": "xsedehub's form (partition, walltime, cores, memory, GPUs, "
        "account, from ``partitions``); empty when there is nothing to choose.",
        "options_from_form": "Whatever form is used, ``start()`` validates "
        "``user_options`` (form, URL query or REST API) before anything is written or "
        "submitted.",
        "ip": "Not used: the server listens on a unix socket on the compute node, and the "
        "hub reaches it at ``127.0.0.1:<tunnel port>``.",
        "port": "Not used: see ``ip``.",
        "cpu_limit": "Only exported to the server as ``CPU_LIMIT``: SLURM's allocation "
        "comes from ``cores`` (or the form).",
        "cpu_guarantee": "Only exported as ``CPU_GUARANTEE``: see ``cpu_limit``.",
        "mem_limit": "Only exported as ``MEM_LIMIT``: SLURM's allocation comes from "
        "``memory`` (or the form).",
        "mem_guarantee": "Only exported as ``MEM_GUARANTEE``: see ``mem_limit``.",
        "notebook_dir": "Gateway mode: not used (JupyterLab's root is the attendee's folder).",
        "ssl_alt_names": "For JupyterHub's ``internal_ssl``, which xsedehub does not "
        "support: nothing copies the hub's internal certificates to the compute node.",
        "ssl_alt_names_include_local": "See ``ssl_alt_names``.",
    },
    "GatewayGitHubAuthenticator": {
        "enable_auth_state": "``apply()`` sets it to True: auth_state keeps each "
        "attendee's numeric GitHub id, which guards their folder.",
        "allowed_organizations": "Private members are only seen with ``read:org`` in "
        "``scope``.  An organisation that restricts OAuth apps must approve the hub's "
        "app first (see the troubleshooting guide).",
        "scope": "Add ``read:org`` when ``allowed_organizations`` is set.",
    },
    "XSEDECILogonAuthenticator": {
        "enable_auth_state": "``apply()`` sets it to True: the user's SSH key and "
        "certificate live in the encrypted auth_state.",
        "refresh_pre_spawn": "True because auth_state is on: before each spawn the hub "
        "renews a certificate that expires within ``certificate_renew_margin``.",
        "refresh_pre_stop": "So that stop can log in with a valid certificate.",
        "idps": "Required in xsede mode (``apply()`` stops the hub without it).",
    },
}

_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`([^`]+)`")


def _plain_roles(text: str) -> str:
    """Cross-reference roles in (upstream) help texts become literals: their targets are
    not in these docs, and every reference here must resolve."""

    def lit(m: re.Match) -> str:
        target = m.group(1)
        title = re.match(r"(.+?)\s*<[^>]+>$", target)
        name = title.group(1) if title else target.lstrip("~!.")
        if not title and m.group(1).startswith("~"):
            name = name.rsplit(".", 1)[-1]
        return f"``{name}``"

    text = _ROLE.sub(lit, text)
    # named hyperlink targets (".. _name: url") would clash between entries: inline them
    targets = dict(re.findall(r"^\s*\.\. _([^:]+): (\S+)\s*$", text, flags=re.M))
    text = re.sub(r"^\s*\.\. _[^:]+: \S+\s*$\n?", "", text, flags=re.M)
    for name, url in targets.items():
        text = text.replace(f"`{name}`_", f"`{name} <{url}>`__")
    return text


def _value(v: object) -> str:
    if callable(v) and not isinstance(v, type):
        return f"a function (``{getattr(v, '__module__', '?')}.{v.__qualname__}``)"
    text = repr(v)
    return f"``{text}``" if "`" not in text else text


def _first_class(cls: type, pred) -> type | None:
    return next((k for k in cls.__mro__ if pred(k)), None)


def config_reference(cls: type) -> dict[str, dict[str, object]]:
    """Every configurable option of ``cls`` (inherited ones included): its type, default
    (as xsedehub sets it), upstream default where xsedehub changes it, and help."""
    from traitlets.traitlets import DefaultHandler

    base = _first_class(cls, lambda k: not k.__module__.startswith("xsedehub"))
    inst, base_inst = cls(), base()
    base_traits = base.class_traits(config=True)
    out = {}
    for name, trait in sorted(cls.class_traits(config=True).items()):
        owner = _first_class(cls, lambda k, n=name: n in vars(k))
        try:
            default = _value(inst.trait_defaults(name))
        except Exception:  # a default computed from the running hub
            default = None
        upstream = None
        if name in base_traits:
            ours = _first_class(
                cls,
                lambda k, n=name: (
                    any(
                        isinstance(v, DefaultHandler) and v.trait_name == n
                        for v in vars(k).values()
                    )
                    or n in vars(k)
                ),
            )
            base_default = _value(base_inst.trait_defaults(name))
            if default != base_default or ours.__module__.startswith("xsedehub"):
                upstream = base_default
        out[name] = {
            "type": type(trait).__name__,
            "default": default,
            "upstream": upstream,
            "defined_in": f"{owner.__module__}.{owner.__qualname__}",
            "own": owner.__module__.startswith("xsedehub"),
            "help": inspect.cleandoc(trait.help or ""),
        }
    return out


def _entry(cls: type, name: str, info: dict) -> str:
    lines = [f".. py:attribute:: {cls.__name__}.{name}"]
    if info["default"] is not None and info["default"].startswith("``"):
        lines.append(f"   :value: {info['default'][2:-2]}")
    lines.append("")
    facts = [f"``c.{cls.__name__}.{name}``", f"{info['type']}"]
    if info["default"] is None:
        facts.append("default computed when the hub starts (see below)")
    else:
        facts.append(f"default {info['default']}")
    if info["upstream"] is not None and info["upstream"] != info["default"]:
        facts.append(f"**xsedehub's default** (upstream: {info['upstream']})")
    elif info["upstream"] is not None:
        facts.append("set by xsedehub, to upstream's value")
    if not info["own"]:
        facts.append(f"from ``{info['defined_in']}``")
    lines.append("   " + " · ".join(facts))
    note = NOTES.get(cls.__name__, {}).get(name)
    if note:
        lines += ["", f"   *xsedehub:* {note}"]
    text = _plain_roles(info["help"]) or "(no help text)"
    lines += [""] + [f"   {ln}" if ln.strip() else "" for ln in text.splitlines()] + [""]
    return "\n".join(lines)


def _apply_sets() -> list[tuple[str, str, str]]:
    """What ``xsedehub.config.apply`` adds to a valid configuration, per mode: read by
    running it on one (throw-away files, a throw-away key)."""
    from traitlets.config import Config

    from xsedehub.config import apply

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as d:
        kh, key = Path(d) / "known_hosts", Path(d) / "key"
        kh.write_text("@cert-authority * ssh-ed25519 AAAA\n")
        key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        key.chmod(0o600)
        old = os.environ.get("JUPYTERHUB_CRYPT_KEY")
        os.environ["JUPYTERHUB_CRYPT_KEY"] = "0" * 64
        try:
            for mode in ("gateway", "xsede"):
                c = Config()
                c.XSEDEHub.mode = mode
                sp = c.SlurmSSHSpawner
                sp.login_host = sp.tunnel_host = "host.example.org"
                sp.known_hosts = sp.tunnel_known_hosts = str(kh)
                sp.gateway_key = str(key)
                c.XSEDECILogonAuthenticator.issuer_url = "https://issuer.example/v1/certificate"
                c.XSEDECILogonAuthenticator.idps = {"https://idp.example": {}}
                c.XSEDECILogonAuthenticator.issuer_secret_file = str(key)
                before = {(s, k): repr(v) for s in c for k, v in c[s].items()}
                apply(c)
                for section in c:
                    for k, v in c[section].items():
                        if before.get((section, k)) != repr(v):
                            rows.append((mode, f"c.{section}.{k}", repr(v)))
        finally:
            if old is None:
                os.environ.pop("JUPYTERHUB_CRYPT_KEY", None)
            else:
                os.environ["JUPYTERHUB_CRYPT_KEY"] = old
    return rows


def reference_classes() -> list[type]:
    """The spawner and both authenticators, as :mod:`xsedehub.config` names them."""
    from importlib import import_module

    from xsedehub.config import AUTHENTICATORS, SPAWNER

    out = []
    for path in (SPAWNER, AUTHENTICATORS["gateway"], AUTHENTICATORS["xsede"]):
        mod, _, name = path.rpartition(".")
        out.append(getattr(import_module(mod), name))
    return out


def _config_reference() -> None:
    """reference/config-generated.md: every configurable option of each class."""
    parts = ["## What `apply()` sets\n"]
    parts.append(
        "Read from the code at build time, by running {py:func}`xsedehub.config.apply` on a "
        "valid configuration of each mode: these values replace whatever the file set.\n"
    )
    parts.append("| mode | setting | value |\n| --- | --- | --- |")
    parts += [f"| {m} | `{k}` | `{v}` |" for m, k, v in _apply_sets()]
    parts.append("")
    for cls in reference_classes():
        ref = config_reference(cls)
        own = [n for n, i in ref.items() if i["own"]]
        changed = [n for n, i in ref.items() if not i["own"] and i["upstream"] is not None]
        rest = [n for n, i in ref.items() if not i["own"] and i["upstream"] is None]
        base = _first_class(cls, lambda k: not k.__module__.startswith("xsedehub"))
        parts.append(f"## {cls.__name__}\n")
        parts.append(
            f"`{cls.__module__}.{cls.__name__}`: {inspect.getdoc(cls).splitlines()[0]} "
            f"{len(ref)} options: {len(own)} of xsedehub's own, {len(changed)} inherited "
            f"with a default xsedehub sets, {len(rest)} inherited unchanged from "
            f"`{base.__module__}.{base.__name__}`.\n"
        )
        for title, names in (
            ("xsedehub's options", own),
            ("Inherited options whose default xsedehub sets", changed),
            ("Inherited options", rest),
        ):
            if not names:
                continue
            parts.append(f"### {cls.__name__}: {title}\n")
            body = [".. py:currentmodule:: " + cls.__module__, ""]
            body += [_entry(cls, n, ref[n]) for n in names]
            parts.append("````{eval-rst}\n" + "\n".join(body) + "\n````\n")
    (HERE / "reference" / "config-generated.md").write_text("\n".join(parts))


sys.path.insert(0, str(HERE.parent))
_cli_reference()
_config_reference()
