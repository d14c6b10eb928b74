"""GET /openapi.json: a valid OpenAPI 3.1 document of every route, built from the wire types,
following the configuration, whose examples fit its schemas; and a schemathesis run against a
real `offload serve` that finds no 5xx and no answer the document does not allow.

The fuzz run is bounded (`OFFLOAD_FUZZ_EXAMPLES` per operation, seed `OFFLOAD_FUZZ_SEED`,
both overridable to explore further) and takes well under a minute on two cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import jsonschema
import msgspec
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from daemon.api import make_app
from daemon.auth import Authenticator
from daemon.ids import is_id, new_id
from daemon.openapi import TASK_ID_PATTERN, Health
from daemon.runtime import Runtime
from daemon.wire import ErrorResponse, SubmitRequest, TaskPage, TaskView
from tests.harness import (
    READY_TIMEOUT,
    DaemonConfig,
    DaemonExited,
    Offload,
    daemon_env,
    free_port,
    render_toml,
)
from tests.inproc import (  # noqa: F401 (api_fixture is the `api` fixture)
    TEST_TYPES,
    Daemon,
    api_fixture,
    make_config,
    open_daemon,
)

TOKEN = "fuzz-admin-token-0123456789"
FUZZ_EXAMPLES = int(os.environ.get("OFFLOAD_FUZZ_EXAMPLES", "30"))
FUZZ_SEED = int(os.environ.get("OFFLOAD_FUZZ_SEED", "20250101"))
FUZZ_WITHIN = 840.0  # seconds; the run takes ~20-60 s on two loaded cores
METHODS = ("get", "put", "post", "delete", "patch")
EX_START = 1  # `offload serve` could not start (the port was taken)


async def openapi(daemon: Daemon) -> dict[str, Any]:
    reply = await daemon.request("GET", "/openapi.json")
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    document: dict[str, Any] = reply.body
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) of every operation of `document`."""
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"ops admin {TOKEN}\nreader read reader-token-0123456789\n")
    return path


# -- the document ----------------------------------------------------------------------


async def test_the_document_is_valid_openapi_3_1(api: Daemon, tmp_path: Path) -> None:
    anonymous = await openapi(api)
    OpenAPIV31SpecValidator(anonymous).validate()
    assert anonymous["openapi"] == "3.1.0"

    overrides = {"auth": {"tokens_file": str(tokens_file(tmp_path))}}
    async with open_daemon(tmp_path / "auth", overrides) as guarded:
        reply = await guarded.request(
            "GET", "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert reply.status == 200, reply.body
    OpenAPIV31SpecValidator(reply.body).validate()


async def test_every_route_of_the_app_is_described_and_nothing_else(
    api: Daemon, tmp_path: Path
) -> None:
    document = await openapi(api)
    # make_app reads only these two attributes of the runtime while it builds the routes.
    config = make_config(tmp_path, free_port())
    rt = cast(Runtime, SimpleNamespace(config=config, auth=Authenticator([], [])))
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in make_app(rt).router.routes()
        if route.method not in ("HEAD", "*") and route.resource is not None
    }
    described = {(method, path) for path, method, _ in operations(document)}
    assert described == routes


async def test_schemas_are_the_wire_types(api: Daemon) -> None:
    document = await openapi(api)
    schemas = document["components"]["schemas"]
    wire = [TaskView, TaskPage, ErrorResponse, Health]
    _, generated = msgspec.json.schema_components(wire, ref_template="#/components/schemas/{name}")
    for name, schema in generated.items():
        assert set(schemas[name]["properties"]) == set(schema["properties"]), name
        assert schemas[name].get("required") == schema.get("required"), name
    submit = schemas["SubmitRequest"]
    assert set(submit["properties"]) == {f.name for f in msgspec.structs.fields(SubmitRequest)}
    assert submit["additionalProperties"] is False
    assert submit["properties"]["priority"] == {
        "type": "integer",
        "minimum": -1000,
        "maximum": 1000,
        "default": 0,
    }


