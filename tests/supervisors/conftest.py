"""Every test of this folder runs under the deadlock watchdog (see watchdog_kit)."""

from watchdog_kit import watchdog_hook

pytest_runtest_call = watchdog_hook("test_sup_")
