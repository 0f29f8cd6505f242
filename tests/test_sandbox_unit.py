"""The attendee sandbox's pure builder (spawner/sandbox.py) and its settings: the
command for bubblewrap and for Apptainer, what the job script does with it, what is
refused.  The sandbox itself, on the local cluster: tests/test_sandbox.py."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from traitlets.config import Config
from xsedehub.spawner import sandbox as sb
from xsedehub.spawner import slurm
from xsedehub.spawner import validate as v
from xsedehub.spawner.spawner import SlurmSSHSpawner

from xsedehub.config import check as config_check


def job(**kw) -> slurm.JobScript:
    base = dict(
        job_name="jupyter-ada",
        resources=slurm.JobResources("compute", 60),
        job_dir=".xsedehub/jobs/u1-abc",
        work_dir="workshop/ada",
        singleuser=["/opt/env/bin/jupyterhub-singleuser", "--debug"],
        tunnel=slurm.Tunnel("10.0.0.1", 22, "tunnelbot", 20001, "127.0.0.1", 8081),
        python="/opt/env/bin/python",
        prologue=[["gitpuller", "https://example.org/w", "main", "w"]],
    )
    base.update(kw)
    return slurm.JobScript(**base)


def pairs(argv: list[str], flag: str, n: int = 2) -> list[tuple[str, ...]]:
    return [tuple(argv[i + 1 : i + 1 + n]) for i, a in enumerate(argv) if a == flag]


def test_bwrap_command_hides_home_and_binds_only_the_attendee_folder():
    argv = sb.argv(sb.Sandbox(ro_binds=("/opt/data",), binds=("/scratch/w",)))
    assert argv[0] == "bwrap"
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--die-with-parent"):
        assert flag in argv
    assert "--new-session" in argv
    assert "--unshare-net" not in argv and "--unshare-all" not in argv  # hub API on loopback
    assert "--share-net" not in argv
    assert pairs(argv, "--proc", 1) == [("/proc",)] and pairs(argv, "--dev", 1) == [("/dev",)]
    # the hidden paths that exist on the node (XH_HIDE, see below), then the home
    assert argv[argv.index("--proc") + 2] == "${XH_HIDE[@]}"
    assert pairs(argv, "--tmpfs", 1) == [("$HOME",)]
    assert ("/", "/") in pairs(argv, "--ro-bind") and ("/opt/data", "/opt/data") in pairs(
        argv, "--ro-bind"
    )
    # writable: only the attendee's folder, the socket-only folder, and what the site lists
    assert pairs(argv, "--bind") == [
        ("/scratch/w", "/scratch/w"),
        ("$XH_WORK", "$XH_WORK"),
        ("$XH_DIR/sock", "$XH_DIR"),
    ]
    assert pairs(argv, "--setenv") == [("HOME", "$XH_WORK")]
    assert pairs(argv, "--chdir", 1) == [("$XH_WORK",)]
    assert argv[-1] == "--"
    # mounts are applied in order: the hidden paths first, the binds on top of them
    assert argv.index("$HOME") < argv.index("$XH_WORK")


def test_apptainer_command_contains_all_with_the_folder_as_home():
    s = sb.Sandbox(
        runtime="apptainer",
        command="/usr/bin/apptainer",
        image="/shared/images/jupyter.sif",
        ro_binds=("/opt/xsedehub/job-env",),
        binds=("/scratch/w",),
        devices=("/dev/nvidia0",),
    )
    argv = sb.argv(s)
    assert argv[:3] == ["/usr/bin/apptainer", "exec", "--containall"]
    assert pairs(argv, "--no-mount", 1) == [("hostfs,bind-paths,cwd",)]
    assert pairs(argv, "--home", 1) == [("$XH_WORK:$XH_WORK",)]
    assert pairs(argv, "--pwd", 1) == [("$XH_WORK",)]
    assert pairs(argv, "--bind", 1) == [
        ("$XH_DIR/sock:$XH_DIR",),
        ("/opt/xsedehub/job-env:/opt/xsedehub/job-env:ro",),
        ("/scratch/w:/scratch/w",),
        ("/dev/nvidia0:/dev/nvidia0",),
    ]
    assert argv[-1] == "/shared/images/jupyter.sif"
    text = sb.words(argv)
    assert '"$XH_DIR/sock:$XH_DIR"' in text and "'--containall'" not in text
    # --cleanenv: the server's environment goes in as APPTAINERENV_* (names from the
    # env file), never on a command line
    setup = "\n".join(sb.setup_lines(s))
    assert "APPTAINERENV_$_n" in setup


def test_apptainer_env_names_come_from_the_env_file(tmp_path):
    (tmp_path / "env").write_text(
        slurm.env_file({"JUPYTERHUB_API_TOKEN": "t0ken", "A_B": "x y"}, "") + "export BAD\n"
    )
    script = (
        f'XH_DIR={shlex.quote(str(tmp_path))}; set -a; . "$XH_DIR/env"; set +a\n'
        + sb._APPTAINER_ENV
        + '\nprintf "%s|" "$APPTAINERENV_JUPYTERHUB_API_TOKEN" "$APPTAINERENV_A_B"'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "t0ken|x y|"


def test_hidden_paths_are_those_that_exist(tmp_path):
    (tmp_path / "there").mkdir()
    s = sb.Sandbox(hide=("/home", str(tmp_path / "there"), str(tmp_path / "not-there")))
    script = sb.hide_line(s) + '\nprintf "%s|" "${XH_HIDE[@]}"'
    out = subprocess.run(["bash", "-uc", script], capture_output=True, text=True, check=True)
    assert out.stdout == f"--tmpfs|/home|--tmpfs|{tmp_path}/there|"
    assert sb.Sandbox().hide == ("/home", "/tmp", "/var/tmp", "/run/munge")
    empty = sb.hide_line(sb.Sandbox(hide=())) + '\nprintf "%s|" "${XH_HIDE[@]}"'
    assert subprocess.run(["bash", "-uc", empty], capture_output=True, text=True).stdout == "|"
    assert '"${XH_HIDE[@]}"' in sb.words(sb.argv(s))


def test_job_script_runs_the_checkout_and_the_server_in_the_sandbox_after_a_trial():
    plain = slurm.build_job_script(job())
    boxed = slurm.build_job_script(job(sandbox=sb.Sandbox()))
    server = [ln for ln in boxed.splitlines() if "jupyterhub-singleuser" in ln]
    assert len(server) == 1
    assert server[0].startswith("bwrap --die-with-parent ")
    assert server[0].endswith(
        '-- /opt/env/bin/jupyterhub-singleuser --debug --ServerApp.sock="$XH_DIR/server.sock" '
        "--ServerApp.sock_mode=0600 &"
    )
    # the plumbing stays outside: the tunnels and the env file are not wrapped
    for line in boxed.splitlines():
        if line.lstrip().startswith("ssh ") or '. "$XH_DIR/env"' in line:
            assert "bwrap" not in line
    # the trial run comes first and ends the job; then the checkout runs in the sandbox
    # too (its .git is the attendee's to write: hooks, config), then the server
    lines = boxed.splitlines()
    trial = next(i for i, ln in enumerate(lines) if "-- true 2>&1" in ln)
    checkout = [i for i, ln in enumerate(lines) if "gitpuller https://example.org/w main w" in ln]
    assert len(checkout) == 1 and trial < checkout[0]
    assert lines[checkout[0]].startswith("bwrap --die-with-parent ")
    assert lines[checkout[0]].endswith("-- gitpuller https://example.org/w main w")
    assert trial < lines.index('log "starting the single-user server"')
    assert "exit 3" in lines[trial + 3]
    assert 'ln -sfn sock/server.sock "$XH_DIR/server.sock"' in boxed
    # without a sandbox, nothing changes
    assert "bwrap" not in plain and "sock/server.sock" not in plain
    assert subprocess.run(["bash", "-n"], input=boxed, text=True).returncode == 0


def test_sandbox_needs_a_folder_below_home_and_beside_the_job_directory():
    with pytest.raises(v.InvalidValue, match="work directory"):
        job(work_dir=".", sandbox=sb.Sandbox())
    for inside in (".xsedehub/jobs/u1-abc", ".xsedehub/jobs/u1-abc/work"):
        with pytest.raises(v.InvalidValue, match="inside the job directory"):
            job(work_dir=inside, sandbox=sb.Sandbox())
    job(work_dir=".xsedehub/jobs/u1-abc-work", sandbox=sb.Sandbox())  # beside it: fine
    # the other way round: an attendee folder that holds the job directories (a GitHub
    # login "jobs" under a workdir root ".xsedehub") would show every job's files
    for outside in (".xsedehub/jobs", ".xsedehub"):
        with pytest.raises(v.InvalidValue, match="job directories are inside the work"):
            job(work_dir=outside, sandbox=sb.Sandbox())


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"runtime": "docker"}, "sandbox"),
        ({"runtime": "apptainer"}, "sandbox_image"),
        ({"runtime": "apptainer", "image": "img.sif"}, "sandbox_image"),
        ({"hide": ("home",)}, "sandbox_hide"),
        ({"hide": ("/",)}, "sandbox_hide"),
        ({"ro_binds": ("/opt/$(id)",)}, "sandbox_ro_binds"),
        ({"binds": ("/scratch/../etc",)}, "sandbox_binds"),
        ({"binds": ("/a b",)}, "sandbox_binds"),
        ({"devices": ("/etc/passwd",)}, "sandbox_devices"),
        ({"command": "bwrap;id"}, "sandbox_command"),
        ({"command": "./bwrap"}, "sandbox_command"),
    ],
)
def test_bad_settings_are_refused(kw, field):
    with pytest.raises(v.InvalidValue) as e:
        sb.Sandbox(**kw)
    assert e.value.field == field


def spawner(mode: str = "gateway", **cfg) -> SlurmSSHSpawner:
    c = Config()
    for k, val in cfg.items():
        setattr(c.SlurmSSHSpawner, k, val)
    sp = SlurmSSHSpawner(config=c)
    sp.mode = mode
    return sp


def test_gateway_mode_is_sandboxed_by_default_xsede_mode_never():
    assert spawner().sandbox == "bubblewrap"
    assert spawner().sandbox_settings() == sb.Sandbox()
    assert spawner("xsede").sandbox_settings() is None
    assert spawner(sandbox="none").sandbox_settings() is None
    s = spawner(sandbox="apptainer", sandbox_image="/i.sif", sandbox_ro_binds=["/opt/e"])
    assert s.sandbox_settings() == sb.Sandbox(
        runtime="apptainer", image="/i.sif", ro_binds=("/opt/e",)
    )


def test_hub_config_names_a_bad_sandbox_setting(tmp_path):
    c = Config()
    c.SlurmSSHSpawner.sandbox = "apptainer"  # without an image
    problems = [str(p) for p in config_check(c, "gateway", environ={})]
    assert any("SlurmSSHSpawner.sandbox_image" in p and "needs an image" in p for p in problems)
    problems = [str(p) for p in config_check(c, "xsede", environ={})]
    assert not any("sandbox" in p for p in problems)


def test_hidden_folders_and_the_home_are_hidden_by_their_real_paths_too(tmp_path):
    """A home (or a hidden folder) that is a link, as on sites whose /home/USER points
    into a parallel file system: its target must be hidden as well, or the read-only
    root shows it (job directories, env files and tunnel keys included)."""
    real_home, real_scratch = tmp_path / "gpfs" / "gw", tmp_path / "gpfs" / "scratch"
    real_home.mkdir(parents=True)
    real_scratch.mkdir()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "gw").symlink_to(real_home)
    (tmp_path / "scratch").symlink_to(real_scratch)
    plain = tmp_path / "plain"
    plain.mkdir()
    box = sb.Sandbox(hide=(str(tmp_path / "scratch"), str(plain), str(tmp_path / "absent")))
    script = f'{sb.hide_line(box)}\nprintf "%s\\n" "${{XH_HIDE[@]}}"\n'
    r = subprocess.run(
        ["bash", "-c", script],
        env={"HOME": str(tmp_path / "home" / "gw"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    words = r.stdout.split("\n")[:-1]
    pairs = list(zip(words[::2], words[1::2], strict=True))
    assert all(opt == "--tmpfs" for opt, _ in pairs)
    hidden = [path for _, path in pairs]
    assert hidden == [str(tmp_path / "scratch"), str(real_scratch), str(plain), str(real_home)]
