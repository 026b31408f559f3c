"""One controller process among one or several: it campaigns for leadership; while it leads it
runs a `Controller` (a new epoch each term), otherwise it follows: it answers status questions
from the store and tells agents and operators who leads, and never decides.

A term ends when leadership lapses by this process's own clock, a fenced write is refused, or
the process stops. Losing leadership or the store only stops decisions: nothing here demotes or
stops PostgreSQL.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from xcha.controller.agents import Agents, GrpcAgents
from xcha.controller.config import ControllerConfig
from xcha.controller.controller import Controller
from xcha.controller.routers import build_router
from xcha.controller.routing import Router
from xcha.controller.store import LeaderInfo, Leadership, Store, StoreError

log = logging.getLogger(__name__)

LEADER_POLL = 0.2  # seconds between a follower's reads of who leads (agents are redirected by it)


class ControllerNode:
    def __init__(
        self,
        config: ControllerConfig,
        store: Store,
        leadership: Leadership,
        router: Callable[[], Router] | None = None,
        agents: Callable[[], Agents] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.leadership = leadership
        self.build_router = router or (lambda: build_router(config))
        self.build_agents = agents or (lambda: GrpcAgents(config.tls))
        self.clock = clock
        self.controller: Controller | None = None
        self.leader_info: LeaderInfo | None = None
        # Called with each term's controller as it starts (events, metrics subscribe here),
        # and when a term ends (agents' Heartbeats streams to this process are ended then).
        self.term_listeners: list[Callable[[Controller], None]] = []
        self.term_end_listeners: list[Callable[[], None]] = []
        self._stopping = asyncio.Event()

    @property
    def name(self) -> str:
        return self.config.name

    def leading(self) -> Controller | None:
        """The controller of this term while this process leads by its own clock, else None."""
        controller = self.controller
        if controller is not None and self.leadership.leading() and controller.ledger.failure is None:
            return controller
        return None

    async def run(self) -> None:
        watcher = asyncio.ensure_future(self._watch_leader())
        try:
            while not self._stopping.is_set():
                await self._term()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _term(self) -> None:
        campaign = asyncio.ensure_future(self.leadership.campaign())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({campaign, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not campaign.done():
            campaign.cancel()
            await asyncio.gather(campaign, return_exceptions=True)
            return
        try:
            token = campaign.result()
        except (StoreError, OSError) as error:
            log.warning("campaign failed: %s (trying again)", error)
            await asyncio.sleep(1.0)
            return
        log.info("%s leads (term %d)", self.name, token)
        try:
            controller = await Controller.open(
                self.config,
                self.store,
                self.build_router(),
                self.build_agents(),
                self.clock,
                self.leadership.leading,
            )
        except (StoreError, OSError) as error:
            log.warning("%s could not read the store as leader: %s", self.name, error)
            await self.leadership.resign()
            return
        deposed = asyncio.Event()
        controller.ledger.on_deposed = lambda error: deposed.set()
        self.controller = controller
        for listener in self.term_listeners:
            listener(controller)
        self.leader_info = LeaderInfo(self.name, self.config.advertise, token)
        ends = [
            asyncio.ensure_future(controller.run()),
            asyncio.ensure_future(self.leadership.lost()),
            asyncio.ensure_future(deposed.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in ends:
                task.cancel()
            await asyncio.gather(*ends, return_exceptions=True)
            self.controller = None
            for ended in self.term_end_listeners:
                ended()
            await controller.stop()
            if self._stopping.is_set():
                with contextlib.suppress(StoreError, OSError):
                    await self.leadership.resign()
            else:
                log.warning("%s no longer leads (term %d): decisions stop here", self.name, token)
                await self.leadership.resign()

    async def _watch_leader(self) -> None:
        """Who leads, for a follower's answers (read from the store once a second)."""
        while True:
            if self.leading() is None:
                with contextlib.suppress(StoreError, OSError):
                    self.leader_info = await self.leadership.leader()
            await asyncio.sleep(LEADER_POLL)

    async def stop(self) -> None:
        self._stopping.set()
