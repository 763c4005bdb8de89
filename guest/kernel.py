"""A code-context kernel: a persistent interpreter that envd drives over two pipes.

envd starts one per code context, in the context's cwd and as the context's user, with
``python -c <bootstrap> guest/kernel.py <language> <control-in fd> <control-out fd>``. It uses
only the standard library, so it runs on whatever Python the sandbox has, and it keeps its own
names out of the user's namespace.

Control protocol (one JSON object per line):

* envd → kernel: ``{"op": "execute", "code": "...", "envs": {...}}``
* kernel → envd: ``{"t": "ready", "body": {...}}`` once at start, then per execution any number
  of ``{"t": "stdout" | "stderr", "body": {"text", "timestamp"}}``, ``{"t": "result", "body":
  {...}}`` (E2B's result keys) and ``{"t": "error", "body": {"name", "value", "traceback"}}``,
  and finally ``{"t": "done", "body": {"execution_count": n}}``.

Output: the kernel points its own fds 1 and 2 at pipes it reads itself, so output of child
processes and C code is captured as well as ``print``. A forwarding thread sends it on as it
arrives; before ``done`` the kernel waits until those pipes are empty (FIONREAD), so every byte
written during an execution is delivered before its end. An interrupt is SIGINT to the kernel's
process group: Python raises KeyboardInterrupt in the running code, bash abandons the sourced
cell, and the kernel lives on.
"""

import ast
import base64
import builtins
import codecs
import datetime
import fcntl
import io
import json
import linecache
import os
import select
import shlex
import signal
import struct
import sys
import tempfile
import termios
import threading
import time
import traceback
import types
from typing import Any

KERNEL_FILE = os.path.abspath(__file__) if "__file__" in globals() else ""


class Control:
    """The kernel's line-oriented link to envd; safe to call from several threads."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self._in = os.fdopen(fd_in, "rb", buffering=1 << 16)
        self._out = fd_out
        self._lock = threading.Lock()

    def send(self, kind: str, body: dict[str, Any]) -> None:
        """Send one message to envd (blocks while envd is not reading, which is the point)."""
        data = json.dumps({"t": kind, "body": body}, default=repr).encode() + b"\n"
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._out, view) :]

    def receive(self) -> dict[str, Any] | None:
        """The next request from envd, or None when envd closed the pipe."""
        while True:
            line = self._in.readline()
            if not line:
                return None
            if line.strip():
                message: dict[str, Any] = json.loads(line)
                return message


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _pending(fd: int) -> int:
    """How many bytes wait unread in pipe ``fd``."""
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    count: int = struct.unpack("i", raw)[0]
    return count


class OutputForwarder(threading.Thread):
    """Reads the pipes behind fds 1 and 2 and forwards their text to envd as it comes."""

    def __init__(self, control: Control) -> None:
        super().__init__(name="cube-output", daemon=True)
        self._control = control
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        self._fds = {out_r: "stdout", err_r: "stderr"}
        self._decoders = {
            fd: codecs.getincrementaldecoder("utf-8")(errors="replace") for fd in self._fds
        }
        self._cond = threading.Condition()

    def run(self) -> None:
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                # Read under the lock: `settle` then sees either bytes in the pipe or none
                # anywhere, never bytes in flight between the pipe and envd.
                with self._cond:
                    data = os.read(fd, 1 << 16)
                    if not data:
                        poller.unregister(fd)
                        continue
                    text = self._decoders[fd].decode(data)
                    if text:
                        self._control.send(self._fds[fd], {"text": text, "timestamp": _now()})
                    self._cond.notify_all()

    def settle(self, limit: float = 0.5) -> None:
        """Wait until everything already written to fds 1 and 2 has been forwarded."""
        deadline = time.monotonic() + limit
        with self._cond:
            while any(_pending(fd) for fd in self._fds):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return  # something keeps writing (a background job); do not wait for it
                self._cond.wait(remaining)


# --------------------------------------------------------------------------------------------
# Rich results

_MIME_TO_KEY = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}
_REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
    ("_repr_javascript_", "application/javascript"),
    ("_repr_pdf_", "application/pdf"),
)


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _is_figure(value: Any) -> bool:
    figure_module = sys.modules.get("matplotlib.figure")
    return figure_module is not None and isinstance(value, figure_module.Figure)


def mime_bundle(value: Any) -> dict[str, Any]:
    """The display bundle of ``value``: its ``_repr_*_`` methods, figures as PNG, and repr."""
    bundle: dict[str, Any] = {}
    if not isinstance(value, type):
        method = getattr(value, "_repr_mimebundle_", None)
        if callable(method):
            try:
                produced = method(include=None, exclude=None)
                if isinstance(produced, tuple):
                    produced = produced[0]
                if isinstance(produced, dict):
                    bundle.update(produced)
            except Exception:
                pass
        for name, mime in _REPR_METHODS:
            if mime in bundle:
                continue
            method = getattr(value, name, None)
            if not callable(method):
                continue
            try:
                produced = method()
            except Exception:
                continue
            if isinstance(produced, tuple):
                produced = produced[0]
            if produced is not None:
                bundle[mime] = produced
        if _is_figure(value) and "image/png" not in bundle:
            try:
                bundle["image/png"] = _figure_png(value)
            except Exception:
                pass
    if "text/plain" not in bundle:
        try:
            bundle["text/plain"] = repr(value)
        except Exception as exc:
            bundle["text/plain"] = f"<unrepresentable {type(value).__name__}: {exc}>"
    return bundle


def _quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0]


def e2b_result(bundle: dict[str, Any], is_main: bool) -> dict[str, Any]:
    """A display bundle mapped to the keys of E2B's ``result`` line."""
    result: dict[str, Any] = {"is_main_result": is_main}
    extra: dict[str, Any] = {}
    for mime, data in bundle.items():
        if isinstance(data, bytes | bytearray):
            data = base64.b64encode(data).decode()
        key = _MIME_TO_KEY.get(mime)
        if key is None:
            extra[mime] = data
            continue
        # As E2B's server does: one layer of surrounding quotes is stripped from text.
        if key == "text" and isinstance(data, str) and _quoted(data):
            data = data[1:-1]
        result[key] = data
    if extra:
        result["extra"] = extra
    return result


