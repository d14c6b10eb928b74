"""offload under a real systemd: the units of systemd/, run the way operators run them.

One container per module (tests/systemd_harness.py): systemd 252 as PID 1, booted from the
host's own files with a tmpfs on top, offload installed under /opt/offload with the units
and a config in /etc/offload. Each test starts from stopped units and an empty state
directory, drives them with `systemctl`, and looks at what systemd, the journal, the store
and the HTTP API say. The container shares the host's network: HTTP goes over loopback.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from daemon.config import load
from daemon.http_server import SHUTDOWN_TIMEOUT
from daemon.workers import STOP_DEADLINE
from tests.harness import REPO_ROOT, TomlValue, free_port, render_toml
from tests.systemd_harness import (
    RELEASES,
    UNIT_DIR,
    Container,
    Service,
    boot_container,
    container_unavailable,
    install_offload,
    poll,
    stored_tasks,
)

# Booting the container and installing into it run in the first test's setup.
pytestmark = pytest.mark.timeout(900)

DB = "/var/lib/offload/offload.db"  # in the unit's StateDirectory
UNIT_TEXT = (REPO_ROOT / "systemd" / "offload.service").read_text()
NO_EXEC_RELOAD = "ExecReload=" not in UNIT_TEXT
SECRET = "s3cr3t-in-a-payload"  # must never reach a log line
MAX_EXPOSURE = 2.0


def python_type(handler: str, **keys: TomlValue) -> dict[str, TomlValue]:
    return {"kind": "python", "handler": handler, **keys}


def config(
    service: Service,
    types: Mapping[str, Mapping[str, TomlValue]],
    *,
    workers: Mapping[str, TomlValue] | None = None,
    auth: Mapping[str, TomlValue] | None = None,
) -> str:
    """A config for the unit: the service's port, SQLite in the state directory."""
    tables: dict[str, Mapping[str, TomlValue]] = {
        "server": {"listen": service.listen},
        "store": {"url": f"sqlite://{DB}", "synchronous": "normal"},
        "workers": {"concurrency": 4, "grace_period": "1s", **(workers or {})},
        "auth": dict(auth or {}),
        "log": {"level": "info"},
    }
    for name, table in types.items():
        tables[f"types.{name}"] = table
    return render_toml(tables)


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """The module's container with offload installed; powered off at the end. Skips the
    tests that use it where no container can boot."""
    unavailable = container_unavailable()
    if unavailable is not None:
        pytest.skip(f"cannot boot a systemd container here: {unavailable}")
    booted = boot_container(tmp_path_factory.mktemp("container"))
    try:
        install_offload(booted)
        yield booted
    finally:
        booted.poweroff()


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture
def service(container: Container, port: int) -> Service:
    """offload.service from a clean slate (see `Service.reset`)."""
    svc = Service(container, port)
    svc.reset()
    return svc


def ended(service: Service, task_id: str, within: float = 30.0) -> dict[str, Any]:
    """The task, once it is terminal (long-polls)."""

    def probe() -> dict[str, Any] | None:
        task = service.task(task_id, wait=5)
        return task if task["state"] in ("succeeded", "failed", "cancelled") else None

    return poll(probe, within=within, what=f"task {task_id} ending")


def test_the_stop_timeout_covers_the_default_grace_and_the_shutdown_deadlines() -> None:
    timeout = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT_TEXT, re.MULTILINE)
    assert timeout is not None, "offload.service sets TimeoutStopSec in seconds"
    grace = load(REPO_ROOT / "config.example.toml").workers.grace_period
    # lifecycle.py: the stop takes at most grace + STOP_DEADLINE + SHUTDOWN_TIMEOUT.
    assert int(timeout.group(1)) > grace + STOP_DEADLINE + SHUTDOWN_TIMEOUT


