"""The distribution installs xsedehub, xsedehub.auth and xsedehub.spawner, and nothing
generic (no top-level ``auth`` or ``spawner``), both as a wheel and editable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT = (
    "import xsedehub.auth, xsedehub.spawner, xsedehub.spawner.spawner, xsedehub.auth.github; "
    "print(xsedehub.auth.__file__)"
)


def test_wheel_install(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("xsedehub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"xsedehub", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert "xsedehub/auth/github.py" in names
    assert "xsedehub/spawner/spawner.py" in names
    # what every job script is made of: its template and the job agent it carries
    assert "xsedehub/spawner/templates/job.sh.j2" in names
    assert "xsedehub/spawner/jobagent.py" in names
    assert "xsedehub/testbed/localcluster_data/workshop/01-where-am-i.ipynb" in names
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    assert not (target / "auth").exists() and not (target / "spawner").exists()
    # run from an empty folder, with the installed copy first on the path
    r = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {IMPORT}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip().startswith(str(target / "xsedehub" / "auth"))


def test_editable_install(tmp_path):
    """The development install (pip install -e) maps the top-level folders."""
    r = subprocess.run([sys.executable, "-c", IMPORT], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(ROOT / "auth" / "__init__.py")
    r = subprocess.run([sys.executable, "-c", "import auth"], cwd=tmp_path, capture_output=True)
    assert r.returncode != 0  # nothing generic is importable


def test_console_script():
    exe = Path(sys.executable).parent / "xsedehub"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "cluster" in r.stdout


PYENV = Path("/root/.pyenv/versions")


@pytest.mark.parametrize("minor", ["3.9", "3.10"])
def test_an_older_python_is_refused_naming_the_hosts_that_work(minor, tmp_path):
    """TLJH's hub environment is the host's system Python: on Ubuntu 22.04 (3.10) or
    Debian 11 (3.9) the install stops with a message that says which hosts work."""
    found = sorted(PYENV.glob(f"{minor}.*/bin/python"))
    if not found:
        pytest.skip(f"no Python {minor} under {PYENV} to try the install with")
    target = tmp_path / "site"
    r = subprocess.run(
        [str(found[-1]), "-m", "pip", "install", "--no-index", "--no-build-isolation"]
        + ["--no-deps", "--target", str(target), str(ROOT)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null"},
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert f"xsedehub needs Python 3.11 or newer; this is Python {minor}." in out
    assert "install it on Debian 12 (Python 3.11) or Ubuntu 24.04 (Python 3.12)" in out
    assert not target.exists() or not any(target.iterdir())