# --------------------------------------------------------------------------------------------
# Python


class PythonRunner:
    """Runs cells in one persistent ``__main__`` namespace, like a notebook kernel."""

    def __init__(self, control: Control) -> None:
        self._control = control
        self.module = types.ModuleType("__main__")
        self.module.__dict__["__builtins__"] = builtins
        self.module.__dict__["display"] = self.display
        sys.modules["__main__"] = self.module
        self.executing = False
        self._loop: Any = None

    def display(self, *values: Any) -> None:
        """Show values as display results (IPython's ``display``)."""
        for value in values:
            self._control.send("result", e2b_result(mime_bundle(value), is_main=False))

    def _evaluate(self, code: types.CodeType) -> Any:
        result = eval(code, self.module.__dict__)
        if code.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
            if self._loop is None:
                import asyncio

                self._loop = asyncio.new_event_loop()
            result = self._loop.run_until_complete(result)
        return result

    def execute(self, code: str, count: int) -> None:
        """Run one cell; send its main result or its error."""
        filename = f"<cell-{count}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        try:
            self.executing = True
            tree = ast.parse(code, filename, "exec")
            last: ast.Expression | None = None
            final = tree.body[-1] if tree.body else None
            if isinstance(final, ast.Expr):
                tree.body.pop()
                last = ast.Expression(final.value)
            self._evaluate(compile(tree, filename, "exec", flags=flags))
            value = None
            if last is not None:
                value = self._evaluate(compile(last, filename, "eval", flags=flags))
        except BaseException as exc:  # the user's exception is the result, whatever it is
            self.executing = False
            self._control.send("error", _describe_error(exc))
            return
        finally:
            self.executing = False
        if value is not None:
            self.module.__dict__["_"] = value
            if _is_figure(value):
                _close_figure(value)
            self._control.send("result", e2b_result(mime_bundle(value), is_main=True))
        self._flush_figures()

    def _flush_figures(self) -> None:
        """Show matplotlib figures left open by the cell, as the inline backend does."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        try:
            for number in pyplot.get_fignums():
                figure = pyplot.figure(number)
                self.display(figure)
            pyplot.close("all")
        except Exception as exc:
            self._control.send("stderr", {"text": f"matplotlib: {exc}\n", "timestamp": _now()})


def _close_figure(figure: Any) -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        try:
            pyplot.close(figure)
        except Exception:
            pass


def _describe_error(exc: BaseException) -> dict[str, str]:
    """Name, value and traceback of a cell's exception, without the kernel's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == KERNEL_FILE:
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb)
    return {"name": type(exc).__name__, "value": str(exc), "traceback": "".join(lines)}


# --------------------------------------------------------------------------------------------
# Bash

# Reads cell file names from the command pipe, sources each, reports its status on the status
# pipe. SIGINT abandons the running cell (the trap returns from `source`) and leaves the shell
# alive; a `read` that a signal interrupted is simply retried.
_BASH_DRIVER = r"""
trap 'return 130 2>/dev/null' INT
while true; do
  IFS= read -r __cube_cell <&{cmd} || {{ __cube_s=$?; [ "$__cube_s" -gt 128 ] && continue; break; }}
  source "$__cube_cell"
  printf '%s\n' "$?" >&{status}
done
"""


