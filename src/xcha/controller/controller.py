"""The controller of one term: hears the agents, asks the state machine, does what it decides.

`Controller` is assembled from one module per concern (see `core`). It exists while this
process leads: `Controller.open` reads the store and starts a new epoch; the node
(`controller/node.py`) stops it when leadership is lost.
"""

import time
from collections.abc import Callable

from xcha.controller.agents import Agents
from xcha.controller.commands import Commands
from xcha.controller.config import ControllerConfig
from xcha.controller.routing import Router
from xcha.controller.status import Reporting
from xcha.controller.store import Store


class Controller(Commands, Reporting):
    @classmethod
    async def open(
        cls,
        config: ControllerConfig,
        store: Store,
        router: Router,
        agents: Agents,
        clock: Callable[[], float] = time.monotonic,
        leading: Callable[[], bool] = lambda: True,
    ) -> "Controller":
        """A controller starting from what the store holds (read linearizably)."""
        return cls(config, store, await store.load(), router, agents, clock, leading)


__all__ = ["Controller"]
