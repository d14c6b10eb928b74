"""The task types of the config, built into what admission validates and consumers run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from daemon.config import CommandType, Config, HttpType, PythonType, TypeConfig
from daemon.errors import ConfigError
from daemon.executors.base import Executor
from daemon.executors.command import command_executor
from daemon.executors.http import HttpClient, http_executor, read_secret
from daemon.executors.python import payload_type, python_executor, resolve_handler

# A payload is decoded at admission as the run decodes it (the consumer, then the python
# executor's convert to the handler's type): valid JSON may still be undecodable, a number
# past a double's range ("9" * 299 + "e20") or an integer of more than 4,300 digits, also in
# a field a typed decode would skip. A full decode is exact, and cheaper than the regex that
# looked for such numbers first (0.5 against 3 µs for 100 bytes, 7 against 37 ms for 1 MB).
_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class TaskType:
    name: str
    config: TypeConfig
    executor: Executor
    payload_type: Any  # `Any` when the handler declares none

    def check_payload(self, payload: bytes) -> None:
        """Raise `msgspec.ValidationError` if the payload would not decode for the run (a
        number beyond a double's range or an integer of more than 4,300 digits is valid JSON
        that Python cannot hold) or does not fit the handler's type."""
        try:
            value = _decode(payload)
            if self.payload_type is not Any:
                msgspec.convert(value, self.payload_type)
        except msgspec.ValidationError:
            raise
        except msgspec.DecodeError as exc:  # the request's decoder checked the syntax already
            raise msgspec.ValidationError(str(exc)) from None
        except RecursionError:
            raise msgspec.ValidationError("nested too deeply") from None


def build_types(
    config: Config, threads: ThreadPoolExecutor, http: HttpClient | None = None
) -> dict[str, TaskType]:
    """Build every configured type. `http` types share `http`, which the caller closes after
    the consumers exit; without one they get a client of their own that nobody closes."""
    client = http if http is not None else HttpClient()
    built = {}
    for name, tc in config.types.items():
        if isinstance(tc, PythonType):
            handler = resolve_handler(tc.handler)
            wants = payload_type(handler)
            executor = python_executor(handler, threads, wants)
            built[name] = TaskType(name, tc, executor, wants)
        elif isinstance(tc, CommandType):
            executor = command_executor(
                tc.argv,
                env=tc.env,
                cwd=tc.cwd,
                max_output=tc.max_output,
                permanent_exit_codes=tc.permanent_exit_codes,
                kill_after=tc.kill_after,
            )
            built[name] = TaskType(name, tc, executor, Any)
        elif isinstance(tc, HttpType):
            executor = http_executor(
                tc.url,
                client=client,
                secret=_secret(name, tc),
                connect_timeout=tc.connect_timeout,
                max_connections=tc.max_connections,
                max_response=tc.max_response,
            )
            built[name] = TaskType(name, tc, executor, Any)
    return built


def _secret(name: str, tc: HttpType) -> bytes | None:
    """Read once, at startup; the config check already read it, so failing here means the
    file changed in between."""
    if tc.secret_file is None:
        return None
    try:
        return read_secret(tc.secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            tc.secret_file, [f"types.{name}.secret_file = {tc.secret_file!r}: {exc}"]
        ) from exc