class BashRunner:
    """Runs cells in one persistent bash, so ``cd``, variables and functions carry over."""

    def __init__(self, control: Control) -> None:
        import subprocess

        self._control = control
        self._dir = self.scratch = tempfile.mkdtemp(prefix="cube-bash-")
        self._cmd_r, self._cmd_w = os.pipe()
        self._status_r, status_w = os.pipe()
        self._shell = subprocess.Popen(
            [
                "bash",
                "--noprofile",
                "--norc",
                "-c",
                _BASH_DRIVER.format(cmd=self._cmd_r, status=status_w),
            ],
            stdin=subprocess.DEVNULL,
            pass_fds=(self._cmd_r, status_w),
        )
        os.close(self._cmd_r)
        os.close(status_w)
        self._status = os.fdopen(self._status_r, "rb")
        self.executing = False

    def execute(self, code: str, count: int, envs: dict[str, str]) -> bool:
        """Source one cell in the shell; a non-zero status becomes an error.

        Returns False when the cell ended the shell (``exit``): the kernel must stop then.
        """
        cell = os.path.join(self._dir, f"cell-{count}.sh")
        with open(cell, "w") as f:
            f.write(code)
            f.write("\n")
        if envs:
            wrapper = os.path.join(self._dir, f"cell-{count}-env.sh")
            assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in envs.items())
            with open(wrapper, "w") as f:
                f.write(f"{assignments} source {shlex.quote(cell)}\n")
            cell = wrapper
        os.write(self._cmd_w, cell.encode() + b"\n")
        self.executing = True
        try:
            line = self._status.readline()
        finally:
            self.executing = False
        for path in {cell, os.path.join(self._dir, f"cell-{count}.sh")}:
            try:
                os.unlink(path)
            except OSError:
                pass
        if not line:
            status = self._shell.wait()
            self._control.send(
                "error",
                {"name": "ShellExited", "value": f"bash exited with status {status}", "traceback": ""},
            )
            return False
        status = int(line)
        if status:
            self._control.send(
                "error", {"name": "Error", "value": f"exit status {status}", "traceback": ""}
            )
        return True

    def close(self) -> None:
        """Remove the cell directory."""
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------


def _text_stream(fd: int, mode: str, closefd: bool = False) -> io.TextIOWrapper:
    """A line-buffered UTF-8 text stream on ``fd`` (output of a cell streams line by line)."""
    raw = io.FileIO(fd, mode, closefd=closefd)
    return io.TextIOWrapper(
        raw, encoding="utf-8", errors="backslashreplace", line_buffering=True, write_through=False
    )


def main(argv: list[str]) -> int:
    """Run the kernel until envd closes the control pipe."""
    language, fd_in, fd_out = argv[0], int(argv[1]), int(argv[2])
    os.environ.setdefault("MPLBACKEND", "Agg")
    control = Control(fd_in, fd_out)
    sys.stdin = _text_stream(os.open(os.devnull, os.O_RDONLY), "r", closefd=True)
    forwarder = OutputForwarder(control)
    sys.stdout = _text_stream(1, "w")
    sys.stderr = _text_stream(2, "w")
    forwarder.start()
    runner: PythonRunner | BashRunner
    if language == "bash":
        runner = BashRunner(control)
        signal.signal(signal.SIGINT, lambda signum, frame: None)
    else:
        runner = PythonRunner(control)
        python_runner = runner

        def interrupt(signum: int, frame: Any) -> None:
            if python_runner.executing:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupt)
    scratch = runner.scratch if isinstance(runner, BashRunner) else None
    control.send("ready", {"pid": os.getpid(), "language": language, "scratch": scratch})
    count = 0
    alive = True
    try:
        while alive and (request := control.receive()) is not None:
            if request.get("op") != "execute":
                continue
            count += 1
            envs: dict[str, str] = request.get("envs") or {}
            if isinstance(runner, BashRunner):
                alive = runner.execute(request["code"], count, envs)
            else:
                saved = {key: os.environ.get(key) for key in envs}
                os.environ.update(envs)
                try:
                    runner.execute(request["code"], count)
                finally:
                    for key, old in saved.items():
                        if old is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = old
            sys.stdout.flush()
            sys.stderr.flush()
            forwarder.settle()
            control.send("done", {"execution_count": count})
    finally:
        if isinstance(runner, BashRunner):
            runner.close()
    return 0


if __name__ == "__cube_kernel__":
    # argv is [-c, this file, language, fd in, fd out]; user code sees an empty argv.
    _arguments, sys.argv = sys.argv[2:], [""]
    raise SystemExit(main(_arguments))
