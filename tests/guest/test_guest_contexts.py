"""Code contexts through a real envd: stateful cells, rich results, bash, interrupts, restarts."""

from __future__ import annotations

import importlib.util

import pytest
import trio
from envd_kit import connect, first_event

from guest import protocol as p


async def execute(client, code: str, **options) -> tuple[list[tuple[str, object]], p.ExecuteDone]:
    events = []
    with trio.fail_after(30):  # a hang is a failure, not a stuck suite
        async with client.stream("code.execute", p.Execute(code=code, **options)) as remote:
            async for event in remote:
                events.append(event)
            return events, remote.result


def texts(events, kind: str) -> str:
    return "".join(body.text for ev, body in events if ev == kind)


def results(events) -> list[p.ExecutionResult]:
    return [body for ev, body in events if ev == "result"]


def errors(events) -> list[p.ExecutionError]:
    return [body for ev, body in events if ev == "error"]


@pytest.fixture
async def context(client):
    info = await client.call("code.create", p.ContextCreate())
    yield info
    await client.call("code.delete", p.ContextId(id=info.id))


async def test_the_last_expression_is_the_main_result(client, context):
    events, done = await execute(client, "x = 41\nx + 1", context_id=context.id)
    [main] = results(events)
    assert main.text == "42" and main.is_main_result and done.execution_count == 1


async def test_state_persists_between_executions_and_the_count_grows(client, context):
    await execute(client, "import math\nvalue = math.pi", context_id=context.id)
    events, done = await execute(client, "round(value, 2)", context_id=context.id)
    assert results(events)[0].text == "3.14" and done.execution_count == 2


async def test_stdout_and_stderr_stream_with_timestamps(client, context):
    events, _ = await execute(
        client, "import sys\nprint('out')\nprint('err', file=sys.stderr)", context_id=context.id
    )
    assert texts(events, "stdout") == "out\n" and texts(events, "stderr") == "err\n"
    assert all(body.timestamp for ev, body in events if ev in ("stdout", "stderr"))


async def test_output_of_child_processes_is_captured_too(client, context):
    events, _ = await execute(client, "import os\nos.system('echo from-a-child')", context_id=context.id)
    assert "from-a-child\n" in texts(events, "stdout")


async def test_output_arrives_before_the_execution_ends(client, context):
    request = p.Execute(code="import time\nprint('early', flush=True)\ntime.sleep(1)", context_id=context.id)
    async with client.stream("code.execute", request) as remote:
        with trio.fail_after(0.8):
            first = await first_event(remote, "stdout")
        assert first.text == "early\n"
        await remote.wait()


async def test_an_exception_is_reported_with_name_value_and_traceback(client, context):
    events, _ = await execute(client, "def f():\n    raise ValueError('bad')\nf()", context_id=context.id)
    [error] = errors(events)
    assert (error.name, error.value) == ("ValueError", "bad")
    assert "line 2, in f" in error.traceback and "kernel.py" not in error.traceback


async def test_a_syntax_error_is_an_error_result_and_the_context_lives_on(client, context):
    events, _ = await execute(client, "def (", context_id=context.id)
    assert errors(events)[0].name == "SyntaxError"
    events, _ = await execute(client, "1", context_id=context.id)
    assert results(events)[0].text == "1"


async def test_rich_reprs_become_mime_results(client, context):
    code = """
class Rich:
    def _repr_html_(self): return '<b>hi</b>'
    def _repr_markdown_(self): return '**hi**'
    def _repr_svg_(self): return '<svg/>'
    def _repr_png_(self): return b'\\x89PNG'
    def _repr_latex_(self): return '$x$'
    def _repr_json_(self): return {'a': 1}
    def __repr__(self): return 'Rich()'
Rich()
"""
    events, _ = await execute(client, code, context_id=context.id)
    [main] = results(events)
    assert (main.text, main.html, main.markdown, main.svg) == ("Rich()", "<b>hi</b>", "**hi**", "<svg/>")
    assert (main.png, main.latex, main.json) == ("iVBORw==", "$x$", {"a": 1})


async def test_mimebundles_and_display_give_extra_results(client, context):
    code = """
class Bundle:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {'text/plain': 'B', 'application/x-thing': 'T'}
display(Bundle())
'tail'
"""
    events, _ = await execute(client, code, context_id=context.id)
    shown, main = results(events)
    assert not shown.is_main_result and shown.extra == {"application/x-thing": "T"}
    assert main.is_main_result and main.text == "tail"  # one layer of quotes stripped


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib absent")
async def test_matplotlib_figures_come_back_as_png(client, context):
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nNone"
    events, _ = await execute(client, code, context_id=context.id)
    assert any(r.png for r in results(events))


async def test_top_level_await_works(client, context):
    events, _ = await execute(client, "import asyncio\nawait asyncio.sleep(0)\n7", context_id=context.id)
    assert results(events)[0].text == "7"


async def test_env_vars_apply_to_one_execution_only(client, context):
    code = "import os\nos.environ.get('ONLY_NOW')"
    events, _ = await execute(client, code, context_id=context.id, envs={"ONLY_NOW": "yes"})
    assert results(events)[0].text == "yes"
    events, _ = await execute(client, code, context_id=context.id)
    assert results(events) == []


