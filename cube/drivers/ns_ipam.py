"""Sandbox addresses on the host bridge, leased through files so that nodes never collide.

Every node on a host shares one bridge (``cubebr0``) and one subnet (10.99.0.0/16), but each
node has its own state directory and knows nothing of the others. A lease is therefore a file
in a host-wide directory (``/run/cube-ipam/<address>``), created with ``O_EXCL`` so exactly one
node wins an address, holding its owner (``<node tag> <slot id>``). ``/run`` is a tmpfs, so
leases vanish with the veths they describe when the host reboots.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os

from cube.drivers.base import DriverError

__all__ = ["AddressPool"]


class AddressPool:
    """The addresses of one subnet, minus the network, broadcast and gateway addresses."""

    def __init__(self, directory: str, gateway: str, prefix_len: int) -> None:
        self.directory = directory
        self.gateway = ipaddress.IPv4Address(gateway)
        self.network = ipaddress.IPv4Network(f"{gateway}/{prefix_len}", strict=False)
        self.prefix_len = prefix_len

    def _path(self, address: str) -> str:
        return os.path.join(self.directory, address)

    def acquire(self, owner: str) -> str:
        """Lease a free address to ``owner``; the same owner tends to get the same address.

        Probing starts at a hash of the owner, so concurrent nodes rarely contend.
        """
        os.makedirs(self.directory, mode=0o755, exist_ok=True)
        size = self.network.num_addresses
        start = int.from_bytes(hashlib.sha256(owner.encode()).digest()[:4], "big") % size
        base = int(self.network.network_address)
        for step in range(size):
            candidate = ipaddress.IPv4Address(base + (start + step) % size)
            if candidate in (
                self.network.network_address,
                self.network.broadcast_address,
                self.gateway,
            ):
                continue
            address = str(candidate)
            try:
                fd = os.open(self._path(address), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            try:
                os.write(fd, f"{owner}\n".encode())
            finally:
                os.close(fd)
            return address
        raise DriverError(f"address pool {self.network}: no free address")

    def owner(self, address: str) -> str | None:
        """Who holds ``address``, or None."""
        try:
            with open(self._path(address)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def release(self, address: str, owner: str) -> bool:
        """Give ``address`` back if ``owner`` holds it; False if it did not."""
        if self.owner(address) != owner:
            return False
        try:
            os.unlink(self._path(address))
        except FileNotFoundError:
            return False
        return True

    def leases(self, owner_prefix: str) -> dict[str, str]:
        """Address -> owner of every lease whose owner starts with ``owner_prefix``."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}
        found = {}
        for name in names:
            holder = self.owner(name)
            if holder is not None and holder.startswith(owner_prefix):
                found[name] = holder
        return found
