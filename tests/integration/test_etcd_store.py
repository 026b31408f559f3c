"""The etcd store and leader election against real etcd (1 or 3 members, real processes):
round trip, compare-and-set, fencing, take-over when the leader's process dies or is
paused, a raft leader killed, and etcd down altogether. Take-over times are printed."""

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aetcd import rpc

import xcha
from xcha.controller.store import etcd as etcd_module
from xcha.controller.store import etcd as etcd_store
from xcha.controller.store.base import (
    Conflict,
    Deposed,
    EventRecord,
    GroupRecord,
    LeaderInfo,
    MemberRecord,
    StoreUnavailable,
)
from xcha.controller.store.etcd import EtcdClient, EtcdLeadership, EtcdSettings, EtcdStore, clock, prefix_end
from xcha.controller.store.sqlite import SqliteLeadership, SqliteStore
from xcha.controller.views import GroupState, Request
from xcha.errors import InvalidInput
from xcha.etcd_cluster import EtcdCluster, EtcdTls, find_etcd
from xcha.tls import Identity, create_ca, issue

pytestmark = pytest.mark.integration

TTL = 2.0  # etcd's smallest lease TTL with its default election timeout
PREFIX = EtcdSettings.default_prefix("test")


def settings_for(
    cluster: EtcdCluster, ttl: float = TTL, endpoints: tuple[str, ...] | None = None
) -> EtcdSettings:
    return EtcdSettings(endpoints or cluster.endpoints, PREFIX, ttl)


def report(text: str) -> None:
    """Measurements: in the test output (pytest -s, or the captured output of a failure)."""
    print(f"\n[etcd] {text}", flush=True)


@contextlib.asynccontextmanager
async def leader_and_store(
    settings: EtcdSettings, name: str = "a"
) -> AsyncIterator[tuple[EtcdLeadership, EtcdStore]]:
    leadership = EtcdLeadership(settings, name, f"127.0.0.1:{len(name)}")
    store = EtcdStore(settings, leadership)
    try:
        yield leadership, store
    finally:
        await store.close()
        await leadership.close()


@dataclass
class FixedTerm:
    """A leadership that believes it still leads with an old token: what a deposed leader's
    store sends before its own clock tells it. Only etcd's fence can refuse its writes."""

    token: int
    name: str = "stale"

    async def campaign(self) -> int:
        return self.token

    def leading(self) -> bool:
        return True

    async def lost(self) -> None:
        await asyncio.Event().wait()

    async def leader(self) -> LeaderInfo | None:
        return None

    async def resign(self) -> None:
        pass

    async def close(self) -> None:
        pass


# ---- a leader in another process, to SIGKILL and SIGSTOP --------------------------------------------

