"""The controller's writes to its store, in order, behind its back.

Deciding must not wait for a consensus round, but nothing a decision implies may reach the
outside before it is durable. So the controller changes its working records at once and queues
the writes; the ledger writes them one after the other, and every message to an agent or a
coordinator first awaits `flush()`. Heartbeat replies are built from the durable copies
(`epoch`, `groups`), never from a decision not yet written.

A write the store refuses (`Deposed`, `Conflict`) or cannot make before leadership lapses ends
this controller's term: `flush()` raises `Deposed` from then on and `on_deposed` is called.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from xcha.controller.store import (
    Conflict,
    Deposed,
    EventRecord,
    GroupRecord,
    MemberRecord,
    Snapshot,
    Store,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

RETRY_DELAY = 0.1  # seconds between attempts of a write the store could not take


@dataclass(frozen=True)
class _Write:
    what: str
    run: Callable[[], Awaitable[object]]
    done: Callable[[object], None]


class Ledger:
    def __init__(
        self,
        store: Store,
        snapshot: Snapshot,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.leading = leading
        self.epoch = snapshot.epoch  # durable
        self.groups: dict[str, GroupRecord] = dict(snapshot.groups)  # durable
        self._queued_epoch = snapshot.epoch
        self._queued_groups: dict[str, GroupRecord | None] = dict(snapshot.groups)
        self._queue: deque[_Write] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.failure: Deposed | None = None
        self.subscribers: list[Callable[[EventRecord], None]] = []
        self.on_deposed: Callable[[Deposed], None] = lambda error: None
        self._writer: asyncio.Task[None] | None = None

    # ---- queueing (synchronous: the controller never waits to decide) -----------------------

    def _put(self, what: str, run: Callable[[], Awaitable[object]], done: Callable[[object], None]) -> None:
        if self.failure is not None:
            return
        self._queue.append(_Write(what, run, done))
        self._idle.clear()
        self._wake.set()
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # made outside the event loop: the first flush starts the writer
            self._writer = asyncio.ensure_future(self._write_all())

    def set_epoch(self, epoch: int) -> None:
        expected, self._queued_epoch = self._queued_epoch, epoch

        def done(_: object) -> None:
            self.epoch = epoch

        self._put(f"epoch {epoch}", lambda: self.store.set_epoch(expected, epoch), done)

    def save_group(self, group: GroupRecord) -> None:
        expected = self._queued_groups.get(group.name)
        if expected == group:
            return
        self._queued_groups[group.name] = group

        def done(_: object) -> None:
            self.groups[group.name] = group

        self._put(f"group {group.name}", lambda: self.store.save_group(group, expected), done)

    def save_member(self, member: MemberRecord) -> None:
        self._put(f"member {member.name}", lambda: self.store.save_member(member), lambda _: None)

    def set_cluster_paused(self, paused: bool) -> None:
        self._put("pause", lambda: self.store.set_cluster_paused(paused), lambda _: None)

    def add_event(
        self, datanode: str, kind: str, epoch: int, message: str, details: dict[str, object] | None
    ) -> None:
        def done(record: object) -> None:
            assert isinstance(record, EventRecord)
            for subscriber in self.subscribers:
                subscriber(record)

        self._put(
            f"event {kind}", lambda: self.store.add_event(datanode, kind, epoch, message, details or {}), done
        )

    # ---- writing ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Return once every queued write is durable; raise Deposed when this term is over."""
        self._start_writer()
        await self._idle.wait()
        if self.failure is not None:
            raise self.failure

    async def _write_all(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                write = self._queue[0]
                try:
                    result = await self._write(write)
                except Deposed as error:
                    self._fail(error)
                    return
                self._queue.popleft()
                write.done(result)
            self._idle.set()

    async def _write(self, write: _Write) -> object:
        while True:
            if not self.leading():
                raise Deposed(f"leadership lapsed before {write.what} was written")
            try:
                return await write.run()
            except Conflict as error:
                raise Deposed(f"{write.what}: {error}") from error
            except StoreUnavailable as error:
                log.warning("store unavailable writing %s: %s (retrying)", write.what, error)
                await asyncio.sleep(RETRY_DELAY)
            except Deposed:
                raise
            except Exception as error:  # a store that fails otherwise cannot be trusted either
                raise Deposed(f"{write.what} failed: {error}") from error

    def _fail(self, error: Deposed) -> None:
        log.error("controller term over: %s", error)
        self.failure = error
        self._queue.clear()
        self._idle.set()
        self.on_deposed(error)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
