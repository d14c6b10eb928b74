"""The `paths` of the OpenAPI document (daemon/openapi.py): every route, every status it
can answer, its parameters, and the token scope it needs. The task routes are here, the
flow and operations routes in daemon/openapi_ops.py, and the response objects and example
error bodies all of them share in daemon/openapi_responses.py.

Statuses are those the handlers raise (`daemon.errors`) and the route wrapper adds (401/403
from auth where a token is needed); 405 and 500 can answer anything and are said once, in
the document's description.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from daemon.errors import (
    BadRequest,
    Invalid,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from daemon.models import TaskState
from daemon.openapi_responses import (
    REF,
    UNAUTHORIZED,
    Json,
    conflict_example,
    error_example,
    error_response,
    forbidden_example,
    json_response,
    not_found_example,
    store_example,
    too_many_streams_example,
    unavailable_example,
)

if TYPE_CHECKING:
    from daemon.openapi import Shape

DEFAULT_PAGE = 100


def submission_schema(shape: Shape) -> Json:
    """One task of a submission: one of the configured types' variants (`Submit.NAME`)."""
    if not shape.types:
        return {"$ref": REF.format(name="SubmitRequest")}
    return {"oneOf": [{"$ref": REF.format(name=f"Submit.{t.name}")} for t in shape.types]}