LEADER_PROCESS = textwrap.dedent(
    """
    import asyncio, json, signal, sys
    from xcha.controller.store.base import Deposed
    from xcha.controller.store.etcd import EtcdLeadership, EtcdSettings, EtcdStore

    def report(**data):
        print(json.dumps(data), flush=True)

    async def main():
        settings = EtcdSettings(tuple(sys.argv[1].split(",")), sys.argv[2], float(sys.argv[3]))
        leadership = EtcdLeadership(settings, "child", "127.0.0.1:9")
        store = EtcdStore(settings, leadership)
        tasks = set()

        async def continued():
            leading = leadership.leading()  # the first thing it knows after SIGCONT
            try:
                await store.set_cluster_paused(True)
                outcome = "written"
            except Deposed as error:
                outcome = f"Deposed: {error}"
            report(event="continued", leading=leading, write=outcome)

        def on_sigcont():
            tasks.add(asyncio.create_task(continued()))

        # Before it says it leads: the test may stop it as soon as it has.
        asyncio.get_running_loop().add_signal_handler(signal.SIGCONT, on_sigcont)
        report(event="leading", token=await leadership.campaign())
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


@dataclass
class LeaderProcess:
    process: asyncio.subprocess.Process

    async def report(self, timeout: float = 20) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert line, f"the leader process ended (exit {self.process.returncode})"
        data: dict[str, Any] = json.loads(line)
        return data

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)


SpawnLeader = Callable[[EtcdSettings], Awaitable[LeaderProcess]]


@pytest.fixture
async def spawn_leader(workdir: Path) -> AsyncIterator[SpawnLeader]:
    """Start a Python process that campaigns and leads; every one is killed by PID afterwards."""
    started: list[asyncio.subprocess.Process] = []
    source = str(Path(xcha.__file__).resolve().parents[1])

    async def spawn(settings: EtcdSettings) -> LeaderProcess:
        path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
        with open(workdir / "leader-process.log", "ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                LEADER_PROCESS,
                ",".join(settings.endpoints),
                settings.prefix,
                str(settings.ttl),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=workdir,
                env={**os.environ, "PYTHONPATH": path},
            )
        started.append(process)
        return LeaderProcess(process)

    yield spawn
    for process in started:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


# ---- the store ------------------------------------------------------------------------------------


def _without_time(events: list[EventRecord]) -> list[tuple[object, ...]]:
    return [(e.id, e.datanode, e.kind, e.epoch, e.message, e.details) for e in events]


async def _keys(settings: EtcdSettings) -> dict[str, bytes]:
    client = EtcdClient(settings)
    try:
        prefix = settings.prefix.encode()
        response = await client.range(rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)))
        return {kv.key.decode().removeprefix(settings.prefix): kv.value for kv in response.kvs}
    finally:
        await client.close()


async def test_round_trip(etcd_cluster: EtcdCluster, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_for(etcd_cluster)
    group = GroupRecord(
        "dn1", GroupState.PROTECTED, "dn1a", sync_set=("dn1b",), request=Request("switchover", "dn1b")
    )
    members = (
        MemberRecord("dn2", "dn2a", port=5432),
        MemberRecord("dn1", "dn1b"),
        MemberRecord("dn1", "dn1a"),
    )
    sqlite = SqliteStore(workdir / "store.db", SqliteLeadership(workdir / "store.db"))
    async with leader_and_store(settings) as (leadership, store):
        assert await leadership.leader() is None
        token = await leadership.campaign()
        assert leadership.leading() and leadership.token == token
        assert await leadership.leader() == LeaderInfo("a", "127.0.0.1:1", token)
        await store.set_epoch(0, 3)
        await store.set_cluster_paused(True)
        await store.save_group(group, None)
        for member in members:
            await store.save_member(member)
        await store.save_member(MemberRecord("dn1", "dn1b", removed=True))
        datanodes = ["dn1", "dn2", "dn1", "dn1", "dn3", "dn2"] * 3
        for i, datanode in enumerate(datanodes):
            written = await store.add_event(datanode, "kind", i, f"message {i}", {"i": i, "list": [1, "x"]})
            assert written.id == i + 1
            await sqlite.add_event(datanode, "kind", i, f"message {i}", {"i": i, "list": [1, "x"]})
        monkeypatch.setattr(etcd_store, "EVENTS_PAGE", 4)  # filtered reads take several pages
        queries: list[dict[str, Any]] = [
            {},
            {"after_id": 4},
            {"limit": 3},
            {"limit": -1},
            {"limit": 0},
            {"after_id": 2, "limit": 5, "datanode": "dn1"},
            {"datanode": "dn2"},
            {"datanode": "dn9"},
            {"newest": True, "limit": 4},
            {"newest": True, "limit": 3, "datanode": "dn2"},
            {"newest": True, "after_id": 10, "limit": 5, "datanode": "dn1"},
            {"newest": True, "after_id": 17},
        ]
        for query in queries:
            expected = _without_time(await sqlite.events(**query))
            assert _without_time(await store.events(**query)) == expected, query
        snapshot = await store.load()

        # The key layout under the prefix.
        keys = await _keys(settings)
        assert json.loads(keys.pop("leader")) == {"name": "a", "address": "127.0.0.1:1"}
        assert keys.pop("epoch") == b"3" and keys.pop("paused") == b"true"
        assert set(keys) == {
            "groups/dn1",
            "members/dn2/dn2a",
            "members/dn1/dn1a",
            "members/dn1/dn1b",
            *(f"events/{i:020d}" for i in range(1, len(datanodes) + 1)),
        }

    # Another process finds the cluster by its directory.
    found = EtcdCluster.load(etcd_cluster.directory, etcd_cluster.runner)
    assert found.endpoints == etcd_cluster.endpoints
    assert found.pid("etcd1") == etcd_cluster.pid("etcd1") is not None

    # Another store (another controller, later) reads the same; event ids go on.
    async with leader_and_store(settings, "b") as (leadership, store):
        await leadership.campaign()
        assert leadership.token > token
        reread = await store.load()
        assert reread == snapshot
        assert reread.epoch == 3 and reread.paused
        assert reread.groups == {"dn1": group}
        assert reread.members == (members[0], MemberRecord("dn1", "dn1b", removed=True), members[2])
        assert (await store.add_event("dn1", "later", 3, "after reopening", {})).id == len(datanodes) + 1
    await sqlite.close()


async def test_compare_and_set(etcd_cluster: EtcdCluster) -> None:
    async with leader_and_store(settings_for(etcd_cluster)) as (leadership, store):
        await leadership.campaign()
        with pytest.raises(Conflict):
            await store.set_epoch(5, 6)  # absent counts as 0
        await store.set_epoch(0, 0)
        await store.set_epoch(0, 1)  # a stored "0" is 0 too
        with pytest.raises(Conflict):
            await store.set_epoch(0, 2)
        with pytest.raises(Conflict):
            await store.set_epoch(1, 0)  # the epoch only grows
        await store.set_epoch(1, 2)
        assert (await store.load()).epoch == 2

        first = GroupRecord("dn1", GroupState.SINGLE, "dn1a")
        second = GroupRecord("dn1", GroupState.PROTECTED, "dn1a", sync_set=("dn1b",))
        await store.save_group(first, None)
        with pytest.raises(Conflict):
            await store.save_group(second, None)  # exists already
        with pytest.raises(Conflict):
            await store.save_group(second, GroupRecord("dn1", GroupState.FAILOVER))
        await store.save_group(second, first)
        with pytest.raises(Conflict):
            await store.save_group(first, first)  # stale expectation
        assert (await store.load()).groups == {"dn1": second}

        # Events added at the same time get distinct ids, in order.
        added = await asyncio.gather(*(store.add_event("dn1", "k", 2, str(i), {}) for i in range(20)))
        assert sorted(event.id for event in added) == list(range(1, 21))
        assert [event.id for event in await store.events(limit=-1)] == list(range(1, 21))


async def test_old_events_are_pruned(etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd keeps every write until compacted, within a quota: only the newest events stay."""
    monkeypatch.setattr(etcd_module, "EVENTS_KEPT", 5)
    monkeypatch.setattr(etcd_module, "PRUNE_EVERY", 5)
    async with leader_and_store(settings_for(etcd_cluster)) as (leadership, store):
        await leadership.campaign()
        for index in range(12):
            await store.add_event("dn1", "k", 1, str(index), {})
        assert [event.id for event in await store.events(limit=-1)] == list(range(5, 13))


async def test_tls(workdir: Path) -> None:
    """Members serve (and peer) over TLS; a client needs the CA and a certificate it issued."""
    try:
        find_etcd()
    except InvalidInput as error:
        pytest.skip(str(error))
    ca, _ = create_ca(workdir / "tls")
    server = issue(workdir / "tls", Identity("monitor", "etcd"))
    cert, key = issue(workdir / "tls", Identity("controller", "c1"))
    cluster = EtcdCluster(workdir / "etcd", 3, tls=EtcdTls(ca, *server))
    try:
        cluster.start()
        await cluster.wait_ready()
        assert all(endpoint.startswith("https://") for endpoint in cluster.endpoints)
        settings = EtcdSettings(cluster.endpoints, PREFIX, TTL, ca=ca, cert=cert, key=key)
        async with leader_and_store(settings) as (leadership, store):
            await leadership.campaign()
            await store.set_epoch(0, 1)
            assert (await store.load()).epoch == 1
        without_certificate = EtcdSettings(cluster.endpoints, PREFIX, TTL, ca=ca)
        async with leader_and_store(without_certificate) as (leadership, _):
            with pytest.raises(StoreUnavailable):
                await leadership.leader()
    finally:
        await cluster.stop()


async def test_fencing(etcd_cluster: EtcdCluster) -> None:
    settings = settings_for(etcd_cluster)
    async with (
        leader_and_store(settings, "a") as (a, store_a),
        leader_and_store(settings, "b") as (b, store_b),
    ):
        token_a = await a.campaign()
        await store_a.set_epoch(0, 1)
        await store_a.save_group(GroupRecord("dn1"), None)
        await a.resign()
        await asyncio.wait_for(a.lost(), 1)
        token_b = await asyncio.wait_for(b.campaign(), 2)  # a revoked its lease: at once
        assert token_b > token_a

        # The resigned leader's store refuses to write...
        with pytest.raises(Deposed):
            await store_a.set_epoch(1, 2)
        with pytest.raises(Deposed):
            await store_a.add_event("dn1", "stale", 1, "from a", {})
        # ... and so does etcd, for a writer that believes it still leads with the old token.
        stale = EtcdStore(settings, FixedTerm(token_a))
        try:
            with pytest.raises(Deposed):
                await stale.set_epoch(1, 2)
            with pytest.raises(Deposed):
                await stale.save_group(GroupRecord("dn1", GroupState.SINGLE), GroupRecord("dn1"))
            with pytest.raises(Deposed):
                await stale.save_member(MemberRecord("dn1", "dn1a"))
            with pytest.raises(Deposed):
                await stale.set_cluster_paused(True)
            with pytest.raises(Deposed):
                await stale.add_event("dn1", "stale", 1, "from a", {})
        finally:
            await stale.close()
        snapshot = await store_b.load()
        assert snapshot.epoch == 1 and not snapshot.paused and not snapshot.members
        assert snapshot.groups == {"dn1": GroupRecord("dn1")}
        assert await store_b.events() == []
        await store_b.set_epoch(1, 2)  # the new leader writes

        # The leader key deleted under a leader (by an operator): another controller takes over;
        # the first one's next write is refused by etcd's fence, which also ends its term.
        client = EtcdClient(settings)
        try:
            await client.call(lambda s, t: s.kv.DeleteRange(rpc.DeleteRangeRequest(key=b.key), timeout=t))
        finally:
            await client.close()
        async with leader_and_store(settings, "c") as (c, _):
            assert await asyncio.wait_for(c.campaign(), 2) > token_b
            with pytest.raises(Deposed):
                await store_b.set_epoch(2, 3)
            assert not b.leading()
            await asyncio.wait_for(b.lost(), 1)
            assert (await store_b.load()).epoch == 2


# ---- take-over ------------------------------------------------------------------------------------


async def test_takeover_when_the_leader_process_dies(
    etcd_cluster: EtcdCluster, spawn_leader: SpawnLeader
) -> None:
    settings = settings_for(etcd_cluster)
    takeovers = []
    for round in range(3):
        child = await spawn_leader(settings)
        event = await child.report()
        assert event["event"] == "leading"
        async with leader_and_store(settings, "b") as (b, store):
            campaign = asyncio.create_task(b.campaign())
            try:
                if round == 0:  # it blocks while the other keeps its lease alive
                    await asyncio.sleep(1.5 * TTL)
                    assert not campaign.done()
                    assert await b.leader() == LeaderInfo("child", "127.0.0.1:9", event["token"])
                else:
                    await asyncio.sleep(0.3 * TTL * round)  # at another phase of its keep-alives
                killed = time.monotonic()
                child.signal(signal.SIGKILL)
                token = await asyncio.wait_for(campaign, TTL + 3)
                takeovers.append(time.monotonic() - killed)
            finally:
                campaign.cancel()
            assert token > event["token"] and b.leading()
            await store.set_epoch(round, round + 1)
    report(
        f"take-over after SIGKILL of the leader process (TTL {TTL:g} s): "
        + ", ".join(f"{t * 1000:.0f} ms" for t in takeovers)
    )
    assert max(takeovers) <= TTL + 1


async def test_paused_leader_wakes_up_deposed(etcd_cluster: EtcdCluster, spawn_leader: SpawnLeader) -> None:
    settings = settings_for(etcd_cluster)
    child = await spawn_leader(settings)
    event = await child.report()
    async with leader_and_store(settings, "b") as (b, store):
        stopped = time.monotonic()
        child.signal(signal.SIGSTOP)
        token = await asyncio.wait_for(b.campaign(), TTL + 3)
        takeover = time.monotonic() - stopped
        assert token > event["token"]
        await asyncio.sleep(stopped + 2 * TTL - time.monotonic())
        child.signal(signal.SIGCONT)
        woke = await child.report()
        report(
            f"leader process SIGSTOPped for {2 * TTL:g} s (TTL {TTL:g} s): taken over after "
            f"{takeover * 1000:.0f} ms; after SIGCONT it reported leading={woke['leading']}, "
            f"its write: {woke['write']}"
        )
        assert woke["leading"] is False
        assert woke["write"].startswith("Deposed")
        assert b.leading()
        assert not (await store.load()).paused
        assert takeover <= TTL + 1


@pytest.mark.parametrize("etcd_cluster", [3], indirect=True)
async def test_raft_leader_killed_keeps_leadership(etcd_cluster: EtcdCluster) -> None:
    """With the default TTL (5 s) the lease outlives an etcd leader election."""
    raft_leader = await etcd_cluster.raft_leader()
    assert raft_leader is not None
    # The controller talks to the raft leader first: it loses its endpoint as well.
    endpoints = sorted(etcd_cluster.endpoints, key=lambda e: e != etcd_cluster.member(raft_leader).endpoint)
    settings = settings_for(etcd_cluster, ttl=EtcdSettings().ttl, endpoints=tuple(endpoints))
    async with leader_and_store(settings) as (leadership, store):
        await leadership.campaign()
        await asyncio.sleep(2)
        killed = time.monotonic()
        etcd_cluster.kill(raft_leader)
        least = math.inf
        new_leader_after = None
        while time.monotonic() < killed + settings.ttl + 2:
            assert leadership.leading(), "leadership lost when the etcd raft leader was killed"
            least = min(least, leadership.deadline - clock())
            if new_leader_after is None and (await etcd_cluster.raft_leader()) not in (None, raft_leader):
                new_leader_after = time.monotonic() - killed
            await asyncio.sleep(0.05)
        await store.set_epoch(0, 1)
        new_leader = await etcd_cluster.raft_leader()
        assert new_leader not in (None, raft_leader)
        report(
            f"raft leader {raft_leader} killed (TTL {settings.ttl:g} s): still leading "
            f"{settings.ttl + 2:g} s later, new raft leader {new_leader} seen after "
            f"{(new_leader_after or 0) * 1000:.0f} ms; least time left before the deadline "
            f"{least:.2f} s"
        )
        etcd_cluster.start_member(raft_leader)
        await etcd_cluster.wait_ready()
        assert leadership.leading()
        assert (await store.load()).epoch == 1

        # A raft leader stopped cleanly hands its leadership over first.
        stopped = time.monotonic()
        await etcd_cluster.stop_member(new_leader)
        report(f"raft leader {new_leader} stopped (SIGTERM) in {(time.monotonic() - stopped) * 1000:.0f} ms")
        await store.set_epoch(1, 2)
        assert leadership.leading()
        etcd_cluster.start_member(new_leader)
        await etcd_cluster.wait_ready()


async def lost_at(leadership: EtcdLeadership) -> float:
    await leadership.lost()
    return time.monotonic()


@pytest.mark.parametrize("etcd_cluster", [3], indirect=True)
async def test_etcd_down_and_back(etcd_cluster: EtcdCluster) -> None:
    settings = settings_for(etcd_cluster)
    async with leader_and_store(settings, "a") as (a, store_a):
        first = await a.campaign()
        await store_a.set_epoch(0, 7)
        await store_a.save_group(GroupRecord("dn1", GroupState.SINGLE, "dn1a"), None)
        await store_a.save_member(MemberRecord("dn1", "dn1a"))
        for i in range(3):
            await store_a.add_event("dn1", "kind", 7, f"event {i}", {})
        before, events_before = await store_a.load(), await store_a.events()

        await asyncio.sleep(0.5)
        lost = asyncio.create_task(lost_at(a))
        stopped = time.monotonic()
        await etcd_cluster.stop()  # SIGTERM: members shut down in a few seconds; lost meanwhile
        stop_took = time.monotonic() - stopped
        lost_after = await asyncio.wait_for(lost, TTL + 1) - stopped
        assert not a.leading()
        with pytest.raises(Deposed):
            await store_a.set_epoch(7, 8)
        with pytest.raises(StoreUnavailable):
            await store_a.load()

        etcd_cluster.start()
        await etcd_cluster.wait_ready()
        back = time.monotonic()
        async with leader_and_store(settings, "b") as (b, store_b):
            second = await asyncio.wait_for(b.campaign(), 2 * TTL + 5)
            campaign_after = time.monotonic() - back
            assert second > first
            assert await store_b.load() == before
            assert await store_b.events() == events_before
            assert (await store_b.add_event("dn1", "kind", 7, "after", {})).id == 4
            await store_b.set_epoch(7, 8)
            await b.resign()

        # The leader that lost its term campaigns again: a new lease, a new term.
        third = await asyncio.wait_for(a.campaign(), 2)
        assert third > second and a.leading()
        await store_a.set_epoch(8, 9)
        report(
            f"all etcd members stopped (SIGTERM, they took {stop_took * 1000:.0f} ms; TTL {TTL:g} s): "
            f"leadership lost after {lost_after * 1000:.0f} ms; "
            f"after etcd came back another controller's campaign took {campaign_after * 1000:.0f} ms "
            "(the old lease is renewed for a TTL when etcd restarts); every record was there"
        )
        assert lost_after <= TTL
