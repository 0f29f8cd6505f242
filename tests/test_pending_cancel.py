"""The durable list of jobs still to cancel, and the sacct parsing (no cluster)."""

from __future__ import annotations

import json
import os
import stat

from xsedehub.spawner import pending_cancel as pc
from xsedehub.spawner import slurm


def entry(job_id: str, **kw) -> pc.PendingCancel:
    return pc.PendingCancel(job_id, "login.example.org", 22, "gateway", **kw)


def test_add_remove_and_the_file_format(tmp_path):
    path = tmp_path / "sub" / "pending.json"
    assert pc.read(path) == []
    pc.add(path, entry("42", spawn_id="u1-abc", user="ada", attempts=4, error="refused"))
    pc.add(path, entry("43", attempts=4))
    pc.add(path, entry("42", attempts=1, error="again"))  # counted, not duplicated
    jobs = pc.read(path)
    assert [(j.job_id, j.attempts, j.error) for j in jobs] == [("42", 5, "again"), ("43", 4, "")]
    assert jobs[0].since > 0 and jobs[0].spawn_id == "u1-abc"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["jobs"][0]["login_host"] == "login.example.org"
    pc.remove(path, [jobs[0]])
    assert [j.job_id for j in pc.read(path)] == ["43"]


def test_unparsable_entries_are_skipped(tmp_path):
    path = tmp_path / "pending.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "jobs": [
                    {"job_id": "12; rm -rf /", "login_host": "h", "ssh_user": "u"},
                    {"job_id": "7"},
                    {"job_id": 8, "login_host": "h", "ssh_user": "u", "future": True},
                    "junk",
                ],
            }
        )
    )
    assert [j.job_id for j in pc.read(path)] == ["8"]


def test_sacct_output_and_disabled_accounting():
    text = "4242|CANCELLED by 1001|node1|alice\n4243|RUNNING|node2|bob\nbad line\n"
    jobs = slurm.parse_sacct(text)
    assert jobs["4242"].state == "CANCELLED" and not jobs["4242"].alive
    assert jobs["4243"].running and jobs["4243"].nodes == "node2"
    assert slurm.sacct_disabled("Slurm accounting storage is disabled\n")
    assert not slurm.sacct_disabled("sacct: error: Problem talking to the database")
    assert slurm.sacct_argv("12")[-2:] == ["--jobs=12", "--format=JobID,State,NodeList,User"]
