"""Commands and PTYs through the real ``e2b`` SDK (sync client)."""

from __future__ import annotations

import time

import pytest
from e2b import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    TimeoutException,
)


def test_run_returns_stdout_stderr_and_exit_code(sbx: Sandbox) -> None:
    result = sbx.commands.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)


def test_nonzero_exit_raises_with_the_output(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"


def test_streaming_callbacks_get_output_as_it_comes(sbx: Sandbox) -> None:
    chunks: list[str] = []
    errors: list[str] = []
    sbx.commands.run(
        "for i in 1 2 3; do echo line$i; sleep 0.05; done; echo oops >&2",
        on_stdout=chunks.append,
        on_stderr=errors.append,
    )
    assert "".join(chunks) == "line1\nline2\nline3\n"
    assert len(chunks) >= 2
    assert errors == ["oops\n"]


def test_cwd_envs_and_special_characters(sbx: Sandbox, workdir: str) -> None:
    sbx.files.make_dir(workdir)
    result = sbx.commands.run('pwd; echo "$A $B"; echo \'q"u\'"o\'te"', cwd=workdir, envs={"A": "1", "B": "two words"})
    assert result.stdout == f"{workdir}\n1 two words\nq\"uo'te\n"


def test_broken_utf8_is_replaced(sbx: Sandbox) -> None:
    result = sbx.commands.run(r"printf 'a\xffb\n'")
    assert result.stdout == "a\ufffdb\n"


def test_missing_cwd_is_an_invalid_argument(sbx: Sandbox) -> None:
    with pytest.raises(InvalidArgumentException):
        sbx.commands.run("true", cwd="/no/such/dir/here")


def test_timeout_kills_the_command(sbx: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=2)
    assert time.monotonic() - started < 10
    assert "sleep 30" not in [p.cmd + " " + " ".join(p.args) for p in sbx.commands.list()]


def test_background_command_list_stdin_and_wait(sbx: Sandbox) -> None:
    handle = sbx.commands.run("read line; echo got:$line", background=True, stdin=True, timeout=0)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    sbx.commands.send_stdin(handle.pid, "hello\n")
    result = handle.wait()
    assert result.stdout == "got:hello\n"


def test_close_stdin_ends_cat(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
    sbx.commands.send_stdin(handle.pid, "abc")
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "abc"


def test_stream_input_feeds_stdin(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
    sbx.commands.stream_input(handle.pid, iter([b"one ", b"two"]))
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "one two"


def test_connect_to_a_running_command(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 0.5; echo late", background=True, timeout=0)
    attached = sbx.commands.connect(handle.pid)
    assert attached.wait().stdout.endswith("late\n")


def started(sbx: Sandbox, command: str) -> int:
    """Start ``command`` in the background; return its pid once its login shell is done.

    Killing ``bash -l`` while it still reads its profile can leave the host's profile in a
    bad state with the process driver (a stale ``pyenv rehash`` lock in /root), so kill tests
    wait for the command proper to run.
    """
    marker = f"/tmp/cube-conformance/ready-{time.monotonic_ns()}"
    handle = sbx.commands.run(f"mkdir -p /tmp/cube-conformance; touch {marker}; {command}", background=True, timeout=0)
    deadline = time.monotonic() + 15
    while not sbx.files.exists(marker):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return handle.pid


def test_kill_a_command_and_unknown_pid(sbx: Sandbox) -> None:
    handle = sbx.commands.connect(started(sbx, "sleep 60"))
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException):
        handle.wait()
    assert sbx.commands.kill(999999) is False
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999999)


def test_pty_create_input_resize_and_kill(sbx: Sandbox) -> None:
    output: list[bytes] = []
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    sbx.pty.resize(terminal.pid, PtySize(rows=40, cols=100))
    sbx.pty.send_stdin(terminal.pid, b"stty size; echo mark$((40+2))\n")
    deadline = time.monotonic() + 10
    for _stdout, _stderr, pty in terminal:
        if pty:
            output.append(pty)
        if b"mark42" in b"".join(output) or time.monotonic() > deadline:
            break
    text = b"".join(output)
    assert b"40 100" in text
    assert b"mark42" in text
    assert sbx.pty.kill(terminal.pid) is True


def test_killing_the_sandbox_breaks_a_running_command_as_behind_e2bs_proxy(server: object) -> None:
    sandbox = Sandbox.create(timeout=60)
    handle = sandbox.commands.connect(started(sandbox, "sleep 60"))
    sandbox.kill()
    with pytest.raises(TimeoutException) as info:
        handle.wait()
    assert "sandbox was killed or reached its end of life" in str(info.value)
