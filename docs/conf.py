"""Sphinx configuration: MyST pages, config reference generated from the traitlets."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

project = "xsedehub"
author = "xsedehub developers"
copyright = "2026, xsedehub developers"
extensions = ["myst_parser", "autodoc_traits", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "reference/config-generated.md", "explanation/bench-results.md"]
html_theme = "alabaster"
html_static_path: list[str] = []
autodoc_typehints = "none"
suppress_warnings = ["myst.header"]


def _cli_reference() -> None:
    """reference/cli-generated.txt: the real --help of every subcommand."""
    from xsedehub.cli import build_parser

    parser = build_parser()
    out = io.StringIO()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    with redirect_stdout(out):
        parser.print_help()
        for name, p in sub.choices.items():
            print(f"\n\n$ xsedehub {name} --help\n")
            p.print_help()
    target = Path(__file__).parent / "reference" / "cli-generated.txt"
    target.write_text(out.getvalue())


def _config_reference() -> None:
    """reference/config-generated.md: one autoconfigurable block per class, listing the
    options the class itself defines (base-class options are documented upstream)."""
    from importlib import import_module

    classes = [
        "xsedehub.spawner.spawner.SlurmSSHSpawner",
        "xsedehub.auth.github.GatewayGitHubAuthenticator",
        "xsedehub.auth.cilogon.XSEDECILogonAuthenticator",
    ]
    parts = []
    for path in classes:
        mod, _, name = path.rpartition(".")
        cls = getattr(import_module(mod), name)
        own = {n for n in cls.class_own_traits(config=True)}
        inherited = sorted(set(cls.class_traits(config=True)) - own)
        parts.append(
            f"## {name}\n\n```{{eval-rst}}\n.. autoconfigurable:: {path}\n"
            f"   :exclude-members: {', '.join(inherited)}\n```\n"
        )
    target = Path(__file__).parent / "reference" / "config-generated.md"
    target.write_text("\n".join(parts))


sys.path.insert(0, str(Path(__file__).parents[1]))
_cli_reference()
_config_reference()
