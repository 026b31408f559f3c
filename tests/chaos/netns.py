"""Hosts for partition tests: one network namespace per host, joined by a bridge that lives
in a namespace of its own. Addresses come from 192.0.2.0/24 and exist only inside these
namespaces: nothing is added to the machine's own network namespace (whose real network
may use the same range), so no test packet can leave the machine. The test process reaches
PostgreSQL through Unix sockets and the controller by running the CLI inside its namespace.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass, field


class NamespacesUnavailable(Exception):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass
class Network:
    prefix: str
    hosts: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (address, namespace)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def create(self, addresses: dict[str, str]) -> dict[str, tuple[str, str]]:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise NamespacesUnavailable("network namespaces need root and iproute2's `ip`")
        probe = _ip("netns", "add", self.switch, check=False)
        if probe.returncode != 0:
            raise NamespacesUnavailable(f"cannot create a network namespace: {probe.stderr.strip()}")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, (name, address) in enumerate(addresses.items()):
            if not address.startswith("192.0.2."):
                raise ValueError(f"{address}: partition tests use 192.0.2.0/24 only")
            namespace = f"{self.prefix}-{name}"
            inner, outer = f"{self.prefix}i{index}", f"{self.prefix}o{index}"
            _ip("netns", "add", namespace)
            self.hosts[name] = (address, namespace)
            _ip(
                "-n",
                namespace,
                "link",
                "add",
                inner,
                "type",
                "veth",
                "peer",
                "name",
                outer,
                "netns",
                self.switch,
            )
            _ip("-n", namespace, "link", "set", inner, "name", "eth0")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "set", outer, "master", "br0")
            _ip("-n", self.switch, "link", "set", outer, "up")
        return dict(self.hosts)

    def cut(self, name: str) -> None:
        """The host loses its network entirely."""
        _ip("-n", self.hosts[name][1], "link", "set", "eth0", "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.hosts[name][1], "link", "set", "eth0", "up")

    def blackhole(self, name: str, towards: str) -> None:
        """Packets from `name` to `towards` are dropped (one direction)."""
        _ip("-n", self.hosts[name][1], "route", "add", "blackhole", f"{self.hosts[towards][0]}/32")

    def unblackhole(self, name: str, towards: str) -> None:
        _ip("-n", self.hosts[name][1], "route", "del", "blackhole", f"{self.hosts[towards][0]}/32")

    def run(self, name: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.hosts[name][1], *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def destroy(self) -> None:
        """Deleting a namespace deletes its interfaces (the veth pairs with them)."""
        for _, namespace in self.hosts.values():
            _ip("netns", "del", namespace, check=False)
        _ip("netns", "del", self.switch, check=False)
        self.hosts.clear()
