"""The ledger: writes in order behind the controller's back; nothing is reported durable
before the store took it; a refused write ends the term; an unavailable store is retried
while leadership lasts."""

import asyncio

import pytest

from xcha.controller.ledger import Ledger
from xcha.controller.store import (
    Conflict,
    Deposed,
    EventRecord,
    GroupRecord,
    MemberRecord,
    Snapshot,
    StoreUnavailable,
)
from xcha.controller.views import GroupState


class RecordingStore:
    """A store double: records each write; `gate` holds writes; `failures` raise in turn."""

    def __init__(self) -> None:
        self.writes: list[tuple[object, ...]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[Exception] = []

    async def _write(self, *what: object) -> None:
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.writes.append(what)

    async def set_epoch(self, expected: int, epoch: int) -> None:
        await self._write("epoch", expected, epoch)

    async def set_cluster_paused(self, paused: bool) -> None:
        await self._write("paused", paused)

    async def save_group(self, group: GroupRecord, expected: GroupRecord | None) -> None:
        await self._write("group", group.state, expected.state if expected else None)

    async def save_member(self, member: MemberRecord) -> None:
        await self._write("member", member.name)

    async def add_event(
        self, datanode: str, kind: str, epoch: int, message: str, details: dict[str, object]
    ) -> EventRecord:
        await self._write("event", message)
        return EventRecord(len(self.writes), 0.0, datanode, kind, epoch, message, details)


async def test_writes_go_in_order_each_expecting_the_one_before() -> None:
    store = RecordingStore()
    ledger = Ledger(store, Snapshot(epoch=3, groups={"dn1": GroupRecord("dn1")}))  # type: ignore[arg-type]
    seen: list[str] = []
    ledger.subscribers.append(lambda event: seen.append(event.message))
    store.gate.clear()
    ledger.set_epoch(4)
    ledger.save_group(GroupRecord("dn1", GroupState.SINGLE, "dn1a"))
    ledger.save_group(GroupRecord("dn1", GroupState.PROTECTED, "dn1a"))
    ledger.save_group(GroupRecord("dn1", GroupState.PROTECTED, "dn1a"))  # unchanged: not written
    ledger.add_event("dn1", "state", 4, "protected", None)
    await asyncio.sleep(0.01)
    assert (ledger.epoch, ledger.groups["dn1"].state, seen) == (3, GroupState.INITIALIZING, []), (
        "nothing is durable before the store took it"
    )
    store.gate.set()
    await ledger.flush()
    assert store.writes == [
        ("epoch", 3, 4),
        ("group", GroupState.SINGLE, GroupState.INITIALIZING),
        ("group", GroupState.PROTECTED, GroupState.SINGLE),
        ("event", "protected"),
    ]
    assert (ledger.epoch, ledger.groups["dn1"].state, seen) == (4, GroupState.PROTECTED, ["protected"])
    await ledger.close()


async def test_a_refused_write_ends_the_term_and_nothing_after_it_is_written() -> None:
    store = RecordingStore()
    ledger = Ledger(store, Snapshot())  # type: ignore[arg-type]
    ended: list[Deposed] = []
    ledger.on_deposed = ended.append
    store.failures = [Conflict("epoch is 9, not 0")]
    ledger.set_epoch(1)
    ledger.save_member(MemberRecord("dn1", "dn1a"))
    with pytest.raises(Deposed, match="epoch is 9"):
        await ledger.flush()
    assert store.writes == [] and len(ended) == 1
    ledger.save_member(MemberRecord("dn1", "dn1b"))  # after the end: dropped
    with pytest.raises(Deposed):
        await ledger.flush()
    assert store.writes == []
    await ledger.close()


async def test_an_unavailable_store_is_retried_while_leading_and_not_after() -> None:
    store = RecordingStore()
    leading = [True]
    ledger = Ledger(store, Snapshot(), leading=lambda: leading[0])  # type: ignore[arg-type]
    store.failures = [StoreUnavailable("no quorum"), StoreUnavailable("no quorum")]
    ledger.set_cluster_paused(True)
    await asyncio.wait_for(ledger.flush(), 5)
    assert store.writes == [("paused", True)]
    store.failures = [StoreUnavailable("no quorum")] * 100
    ledger.set_cluster_paused(False)
    await asyncio.sleep(0.25)
    leading[0] = False  # the lease lapsed meanwhile
    with pytest.raises(Deposed, match="leadership lapsed"):
        await asyncio.wait_for(ledger.flush(), 5)
    await ledger.close()
