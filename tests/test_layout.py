"""The tree says what is product and what is test ground: no product module imports
xsedehub.testbed.  Checked in a fresh interpreter, so that what other tests imported
before cannot hide an import."""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import importlib, json, pkgutil, sys
import xsedehub, xsedehub.auth, xsedehub.spawner

names = []
for pkg in (xsedehub, xsedehub.auth, xsedehub.spawner):
    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        if m.name != "xsedehub.testbed" and m.name not in names:
            names.append(m.name)
for name in names:
    importlib.import_module(name)
from xsedehub.cli import build_parser

build_parser()
testbed = sorted(m for m in sys.modules if m.split(".")[:2] == ["xsedehub", "testbed"])
print(json.dumps({"imported": names, "testbed": testbed}))
"""


def test_the_product_never_imports_the_testbed():
    r = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, cwd="/"
    )
    out = json.loads(r.stdout)
    # every product package was walked (the check is not empty)
    for name in (
        "xsedehub.cli",
        "xsedehub.check",
        "xsedehub.config",
        "xsedehub.issuer_service",
        "xsedehub.tljh",
        "xsedehub.auth.cilogon",
        "xsedehub.auth.issuer_client",
        "xsedehub.spawner.spawner",
        "xsedehub.spawner.ssh",
    ):
        assert name in out["imported"]
    assert out["testbed"] == []


def test_the_command_line_reaches_the_testbed_only_in_its_own_subcommands():
    code = (
        "import sys; from xsedehub import cli; p = cli.build_parser(); "
        "[p.parse_args(a) for a in (['orphans'], ['check'], ['tunnel', 'setup'])]; "
        "print(any(m.startswith('xsedehub.testbed') for m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
    code = "from xsedehub.testbed import localcluster, localhub, netns, demo; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "ok"
