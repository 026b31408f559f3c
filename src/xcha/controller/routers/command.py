"""The `command` router: an operator's executable re-points whatever clients use (a virtual
IP, pgbouncer, DNS, ...). It gets the datanode, the old and new host/port and the epoch in
its environment; exit status 0 acknowledges, anything else is retried."""

import os
from dataclasses import dataclass

from xcha.config import Section
from xcha.controller.routers.base import RouterConfig, settings_of
from xcha.controller.routers.process import run_command
from xcha.controller.routing import Target
from xcha.names import Endpoint

KIND = "command"


@dataclass(frozen=True)
class Settings:
    command: tuple[str, ...]  # argv


def parse(section: Section) -> Settings:
    command = section.strings("command", [])
    if not command:
        section.problems.add(
            section.key("command"), 'router kind command needs command = ["/path/to/program", ...]'
        )
    return Settings(command or ())


def build(router: RouterConfig, datanodes: tuple[str, ...]) -> list[Target]:
    return [CommandTarget(settings_of(router, Settings).command, router.timeout)]


class CommandTarget:
    def __init__(self, argv: tuple[str, ...], timeout: float) -> None:
        self.name = os.path.basename(argv[0])
        self.argv = argv
        self.timeout = timeout

    @property
    def attempt_timeout(self) -> float:
        """The command may take `timeout`; then it is killed (with whatever it started)."""
        return self.timeout

    async def apply(self, datanode: str, new: Endpoint, old: Endpoint | None, epoch: int) -> str:
        env = {
            **os.environ,
            "XCHA_DATANODE": datanode,
            "XCHA_NEW_HOST": new.host,
            "XCHA_NEW_PORT": str(new.port),
            "XCHA_OLD_HOST": old.host if old else "",
            "XCHA_OLD_PORT": str(old.port) if old else "",
            "XCHA_EPOCH": str(epoch),
        }
        text = await run_command(self.argv, self.timeout, env)
        return f"{self.argv[0]} acknowledged" + (f": {text.splitlines()[-1]}" if text else "")

    async def close(self) -> None:
        return None