class Operations:
    """Builds the operations of the `paths` object from the same pieces: the task routes
    here, the flow and operations routes in daemon/openapi_ops.py."""

    def __init__(self, shape: Shape, max_page: int) -> None:
        self.shape = shape
        self.max_page = max_page

    def paths(self) -> Json:
        return {
            "/v1/tasks": {"post": self.submit(), "get": self.list_tasks()},
            "/v1/tasks/batch": {"post": self.submit_batch()},
            "/v1/tasks/{id}": {
                "parameters": [self._id_param()],
                "get": self.get_task(),
                "delete": self.cancel_task(),
            },
            "/v1/tasks/{id}/retry": {"parameters": [self._id_param()], "post": self.retry()},
            "/v1/events": {"get": self.events()},
        }

    # -- the operations ----------------------------------------------------------------

    def submit(self) -> Json:
        media: Json = {"schema": submission_schema(self.shape)}
        if examples := self._submit_examples():
            media["examples"] = examples
        return self.op(
            "/v1/tasks",
            "submitTask",
            "submit",
            summary="Submit a task",
            description="The task is committed to the store before the answer (202 means "
            "durable). `delay` (seconds) and `run_at` (RFC 3339 with a zone) are exclusive. "
            "A retry with the same `Idempotency-Key` and body answers the original task.",
            params=[_IDEMPOTENCY_KEY],
            body={"required": True, "content": {"application/json": media}},
            ok=(
                "202",
                "The task, committed (or, replayed, as it is now).",
                "TaskView",
                {"Location": _LOCATION, "Idempotent-Replayed": _REPLAYED},
            ),
            errors=self._submit_errors("payload.seconds"),
        )

    def submit_batch(self) -> Json:
        return self.op(
            "/v1/tasks/batch",
            "submitTasks",
            "submit",
            summary="Submit up to `server.max_batch` tasks at once",
            description="Validated all-or-nothing (an error names `tasks[i].field`), committed "
            "in one transaction, answered with the tasks' ids in order. A batch that does not "
            "fit under `workers.max_pending` is refused whole (503).",
            params=[_IDEMPOTENCY_KEY],
            body={
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(name="BatchRequest")}}
                },
            },
            ok=(
                "202",
                "The ids of the tasks, committed, in the order sent.",
                "IdList",
                {"Idempotent-Replayed": _REPLAYED},
            ),
            errors=self._submit_errors("tasks[3].payload.seconds"),
        )

    def _submit_errors(self, field: str) -> dict[str, Any]:
        return {
            "400": error_example(BadRequest, "the body is not valid JSON"),
            "408": error_example(
                RequestTimeout,
                "the body did not arrive within server.body_timeout "
                f"({self.shape.body_timeout:g}s)",
                "body",
            ),
            "413": error_example(PayloadTooLarge, f"the body is over {self.shape.max_body} bytes"),
            "415": error_example(
                UnsupportedMediaType,
                "send Content-Type: application/json (got text/plain)",
                "Content-Type",
            ),
            "422": error_example(Invalid, "Expected `float`, got `str`", field),
            "503": unavailable_example("queue_full"),
        }

    def events(self) -> Json:
        op = self.op(
            "/v1/events",
            "streamEvents",
            "read",
            summary="Task state changes as Server-Sent Events",
            description="Each change is `id: <sequence>`, `event: task`, `data: <the task as "
            "TaskView JSON>`. With `Last-Event-ID` (header, or `last_event_id`), every "
            "matching task changed since is sent first, once each in its current state, then "
            "the live stream. A `: keep-alive` comment comes every `server.sse_heartbeat`; a "
            "client too slow to keep up gets `event: overflow` and should reconnect. At most "
            "`server.max_streams` streams are open at once: one more is refused (503 "
            "`too_many_streams`) until one ends, as one does when its client disconnects.",
            params=[
                _query("task_id", {"$ref": REF.format(name="TaskId")}, "Only this task."),
                _query("type", {"type": "string"}, "Only tasks of this type."),
                _query("queue", {"type": "string"}, "Only tasks of this queue."),
                _query("last_event_id", _EVENT_ID, "Resume after this event (as the header)."),
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "required": False,
                    "description": "Resume after this event (EventSource sends it itself).",
                    "schema": _EVENT_ID,
                },
            ],
            errors={
                "422": error_example(Invalid, "task_id is not a task id", "task_id"),
                "503": too_many_streams_example(),
            },
        )
        op["responses"]["200"] = {
            "description": "An endless `text/event-stream`.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
        return op

    def list_tasks(self) -> Json:
        states = [s.value for s in TaskState]
        return self.op(
            "/v1/tasks",
            "listTasks",
            "read",
            summary="List tasks, newest first",
            description="Pass `next_cursor` back as `cursor` for the next page; it is null on "
            "the last one. A page filtered by `type` or `queue` examines a bounded number of "
            "tasks, so it may hold fewer than `limit` tasks, even none, and still have a "
            "`next_cursor`: follow `next_cursor` until it is null. Unknown parameters are "
            "refused (422).",
            params=[
                _query("state", {"type": "string", "enum": states}, "Only tasks in this state."),
                _query("type", {"type": "string"}, "Only tasks of this type."),
                _query("queue", {"type": "string"}, "Only tasks of this queue."),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": self.max_page},
                    f"Tasks per page (default {DEFAULT_PAGE}).",
                ),
                _query("cursor", {"$ref": REF.format(name="TaskId")}, "A `next_cursor`."),
            ],
            ok=("200", "A page of tasks.", "TaskPage", {}),
            errors={
                "422": error_example(Invalid, "limit must be an integer", "limit"),
                "503": store_example(),
            },
        )

    def get_task(self) -> Json:
        cap = self.shape.max_wait
        return self.op(
            "/v1/tasks/{id}",
            "getTask",
            "read",
            summary="Read a task; with `wait`, long-poll until it ends",
            description="With `wait=N` the answer is held until the task ends or N seconds "
            "pass, whichever is first; then the task is returned as it is.",
            params=[
                _query(
                    "wait",
                    {"type": "number", "minimum": 0, "maximum": cap},
                    f"Seconds to hold the answer until the task ends (at most {cap:g}).",
                )
            ],
            ok=("200", "The task.", "TaskView", {}),
            errors={
                "404": not_found_example(),
                "422": error_example(Invalid, f"wait must be between 0 and {cap:g}", "wait"),
                "503": store_example(),
            },
        )

    def cancel_task(self) -> Json:
        return self.op(
            "/v1/tasks/{id}",
            "cancelTask",
            "admin",
            summary="Cancel a task",
            description="A queued task ends `cancelled`; a running task's handler is stopped.",
            ok=("200", "The task, cancelled.", "TaskView", {}),
            errors={
                "404": not_found_example(),
                "409": conflict_example("already ended succeeded"),
                "503": store_example(),
            },
        )

    def retry(self) -> Json:
        return self.op(
            "/v1/tasks/{id}/retry",
            "retryTask",
            "admin",
            summary="Put a failed or cancelled task back to `queued`",
            description="The task gets a fresh budget of `max_attempts`.",
            ok=("200", "The task, queued again.", "TaskView", {}),
            errors={
                "404": not_found_example(),
                "409": conflict_example("is queued; only failed or cancelled tasks can be retried"),
                "503": unavailable_example("draining"),
            },
        )

    # -- the pieces ----------------------------------------------------------------------

    def op(
        self,
        path: str,
        operation_id: str,
        scope: str,
        *,
        summary: str,
        errors: dict[str, Any],
        tag: str = "tasks",
        description: str | None = None,
        params: list[Json] | None = None,
        body: Json | None = None,
        ok: tuple[str, str, str, Json] | None = None,
    ) -> Json:
        """One operation: its successful answer `ok` (status, description, schema name,
        headers) and one error answer per status in `errors` (status → example body), plus
        401/403 where a token is needed."""
        op: Json = {"operationId": operation_id, "tags": [tag], "summary": summary}
        if description is not None:
            op["description"] = description
        if params:
            op["parameters"] = params
        if body is not None:
            op["requestBody"] = body
        op["security"] = self._security(path, scope)
        responses: Json = {}
        if ok is not None:
            status, text, schema, headers = ok
            responses[status] = json_response(text, schema, headers=headers)
        if self._guarded(path):
            errors = {**errors, "401": UNAUTHORIZED, "403": forbidden_example(scope)}
        for status in sorted(errors):
            responses[status] = error_response(status, errors[status])
        op["responses"] = responses
        return op

    def _guarded(self, path: str) -> bool:
        return self.shape.auth and path not in self.shape.open_paths

    def _security(self, path: str, scope: str) -> list[Json]:
        """A token with `scope` (or `admin`) where one is needed; none on open paths or
        while no tokens are configured (then every request is anonymous)."""
        if self._guarded(path):
            return [{"bearer": [scope]}]
        return [{}]

    def _id_param(self) -> Json:
        return {
            "name": "id",
            "in": "path",
            "required": True,
            "description": "The task's id (any other text is answered 404).",
            "schema": {"$ref": REF.format(name="TaskId")},
        }

    def _submit_examples(self) -> Json:
        """One example submission per type whose payload `{}` fits (a typed payload with
        required fields gets none: we cannot make up a valid one)."""
        examples: Json = {}
        for t in self.shape.types:
            if t.payload_type is not Any:
                try:
                    msgspec.json.decode(b"{}", type=t.payload_type)
                except msgspec.ValidationError:
                    continue
            examples[t.name] = {
                "summary": f"a {t.name} task, in 5 seconds, with priority 10",
                "value": {"type": t.name, "payload": {}, "priority": 10, "delay": 5},
            }
        return examples


_IDEMPOTENCY_KEY: Json = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "IETF httpapi idempotency-key draft: a retry with the same key and the same "
    "body within `server.idempotency_window` (24 h) answers what the first request created, "
    "with `Idempotent-Replayed: true`, and creates nothing; the same key with another body "
    "is refused (422 `idempotency_key_reused`). Keys are scoped per token. 1 to 255 "
    "printable characters (ASCII is portable).",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
}
_REPLAYED: Json = {
    "description": "`true` when the answer is a replay of an earlier request's.",
    "required": False,
    "schema": {"type": "string", "enum": ["true"]},
}
_EVENT_ID: Json = {"type": "string", "pattern": "^[0-9]{1,19}$"}  # a 64-bit change number
_LOCATION: Json = {
    "description": "The task's URL, `/v1/tasks/{id}`.",
    "required": True,
    "schema": {"type": "string"},
}


def _query(name: str, schema: Json, description: str) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }
