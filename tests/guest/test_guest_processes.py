"""The process service, through a real envd: E2B envd's semantics, stream by stream."""

from __future__ import annotations

import os
import signal

import pytest
import trio
from envd_kit import collect, connect, first_event, marked_processes, run, shell, wait_until

from guest import protocol as p
from guest.processes import exit_report


async def test_the_first_event_is_start_with_the_pid_and_the_last_is_end(client):
    result = await run(client, "echo hi")
    kinds = [kind for kind, _ in result.events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert result.pid > 0 and result.error is None


async def test_stdout_and_stderr_arrive_separately(client):
    result = await run(client, "echo out; echo err >&2")
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


async def test_a_clean_exit_reports_exit_status_0_and_no_error(client):
    end = (await run(client, "true")).end
    assert end == p.ProcessEnded(exit_code=0, exited=True, status="exit status 0", error=None)


async def test_a_failing_exit_reports_its_code_and_the_status_as_error(client):
    end = (await run(client, "exit 3")).end
    assert end == p.ProcessEnded(
        exit_code=3, exited=True, status="exit status 3", error="exit status 3"
    )


async def test_a_process_killed_by_a_signal_reports_minus_one_and_the_go_status_text(client):
    end = (await run(client, "kill -KILL $$")).end
    assert end == p.ProcessEnded(
        exit_code=-1, exited=False, status="signal: killed", error="signal: killed"
    )


async def test_sigterm_is_reported_as_terminated(client):
    end = (await run(client, "kill -TERM $$")).end
    assert end is not None and (end.exit_code, end.status) == (-1, "signal: terminated")


async def test_output_arrives_while_the_process_is_still_running(client):
    remote = await client.start("process.start", shell("echo first; read line; echo second"))
    pid = (await first_event(remote, "start")).pid
    first = await first_event(remote, "data")
    assert first.stdout == b"first\n"  # the process is blocked on stdin: nothing has ended
    await client.call("process.input", p.ProcessInput(pid=pid, stdin=b"go\n"))
    rest = await collect(remote)
    assert rest.stdout == b"second\n" and rest.end.exit_code == 0


async def test_a_missing_executable_is_an_invalid_argument(client):
    with pytest.raises(p.InvalidArgument):
        await client.call(
            "process.start", p.ProcessStart(process=p.ProcessConfig(cmd="/no/such/binary"))
        )


async def test_a_missing_cwd_is_an_invalid_argument_naming_it(client):
    with pytest.raises(p.InvalidArgument, match="cwd '/no/such/dir' does not exist"):
        await client.call("process.start", shell("pwd", cwd="/no/such/dir"))


async def test_the_cwd_is_used_and_a_relative_one_starts_at_the_home(client, tmp_path):
    assert (await run(client, "pwd", cwd=str(tmp_path))).stdout == f"{tmp_path}\n".encode()
    home = client.hello.home
    assert (await run(client, "pwd", cwd=".")).stdout == f"{home}\n".encode()


async def test_the_environment_has_the_basics_the_sandbox_env_and_the_request_env(client, envd):
    result = await run(
        client,
        'echo "$HOME|$USER|$LOGNAME|$CUBE_GUEST_TEST|$EXTRA"; test -n "$PATH"',
        envs={"EXTRA": "x"},
    )
    user = client.hello.user
    assert result.stdout == f"{client.hello.home}|{user}|{user}|{envd.marker}|x\n".encode()
    assert result.end.exit_code == 0


async def test_the_request_env_wins_over_the_sandbox_env(client):
    result = await run(client, 'echo "$TMPDIR"', envs={"TMPDIR": "/override"})
    assert result.stdout == b"/override\n"


async def test_envd_configure_sets_sandbox_env_for_later_processes(private_envd):
    envd = private_envd()
    async with connect(envd) as client:
        await client.call(
            "envd.configure",
            p.Configure(envs={"CUBE_GUEST_TEST": envd.marker, "SANDBOX": "yes", "TMPDIR": str(envd.tmp)}),
        )
        assert (await run(client, 'echo "$SANDBOX"')).stdout == b"yes\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_a_process_runs_as_the_requested_user(client):
    result = await run(client, "id -u; id -g", user="nobody", cwd="/")
    nobody = __import__("pwd").getpwnam("nobody")
    assert result.stdout == f"{nobody.pw_uid}\n{nobody.pw_gid}\n".encode()


async def test_an_unknown_user_is_unauthenticated(client):
    with pytest.raises(p.Unauthenticated):
        await client.call("process.start", shell("true", user="no-such-user-here"))


async def test_stdin_is_a_pipe_that_input_and_close_stdin_feed(client):
    remote = await client.start("process.start", shell("cat"))
    pid = (await first_event(remote, "start")).pid
    await client.call("process.input", p.ProcessInput(pid=pid, stdin=b"one "))
    await client.call("process.input", p.ProcessInput(pid=pid, stdin=b"two"))
    await client.call("process.close_stdin", p.ProcessCloseStdin(pid=pid))
    result = await collect(remote)
    assert result.stdout == b"one two" and result.end.exit_code == 0


async def test_input_sent_without_waiting_is_written_in_order(client):
    remote = await client.start("process.start", shell("cat"))
    pid = (await first_event(remote, "start")).pid
    pieces = [await client.start("process.input", p.ProcessInput(pid=pid, stdin=b"%d," % i))
              for i in range(200)]
    for piece in pieces:
        await piece.wait()
    await client.call("process.close_stdin", p.ProcessCloseStdin(pid=pid))
    result = await collect(remote)
    assert result.stdout == b"".join(b"%d," % i for i in range(200))


async def test_without_stdin_the_process_reads_dev_null_and_input_is_refused(client):
    remote = await client.start("process.start", shell("sleep 0.3; cat", stdin=False))
    pid = (await first_event(remote, "start")).pid
    with pytest.raises(p.FailedPrecondition):
        await client.call("process.input", p.ProcessInput(pid=pid, stdin=b"x"))
    result = await collect(remote)
    assert result.stdout == b"" and result.end.exit_code == 0


async def test_closing_stdin_twice_is_fine(client):
    remote = await client.start("process.start", shell("cat"))
    pid = (await first_event(remote, "start")).pid
    await client.call("process.close_stdin", p.ProcessCloseStdin(pid=pid))
    await client.call("process.close_stdin", p.ProcessCloseStdin(pid=pid))
    assert (await collect(remote)).end.exit_code == 0


async def test_a_pty_process_sees_a_terminal_of_the_requested_size(client):
    request = shell("test -t 0 && stty size", pty=p.PtySize(cols=100, rows=30))
    result = await collect(await client.start("process.start", request))
    assert b"30 100" in result.pty and result.stdout == b"" and result.end.exit_code == 0


async def test_a_pty_can_be_resized_and_typed_into(client):
    request = shell("read a; stty size; read b", pty=p.PtySize(cols=80, rows=24))
    remote = await client.start("process.start", request)
    pid = (await first_event(remote, "start")).pid
    await client.call("process.resize", p.ProcessResize(pid=pid, pty=p.PtySize(cols=120, rows=40)))
    await client.call("process.input", p.ProcessInput(pid=pid, pty=b"go\n"))
    await client.call("process.input", p.ProcessInput(pid=pid, pty=b"done\n"))
    result = await collect(remote)
    assert b"40 120" in result.pty and result.end.exit_code == 0


async def test_pty_input_to_a_pipe_process_and_resizing_it_are_failed_preconditions(client):
    remote = await client.start("process.start", shell("cat"))
    pid = (await first_event(remote, "start")).pid
    with pytest.raises(p.FailedPrecondition):
        await client.call("process.input", p.ProcessInput(pid=pid, pty=b"x"))
    with pytest.raises(p.FailedPrecondition):
        await client.call("process.resize", p.ProcessResize(pid=pid, pty=p.PtySize(cols=1, rows=1)))
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGNAL_SIGKILL"))
    await collect(remote)


async def test_closing_the_stdin_of_a_pty_process_is_a_failed_precondition(client):
    remote = await client.start("process.start", shell("cat", pty=p.PtySize(cols=80, rows=24)))
    pid = (await first_event(remote, "start")).pid
    with pytest.raises(p.FailedPrecondition):
        await client.call("process.close_stdin", p.ProcessCloseStdin(pid=pid))
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal=9))
    await collect(remote)