async def test_the_document_follows_the_configuration(api: Daemon, tmp_path: Path) -> None:
    document = await openapi(api)
    schemas = document["components"]["schemas"]
    submit = document["paths"]["/v1/tasks"]["post"]
    variants = submit["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert variants == [{"$ref": f"#/components/schemas/Submit.{n}"} for n in sorted(TEST_TYPES)]
    sleep = schemas["Submit.sleep"]
    assert sleep["properties"]["type"] == {"const": "sleep"}
    # daemon.builtins:sleep declares SleepPayload: `seconds` is required, so is the payload.
    assert sleep["properties"]["payload"] == {"$ref": "#/components/schemas/SleepPayload"}
    assert "payload" in sleep["required"]
    assert schemas["SleepPayload"]["required"] == ["seconds"]
    # No [callbacks.NAME] in the test config: a task may name none.
    assert sleep["properties"]["callback"]["anyOf"] == [{"type": "null"}]
    batch = schemas["BatchRequest"]["properties"]["tasks"]
    assert batch["items"] == submit["requestBody"]["content"]["application/json"]["schema"]
    assert (batch["minItems"], batch["maxItems"]) == (1, api.config.server.max_batch)
    noop = schemas["Submit.noop"]
    assert noop["properties"]["payload"] == {"default": {}}
    assert "payload" not in noop["required"]
    timeout = [b for b in noop["properties"]["timeout"]["anyOf"] if b.get("type") == "number"]
    assert timeout[0]["maximum"] == 60  # types.noop.timeout = "1m"
    (wait,) = document["paths"]["/v1/tasks/{id}"]["get"]["parameters"]
    assert wait["name"] == "wait"
    assert wait["schema"]["maximum"] == api.config.server.max_wait

    # No tokens: anonymous everywhere, so no 401/403.
    assert submit["security"] == [{}]
    assert "401" not in submit["responses"]
    overrides = {"auth": {"tokens_file": str(tokens_file(tmp_path))}}
    async with open_daemon(tmp_path / "auth", overrides) as guarded:
        reply = await guarded.request(
            "GET", "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    paths = reply.body["paths"]
    assert paths["/v1/tasks"]["post"]["security"] == [{"bearer": ["submit"]}]
    assert paths["/v1/tasks"]["get"]["security"] == [{"bearer": ["read"]}]
    assert paths["/v1/tasks/{id}"]["delete"]["security"] == [{"bearer": ["admin"]}]
    assert set(paths["/v1/tasks"]["post"]["responses"]) >= {"401", "403"}
    assert paths["/healthz"]["get"]["security"] == [{}]  # an auth.open path
    assert reply.body["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_id_pattern_is_the_ids_of_daemon_ids() -> None:
    assert all(re.fullmatch(TASK_ID_PATTERN, new_id()) for _ in range(100))
    for char in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcz-_":
        assert bool(re.fullmatch(TASK_ID_PATTERN, char * 26)) == is_id(char * 26), char


async def test_errors_statuses_and_headers_are_declared(api: Daemon) -> None:
    document = await openapi(api)
    for path, _, op in operations(document):
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and path != "/readyz":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
            if status == "503" and path != "/readyz":
                assert response["headers"]["Retry-After"]["required"] is True
    submit = document["paths"]["/v1/tasks"]["post"]["responses"]
    assert set(submit) == {"202", "400", "408", "413", "415", "422", "503"}
    timeout = submit["408"]["content"]["application/json"]["example"]["error"]
    assert (timeout["code"], timeout["field"]) == ("request_timeout", "body")
    assert "server.body_timeout" in timeout["message"]
    assert submit["202"]["headers"]["Location"]["required"] is True
    batch = document["paths"]["/v1/tasks/batch"]["post"]["responses"]
    assert set(batch) == set(submit)
    cancel = document["paths"]["/v1/tasks/{id}"]["delete"]["responses"]
    assert set(cancel) == {"200", "404", "409", "503"}
    events = document["paths"]["/v1/events"]["get"]["responses"]
    assert set(events) == {"200", "422", "503"}
    refused = events["503"]["content"]["application/json"]["example"]["error"]
    assert refused["code"] == "too_many_streams"
    assert "server.max_streams" in refused["message"]


async def test_the_stream_answers_only_what_the_document_says(tmp_path: Path) -> None:
    # Schemathesis leaves the stream out (it does not end): its statuses are checked here.
    overrides = {
        "server": {"max_streams": 1},
        "auth": {"tokens_file": str(tokens_file(tmp_path))},
    }
    reader = {"Authorization": "Bearer reader-token-0123456789"}
    async with open_daemon(tmp_path, overrides) as api:
        document = (await api.request("GET", "/openapi.json", headers=reader)).body
        documented = document["paths"]["/v1/events"]["get"]["responses"]
        assert set(documented) == {"200", "401", "403", "422", "503"}
        async with api.http.get("/v1/events", headers=reader) as held:
            assert held.status == 200
            assert held.headers["Content-Type"] == "text/event-stream"
            replies = [
                await api.request("GET", "/v1/events", headers=reader),  # the one slot is held
                await api.request("GET", "/v1/events"),  # no token
                await api.request(
                    "GET", "/v1/events", headers={**reader, "Origin": "https://elsewhere.example"}
                ),
                await api.request("GET", "/v1/events?task_id=nope", headers=reader),
            ]
    check = Checker(document)
    assert [r.status for r in replies] == [503, 401, 403, 422]
    for reply in replies:
        response = documented[str(reply.status)]
        media = response["content"]["application/json"]
        check(media["schema"], reply.body)
        assert reply.body["error"]["code"] == media["example"]["error"]["code"], reply.body
        for name, header in response.get("headers", {}).items():
            assert not header["required"] or name in reply.headers, (reply.status, name)
    assert int(replies[0].headers["Retry-After"]) > 0


async def test_examples_and_real_answers_fit_the_schemas(api: Daemon) -> None:
    document = await openapi(api)
    check = Checker(document)
    examples = 0
    for _, _, op in operations(document):
        for response in op["responses"].values():
            for media in response.get("content", {}).values():
                if "example" in media:
                    check(media["schema"], media["example"])
                    examples += 1
        for media in op.get("requestBody", {}).get("content", {}).values():
            for example in media.get("examples", {}).values():
                check(media["schema"], example["value"])
                examples += 1
    for example in document["components"]["schemas"]["TaskView"]["examples"]:
        check({"$ref": "#/components/schemas/TaskView"}, example)
        examples += 1
    assert examples >= 20

    task = await api.submit({"type": "sleep", "payload": {"seconds": 0}})
    check({"$ref": "#/components/schemas/TaskView"}, task)
    check({"$ref": "#/components/schemas/TaskView"}, await api.ended(task["id"]))
    batch = await api.request("POST", "/v1/tasks/batch", json={"tasks": [{"type": "noop"}] * 2})
    check({"$ref": "#/components/schemas/IdList"}, batch.body)
    with pytest.raises(jsonschema.ValidationError):
        check({"$ref": "#/components/schemas/IdList"}, {"ids": ["not-an-id"]})
    page = await api.request("GET", "/v1/tasks", params={"limit": "1"})
    check({"$ref": "#/components/schemas/TaskPage"}, page.body)
    missing = await api.request("GET", f"/v1/tasks/{new_id()}")
    check({"$ref": "#/components/schemas/ErrorResponse"}, missing.body)
    with pytest.raises(jsonschema.ValidationError):
        check({"$ref": "#/components/schemas/TaskView"}, {**task, "state": "lost"})


class Checker:
    """Validates instances against schemas of an OpenAPI 3.1 document (JSON Schema 2020-12):
    the schema is checked at the document's root, so its `#/components/...` refs resolve."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def __call__(self, schema: dict[str, Any], instance: Any) -> None:
        # The document's own keys (openapi, info, paths, ...) are no JSON Schema keywords.
        validator = jsonschema.Draft202012Validator(
            {**self.document, **schema},
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
        validator.validate(instance)


# -- daemon bugs found while fuzzing, fixed: each test would fail on the old code ---------


async def test_a_far_future_run_at_is_not_a_server_error(api: Daemon) -> None:
    body = {"type": "noop", "run_at": "9999-12-31T23:59:59-23:59"}
    reply = await api.request("POST", "/v1/tasks", json=body)
    assert reply.status < 500, reply.body
    listing = await api.request("GET", "/v1/tasks")
    assert listing.status == 200, listing.body


async def test_numbers_in_the_query_are_read_as_the_document_writes_them(api: Daemon) -> None:
    task = await api.submit({"type": "noop"})
    for path, params in (
        ("/v1/tasks", {"limit": "1_0"}),
        ("/v1/tasks", {"limit": "\u0661"}),  # ARABIC-INDIC DIGIT ONE
        (f"/v1/tasks/{task['id']}", {"wait": "\u0661"}),
    ):
        reply = await api.request("GET", path, params=params)
        assert reply.status == 422, (path, params, reply.status)


async def test_undocumented_methods_answer_405_with_allow(api: Daemon) -> None:
    document = await openapi(api)
    for path, item in document["paths"].items():
        documented = {m.upper() for m in METHODS if m in item}
        streams = "text/event-stream" in json.dumps(item.get("get", {}))
        if "GET" in documented and not streams:  # a stream has no end for HEAD to stop at
            documented.add("HEAD")
        url = path.replace("{id}", new_id()).replace("{name}", "default")
        reply = await api.request("PATCH", url)
        assert reply.status == 405, (path, reply.status, reply.body)
        assert reply.body["error"]["code"] == "method_not_allowed"
        assert set(reply.headers["Allow"].split(",")) == documented, path


async def test_the_batch_path_allows_only_post(api: Daemon) -> None:
    put = await api.request("PUT", "/v1/tasks/batch")
    assert put.status == 405, put.body
    assert put.headers["Allow"] == "POST"
    get = await api.request("GET", "/v1/tasks/batch")
    assert get.status == 405, get.body


# -- the fuzz run ----------------------------------------------------------------------


def fuzz_config(tmp_path: Path) -> DaemonConfig:
    """A daemon with a typed, an untyped and a failing type, tokens, a schedule, a 1 s
    max_wait (long-polls on tasks that never end stay short) and room for a batch one over
    max_batch (refused 422 for its size, not 413 for its bytes)."""
    port = free_port()
    db = tmp_path / "fuzz.db"
    tables: dict[str, dict[str, str | int | bool | float]] = {
        "server": {"listen": f"127.0.0.1:{port}", "max_wait": "1s", "max_body": "1MiB"},
        "store": {"url": f"sqlite:///{db}", "synchronous": "normal"},
        "workers": {"concurrency": 4, "max_pending": 100_000, "grace_period": "1s"},
        "log": {"level": "warning"},
        "auth": {"tokens_file": str(tokens_file(tmp_path))},
        "types.noop": {"kind": "python", "handler": "daemon.builtins:noop"},
        "types.echo": {"kind": "python", "handler": "tests.clienthandlers:echo", "timeout": "30s"},
        "types.fail": {"kind": "python", "handler": "tests.clienthandlers:fail"},
    }
    schedule = '[[schedules]]\nname = "nightly"\ncron = "0 3 * * *"\ntype = "noop"\n'
    path = tmp_path / "fuzz.toml"
    path.write_text(render_toml(tables) + schedule, encoding="utf-8")
    return DaemonConfig(path=path, url=f"http://127.0.0.1:{port}", db=db)


def schemathesis_argv(url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        # use_after_free: DELETE cancels; the task stays readable, by contract (DESIGN.md).
        "--exclude-checks",
        "use_after_free",
        # An event stream does not end (tests/test_events.py covers it).
        "--exclude-path",
        "/v1/events",
        # Hypothesis' health checks time the generation: on a slow machine they fail the
        # run for the machine's speed, not for anything the daemon did.
        "--suppress-health-check",
        "all",
        "--max-examples",
        str(FUZZ_EXAMPLES),
        "--seed",
        str(FUZZ_SEED),
        # One worker: CPython 3.11's parser is not safe for hypothesis' concurrent lambda
        # descriptions ("AST constructor recursion depth mismatch").
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
    ]


@pytest.mark.timeout(900)  # room for FUZZ_WITHIN on a machine three times slower
async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_spec(
    offload: Offload, tmp_path: Path
) -> None:
    for _ in range(3):  # a fresh port if another process took it before the bind
        daemon = await offload.start(fuzz_config(tmp_path), ready=False)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await daemon.wait_ready()
            break
        except DaemonExited:
            if daemon.returncode != EX_START:
                raise
    else:
        raise AssertionError("the port was taken 3 times")
    env = {**daemon_env(), "SCHEMATHESIS_HOOKS": "tests.fuzzhooks"}  # the repo on the path
    proc = await asyncio.create_subprocess_exec(
        *schemathesis_argv(daemon.url),
        cwd=tmp_path,  # its .hypothesis database and reports stay in the test's directory
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(FUZZ_WITHIN):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    report = output.decode(errors="replace")
    assert proc.returncode == 0, report[-8000:]
    # Every operation of the document but the event stream was exercised.
    assert re.search(r"Selected: (\d+)/(\d+)\s+Tested: \1\s", report), report[-8000:]

    # The daemon's own count agrees: it answered requests and none with a 5xx.
    reply = await daemon.request("GET", "/metrics")
    text = reply.body.decode()
    answered = [
        (re.search(r'code="(\d+)"', labels), float(count))
        for labels, count in re.findall(r"^offload_http_requests_total\{(.*)\} (\S+)$", text, re.M)
    ]
    assert sum(count for _, count in answered) > FUZZ_EXAMPLES
    codes = {code.group(1) for code, _ in answered if code is not None}
    assert codes >= {"200", "202", "404", "422"}
    assert {code for code in codes if code.startswith("5")} == set()
    assert daemon.returncode is None


async def test_a_payload_type_without_a_json_schema_is_described_as_any_json(
    tmp_path: Path,
) -> None:
    loose = {"loose": {"kind": "python", "handler": "tests.apphandlers:loose"}}
    async with open_daemon(tmp_path, {"types": loose}) as api:
        reply = await api.request("GET", "/openapi.json")
        assert reply.status == 200, reply.body
        payload = reply.body["components"]["schemas"]["Submit.loose"]["properties"]["payload"]
        assert "$ref" not in payload  # any JSON, like an unannotated handler's
        task = await api.submit({"type": "loose", "payload": {"b": 1, "a": 2}})
        assert (await api.ended(task["id"]))["result"] == {"keys": ["a", "b"]}
