"""The configuration: config.example.toml loads and documents the defaults exactly, durations
and sizes parse, and a bad config is refused with one problem per mistake, each naming its
dotted key."""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.config import (
    CallbackConfig,
    Config,
    Duration,
    QueueConfig,
    ScheduleConfig,
    Size,
    load,
    parse,
    parse_duration,
    parse_size,
)
from daemon.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def example_toml() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))


def keys_and_values(
    raw: dict[str, Any], loaded: msgspec.Struct, default: msgspec.Struct, path: str = ""
) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in the loaded example, default) for every key of `raw`, walking
    sub-tables that are structs."""
    found = []
    for key, value in raw.items():
        dotted = f"{path}{key}"
        here, there = getattr(loaded, key), getattr(default, key)
        if isinstance(value, dict) and isinstance(there, msgspec.Struct):
            assert isinstance(here, msgspec.Struct)
            found += keys_and_values(value, here, there, f"{dotted}.")
        else:
            found.append((dotted, here, there))
    return found


def struct_keys(struct: msgspec.Struct, path: str = "") -> set[str]:
    """Every dotted key of a (default) struct, sub-structs included."""
    keys = set()
    for name in struct.__struct_fields__:
        value = getattr(struct, name)
        if isinstance(value, msgspec.Struct):
            keys |= struct_keys(value, f"{path}{name}.")
        else:
            keys.add(f"{path}{name}")
    return keys


def test_the_example_config_loads() -> None:
    config = load(EXAMPLE)
    assert isinstance(config, Config)
    assert {"sleep", "noop"} <= set(config.types)


# Tables of named examples (task types, queues, schedules): their presence is compared, not
# their values, since the defaults have none.
EXAMPLES = ("types", "queues", "schedules", "callbacks")


def test_every_key_of_the_example_is_the_default() -> None:
    raw = example_toml()
    types = raw.pop("types", {})
    for name in EXAMPLES:
        raw.pop(name, None)
    loaded, default = load(EXAMPLE), Config()

    differing = [
        (key, value, want)
        for key, value, want in keys_and_values(raw, loaded, default)
        if value != want
    ]

    assert differing == [], "config.example.toml must show the defaults"
    # Task types are examples, not defaults: only their presence is compared.
    assert set(types) == set(loaded.types)
    assert set(default.types) == set()


def test_the_example_lists_every_key() -> None:
    raw = example_toml()
    present = {name for name in EXAMPLES if raw.pop(name, None)}
    default = Config(types={})
    listed = {key for key, _, _ in keys_and_values(raw, load(EXAMPLE), default)}

    missing = struct_keys(default) - listed - present

    assert missing == set(), "document these keys in config.example.toml"


def commented_keys(header: str) -> set[str]:
    """The keys shown commented out (`# key = value`) in the example's table `header`."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    block = itertools.takewhile(
        lambda line: not line.startswith("["), lines[lines.index(header) + 1 :]
    )
    return {m.group(1) for line in block if (m := re.match(r"# ?(\w+) = ", line))}


def test_the_example_schedule_callback_and_queue_show_every_key() -> None:
    raw = example_toml()
    [schedule] = raw["schedules"]
    assert set(schedule) | commented_keys("[[schedules]]") == set(ScheduleConfig.__struct_fields__)
    callback = raw["callbacks"]["example"]
    assert set(callback) | commented_keys("[callbacks.example]") == set(
        CallbackConfig.__struct_fields__
    )
    assert set(raw["queues"]["default"]) == set(QueueConfig.__struct_fields__)


SEVERAL_PROBLEMS: dict[str, Any] = {
    "server": {"listen": "127.0.0.1:8080", "bogus": 1},
    "workers": {"concurrency": "many", "grace_period": "soon", "prefetch": 5000},
    "types": {"y": {"kind": "shell"}},
}
EXPECTED_KEYS = [
    "server.bogus",
    "workers.concurrency",
    "workers.grace_period",
    "workers.prefetch",
    "types.y.kind",
]


