"""Shared fixtures of the end-to-end tests (tests/test_process_*.py); see tests/harness.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest

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
