"""The documentation builds without a warning, and its references come from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from xsedehub.auth.cilogon import XSEDECILogonAuthenticator
from xsedehub.spawner.spawner import SlurmSSHSpawner

from xsedehub.cli import build_parser

DOCS = Path(__file__).parents[1] / "docs"


def test_docs_build_warning_free(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    config = (tmp_path / "reference" / "config.html").read_text()
    for cls in (SlurmSSHSpawner, XSEDECILogonAuthenticator):
        for name in cls.class_own_traits(config=True):
            assert f"c.{cls.__name__}.{name}" in config, name
    cli = (tmp_path / "reference" / "cli.html").read_text()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        assert f"xsedehub {name} --help" in cli
    for page in (
        "tutorial",
        "explanation/security",
        "explanation/architecture",
        "howto/troubleshooting",
        "howto/issuer",
        "howto/tljh",
    ):
        assert (tmp_path / f"{page}.html").exists()


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