def problem_keys(problems: list[str]) -> list[str]:
    """The dotted key each problem starts with ("key: ..." or "key = value: ...")."""
    return sorted(p.split(":", 1)[0].split(" = ", 1)[0] for p in problems)


def test_every_problem_is_reported_once_naming_its_key() -> None:
    with pytest.raises(ConfigError) as refused:
        parse(SEVERAL_PROBLEMS, source="several.toml")

    problems = refused.value.problems
    assert problem_keys(problems) == sorted(EXPECTED_KEYS), problems
    assert refused.value.path == "several.toml"
    by_key = dict(zip(problem_keys(problems), sorted(problems), strict=True))
    assert "unknown key" in by_key["server.bogus"]
    assert "'many'" in by_key["workers.concurrency"]
    assert "duration" in by_key["workers.grace_period"]
    assert "4096" in by_key["workers.prefetch"]
    assert "'python'" in by_key["types.y.kind"]


def test_problems_found_after_decoding_are_reported_together() -> None:
    raw = {
        "workers": {"concurrency": 8, "max_pending": 4},
        "types": {
            "x": {"kind": "python", "handler": "no_such_module_offload_test:run"},
            "z": {"kind": "python", "handler": "daemon.builtins:noop", "backoff": {"max": "0s"}},
        },
    }

    with pytest.raises(ConfigError) as refused:
        parse(raw)

    problems = refused.value.problems
    assert problem_keys(problems) == [
        "types.x.handler",
        "types.z.backoff.max",
        "workers.max_pending",
    ]
    assert "no_such_module_offload_test" in next(p for p in problems if p.startswith("types.x"))


def test_a_bad_handler_is_reported_alongside_other_problems() -> None:
    raw = dict(SEVERAL_PROBLEMS)
    raw["types"] = {
        **SEVERAL_PROBLEMS["types"],
        "x": {"kind": "python", "handler": "no_such_module_offload_test:run"},
    }

    with pytest.raises(ConfigError) as refused:
        parse(raw)

    assert problem_keys(refused.value.problems) == sorted([*EXPECTED_KEYS, "types.x.handler"])


@pytest.mark.parametrize(
    ("top_level", "named"),
    [
        ("import sys\nsys.exit(3)\n", "SystemExit"),
        ("raise KeyError('boom')\n", "KeyError"),
        ("def run(:\n", "SyntaxError"),
    ],
    ids=["sys-exit", "raises", "syntax-error"],
)
def test_a_handler_module_that_fails_at_import_is_a_config_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, top_level: str, named: str
) -> None:
    """Whatever a handler module's top level does (even sys.exit), the config naming it is
    refused with the key named; the process that loads it goes on."""
    module = f"offload_test_import_{named.lower()}"
    (tmp_path / f"{module}.py").write_text(top_level)
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {"types": {"x": {"kind": "python", "handler": f"{module}:run"}}}

    with pytest.raises(ConfigError) as refused:
        parse(raw)

    (problem,) = refused.value.problems
    assert problem_keys([problem]) == ["types.x.handler"]
    assert named in problem


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("2h", 7200), ("7d", 604800), ("1.5s", 1.5), (2, 2)],
)
def test_durations_parse(text: str | int, seconds: float) -> None:
    value = parse_duration(text)
    assert isinstance(value, Duration)
    assert value == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1MiB", 1 << 20), ("64KiB", 65536), ("2GiB", 2 << 30), ("10B", 10), (4096, 4096)],
)
def test_sizes_parse(text: str | int, size: int) -> None:
    value = parse_size(text)
    assert isinstance(value, Size)
    assert value == size


