"""SqliteStore: what the controller must not forget survives closing and reopening the file."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xcha.controller.store import EventRecord, GroupRecord, MemberRecord, SqliteStore
from xcha.controller.views import GroupState, Request


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "controller.db"  # the directory is created by the store


@pytest.fixture
def store(path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(path)
    yield opened
    opened.close()


def reopen(store: SqliteStore, path: Path) -> SqliteStore:
    store.close()
    return SqliteStore(path)


def test_a_new_store_starts_at_epoch_zero_unpaused_and_empty(store: SqliteStore, path: Path) -> None:
    assert path.is_file()
    assert store.epoch() == 0
    assert store.cluster_paused() is False
    assert store.groups() == {}
    assert store.members() == []
    assert store.events() == []


def test_epoch_persists_across_reopen(store: SqliteStore, path: Path) -> None:
    store.set_epoch(3)
    store.set_epoch(7)
    store = reopen(store, path)
    try:
        assert store.epoch() == 7
    finally:
        store.close()


def test_epoch_refuses_to_go_backwards(store: SqliteStore, path: Path) -> None:
    store.set_epoch(5)
    with pytest.raises(ValueError, match="the epoch only grows"):
        store.set_epoch(4)
    assert store.epoch() == 5
    store.set_epoch(5)  # the same epoch again is not going backwards
    assert store.epoch() == 5
    store = reopen(store, path)
    try:
        with pytest.raises(ValueError):
            store.set_epoch(0)
        assert store.epoch() == 5
    finally:
        store.close()


def test_groups_round_trip_across_reopen(store: SqliteStore, path: Path) -> None:
    failing_over = GroupRecord(
        name="dn1",
        state=GroupState.REROUTING,
        master="dn1b",
        candidate="dn1b",
        sync_set=("dn1b", "dn1c"),
        paused=True,
        promote_attempts=2,
        rerouted_epoch=6,
        request=Request("switchover", target="dn1b", allow_data_loss=True),
        reason="operator asked",
    )
    fresh = GroupRecord(name="dn2")
    store.save_group(failing_over)
    store.save_group(fresh)
    store = reopen(store, path)
    try:
        groups = store.groups()
        assert groups == {"dn1": failing_over, "dn2": fresh}
        loaded = groups["dn1"]
        assert isinstance(loaded.state, GroupState) and loaded.state is GroupState.REROUTING
        assert isinstance(loaded.sync_set, tuple)
        assert isinstance(loaded.request, Request)
        assert groups["dn2"].request is None and groups["dn2"].state is GroupState.INITIALIZING
    finally:
        store.close()


def test_a_failed_switchover_round_trips_and_a_row_written_before_the_flag_loads_without_it(
    store: SqliteStore, path: Path
) -> None:
    failed = GroupRecord(
        name="dn1", state=GroupState.SWITCHOVER, master="dn1a", candidate="dn1b", switchover_failed=True
    )
    store.save_group(failed)
    # A row saved by a version without switchover_failed (and without the takeover fields).
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
    store = reopen(store, path)
    try:
        groups = store.groups()
        assert groups["dn1"] == failed and groups["dn1"].switchover_failed is True
        assert groups["dn2"] == GroupRecord(
            name="dn2",
            state=GroupState.SWITCHOVER,
            master="dn2a",
            candidate="dn2b",
            sync_set=("dn2b",),
            rerouted_epoch=3,
            reason=reason,
        )
        assert groups["dn2"].switchover_failed is False
    finally:
        store.close()


def test_saving_a_group_again_replaces_it(store: SqliteStore, path: Path) -> None:
    store.save_group(GroupRecord(name="dn1", state=GroupState.PROTECTED, master="dn1a", sync_set=("dn1b",)))
    updated = GroupRecord(name="dn1", state=GroupState.UNPROTECTED, master="dn1a", sync_set=())
    store.save_group(updated)
    store = reopen(store, path)
    try:
        assert store.groups() == {"dn1": updated}
    finally:
        store.close()


def test_members_round_trip_across_reopen_in_insertion_order(store: SqliteStore, path: Path) -> None:
    first = MemberRecord("dn1", "dn1a", host="10.0.0.1", port=5432, agent_address="10.0.0.1:7001")
    second = MemberRecord("dn1", "dn1b", mode="async")
    other = MemberRecord("dn2", "dn2a", removed=True)
    for member in (first, second, other):
        store.save_member(member)
    moved = MemberRecord("dn1", "dn1a", host="10.0.0.9", port=5433, agent_address="10.0.0.9:7001")
    store.save_member(moved)  # same (datanode, name): replaced, keeps its place
    store = reopen(store, path)
    try:
        assert store.members() == [moved, second, other]
    finally:
        store.close()


def test_events_get_increasing_ids_and_persist(store: SqliteStore, path: Path) -> None:
    before = time.time()
    added = [
        store.add_event("dn1", "failover", 1, "master dn1a lost", {"candidate": "dn1b"}),
        store.add_event("dn2", "protected", 1, "dn2 protected"),
        store.add_event("dn1", "reroute_ack", 2, "co1 acknowledged", {"coordinator": "co1", "n": 3}),
    ]
    assert [event.id for event in added] == sorted({event.id for event in added})
    assert added[0].id >= 1
    assert all(before <= event.time <= time.time() for event in added)
    assert added[1].details == {}
    store = reopen(store, path)
    try:
        assert store.events() == added
        newer = store.add_event("dn1", "protected", 2, "dn1 protected")
        assert newer.id > added[-1].id
    finally:
        store.close()


def test_events_are_filtered_by_after_id_limit_and_datanode(store: SqliteStore) -> None:
    added = [store.add_event(f"dn{i % 2 + 1}", "note", i, f"event {i}") for i in range(10)]
    ids = [event.id for event in added]

    assert [e.id for e in store.events()] == ids
    assert [e.id for e in store.events(after_id=ids[3])] == ids[4:]
    assert store.events(after_id=ids[-1]) == []
    assert [e.id for e in store.events(limit=3)] == ids[:3]
    assert [e.id for e in store.events(after_id=ids[2], limit=2)] == ids[3:5]

    dn2 = store.events(datanode="dn2")
    assert [e.id for e in dn2] == ids[1::2]
    assert all(isinstance(e, EventRecord) and e.datanode == "dn2" for e in dn2)
    assert [e.id for e in store.events(after_id=ids[4], limit=2, datanode="dn1")] == [ids[6], ids[8]]
    assert store.events(datanode="dn9") == []


def test_events_default_limit_is_100(store: SqliteStore) -> None:
    for i in range(105):
        store.add_event("dn1", "note", 0, f"event {i}")
    assert len(store.events()) == 100
    assert len(store.events(limit=200)) == 105


def test_cluster_pause_persists(store: SqliteStore, path: Path) -> None:
    store.set_cluster_paused(True)
    assert store.cluster_paused() is True
    store = reopen(store, path)
    assert store.cluster_paused() is True
    store.set_cluster_paused(False)
    store = reopen(store, path)
    try:
        assert store.cluster_paused() is False
    finally:
        store.close()


def test_epoch_and_pause_are_independent_settings(store: SqliteStore, path: Path) -> None:
    store.set_epoch(4)
    store.set_cluster_paused(True)
    store.set_epoch(9)
    store = reopen(store, path)
    try:
        assert (store.epoch(), store.cluster_paused()) == (9, True)
    finally:
        store.close()
