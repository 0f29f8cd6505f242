"""The documentation builds without a warning and with every cross-reference resolved
(``-W -n``), and its references come from the code: every configurable option of the
spawner and of both authenticators, inherited ones included, with xsedehub's defaults;
every subcommand's ``--help``."""

from __future__ import annotations

import html
import re
import runpy
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

from xsedehub.cli import build_parser
from xsedehub.config import AUTHENTICATORS, SPAWNER

DOCS = Path(__file__).parents[1] / "docs"
CLASSES = [SPAWNER, AUTHENTICATORS["gateway"], AUTHENTICATORS["xsede"]]


def _cls(path: str) -> type:
    mod, _, name = path.rpartition(".")
    return getattr(import_module(mod), name)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    r = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html"]
        + [str(DOCS), str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


def test_docs_build_warning_free_with_every_reference_resolved(site):
    for page in (
        "index",
        "tutorial",
        "tutorial-local",
        "explanation/security",
        "explanation/architecture",
        "explanation/performance",
        "howto/troubleshooting",
        "howto/issuer",
        "howto/tljh",
        "howto/gateway",
        "howto/xsede",
        "howto/centre",
        "howto/network",
        "howto/hub",
        "howto/upkeep",
        "reference/config",
        "reference/cli",
        "reference/versions",
        "changelog",
    ):
        assert (site / f"{page}.html").exists(), page


def _entries(page: str, cls: type) -> dict[str, str]:
    """option name -> the HTML of its entry in the configuration reference."""
    prefix = f"{cls.__module__}.{cls.__name__}."
    parts = re.split(r'(<dt class="sig sig-object py" id="[^"]+">)', page)
    out = {}
    for head, body in zip(parts[1::2], parts[2::2], strict=True):
        anchor = re.search(r'id="([^"]+)"', head).group(1)
        if anchor.startswith(prefix):
            out[anchor[len(prefix) :]] = body.split("</dd>")[0]
    return out


@pytest.mark.parametrize("path", CLASSES)
def test_config_reference_lists_every_option_of_the_class(site, path):
    cls = _cls(path)
    page = (site / "reference" / "config.html").read_text()
    entries = _entries(page, cls)
    assert set(entries) == set(cls.class_traits(config=True))
    for name, body in entries.items():
        assert f"c.{cls.__name__}.{name}" in body, name


@pytest.mark.parametrize("path", CLASSES)
def test_config_reference_gives_the_defaults_xsedehub_changes(site, path):
    cls = _cls(path)
    base = next(k for k in cls.__mro__ if not k.__module__.startswith("xsedehub"))
    ours, theirs = cls(), base()
    entries = _entries((site / "reference" / "config.html").read_text(), cls)
    changed = []
    for name in base.class_traits(config=True):
        mine, upstream = ours.trait_defaults(name), theirs.trait_defaults(name)
        if callable(mine) or mine == upstream:
            continue
        changed.append(name)
        # Sphinx typesets ' as a right single quote outside literals
        text = html.unescape(re.sub(r"<[^>]+>", "", entries[name])).replace("\u2019", "'")
        assert "xsedehub's default" in text and f"upstream: {upstream!r}" in text, name
        assert f"default {mine!r}" in text, name
    expected = {
        "SlurmSSHSpawner": {"start_timeout", "http_timeout", "env_keep"},
        "GatewayGitHubAuthenticator": {"enable_auth_state", "refresh_pre_spawn"},
        "XSEDECILogonAuthenticator": {"enable_auth_state", "refresh_pre_spawn", "refresh_pre_stop"},
    }[cls.__name__]
    assert expected <= set(changed)


def test_config_reference_notes_name_real_options():
    notes = runpy.run_path(str(DOCS / "conf.py"))["NOTES"]
    for path in CLASSES:
        cls = _cls(path)
        assert set(notes.get(cls.__name__, {})) <= set(cls.class_traits(config=True))


def test_config_reference_shows_what_apply_sets(site):
    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "reference" / "config.html").read_text()))
    for setting in (
        "c.JupyterHub.cleanup_servers",
        "c.JupyterHub.authenticator_class",
        "c.JupyterHub.spawner_class",
        "c.GatewayGitHubAuthenticator.enable_auth_state",
        "c.XSEDECILogonAuthenticator.enable_auth_state",
        "c.SlurmSSHSpawner.mode",
    ):
        assert setting in text, setting


def test_cli_reference_has_every_subcommand(site):
    cli = (site / "reference" / "cli.html").read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        assert f"xsedehub {name} --help" in cli


def test_docs_name_tljhs_config_where_it_is():
    """TLJH's jupyterhub_config.py lives inside the tljh package (``check --tljh`` finds
    it); the docs once named a path under share/ where no such file exists."""
    pages = [*DOCS.rglob("*.md"), DOCS.parent / "README.md"]
    for page in pages:
        if "_build" in page.parts:
            continue
        assert "share/jupyterhub/jupyterhub_config.py" not in page.read_text(), page
    tutorial = (DOCS / "tutorial.md").read_text()
    assert "xsedehub check --tljh" in tutorial and "Ubuntu 22.04/24.04" not in tutorial
