"""envd's command line: cheap to ask for help, strict about what it is given."""

from __future__ import annotations

import subprocess
import sys

from envd_kit import ROOT


def envd(*args: str, **options) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *options.pop("python_flags", ()), "-m", "guest.envd", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30, **options,
    )


def test_help_lists_every_transport():
    done = envd("--help")
    assert done.returncode == 0
    for flag in ("--listen", "--device", "--vsock", "--stdio"):
        assert flag in done.stdout


def test_help_does_not_load_trio_or_the_services():
    done = envd("--help", python_flags=("-X", "importtime"))
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "trio" not in imported and "guest.agent" not in imported


def test_a_transport_is_required():
    done = envd()
    assert done.returncode == 2 and "one of the arguments" in done.stderr


def test_listen_takes_only_unix_addresses():
    done = envd("--listen", "tcp:1.2.3.4:5")
    assert done.returncode == 2 and "unix:PATH" in done.stderr


def test_an_env_var_must_be_key_equals_value():
    done = envd("--stdio", "--env", "NOEQUALS")
    assert done.returncode == 2 and "KEY=VALUE" in done.stderr
