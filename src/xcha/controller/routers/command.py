"""The `command` router: an operator's executable re-points whatever clients use (a virtual
IP, pgbouncer, DNS, ...). It gets the datanode, the old and new host/port and the epoch in
its environment; exit status 0 acknowledges, anything else is retried."""

import os

from xcha.controller.routers.process import run_command
from xcha.names import Endpoint


class CommandTarget:
    def __init__(self, argv: tuple[str, ...], timeout: float) -> None:
        self.name = os.path.basename(argv[0])
        self.argv = argv
        self.attempt_timeout = timeout

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
        text = await run_command(self.argv, self.attempt_timeout, env)
        return f"{self.argv[0]} acknowledged" + (f": {text.splitlines()[-1]}" if text else "")

    async def close(self) -> None:
        return None
