"""Names of queues, task types, schedules and callbacks (`models.NAME_PATTERN`): a newline,
also a trailing one that Python's `$` lets through, is refused wherever a name is checked,
and the pattern means the same as JSON Schema's ECMA-262 regex in the OpenAPI document."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import jsonschema_rs
import msgspec
import pytest

from daemon.config import parse
from daemon.errors import ConfigError
from daemon.models import NAME_PATTERN, Name

NOOP = {"kind": "python", "handler": "daemon.builtins:noop"}
GOOD = ["billing", "a", "A.b-c_9", "x" * 64]
BAD = ["billing\n", "billing\n\n", "\nbilling", "bil\nling", "", "x" * 65, "a b", "a\r", "é"]


@pytest.mark.parametrize("name", BAD)
def test_a_bad_name_is_refused_by_the_type_and_the_config(name: str) -> None:
    assert re.search(NAME_PATTERN, name) is None
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(name, Name)
    with pytest.raises(ConfigError) as caught:
        parse({"types": {"noop": {**NOOP, "queue": name}}})
    assert [p.split(" ")[0].rstrip(":") for p in caught.value.problems] == ["types.noop.queue"]
    with pytest.raises(ConfigError):
        parse({"types": {name: NOOP}})


@pytest.mark.parametrize("name", GOOD)
def test_a_good_name_is_taken(name: str) -> None:
    assert msgspec.convert(name, Name) == name
    assert parse({"types": {name: {**NOOP, "queue": name}}}).types[name].queue == name


def test_the_pattern_reads_the_same_as_a_json_schema_regex() -> None:
    """jsonschema_rs compiles patterns as ECMA-262 (`$` is the end of the text only)."""
    schema = {"type": "string", "pattern": NAME_PATTERN}
    assert [jsonschema_rs.is_valid(schema, name) for name in GOOD] == [True] * len(GOOD)
    assert [jsonschema_rs.is_valid(schema, name) for name in BAD] == [False] * len(BAD)


@pytest.mark.skipif(shutil.which("node") is None, reason="no node to run ECMA-262 regexes")
def test_the_pattern_reads_the_same_in_javascript() -> None:
    script = (
        "const p = new RegExp(process.argv[1], 'u');"
        "process.stdout.write(JSON.stringify(JSON.parse(process.argv[2]).map(s => p.test(s))))"
    )
    names = GOOD + BAD
    node = subprocess.run(
        ["node", "-e", script, NAME_PATTERN, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(node.stdout) == [name in GOOD for name in names]