async def test_list_shows_running_processes_with_config_and_tag(client):
    remote = await client.start("process.start", shell("sleep 30", tag="sleeper"))
    pid = (await first_event(remote, "start")).pid
    listed = {info.pid: info for info in (await client.call("process.list")).processes}
    assert listed[pid].tag == "sleeper" and listed[pid].config.cmd == "/bin/sh"
    await client.call("process.signal", p.ProcessSignal(tag="sleeper", signal="SIGKILL"))
    assert (await collect(remote)).end.status == "signal: killed"
    assert pid not in {i.pid for i in (await client.call("process.list")).processes}


async def test_connect_attaches_to_a_running_process_and_sees_its_end(client):
    remote = await client.start("process.start", shell("read x; echo got $x"))
    pid = (await first_event(remote, "start")).pid
    attached = await client.start("process.connect", p.ProcessConnect(pid=pid))
    assert (await first_event(attached, "start")).pid == pid
    await client.call("process.input", p.ProcessInput(pid=pid, stdin=b"it\n"))
    seen = await collect(attached)
    assert seen.stdout == b"got it\n" and seen.end.exit_code == 0
    await collect(remote)


async def test_connect_to_a_recently_exited_process_gives_start_and_end(client):
    pid = (await run(client, "exit 7")).pid
    seen = await collect(await client.start("process.connect", p.ProcessConnect(pid=pid)))
    assert [kind for kind, _ in seen.events] == ["start", "end"]
    assert seen.end.exit_code == 7


