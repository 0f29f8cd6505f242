"""Stops an install on a Python older than 3.11 with a message that names the hosts that
work (pip's own refusal of ``requires-python`` does not say why or what to do).

Everything else is in pyproject.toml."""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 (this file runs on old Pythons on purpose)
    sys.exit(
        "xsedehub needs Python 3.11 or newer; this is Python "
        f"{sys.version.split()[0]} ({sys.executable}).\n"
        "The Littlest JupyterHub builds its hub environment from the host's system Python: "
        "install it on Debian 12 (Python 3.11) or Ubuntu 24.04 (Python 3.12). "
        "Ubuntu 22.04 (Python 3.10) and Debian 11 (Python 3.9) cannot run xsedehub."
    )

from setuptools import setup

setup()
