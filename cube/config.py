"""Node configuration: a TOML file, then ``CUBE_*`` environment variables, then flags.

Later sources override earlier ones. Everything a node writes lives under ``state_dir``
(``CUBE_STATE_DIR``), so two nodes with two state dirs run side by side without touching
each other's journal, sockets, images or kernel resources.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["ConfigError", "NodeConfig", "PoolConfig", "TemplateConfig", "load_config"]

DRIVERS = ("auto", "process", "ns", "qemu", "jail", "bhyve")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the setting and its source."""


class TemplateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Resources of the sandboxes made from one template."""

    cpus: float = 1.0
    memory_mb: int = 512
    disk_mb: int = 1024
    pids_max: int = 256
    network: bool = True
    code_interpreter: bool = False


class PoolConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How many warm sandboxes to keep for a template, and how many to start at once."""

    size: int = 2
    concurrency: int = 2


def _default_templates() -> dict[str, TemplateConfig]:
    return {
        "base": TemplateConfig(),
        "code-interpreter-v1": TemplateConfig(memory_mb=1024, code_interpreter=True),
    }


def _default_pools() -> dict[str, PoolConfig]:
    return {"base": PoolConfig(), "code-interpreter-v1": PoolConfig(size=1)}


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a node needs to run."""

    state_dir: str = "/var/lib/cube"
    driver: str = "auto"
    host: str = "127.0.0.1"
    port: int = 3000
    api_keys: list[str] = []
    default_timeout: float = 300.0
    max_timeout: float = 24 * 3600.0
    max_sandboxes: int = 200
    templates: dict[str, TemplateConfig] = msgspec.field(default_factory=_default_templates)
    pools: dict[str, PoolConfig] = msgspec.field(default_factory=_default_pools)

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise ConfigError(f"driver must be one of {', '.join(DRIVERS)}, not {self.driver!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be 0-65535 (0: any free port), not {self.port}")
        for name in self.pools:
            if name not in self.templates:
                raise ConfigError(f"pool {name!r} names an unknown template")
        for name, pool in self.pools.items():
            if pool.size < 0 or pool.concurrency < 1:
                raise ConfigError(f"pool {name!r}: size must be >= 0 and concurrency >= 1")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def tag(self) -> str:
        """A short name for this node's host-wide resources (nft tables, bridges, cgroups),
        derived from the state dir so that two nodes never share them."""
        import hashlib

        return "n" + hashlib.sha256(os.path.realpath(self.state_dir).encode()).hexdigest()[:6]

    @property
    def bridge(self) -> str:
        """This node's sandbox bridge: one per node, so that nodes never filter each other."""
        return f"cb{self.tag}"

    @property
    def subnet(self) -> str:
        """This node's sandbox subnet, a /16 of 10.100-10.227 chosen by the tag."""
        return f"10.{100 + int(self.tag[1:], 16) % 128}.0.0/16"

    def resolved_driver(self) -> str:
        """The driver to use: ``auto`` means ``ns`` as root on Linux, else ``process``."""
        if self.driver != "auto":
            return self.driver
        if sys.platform.startswith("linux") and os.geteuid() == 0:
            return "ns"
        return "process"


def default_state_dir() -> str:
    """``/var/lib/cube`` for root, else ``~/.local/state/cube``."""
    if os.geteuid() == 0:
        return "/var/lib/cube"
    return str(Path.home() / ".local" / "state" / "cube")


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    simple = {
        "CUBE_STATE_DIR": ("state_dir", str),
        "CUBE_DRIVER": ("driver", str),
        "CUBE_HOST": ("host", str),
        "CUBE_PORT": ("port", int),
        "CUBE_DEFAULT_TIMEOUT": ("default_timeout", float),
        "CUBE_MAX_SANDBOXES": ("max_sandboxes", int),
    }
    for var, (key, kind) in simple.items():
        if var in env and env[var] != "":
            try:
                settings[key] = kind(env[var])
            except ValueError as exc:
                raise ConfigError(f"{var}={env[var]!r}: {exc}") from exc
    if env.get("CUBE_API_KEY"):
        settings["api_keys"] = [k.strip() for k in env["CUBE_API_KEY"].split(",") if k.strip()]
    return settings


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build the configuration from a TOML file, ``CUBE_*`` variables and ``overrides``.

    ``path`` defaults to ``CUBE_CONFIG``, then ``<state_dir>/config.toml`` if it exists.
    """
    env = os.environ if env is None else env
    settings: dict[str, Any] = {"state_dir": default_state_dir()}
    from_env = _from_env(env)
    state_dir = (overrides or {}).get("state_dir") or from_env.get("state_dir") or settings["state_dir"]
    file = Path(path) if path else Path(env["CUBE_CONFIG"]) if env.get("CUBE_CONFIG") else None
    if file is None and (Path(state_dir) / "config.toml").exists():
        file = Path(state_dir) / "config.toml"
    if file is not None:
        try:
            settings.update(tomllib.loads(file.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{file}: {exc}") from exc
    settings.update(from_env)
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(settings, NodeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
