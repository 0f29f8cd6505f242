"""The spawn form's validation, table-driven (no cluster)."""

from __future__ import annotations

import pytest
from xsedehub.spawner import form
from xsedehub.spawner import validate as v

PARTS = [
    form.PartitionSpec.from_config(
        "compute",
        {"max_walltime": "08:00:00", "max_cores": 8, "max_memory": "16G", "default_memory": "1G"},
    ),
    form.PartitionSpec.from_config(
        "gpu", {"max_walltime": "02:00:00", "max_cores": 4, "max_memory": "32G", "max_gpus": 2}
    ),
]


def check(opts, **kw):
    kw.setdefault("default_partition", "compute")
    return form.validate_options(opts, PARTS, **kw)


def test_defaults_and_choices():
    r = check({})
    assert (r.partition, r.walltime_minutes, r.cpus, r.memory_mb, r.gpus) == (
        "compute",
        60,
        1,
        1024,
        0,
    )
    r = check(
        {"partition": "gpu", "walltime": "01:30:00", "cores": "4", "memory": "8G", "gpus": "2"}
    )
    assert (r.partition, r.walltime_minutes, r.cpus, r.memory_mb, r.gpus) == ("gpu", 90, 4, 8192, 2)
    r = check({"account": "abc-123"}, allow_account=True, accounts=["abc-123"])
    assert r.account == "abc-123"


@pytest.mark.parametrize(
    "opts,field",
    [
        ({"partition": "nope"}, "partition"),
        ({"partition": "compute;id"}, "partition"),
        ({"partition": "compute\n#SBATCH --uid=0"}, "partition"),
        ({"walltime": "09:00:00"}, "walltime"),
        ({"walltime": "soon"}, "walltime"),
        ({"walltime": "01:00:00`id`"}, "walltime"),
        ({"cores": "9"}, "cores"),
        ({"cores": "0"}, "cores"),
        ({"cores": "1; rm -rf /"}, "cores"),
        ({"cores": 2.5}, "cores"),
        ({"cores": ["1"]}, "cores"),
        ({"memory": "17G"}, "memory"),
        ({"memory": "$(id)"}, "memory"),
        ({"gpus": "1"}, "gpus"),
        ({"partition": "gpu", "gpus": "3"}, "gpus"),
        ({"account": "abc"}, "account"),
        ({"image": "x"}, "options"),
        ({"walltime": "0" * 5000}, "walltime"),
    ],
)
def test_refusals_name_the_field(opts, field):
    with pytest.raises(v.InvalidValue) as e:
        check(opts)
    assert e.value.field == field


@pytest.mark.parametrize("account", ["other", "abc 123", "abc\n", "../x", ""])
def test_accounts(account):
    if account == "":
        assert check({"account": ""}, allow_account=True).account is None
        return
    with pytest.raises(v.InvalidValue) as e:
        check({"account": account}, allow_account=True, accounts=["abc-123"])
    assert e.value.field == "account"


def test_options_from_form_keeps_only_known_fields():
    assert form.options_from_form(
        {"partition": ["gpu"], "cores": [" 2 "], "evil": ["x"], "memory": [""]}
    ) == {"partition": "gpu", "cores": "2"}


def test_parse_sinfo():
    out = "compute*|up|8:00:00|2|4/124/0/128|(null)\ndebug|up|30:00|2|0/128/0/128|gpu:2\nbad\n"
    a = form.parse_sinfo(out)
    assert a["compute"].cpus_idle == 124 and a["compute"].cpus_total == 128
    assert a["debug"].gres == "gpu:2"


def test_render_escapes_everything():
    parts = [form.PartitionSpec("compute", description="<script>alert(1)</script>")]
    html = form.render_form(
        parts, default_partition="compute", allow_account=True, default_account='"><img src=x>'
    )
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html
    assert '"><img' not in html


def test_partition_data_is_json_the_page_can_parse():
    import json
    import re

    html = form.render_form(PARTS, default_partition="compute")
    text = re.search(r'id="xh-partitions">(.*?)</script>', html, re.S).group(1)
    data = json.loads(text)  # what JSON.parse sees: the element's raw text
    assert data["gpu"]["max_gpus"] == 2 and data["compute"]["max_walltime"] == "08:00:00"
    # no value can close the element or open a comment, whatever it holds
    hostile = form.script_json({"x": "</script><!--&"})
    assert "<" not in hostile and ">" not in hostile and "&" not in hostile
    assert json.loads(hostile) == {"x": "</script><!--&"}


@pytest.mark.parametrize("spec", [{"max_cores": "many"}, {"colour": "red"}, {"max_walltime": "x"}])
def test_bad_partition_config(spec):
    with pytest.raises(v.InvalidValue):
        form.PartitionSpec.from_config("compute", spec)