def test_units_pass_verify_and_security_scores_them_well(service: Service) -> None:
    ct = service.container
    units = [f"{UNIT_DIR}/offload.service", f"{UNIT_DIR}/offload.socket"]
    verified = ct.run("systemd-analyze", "verify", *units, check=False)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")

    security = ct.run("systemd-analyze", "security", "--offline=true", units[0], check=False)
    found = re.search(r"Overall exposure level for offload\.service: ([0-9.]+)", security.stdout)
    assert found is not None, security.stdout + security.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout

    # The shipped drop-ins are valid too.
    for drop_in in sorted((REPO_ROOT / "systemd" / "drop-ins").glob("*.conf")):
        service.drop_in("offload.service", drop_in.stem, drop_in.read_text())
    verified = ct.run("systemd-analyze", "verify", units[0], check=False)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def test_start_returns_once_the_api_answers(service: Service) -> None:
    service.write_config(config(service, {"noop": python_type("daemon.builtins:noop")}))
    service.systemctl("start", "offload.service")
    # No retry: `systemctl start` waited for READY=1, which comes after the bind.
    assert service.http("GET", "/readyz").status == 200
    assert service.systemctl("is-active", "offload.service").stdout.strip() == "active"
    assert service.show("SubState") == "running"
    assert service.show("NRestarts") == "0"


def test_a_bad_config_fails_the_start_once_and_is_not_restarted(service: Service) -> None:
    """Exit 78 from `serve` itself (there is no ExecStartPre=, whose 78 the unit would
    restart: RestartPreventExitStatus= looks at the main process only)."""
    service.write_config("[workers]\nconcurrency = 0\n")
    assert service.systemctl("start", "offload.service", check=False).returncode != 0

    def settled() -> bool | None:
        return service.show("ActiveState") == "failed" or None

    poll(settled, within=30, what="the unit failed")
    assert service.show("ExecMainStatus") == "78"
    assert service.show("NRestarts") == "0"
    assert service.journal("EVENT=config.invalid")


def test_tasks_run_and_journalctl_tells_the_story_of_each(service: Service) -> None:
    types = {
        "chatty": python_type("offload_test:chatty"),
        "fail": python_type("offload_test:fail", max_attempts=1),
    }
    service.write_config(config(service, types))
    service.systemctl("start", "offload.service")
    a = service.submit("chatty", {"lines": 3, "token": SECRET})["id"]
    b = service.submit("chatty", {"lines": 2})["id"]
    c = service.submit("fail", {})["id"]
    assert ended(service, a)["state"] == "succeeded"
    assert ended(service, b)["state"] == "succeeded"
    assert ended(service, c)["state"] == "failed"

    def story(task_id: str) -> list[dict[str, Any]] | None:
        # journald stores entries asynchronously: wait for the last line of the task.
        entries = service.journal(f"TASK_ID={task_id}")
        events = {e.get("EVENT") for e in entries}
        return entries if events & {"task.succeeded", "task.failed"} else None

    story_a = poll(lambda: story(a), within=10, what="the journal entries of task a")
    story_b = poll(lambda: story(b), within=10, what="the journal entries of task b")
    for task_id, entries, lines in ((a, story_a, 3), (b, story_b, 2)):
        assert {e["TASK_ID"] for e in entries} == {task_id}
        assert {(e["TASK_TYPE"], e["QUEUE"], e["ATTEMPT"]) for e in entries} == {
            ("chatty", "default", "1")
        }
        events = Counter(e.get("EVENT") for e in entries)
        assert events["task.succeeded"] == 1, entries
        assert len(entries) >= lines + 1, [
            e["MESSAGE"] for e in entries
        ]  # the handler's lines, then the outcome
        assert {e["_SYSTEMD_UNIT"] for e in entries} == {"offload.service"}
        assert {e["_TRANSPORT"] for e in entries} == {"journal"}  # native, not stderr

    poll(lambda: story(c), within=10, what="the journal entries of task c")
    problems = service.journal(priority="warning")
    assert all(int(e["PRIORITY"]) <= 4 for e in problems), problems
    problem_tasks = {e.get("TASK_ID") for e in problems}
    assert c in problem_tasks
    assert not problem_tasks & {a, b}

    everything = service.journal()
    assert not [e for e in everything if SECRET in str(e)], "a payload value was logged"


