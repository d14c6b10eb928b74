"""The task types of the config, built into what admission validates and consumers run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from daemon.config import Config, PythonType, TypeConfig
from daemon.executors.base import Executor
from daemon.executors.python import payload_type, python_executor, resolve_handler


@dataclass(frozen=True, slots=True)
class TaskType:
    name: str
    config: TypeConfig
    executor: Executor
    payload_type: Any  # `Any` when the handler declares none

    def check_payload(self, payload: bytes) -> None:
        """Raise `msgspec.ValidationError` if the payload does not fit the handler's type."""
        if self.payload_type is not Any:
            msgspec.json.decode(payload, type=self.payload_type)


def build_types(config: Config, threads: ThreadPoolExecutor) -> dict[str, TaskType]:
    built = {}
    for name, tc in config.types.items():
        if isinstance(tc, PythonType):
            handler = resolve_handler(tc.handler)
            wants = payload_type(handler)
            executor = python_executor(handler, threads, wants)
            built[name] = TaskType(name, tc, executor, wants)
    return built
