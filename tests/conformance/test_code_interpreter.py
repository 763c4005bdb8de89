"""The real ``e2b-code-interpreter`` SDK (sync and async) against /execute and /contexts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from conformance_kit import LiveServer
from e2b import NotFoundException
from e2b_code_interpreter import AsyncSandbox, Sandbox


@pytest.fixture(scope="module")
def ci(server: LiveServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_run_code_returns_the_main_result_and_logs(ci: Sandbox) -> None:
    execution = ci.run_code("x = 41\nprint('side')\nx + 1")
    assert execution.text == "42"
    assert execution.logs.stdout == ["side\n"]
    assert execution.error is None
    assert execution.execution_count is not None and execution.execution_count >= 1


def test_state_persists_between_calls(ci: Sandbox) -> None:
    ci.run_code("counter = 10")
    ci.run_code("counter += 5")
    assert ci.run_code("counter").text == "15"


def test_errors_are_results_not_exceptions(ci: Sandbox) -> None:
    execution = ci.run_code("1 / 0")
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert "division by zero" in execution.error.value


def test_callbacks_see_output_and_results(ci: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    results: list[object] = []
    errors: list[object] = []
    ci.run_code(
        "import sys\nprint('a')\nprint('b', file=sys.stderr)\n7",
        on_stdout=lambda m: out.append(m.line),
        on_stderr=lambda m: err.append(m.line),
        on_result=results.append,
        on_error=errors.append,
    )
    assert out == ["a\n"] and err == ["b\n"]
    assert len(results) == 1 and errors == []


def test_env_vars_apply_to_one_execution(ci: Sandbox) -> None:
    code = "import os; os.environ.get('ONLY_ONCE', 'unset')"
    assert ci.run_code(code, envs={"ONLY_ONCE": "yes"}).text == "yes"  # one layer of quotes stripped
    assert ci.run_code(code).text == "unset"


def test_contexts_create_run_list_restart_remove(ci: Sandbox) -> None:
    context = ci.create_code_context(cwd="/tmp")
    assert context.language == "python" and context.cwd == "/tmp"
    ci.run_code("secret = 99", context=context)
    assert ci.run_code("secret", context=context).text == "99"
    assert ci.run_code("'secret' in globals()").text == "False"
    assert context.id in [c.id for c in ci.list_code_contexts()]
    ci.restart_code_context(context)
    assert ci.run_code("'secret' in globals()", context=context).text == "False"
    ci.remove_code_context(context.id)
    assert context.id not in [c.id for c in ci.list_code_contexts()]
    with pytest.raises(NotFoundException):
        ci.run_code("1", context=context)


def test_bash_language(ci: Sandbox) -> None:
    execution = ci.run_code("echo from-bash", language="bash")
    assert execution.logs.stdout == ["from-bash\n"]


def test_execute_needs_the_traffic_token(server: LiveServer, ci: Sandbox) -> None:
    headers = {"E2b-Sandbox-Id": ci.sandbox_id, "E2b-Sandbox-Port": "49999"}
    with httpx.Client(base_url=server.url, timeout=10) as plain:
        refused = plain.post("/execute", json={"code": "1"}, headers=headers)
        assert refused.status_code == 401
        lines = plain.post(
            "/execute",
            json={"code": "print(1)\n2", "context_id": None, "language": None, "env_vars": None},
            headers={**headers, "E2B-Traffic-Access-Token": ci.traffic_access_token or ""},
        ).text.split("\n")
    assert lines[-1] == "" and all(line for line in lines[:-1])
    kinds = [httpx.Response(200, content=line).json()["type"] for line in lines[:-1]]
    assert kinds[-1] == "end_of_execution"
    assert {"stdout", "result", "number_of_executions"} <= set(kinds)


def test_async_client_runs_code_and_contexts(server: LiveServer) -> None:
    async def scenario() -> None:
        sandbox = await AsyncSandbox.create(timeout=120)
        try:
            await sandbox.run_code("y = 2")
            seen: list[str] = []
            execution = await sandbox.run_code("print('hey')\ny * 21", on_stdout=lambda m: seen.append(m.line))
            assert execution.text == "42" and seen == ["hey\n"]
            context = await sandbox.create_code_context()
            assert context.id in [c.id for c in await sandbox.list_code_contexts()]
            await sandbox.remove_code_context(context)
        finally:
            await sandbox.kill()

    asyncio.run(scenario())
