"""The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.

Schemas come from the msgspec types that decode requests and encode answers (`daemon.wire`)
through `msgspec.json.schema_components`; this module adds what those types cannot say: the
paths, every status each route answers, auth, examples, and what the running configuration
decides (the task types and their payload types, `server.max_wait`, which paths need a token).
The document is built once per configuration shape and cached as bytes.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from daemon import __version__
from daemon.api_flow import QueueView, ScheduleView
from daemon.models import Attempt, Task, TaskState
from daemon.openapi_ops import flow_paths, operations_paths
from daemon.openapi_paths import Operations, submission_schema
from daemon.openapi_responses import EXAMPLE_ID, REF, Json
from daemon.runtime import RUNTIME, Runtime
from daemon.wire import (
    BatchRequest,
    ErrorBody,
    ErrorResponse,
    SubmitRequest,
    TaskPage,
    TaskView,
    encode,
    view,
)

# The ids of daemon/ids.py: 26 characters of Crockford base32 (tests/test_openapi.py checks).
TASK_ID_PATTERN = "^[0-9A-HJKMNP-TV-Z]{26}$"


# The bodies api.py and api_flow.py build as dicts, as types (one shape each).
class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    """What /healthz and /readyz answer; `error` says why the store is unavailable."""

    status: Literal["ok", "ready", "starting", "draining", "store_unavailable"]
    error: ErrorBody | None = None


class IdList(msgspec.Struct, frozen=True):
    ids: list[str]


class QueueList(msgspec.Struct, frozen=True):
    queues: list[QueueView]


class ScheduleList(msgspec.Struct, frozen=True):
    schedules: list[ScheduleView]


@dataclass(frozen=True)
class TypeShape:
    """What the document says about one configured task type."""

    name: str
    payload_type: Any  # `Any` when the handler declares none
    max_timeout: float


@dataclass(frozen=True)
class Shape:
    """Everything of the running configuration the document depends on (the cache key)."""

    types: tuple[TypeShape, ...]
    callbacks: tuple[str, ...]  # the `[callbacks.NAME]` a task may name
    max_wait: float
    max_body: int
    body_timeout: float
    max_batch: int
    auth: bool  # tokens are configured: every path outside `open_paths` needs one
    open_paths: frozenset[str]


def _describable(tp: Any) -> Any:
    """`tp` if msgspec can write a JSON schema for it, else `Any`: a handler may annotate
    its payload `object`, `dict[str, object]` or a class of its own, which checks payloads
    (or not) but has no schema; the document then says "any JSON" for it."""
    if tp is Any:
        return tp
    try:
        msgspec.json.schema(tp)
    except (TypeError, ValueError):
        return Any
    return tp


def shape_of(rt: Runtime) -> Shape:
    return Shape(
        types=tuple(
            TypeShape(name, _describable(t.payload_type), float(t.config.timeout))
            for name, t in sorted(rt.types.items())
        ),
        callbacks=tuple(sorted(rt.config.callbacks)),
        max_wait=float(rt.config.server.max_wait),
        max_body=int(rt.config.server.max_body),
        body_timeout=float(rt.config.server.body_timeout),
        max_batch=rt.config.server.max_batch,
        auth=rt.auth.enabled,
        open_paths=rt.auth.open_paths,
    )


async def serve_openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the document for this daemon's current configuration."""
    body = document_bytes(shape_of(request.app[RUNTIME]))
    return web.Response(body=body, content_type="application/json")


@functools.lru_cache(maxsize=8)
def document_bytes(shape: Shape) -> bytes:
    return encode(document(shape))


def document(shape: Shape) -> Json:
    """The OpenAPI 3.1 document for `shape`, as JSON-ready builtins."""
    from daemon.api import MAX_PAGE  # api.py imports this module to route to it

    schemas = _schemas(shape)
    ops = Operations(shape, MAX_PAGE)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "offload",
            "version": __version__,
            "summary": "A durable background-task daemon: POST a task, get an id, it runs.",
            "description": _INFO,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "tags": [
            {"name": "tasks", "description": "Submit, read, cancel and retry tasks."},
            {"name": "flow", "description": "Queues and cron schedules: list, pause, resume."},
            {"name": "operations", "description": "Probes, metrics and this document."},
        ],
        "paths": {**ops.paths(), **flow_paths(ops), **operations_paths(ops)},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token of the daemon's tokens file (`[auth]`). Its scopes "
                    "(`submit`, `read`, `admin`) decide what it may do; the scopes an operation "
                    "needs are listed in its security requirement.",
                }
            },
        },
    }


_INFO = """\
All bodies are JSON. Every error is `{"error": {"code", "message", "field"?}}`: `code` is
stable and machine-readable, `field` names the offending field, parameter or header (a
dotted path inside the body). A `503` carries `Retry-After` (seconds). Any request may
also be answered `405` (method not allowed, with `Allow`) or `500` (a bug; see the log)."""


# -- schemas ---------------------------------------------------------------------------


def _schemas(shape: Shape) -> Json:
    """The components: the wire types, the payload types the handlers declare, and one
    submission variant per configured type (what requests are checked against)."""
    submit = _schema_twin(SubmitRequest)
    batch = _schema_twin(BatchRequest, {SubmitRequest: submit})
    wire = [submit, batch, TaskView, TaskPage, IdList, ErrorResponse, Health]
    wire += [QueueList, ScheduleList]
    payload_types = [t.payload_type for t in shape.types]
    refs, components = msgspec.json.schema_components([*wire, *payload_types], ref_template=REF)
    _refine(components)
    for t, payload in zip(shape.types, refs[len(wire) :], strict=True):
        variant = _variant(components["SubmitRequest"], t, payload, shape.callbacks)
        components[f"Submit.{t.name}"] = variant
    tasks = components["BatchRequest"]["properties"]["tasks"]
    tasks.update(minItems=1, maxItems=shape.max_batch)
    if shape.types:
        tasks["items"] = submission_schema(shape)
    components["TaskId"] = {
        "type": "string",
        "pattern": TASK_ID_PATTERN,
        "description": "26 characters, time-ordered (ULID layout).",
        "examples": [EXAMPLE_ID],
    }
    return components