async def test_a_context_has_its_own_cwd_and_env(client, tmp_path):
    info = await client.call(
        "code.create", p.ContextCreate(cwd=str(tmp_path), envs={"CTX": "mine"})
    )
    assert info.cwd == str(tmp_path) and info.language == "python"
    events, _ = await execute(client, "import os\n(os.getcwd(), os.environ['CTX'])", context_id=info.id)
    assert results(events)[0].text == f"('{tmp_path}', 'mine')"
    await client.call("code.delete", p.ContextId(id=info.id))


async def test_contexts_are_listed_and_deleted(client):
    info = await client.call("code.create", p.ContextCreate())
    assert info.id in {c.id for c in (await client.call("code.list")).contexts}
    await client.call("code.delete", p.ContextId(id=info.id))
    assert info.id not in {c.id for c in (await client.call("code.list")).contexts}
    with pytest.raises(p.NotFound, match=f"Context {info.id} not found"):
        await client.call("code.execute", p.Execute(code="1", context_id=info.id))


async def test_restart_clears_the_state_and_keeps_the_id(client, context):
    await execute(client, "kept = 1", context_id=context.id)
    await client.call("code.restart", p.ContextId(id=context.id))
    events, done = await execute(client, "kept", context_id=context.id)
    assert errors(events)[0].name == "NameError" and done.execution_count == 1


async def test_an_interrupt_stops_the_cell_and_the_context_survives(client, context):
    await execute(client, "survivor = 5", context_id=context.id)
    request = p.Execute(code="import time\nprint('go', flush=True)\ntime.sleep(60)", context_id=context.id)
    async with client.stream("code.execute", request) as remote:
        await first_event(remote, "stdout")
        await client.call("code.interrupt", p.ContextId(id=context.id))
        with trio.fail_after(5):
            rest = [event async for event in remote]
    assert errors(rest)[0].name == "KeyboardInterrupt"
    events, _ = await execute(client, "survivor", context_id=context.id)
    assert results(events)[0].text == "5"


async def test_a_cell_past_its_timeout_is_interrupted_with_deadline_exceeded(client, context):
    with pytest.raises(p.DeadlineExceeded):
        await execute(client, "import time\ntime.sleep(60)", context_id=context.id, timeout_ms=300)
    events, _ = await execute(client, "'alive'", context_id=context.id)
    assert results(events)[0].text == "alive"


async def test_a_kernel_that_dies_is_reported_and_restarted_under_the_same_id(client, context):
    await execute(client, "lost = 1", context_id=context.id)
    events, _ = await execute(client, "import os\nos._exit(1)", context_id=context.id)
    assert errors(events)[0].name == "UnexpectedEndOfExecution"
    with trio.fail_after(10):
        while True:
            events, _ = await execute(client, "'back'", context_id=context.id)
            if results(events):
                break
            await trio.sleep(0.05)
    assert results(events)[0].text == "back"


async def test_cancelling_an_execution_interrupts_the_kernel(client, context):
    request = p.Execute(code="import time\nprint('go', flush=True)\ntime.sleep(60)", context_id=context.id)
    async with client.stream("code.execute", request) as remote:
        await first_event(remote, "stdout")
    with trio.fail_after(5):
        events, _ = await execute(client, "'next'", context_id=context.id)
    assert results(events)[0].text == "next"


async def test_without_a_context_id_the_default_python_context_is_used(client):
    await execute(client, "default_marker = 3")
    events, _ = await execute(client, "default_marker", language="python")
    assert results(events)[0].text == "3"


async def test_context_id_and_language_together_are_an_invalid_argument(client, context):
    with pytest.raises(p.InvalidArgument):
        await execute(client, "1", context_id=context.id, language="python")


async def test_an_unsupported_language_is_an_invalid_argument(client):
    with pytest.raises(p.InvalidArgument):
        await client.call("code.create", p.ContextCreate(language="cobol"))


async def test_a_bash_context_keeps_its_directory_and_variables(client, tmp_path):
    info = await client.call("code.create", p.ContextCreate(language="bash"))
    await execute(client, f"cd {tmp_path}\nGREETING=hello", context_id=info.id)
    events, done = await execute(client, 'echo "$GREETING from $(pwd)"', context_id=info.id)
    assert texts(events, "stdout") == f"hello from {tmp_path}\n" and done.execution_count == 2
    events, _ = await execute(client, "false", context_id=info.id)
    assert errors(events)[0].value == "exit status 1"
    await client.call("code.delete", p.ContextId(id=info.id))


async def test_a_bash_cell_can_be_interrupted(client):
    info = await client.call("code.create", p.ContextCreate(language="bash"))
    request = p.Execute(code="echo go; sleep 60; echo never", context_id=info.id)
    async with client.stream("code.execute", request) as remote:
        await first_event(remote, "stdout")
        await client.call("code.interrupt", p.ContextId(id=info.id))
        with trio.fail_after(5):
            rest = [event async for event in remote]
    assert "never" not in texts(rest, "stdout")
    events, _ = await execute(client, "echo still here", context_id=info.id)
    assert texts(events, "stdout") == "still here\n"
    await client.call("code.delete", p.ContextId(id=info.id))


async def test_a_kernel_that_cannot_start_makes_the_context_unavailable(private_envd):
    envd = private_envd("unix", "--python", "/bin/false")
    async with connect(envd) as client:
        with pytest.raises(p.Unavailable):
            await client.call("code.create", p.ContextCreate())


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib absent")
async def test_a_returned_figure_is_the_main_result_as_png_and_is_shown_once(client, context):
    code = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nfig"
    events, _ = await execute(client, code, context_id=context.id)
    [main] = results(events)
    assert main.is_main_result and main.png and "Figure" in main.text
