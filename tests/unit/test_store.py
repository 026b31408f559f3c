"""SqliteStore and SqliteLeadership: what the controller must not forget survives closing and
reopening the file; every write is fenced by the term and the epoch and group records are
compare-and-set."""

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from xcha.controller.store import (
    Conflict,
    Deposed,
    EventRecord,
    GroupRecord,
    MemberRecord,
    SqliteLeadership,
    SqliteStore,
)
from xcha.controller.views import GroupState, Request


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "controller.db"  # the directory is created by the store


@pytest.fixture
async def store(path: Path) -> AsyncIterator[SqliteStore]:
    leadership = SqliteLeadership(path, "c1", "127.0.0.1:7000")
    assert await leadership.campaign() == 1
    opened = SqliteStore(path, leadership)
    yield opened
    await opened.close()
    await leadership.close()


async def reopen(store: SqliteStore, path: Path) -> SqliteStore:
    await store.close()
    return SqliteStore(path, store.leadership)


async def test_a_new_store_starts_at_epoch_zero_unpaused_and_empty(store: SqliteStore, path: Path) -> None:
    assert path.is_file()
    snapshot = await store.load()
    assert (snapshot.epoch, snapshot.paused, snapshot.groups, snapshot.members) == (0, False, {}, ())
    assert await store.events() == []


async def test_the_epoch_is_compare_and_set_and_only_grows(store: SqliteStore, path: Path) -> None:
    await store.set_epoch(0, 3)
    await store.set_epoch(3, 7)
    with pytest.raises(Conflict, match="epoch is 7, not 3"):
        await store.set_epoch(3, 8)
    with pytest.raises(Conflict, match="the epoch only grows"):
        await store.set_epoch(7, 6)
    store = await reopen(store, path)
    try:
        assert (await store.load()).epoch == 7
    finally:
        await store.close()


async def test_groups_round_trip_across_reopen_and_are_compare_and_set(
    store: SqliteStore, path: Path
) -> None:
    first = GroupRecord(
        "dn1", GroupState.PROTECTED, "dn1a", None, ("dn1b",), request=Request("switchover", "dn1b")
    )
    await store.save_group(first, None)
    with pytest.raises(Conflict, match="changed under me"):
        await store.save_group(GroupRecord("dn1"), None)
    second = GroupRecord("dn1", GroupState.FAILOVER, "dn1a", "dn1b", ("dn1b",), promote_attempts=1)
    with pytest.raises(Conflict):
        await store.save_group(second, GroupRecord("dn1"))
    await store.save_group(second, first)
    store = await reopen(store, path)
    try:
        assert (await store.load()).groups == {"dn1": second}
    finally:
        await store.close()


async def test_a_row_written_before_newer_fields_loads_with_their_defaults(
    store: SqliteStore, path: Path
) -> None:
    reason = "switchover failed: dn2b did not catch up with dn2a within 10 s"
    old = {
        "name": "dn2",
        "state": "switchover",
        "master": "dn2a",
        "candidate": "dn2b",
        "sync_set": ["dn2b"],
        "paused": False,
        "promote_attempts": 0,
        "rerouted_epoch": 3,
        "request": None,
        "reason": reason,
    }
    store.db.execute("INSERT INTO groups VALUES (?, ?)", ("dn2", json.dumps(old)))
    assert (await store.load()).groups["dn2"] == GroupRecord(
        name="dn2",
        state=GroupState.SWITCHOVER,
        master="dn2a",
        candidate="dn2b",
        sync_set=("dn2b",),
        rerouted_epoch=3,
        reason=reason,
    )


async def test_members_round_trip_in_insertion_order(store: SqliteStore, path: Path) -> None:
    members = [MemberRecord("dn1", "dn1b", "async"), MemberRecord("dn1", "dn1a", host="h", port=5432)]
    for member in members:
        await store.save_member(member)
    await store.save_member(MemberRecord("dn1", "dn1b", "sync", removed=True))
    store = await reopen(store, path)
    try:
        assert list((await store.load()).members) == [
            MemberRecord("dn1", "dn1b", "sync", removed=True),
            members[1],
        ]
    finally:
        await store.close()


async def test_events_get_increasing_ids_and_are_filtered(store: SqliteStore) -> None:
    before = time.time()
    for index in range(150):
        await store.add_event(f"dn{index % 2 + 1}", "state", 1, f"event {index}", {"i": index})
    events = await store.events()
    assert len(events) == 100, "the default limit"
    assert [e.id for e in events] == list(range(1, 101))
    assert isinstance(events[0], EventRecord) and events[0].time >= before and events[0].details == {"i": 0}
    assert [e.id for e in await store.events(after_id=140, limit=5)] == [141, 142, 143, 144, 145]
    assert all(e.datanode == "dn2" for e in await store.events(datanode="dn2", limit=1000))
    assert [e.id for e in await store.events(limit=3, newest=True)] == [148, 149, 150]


async def test_a_deposed_term_writes_nothing(path: Path) -> None:
    """The lock released, another controller takes over: the term grows, and every write of
    the first (the epoch, a group, a member, an event) is refused."""
    first = SqliteLeadership(path, "c1", "127.0.0.1:7000")
    second = SqliteLeadership(path, "c2", "127.0.0.1:7001")
    assert await first.campaign() == 1
    old = SqliteStore(path, first)
    await old.save_group(GroupRecord("dn1", GroupState.PROTECTED, "dn1a"), None)
    await first.resign()
    assert not first.leading()
    assert await second.campaign() == 2
    assert await second.leader() == (await first.leader()) and (await second.leader()).name == "c2"  # type: ignore[union-attr]
    new = SqliteStore(path, second)
    await new.set_epoch(0, 5)
    for write in (
        old.set_epoch(5, 6),
        old.save_group(
            GroupRecord("dn1", GroupState.FAILOVER), GroupRecord("dn1", GroupState.PROTECTED, "dn1a")
        ),
        old.save_member(MemberRecord("dn1", "dn1a")),
        old.add_event("dn1", "failover", 4, "promoting", {}),
    ):
        with pytest.raises(Deposed, match="term 2 is not mine"):
            await write
    snapshot = await new.load()
    assert snapshot.epoch == 5 and snapshot.groups["dn1"].master == "dn1a" and snapshot.members == ()
    assert await new.events() == []
    for each in (old, new):
        await each.close()
    await second.close()


async def test_a_second_controller_waits_for_the_lock(path: Path) -> None:
    import asyncio

    first, second = SqliteLeadership(path, "c1"), SqliteLeadership(path, "c2")
    await first.campaign()
    waiting = asyncio.ensure_future(second.campaign())
    await asyncio.sleep(0.5)
    assert not waiting.done() and not second.leading()
    await first.resign()
    assert await asyncio.wait_for(waiting, 5) == 2 and second.leading()
    await second.close()