@pytest.mark.parametrize("bad", ["5 minutes", "-1s", "1w", "", True, -1, None])
def test_bad_durations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("bad", ["1MB", "1.5MiB", "-1", True, -1, None])
def test_bad_sizes_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_durations_and_sizes_in_a_config() -> None:
    config = parse(
        {
            "server": {"max_body": "1MiB", "max_wait": "500ms"},
            "workers": {"grace_period": "5m", "lease": 90},
        }
    )

    assert config.server.max_body == 1024 * 1024
    assert config.server.max_wait == pytest.approx(0.5)
    assert config.workers.grace_period == pytest.approx(300)
    assert config.workers.lease == pytest.approx(90)


def refused(raw: dict[str, Any]) -> list[str]:
    """The problems `parse` reports for `raw` (it must refuse it)."""
    with pytest.raises(ConfigError) as caught:
        parse(raw)
    return caught.value.problems


NOOP = {"noop": {"kind": "python", "handler": "daemon.builtins:noop"}}


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("0 0 31 4 *", "never fires"),  # April has 30 days
        ("0 0 30 2 *", "never fires"),
        ("* * * * * */2", "5 fields"),  # croniter's seconds field: not what the README says
        ("not cron", "5 fields"),
    ],
)
def test_a_cron_that_cannot_fire_as_written_is_refused(cron: str, expected: str) -> None:
    schedule = {"name": "s", "cron": cron, "type": "noop"}
    problems = refused({"types": NOOP, "schedules": [schedule]})
    assert len(problems) == 1
    assert problems[0].startswith(f"schedules[0].cron = {cron!r}: ")
    assert expected in problems[0]


def test_every_schedule_item_is_checked_key_by_key() -> None:
    schedules = [
        {"name": "a", "cron": "0 3 * * *", "type": "noop", "timezon": "UTC"},
        {"name": "b", "cron": "not cron", "type": "nope"},
    ]
    problems = refused({"types": NOOP, "schedules": schedules})
    assert problem_keys(problems) == [
        "schedules[0].timezon",
        "schedules[1].cron",
        "schedules[1].type",
    ]


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), 1e309, "9" * 400 + "d", 10**400, "36501d"]
)
def test_durations_must_be_finite_and_bounded(value: object) -> None:
    (problem,) = refused({"workers": {"grace_period": value}})
    assert problem.startswith("workers.grace_period = ")
    assert "duration" in problem


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"server": {"sse_heartbeat": 0}}, "server.sse_heartbeat"),
        ({"server": {"body_timeout": "0ms"}}, "server.body_timeout"),
        ({"workers": {"lease": "0s"}}, "workers.lease"),
        ({"types": {"t": {**NOOP["noop"], "timeout": 0}}}, "types.t.timeout"),
        (
            {"callbacks": {"c": {"url": "http://127.0.0.1:9/x", "timeout": 0}}},
            "callbacks.c.timeout",
        ),
    ],
)
def test_intervals_and_timeouts_must_be_more_than_zero(raw: dict[str, Any], key: str) -> None:
    (problem,) = refused(raw)
    assert problem.startswith(f"{key} = ")
    assert "expected a duration > 0" in problem


def test_a_queue_table_reports_each_bad_key_and_strict_once() -> None:
    queues = {"strict": "yes", "hi": {"wieght": 5, "rate": -1}, "lo": 3}
    problems = refused({"queues": queues})
    assert problem_keys(problems) == [
        "queues.hi.rate",
        "queues.hi.wieght",
        "queues.lo",
        "queues.strict",
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:", "expected sqlite:PATH"),
        ("sqlite://", "expected sqlite:PATH"),
        ("mysql://app:hunter2@db/offload", "expected sqlite:PATH"),
        ("postgresql://app:hunter2@127.0.0.1:abc/db", "port"),
        ("postgresql://app:hunter2@127.0.0.1:99999/db", "port"),
        ("hunter2secret", "expected sqlite:PATH"),
        ("postgresql:app:hunter2@127.0.0.1/db", "expected postgresql://"),
    ],
)
def test_the_store_url_is_checked_without_showing_a_password(url: str, expected: str) -> None:
    (problem,) = refused({"store": {"url": url}})
    assert problem.startswith("store.url")
    assert expected in problem
    assert "hunter2" not in problem