def _schema_twin(tp: type[msgspec.Struct], twins: dict[Any, Any] | None = None) -> Any:
    """`tp` with its `Raw` defaults decoded (msgspec cannot put a `Raw` into a schema's
    `default`, and the JSON they hold is the default a client sees) and its `list[X]`
    fields of a type in `twins` made lists of that type's twin."""
    twins = twins or {}
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(tp):
        ftype = f.type
        args = getattr(ftype, "__args__", ())
        if getattr(ftype, "__origin__", None) is list and args and args[0] in twins:
            ftype = list.__class_getitem__(twins[args[0]])
        if f.default is msgspec.NODEFAULT:
            fields.append((f.name, ftype))
        elif isinstance(f.default, msgspec.Raw):
            fields.append((f.name, ftype, msgspec.json.decode(f.default)))
        else:
            fields.append((f.name, ftype, f.default))
    info = tp.__struct_config__
    return msgspec.defstruct(
        tp.__name__,
        fields,
        forbid_unknown_fields=info.forbid_unknown_fields,
        module=tp.__module__,
    )


def _refine(components: Json) -> None:
    """Say what the wire types hold as plain strings: the state's values, the id's shape,
    RFC 3339 times (`wire.rfc3339`), and that `run_at` needs a zone (admission refuses a
    naive one)."""
    task = components["TaskView"]["properties"]
    task["id"] = {"$ref": REF.format(name="TaskId")}
    components["IdList"]["properties"]["ids"]["items"] = {"$ref": REF.format(name="TaskId")}
    task["state"] = {"enum": [s.value for s in TaskState]}
    for name in ("run_at", "created_at", "started_at", "finished_at"):
        _add_to_string(task[name], format="date-time")
    _add_to_string(components["AttemptView"]["properties"]["started_at"], format="date-time")
    _add_to_string(components["TaskPage"]["properties"]["next_cursor"], pattern=TASK_ID_PATTERN)
    _add_to_string(components["SubmitRequest"]["properties"]["run_at"], format="date-time")
    for name in ("last_fire", "next_fire"):
        _add_to_string(components["ScheduleView"]["properties"][name], format="date-time")
    components["SubmitRequest"]["not"] = _DELAY_AND_RUN_AT
    components["TaskView"]["examples"] = [_task_example()]


_DELAY_AND_RUN_AT = {
    "description": "delay and run_at are exclusive",
    "required": ["delay", "run_at"],
    "properties": {"delay": {"type": "number"}, "run_at": {"type": "string"}},
}


def _add_to_string(schema: Json, **extra: str) -> None:
    """Add `extra` to the string branch of `schema` (a string, or string-or-null)."""
    branches = schema.get("anyOf", [schema])
    strings = [b for b in branches if b.get("type") == "string"]
    if len(strings) != 1:
        raise AssertionError(f"no single string schema in {schema}")
    strings[0].update(extra)


def _variant(base: Json, t: TypeShape, payload: Json, callbacks: tuple[str, ...]) -> Json:
    """`SubmitRequest` narrowed to one task type: its name, its payload's schema, its
    timeout as the maximum, the configured callbacks. The payload is required when `{}`
    (the default) does not fit."""
    variant = copy.deepcopy(base)
    variant["title"] = f"Submit {t.name}"
    props = variant["properties"]
    props["type"] = {"const": t.name}
    props["payload"] = dict(payload)
    named = [{"enum": list(callbacks)}] if callbacks else []
    props["callback"] = {
        "anyOf": [*named, {"type": "null"}],
        "default": None,
        "description": "A `[callbacks.NAME]` of the config, POSTed the task when it ends.",
    }
    timeout = next(b for b in props["timeout"]["anyOf"] if b.get("type") == "number")
    timeout["maximum"] = t.max_timeout
    if t.payload_type is not Any:
        try:
            msgspec.json.decode(b"{}", type=t.payload_type)
            props["payload"]["default"] = {}
        except msgspec.ValidationError:
            variant["required"] = [*variant["required"], "payload"]
    else:
        props["payload"]["default"] = {}
    return variant


# -- examples: built by the encoder the API uses -------------------------------------------

_EXAMPLE_TIME = 1_735_732_800.0  # 2025-01-01T12:00:00Z


def _task_example(state: TaskState = TaskState.SUCCEEDED) -> Any:
    finished = state.terminal
    task = Task(
        id=EXAMPLE_ID,
        type="resize",
        queue="default",
        state=state,
        payload=b'{"image":"s3://bucket/cat.png","width":640}',
        priority=0,
        run_at=_EXAMPLE_TIME,
        created_at=_EXAMPLE_TIME,
        timeout=300.0,
        max_attempts=3,
        attempts=2 if finished else 0,
        started_at=_EXAMPLE_TIME + 2.5 if finished else None,
        finished_at=_EXAMPLE_TIME + 3.75 if finished else None,
        result=b'{"thumbnail":"s3://bucket/cat-640.png"}' if finished else None,
        last_error="ConnectionResetError: peer closed the connection" if finished else None,
        history=(
            (Attempt(1, _EXAMPLE_TIME + 0.01, 0.2, "ConnectionResetError: peer closed"),)
            if finished
            else ()
        ),
    )
    return msgspec.json.decode(encode(view(task)))
