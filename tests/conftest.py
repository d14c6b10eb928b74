"""Shared fixtures of the end-to-end tests (tests/test_process_*.py); see tests/harness.py."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path

import pytest

from daemon import logs
from daemon.journal import JournalHandler
from tests.harness import Offload, open_offload


@pytest.fixture
async def offload(tmp_path: Path) -> AsyncIterator[Offload]:
    """Start real `offload serve` processes; every one still running is killed at the end."""
    async with open_offload(tmp_path) as factory:
        yield factory


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that started daemons shows their logs in its report."""
    report = yield
    factory = item.funcargs.get("offload") if isinstance(item, pytest.Function) else None
    if report.failed and isinstance(factory, Offload):
        for name, text in factory.logs():
            report.sections.append((f"offload log {name}", text))
    return report


InstallHandler = Callable[[logs.LineHandler | JournalHandler], None]


@pytest.fixture
def install_handler() -> Iterator[InstallHandler]:
    """Makes a handler the root logger's only one at level INFO (what `logs.setup()` does),
    then puts the root's handlers and level back and closes the handler."""
    root = logging.getLogger()
    level = root.level
    replaced: list[logging.Handler] = []
    mine: list[logging.Handler] = []

    def install(handler: logs.LineHandler | JournalHandler) -> None:
        mine.append(handler)
        replaced.extend(logs.install(handler))
        root.setLevel(logging.INFO)

    try:
        yield install
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in replaced:
            root.addHandler(handler)
        for handler in mine:
            handler.close()
        root.setLevel(level)
