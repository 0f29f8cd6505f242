"""The local cluster is real: certificates, host keys, SLURM."""

from __future__ import annotations

import asyncio
import subprocess
import time

import asyncssh
import pytest

from .conftest import in_cluster

pytestmark = pytest.mark.cluster

JOB = (
    "#!/bin/bash\n#SBATCH --job-name=xh-smoke\n#SBATCH --time=00:05:00\n"
    "#SBATCH --output=/dev/null\nsleep 300\n"
)


def _cert(ca_path: str, principal: str, *, valid_after, valid_before, ca=None):
    key = asyncssh.generate_private_key("ssh-ed25519")
    ca = ca or asyncssh.read_private_key(ca_path)
    cert = ca.generate_user_certificate(
        key,
        f"test-{principal}",
        principals=[principal],
        valid_after=valid_after,
        valid_before=valid_before,
    )
    return key, cert


async def _connect(cluster, user, key, cert):
    return await asyncssh.connect(
        cluster.login_ip,
        cluster.login_port,
        username=user,
        client_keys=[(key, cert)],
        known_hosts=cluster.known_hosts,
        agent_path=None,
        config=None,
        connect_timeout=10,
    )


async def test_certificate_login_submits_a_real_job(cluster):
    now = time.time()
    key, cert = _cert(cluster.user_ca_key, "alice", valid_after=now - 60, valid_before=now + 600)
    async with await _connect(cluster, "alice", key, cert) as conn:
        who = await conn.run("id -un", check=True, timeout=10)
        assert who.stdout.strip() == "alice"
        sub = await conn.run("sbatch --parsable", input=JOB, check=True, timeout=20)
        job_id = sub.stdout.strip().split(";")[0]
        assert job_id.isdigit()
        deadline = time.monotonic() + 30
        state = node = ""
        while time.monotonic() < deadline:
            q = await conn.run(f"squeue -h -j {job_id} -o '%T %N %u'", check=True, timeout=10)
            state, node, owner = (q.stdout.split() + ["", "", ""])[:3]
            if state == "RUNNING":
                break
            await asyncio.sleep(0.2)
        assert state == "RUNNING"
        assert node in cluster.nodes
        assert owner == "alice"
        await conn.run(f"scancel {job_id}", check=True, timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            q = await conn.run(f"squeue -h -j {job_id} -o %T", timeout=10)
            if q.stdout.strip() in ("", "CANCELLED", "COMPLETED"):
                break
            await asyncio.sleep(0.2)
        assert q.stdout.strip() in ("", "CANCELLED", "COMPLETED")


@pytest.mark.parametrize(
    "case",
    ["other_ca", "expired", "wrong_principal", "bare_key"],
)
async def test_login_node_refuses_bad_certificates(cluster, case):
    now = time.time()
    if case == "other_ca":
        rogue = asyncssh.generate_private_key("ssh-ed25519")
        key, cert = _cert("", "alice", valid_after=now - 60, valid_before=now + 600, ca=rogue)
    elif case == "expired":
        key, cert = _cert(
            cluster.user_ca_key, "alice", valid_after=now - 3600, valid_before=now - 60
        )
    elif case == "wrong_principal":
        key, cert = _cert(cluster.user_ca_key, "bob", valid_after=now - 60, valid_before=now + 600)
    else:
        key, cert = asyncssh.generate_private_key("ssh-ed25519"), None
    with pytest.raises(asyncssh.PermissionDenied):
        if cert is None:
            await asyncssh.connect(
                cluster.login_ip,
                cluster.login_port,
                username="alice",
                client_keys=[key],
                known_hosts=cluster.known_hosts,
                agent_path=None,
                config=None,
                connect_timeout=10,
            )
        else:
            await _connect(cluster, "alice", key, cert)


async def test_host_key_is_verified(cluster, tmp_path):
    """A known_hosts that does not vouch for the login node makes the connection fail."""
    rogue_ca = asyncssh.generate_private_key("ssh-ed25519")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"@cert-authority {cluster.login_ip} {rogue_ca.export_public_key().decode()}")
    now = time.time()
    key, cert = _cert(cluster.user_ca_key, "alice", valid_after=now - 60, valid_before=now + 600)
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await asyncssh.connect(
            cluster.login_ip,
            cluster.login_port,
            username="alice",
            client_keys=[(key, cert)],
            known_hosts=str(kh),
            agent_path=None,
            config=None,
        )


def test_cluster_description_and_nodes(cluster):
    r = in_cluster(cluster, "sinfo", "-h", "-N", "-o", "%N %c")
    cpus = {}
    for line in r.stdout.split("\n"):
        if line.strip():
            n, c = line.split()
            cpus[n] = int(c)
    assert set(cpus) == set(cluster.nodes)
    assert sum(cpus.values()) >= 100  # room for a 100-attendee workshop of 1-core jobs
    assert cluster.gateway_user == "gateway" and set(cluster.researchers) == {"alice", "bob"}


def test_the_job_environment_imports_no_slow_iri_validator(cluster):
    """The install drops rfc3987-syntax from the job environment: jsonschema would
    import it in every server's start and build 35 parsers (2.3 s of CPU here)."""
    py = f"{cluster.job_env}/bin/python"
    probe = "import importlib.util as u; print(u.find_spec('rfc3987_syntax'))"
    r = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "None"
    # and what used it still imports (the format checker without the IRI formats)
    subprocess.run([py, "-c", "import jupyter_events.validators"], check=True)
