"""Schemathesis hooks for tests/test_openapi.py's fuzz run, loaded by `st run` through
`SCHEMATHESIS_HOOKS=tests.fuzzhooks`. Each adapts generated requests to something no schema
can say, without changing any value's validity against the document:

- JSON Schema counts 48.0 as an integer; msgspec (and so offload) wants integers written as
  integers and answers 422 naming the field. Bodies write integral floats as integers, as
  real clients do.
- An Idempotency-Key is state: the same key with another body is refused (422), whatever
  the schema. Every valid key of a positive case gets a unique suffix, so each request is
  a first use.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import schemathesis


def integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral_floats_as_ints(v) for v in value]
    return value


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    return integral_floats_as_ints(body)


_KEY = re.compile(r"[ -~]{1,255}")  # a valid key (openapi_paths._IDEMPOTENCY_KEY)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    # Positive cases only: an edit makes schemathesis revalidate the case, which would turn
    # a negative one (say, sent without its Authorization) positive. A negative case may
    # meet a used key: its 4xx is what it expects anyway.
    if case.meta is not None and case.meta.generation.mode.is_negative:
        return
    headers = case.headers
    key = headers.get("Idempotency-Key") if headers is not None else None
    if isinstance(key, str) and _KEY.fullmatch(key):
        headers["Idempotency-Key"] = f"{key[:200]}.{uuid.uuid4().hex}"  # 233 at most
