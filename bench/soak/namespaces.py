"""Entering the benchmark's own network namespaces (the client side of the partition fault)."""

import contextlib
import ctypes
import os
import secrets
from collections.abc import Sequence

from bench.soak.settings import CLIENT_ADDRESS, CLONE_NEWNET, CONTROLLER_ADDRESS
from tests.chaos.netns import Network


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


class Namespaces:
    """tests/chaos/netns.py's hosts for the controller and every member, and one more, "client",
    that this process (its main thread, and every thread and process it starts afterwards: the
    writers, the coordinator, the supervisor) enters: so the coordinator reaches the datanodes
    on 192.0.2.0/24 while nothing is added to the machine's own network namespace."""

    def __init__(self) -> None:
        self.network = Network(f"xs{secrets.token_hex(3)}")
        self._home: int | None = None

    def create(self, members: Sequence[Sequence[str]]) -> dict[str, tuple[str, str]]:
        addresses = {"client": CLIENT_ADDRESS, "controller": CONTROLLER_ADDRESS}
        for index, group in enumerate(members):
            for position, member in enumerate(group):
                addresses[member] = f"192.0.2.{110 + 10 * index + position + 1}"
        try:
            hosts = self.network.create(addresses)
        except BaseException:
            self.network.destroy()
            raise
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        client = os.open(f"/var/run/netns/{hosts['client'][1]}", os.O_RDONLY)
        try:
            _setns(client)
            self._home = home
        except OSError:
            os.close(home)
            self.network.destroy()
            raise
        finally:
            os.close(client)
        return {name: host for name, host in hosts.items() if name != "client"}

    def destroy(self) -> None:
        """Back to the machine's namespace, then every namespace made here removed."""
        if self._home is not None:
            with contextlib.suppress(OSError):
                _setns(self._home)
            os.close(self._home)
            self._home = None
        self.network.destroy()


# ---- records ---------------------------------------------------------------------------------------