async def test_connect_by_tag_finds_the_process(client):
    remote = await client.start("process.start", shell("sleep 30", tag="by-tag"))
    pid = (await first_event(remote, "start")).pid
    attached = await client.start("process.connect", p.ProcessConnect(tag="by-tag"))
    assert (await first_event(attached, "start")).pid == pid
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal="KILL"))
    await collect(attached)
    await collect(remote)


async def test_connect_signal_and_input_for_an_unknown_pid_are_not_found(client):
    with pytest.raises(p.NotFound):
        await client.call("process.connect", p.ProcessConnect(pid=999_999))
    with pytest.raises(p.NotFound):
        await client.call("process.signal", p.ProcessSignal(pid=999_999))
    with pytest.raises(p.NotFound):
        await client.call("process.input", p.ProcessInput(pid=999_999, stdin=b""))


async def test_an_unknown_signal_name_is_an_invalid_argument(client):
    with pytest.raises(p.InvalidArgument):
        await client.call("process.signal", p.ProcessSignal(pid=1, signal="SIGNAL_NOPE"))


async def test_cancelling_the_stream_detaches_and_the_process_keeps_running(client):
    remote = await client.start("process.start", shell("read x; echo late $x"))
    pid = (await first_event(remote, "start")).pid
    await remote.cancel()
    with pytest.raises(p.Canceled):
        await remote.wait()
    assert pid in {i.pid for i in (await client.call("process.list")).processes}
    attached = await client.start("process.connect", p.ProcessConnect(pid=pid))
    await first_event(attached, "start")
    await client.call("process.input", p.ProcessInput(pid=pid, stdin=b"x\n"))
    assert (await collect(attached)).stdout == b"late x\n"


async def test_a_timeout_kills_the_process_and_ends_the_stream_with_deadline_exceeded(client):
    with trio.fail_after(10):
        result = await run(client, "sleep 30", timeout_ms=300)
    assert isinstance(result.error, p.DeadlineExceeded)
    assert result.end.status == "signal: killed" and result.end.exit_code == -1


async def test_a_signal_reaches_the_whole_tree(client, envd):
    remote = await client.start("process.start", shell("sleep 60 & sleep 60 & echo up; wait"))
    pid = (await first_event(remote, "start")).pid
    await first_event(remote, "data")
    assert len(marked_processes(envd.marker)) >= 3
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGTERM"))
    assert (await collect(remote)).end.exit_code == -1
    assert wait_until(lambda: not any(_is_sleep_60(q) for q in marked_processes(envd.marker)))


async def test_a_process_that_leaves_a_daemon_still_reports_its_exit_promptly(client):
    # The daemon inherits stdout and keeps it open; the end must not wait for it.
    with trio.fail_after(5):
        result = await run(client, "sleep 120 & echo $!")
    daemon = int(result.stdout)
    assert result.end.exit_code == 0
    assert os.path.exists(f"/proc/{daemon}")
    # The daemon stayed in the command's session: signalling the exited command kills it.
    await client.call("process.signal", p.ProcessSignal(pid=result.pid, signal="SIGKILL"))
    assert wait_until(lambda: not _alive(daemon), timeout=5)


async def test_signalling_an_exited_process_with_nothing_left_is_not_found(client):
    pid = (await run(client, "true")).pid
    with pytest.raises(p.NotFound):
        await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGKILL"))


async def test_interleaved_streams_each_get_exactly_their_own_output(client):
    async def one(n: int, results: dict[int, bytes]) -> None:
        script = f"for i in 1 2 3 4 5; do echo {n}-$i; sleep 0.01; done"
        results[n] = (await run(client, script)).stdout

    results: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        for n in range(12):
            nursery.start_soon(one, n, results)
    for n in range(12):
        assert results[n] == b"".join(f"{n}-{i}\n".encode() for i in range(1, 6))


async def test_a_flood_of_output_arrives_complete_and_in_order(client):
    size = 32 << 20
    result = await run(client, f"head -c {size} /dev/zero | tr '\\0' 'x'; echo; echo done >&2")
    assert len(result.stdout) == size + 1 and set(result.stdout[:-1]) == {ord("x")}
    assert result.stderr == b"done\n"


async def test_a_flooding_process_does_not_slow_a_ping_on_the_same_channel(client):
    remote = await client.start("process.start", shell("yes"))
    pid = (await first_event(remote, "start")).pid
    await first_event(remote, "data")  # the flood is on; we stop reading it now
    with trio.fail_after(2):
        for _ in range(20):
            await client.call("ping")
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGKILL"))
    await collect(remote)


def _is_sleep_60(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read() == b"sleep\x0060\x00"
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_signal_names_follow_go():
    assert exit_report(-signal.SIGSEGV).status == "signal: segmentation fault"
    assert exit_report(-signal.SIGINT).status == "signal: interrupt"