def test_stop_past_the_grace_is_clean_and_puts_tasks_back(service: Service) -> None:
    service.write_config(
        config(service, {"hold": python_type("offload_test:hold")}, workers={"grace_period": "1s"})
    )
    service.systemctl("start", "offload.service")
    release = uuid.uuid4().hex
    payload = {"release": f"{RELEASES}/{release}"}
    ids = {service.submit("hold", payload)["id"] for _ in range(3)}

    def all_running() -> bool | None:
        return True if {service.task(i)["state"] for i in ids} == {"running"} else None

    poll(all_running, within=15, what="three hold tasks running")

    started = time.monotonic()
    service.systemctl("stop", "offload.service")
    took = time.monotonic() - started
    assert took < 15, f"stop took {took:.1f}s"  # grace 1s + unwinding; TimeoutStopSec is 50s
    assert service.show("Result") == "success"
    assert service.show("ExecMainStatus") == "0"
    assert service.show("ActiveState") == "inactive"
    killing = [e for e in service.journal() if "Killing" in str(e.get("MESSAGE"))]
    assert killing == [], killing

    rows = stored_tasks(service.container, DB)
    assert {rows[i][0] for i in ids} == {"queued"}

    service.release(release)
    service.systemctl("start", "offload.service")
    assert {ended(service, i)["state"] for i in ids} == {"succeeded"}


def test_reload_applies_a_changed_type_and_refuses_a_broken_file(service: Service) -> None:
    noop = python_type("daemon.builtins:noop")
    service.write_config(
        config(service, {"noop": noop, "sleep": python_type("daemon.builtins:sleep")})
    )
    service.systemctl("start", "offload.service")
    main_pid = service.show("MainPID")

    service.write_config(
        config(service, {"noop": noop, "chatty": python_type("offload_test:chatty")})
    )
    service.systemctl("reload", "offload.service")

    def chatty_accepted() -> bool | None:
        body = {"type": "chatty", "payload": {"lines": 1}}
        return True if service.http("POST", "/v1/tasks", json_body=body).status == 202 else None

    poll(chatty_accepted, within=15, what="the added type accepted")
    removed = service.http("POST", "/v1/tasks", json_body={"type": "sleep", "payload": {}})
    assert removed.status == 422, removed.body

    # A broken file fails `systemctl reload` itself (ExecReload= checks it first), and the
    # daemon never hears of it.
    service.write_config("[workers\nconcurrency = ")
    refused = service.systemctl("reload", "offload.service", check=False)
    assert refused.returncode != 0
    assert not service.journal("EVENT=config.reload_refused")
    assert service.show("ActiveState") == "active"
    assert service.show("MainPID") == main_pid
    service.submit("chatty", {"lines": 1})
    service.submit("noop", None)
    removed = service.http("POST", "/v1/tasks", json_body={"type": "sleep", "payload": {}})
    assert removed.status == 422, removed.body


def test_a_wedged_event_loop_is_restarted_by_the_watchdog(service: Service) -> None:
    service.drop_in("offload.service", "watchdog", "[Service]\nWatchdogSec=5s\n")
    service.write_config(config(service, {"wedge": python_type("offload_test:wedge")}))
    service.systemctl("start", "offload.service")
    first_pid = service.show("MainPID")
    task_id = service.submit("wedge", {"seconds": 60})["id"]

    def restarted() -> str | None:
        pid = service.show("MainPID")
        active = service.show("ActiveState") == "active"
        return pid if active and pid not in (first_pid, "0") else None

    poll(restarted, within=30, what="a new main process after the watchdog fired")
    assert service.show("NRestarts") == "1"
    verdicts = service.journal("UNIT_RESULT=watchdog")
    assert verdicts, "systemd did not record a watchdog failure"
    # Attempt 1 wedged the loop and died with it; the restarted daemon ran attempt 2.
    task = ended(service, task_id)
    assert (task["state"], task["attempts"]) == ("succeeded", 2)


