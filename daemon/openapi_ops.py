"""The flow and operations paths of the OpenAPI document (see daemon/openapi_paths.py):
queues and schedules (list, pause, resume), probes, metrics and the document itself."""

from __future__ import annotations

from daemon.errors import NotFound
from daemon.models import NAME_PATTERN
from daemon.openapi_paths import Operations
from daemon.openapi_responses import Json, error_example, json_response, store_example


def flow_paths(ops: Operations) -> Json:
    return {
        "/v1/queues": {"get": list_queues(ops)},
        "/v1/queues/{name}/pause": flow_switch(ops, "queue", "pause"),
        "/v1/queues/{name}/resume": flow_switch(ops, "queue", "resume"),
        "/v1/schedules": {"get": list_schedules(ops)},
        "/v1/schedules/{name}/pause": flow_switch(ops, "schedule", "pause"),
        "/v1/schedules/{name}/resume": flow_switch(ops, "schedule", "resume"),
    }


def operations_paths(ops: Operations) -> Json:
    return {
        "/healthz": {"get": healthz(ops)},
        "/readyz": {"get": readyz(ops)},
        "/metrics": {"get": metrics(ops)},
        "/openapi.json": {"get": openapi(ops)},
    }


def list_queues(ops: Operations) -> Json:
    return ops.op(
        "/v1/queues",
        "listQueues",
        "read",
        tag="flow",
        summary="Every known queue: its settings, whether it is paused, its counts",
        ok=("200", "The queues, by name.", "QueueList", {}),
        errors={"503": store_example()},
    )


def list_schedules(ops: Operations) -> Json:
    return ops.op(
        "/v1/schedules",
        "listSchedules",
        "read",
        tag="flow",
        summary="Every configured cron schedule, its last and next fire",
        ok=("200", "The schedules, in the config's order.", "ScheduleList", {}),
        errors={"503": store_example()},
    )


def flow_switch(ops: Operations, kind: str, action: str) -> Json:
    """POST /v1/{queues,schedules}/{name}/{pause,resume}."""
    path = f"/v1/{kind}s/{{name}}/{action}"
    view = "QueueView" if kind == "queue" else "ScheduleView"
    effect = {
        ("queue", "pause"): "No task of the queue starts until it is resumed; running "
        "tasks go on. The pause is kept in the store (it survives a restart).",
        ("queue", "resume"): "Tasks of the queue start again.",
        ("schedule", "pause"): "The schedule fires no more until it is resumed; the pause "
        "is kept in the store.",
        ("schedule", "resume"): "The schedule fires again from its next time.",
    }[kind, action]
    operation = ops.op(
        path,
        f"{action}{kind.title()}",
        "admin",
        tag="flow",
        summary=f"{action.title()} a {kind}",
        description=effect,
        ok=("200", f"The {kind}, {action}d.", view, {}),
        errors={
            "404": error_example(NotFound, f"no {kind} 'reports' is configured", "name"),
            "503": store_example(),
        },
    )
    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": f"The {kind}'s name (an unknown one is answered 404).",
        "schema": {"type": "string", "pattern": NAME_PATTERN},
    }
    return {"parameters": [name], "post": operation}


def healthz(ops: Operations) -> Json:
    return ops.op(
        "/healthz",
        "health",
        "read",
        tag="operations",
        summary="Liveness: the process answers",
        ok=("200", "Up.", "Health", {}),
        errors={},
    )


def readyz(ops: Operations) -> Json:
    op = ops.op(
        "/readyz",
        "ready",
        "read",
        tag="operations",
        summary="Readiness: recovered, bound, not stopping, and the store answers",
        ok=("200", "Ready to take work.", "Health", {}),
        errors={},
    )
    op["responses"]["503"] = json_response(
        "Starting, stopping, or the store is unavailable (`status` says which; `error` why "
        "the store fails).",
        "Health",
    )
    return op


def metrics(ops: Operations) -> Json:
    op = ops.op(
        "/metrics", "metrics", "read", tag="operations", summary="Prometheus metrics", errors={}
    )
    op["responses"]["200"] = {
        "description": "The Prometheus text exposition format 0.0.4.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return op


def openapi(ops: Operations) -> Json:
    op = ops.op(
        "/openapi.json", "openapi", "read", tag="operations", summary="This document", errors={}
    )
    op["responses"]["200"] = {
        "description": "The OpenAPI 3.1 document of this daemon's configuration.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    return op