def test_a_url_with_a_password_is_never_echoed() -> None:
    raw = {
        "callbacks": {"c": {"url": "http://user:s3cretpw@example.com:70000/x"}},
        "types": {"h": {"kind": "http", "url": "ftp://user:s3cretpw@example.com/x"}},
    }
    problems = refused(raw)
    assert problem_keys(problems) == ["callbacks.c.url", "types.h.url"]
    assert not [p for p in problems if "s3cretpw" in p]
    assert "user:***@example.com" in problems[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"\xff\xfe junk", "not UTF-8"), (b"# only a comment\n\n", "holds no token")],
)
def test_a_tokens_file_that_gives_no_tokens_is_refused(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_bytes(content)
    (problem,) = refused({"auth": {"tokens_file": str(tokens)}})
    assert problem.startswith("auth.tokens_file: ")
    assert expected in problem


def test_a_credential_problem_is_named_after_the_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ci submit " + "a" * 32 + "\n")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    auth = {"tokens_file": str(tokens), "credential": "offload-tokens"}
    (problem,) = refused({"auth": auth})
    assert problem.startswith("auth.credential: ")


def test_listen_and_auth_problems_are_reported_together() -> None:
    raw = {"server": {"listen": "0.0.0.0", "max_batch": 0}, "auth": {"open": "/healthz"}}
    assert problem_keys(refused(raw)) == ["auth.open", "server.listen", "server.max_batch"]
    raw = {"server": {"listen": "0.0.0.0:8099", "max_batch": 0}}
    problems = refused(raw)
    assert problem_keys(problems) == ["server.listen", "server.max_batch"]
    assert "needs tokens" in problems[0] or "needs tokens" in problems[1]


@pytest.mark.parametrize("listen", ["127.0.0.1:١٨٣٠٣", "127.0.0.1:70000", "127.0.0.1"])
def test_a_listen_port_is_ascii_digits_up_to_65535(listen: str) -> None:
    (problem,) = refused({"server": {"listen": listen}})
    assert problem.startswith("server.listen = ")


def test_a_handler_that_does_not_import_is_reported_beside_an_unknown_key() -> None:
    raw = {"types": {"x": {"kind": "python", "handler": "nope_offload_test.mod:fn", "bogus": 1}}}
    assert problem_keys(refused(raw)) == ["types.x.bogus", "types.x.handler"]


def test_lesser_mistakes_are_named_with_what_was_expected(tmp_path: Path) -> None:
    callback = {"url": "http://127.0.0.1:9/x", "backoff": {"initial": "10s", "max": "1s"}}
    schedule = {"name": "s", "cron": "0 3 * * *", "type": "noop", "payload": {"x": math.inf}}
    raw = {
        "log": {"level": "off"},
        "callbacks": {"c": callback},
        "types": NOOP,
        "schedules": [schedule],
        "server": {"listen": f"unix:{tmp_path}/missing/offload.sock"},
    }
    problems = dict(p.split(" ", 1) for p in refused(raw))
    assert problems["log.level"] == "= 'off': expected one of 'debug', 'info', 'warning', 'error'"
    assert "expected at least backoff.initial (10s)" in problems["callbacks.c.backoff.max"]
    assert "inf or nan" in problems["schedules[0].payload:"]
    assert f"no directory {tmp_path}/missing" in problems["server.listen"]


def test_a_file_starting_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "offload.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b"[workers]\nconcurrency = 3\n")
    assert load(path).workers.concurrency == 3


@pytest.mark.parametrize("listen", ["[[::1]]:8080", "[::1:8080", "::1]:8080"])
def test_an_ipv6_listen_address_has_one_pair_of_brackets(listen: str) -> None:
    (problem,) = refused({"server": {"listen": listen}})
    assert problem.startswith("server.listen = ")