async def test_restart_under_load_with_the_socket_unit_refuses_no_connection(
    service: Service,
) -> None:
    service.write_config(config(service, {"noop": python_type("daemon.builtins:noop")}))
    service.systemctl("start", "offload.socket")
    service.systemctl("start", "offload.service")
    # The socket unit owns the port: a connection while the service is stopped starts it.
    service.systemctl("stop", "offload.service")
    assert service.http("GET", "/healthz").status == 200
    assert service.show("ActiveState") == "active"
    first_pid = service.show("MainPID")

    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def one_request() -> str:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            return f"connect: {exc!r}"
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: offload\r\nConnection: close\r\n\r\n")
            await writer.drain()
            status_line = await reader.readline()
            await reader.read()
            return status_line.decode(errors="replace").strip() or "no answer"
        except OSError as exc:
            return f"io: {exc!r}"
        finally:
            writer.close()

    async def client() -> None:
        while not stop.is_set():
            async with asyncio.timeout(30):
                outcomes[await one_request()] += 1

    async def answered(n: int) -> None:
        # The clients are tasks of this loop: look at the count between their requests.
        target = outcomes["HTTP/1.1 200 OK"] + n
        while outcomes["HTTP/1.1 200 OK"] < target:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async with asyncio.timeout(90):
        clients = [asyncio.create_task(client(), name=f"client-{i}") for i in range(8)]
        try:
            await answered(50)
            for _ in range(2):
                await asyncio.to_thread(service.systemctl, "restart", "offload.service")
                await answered(50)
        finally:
            stop.set()
            await asyncio.gather(*clients)

    assert service.show("MainPID") != first_pid
    assert service.show("NRestarts") == "0"  # restarts asked for, not failures
    failed_connects = {
        k: n for k, n in outcomes.items() if k == "refused" or k.startswith("connect")
    }
    assert failed_connects == {}, outcomes
    # What the issue asks: no refusal. A connection the stopping daemon itself had accepted
    # but not read a request from yet is closed unanswered or reset; that is counted in
    # `outcomes` and reported with issue 4, not asserted here.
    assert outcomes["HTTP/1.1 200 OK"] >= 150, outcomes


def test_tokens_come_from_a_systemd_credential(service: Service) -> None:
    ops, reader = "ops-" + uuid.uuid4().hex, "reader-" + uuid.uuid4().hex
    tokens = service.container.path("/etc/offload/tokens")
    tokens.write_text(f"ops admin {ops}\nreader read {reader}\n")
    tokens.chmod(0o600)  # root's: only the credential hands it to the dynamic user
    shipped = REPO_ROOT / "systemd" / "drop-ins" / "tokens-credential.conf"
    service.drop_in("offload.service", "tokens-credential", shipped.read_text())
    service.write_config(
        config(
            service,
            {"noop": python_type("daemon.builtins:noop")},
            auth={"credential": "offload-tokens"},
        )
    )
    service.systemctl("start", "offload.service")

    anonymous = service.http("GET", "/v1/tasks")
    assert anonymous.status == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert service.http("GET", "/readyz").status == 200  # an open path
    as_reader = {"Authorization": f"Bearer {reader}"}
    assert service.http("GET", "/v1/tasks", headers=as_reader).status == 200
    body = {"type": "noop", "payload": None}
    denied = service.http("POST", "/v1/tasks", json_body=body, headers=as_reader)
    assert denied.status == 403
    as_ops = {"Authorization": f"Bearer {ops}"}
    assert service.http("POST", "/v1/tasks", json_body=body, headers=as_ops).status == 202
    # Neither token reached the journal.
    assert not [e for e in service.journal() if ops in str(e) or reader in str(e)]
