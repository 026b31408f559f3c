"""`xcha demo`: the whole system on one machine, a failover under load, and the proof that
nothing acknowledged was lost.

Builds a coordinator (plain PostgreSQL with postgres_fdw), two datanodes (each the
specification's master/slave pair, on a pair of adjacent free ports), an agent per
instance and a controller, all real processes talking mTLS. Two writers insert through the
coordinator (one into dn1's shard, one into dn2's) and record every acknowledged commit.
dn1's master postmaster is killed with SIGKILL; the controller detects it, promotes the
synchronous standby and re-points the coordinator (or, with --reroute takeover, the
promoted standby takes over the old master's port); the old master rejoins as the new
standby. Everything is torn down by PID at the end, also on Ctrl-C or error.
"""

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xcha.coordinator import partition_ids
from xcha.ctl import call, status_table
from xcha.errors import XchaError
from xcha.topology import DatanodePlan, Topology, TopologyPlan
from xcha.v1 import xcha_pb2 as pb
from xcha.workload import Writer, verify_all

REROUTES = ("fdw", "takeover")


def demo_plan(reroute: str = "fdw") -> TopologyPlan:
    return TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")), DatanodePlan("dn2", ("dn2a", "dn2b"))),
        router=reroute,
        coordinators=("coord1",),
        startup_grace=0.5,
    )


@dataclass
class Report:
    rto_ms: float | None = None
    detect_ms: float | None = None
    promote_ms: float | None = None
    reroute_ms: float | None = None
    acknowledged: int = 0
    lost: int = 0
    unexpected: int = 0
    old_master_rejoined: bool = False
    epoch: int = 0
    failed_over: bool = False
    dn2_failed_writes: int = 0
    router: str = "fdw"

    def as_json(self) -> str:
        return json.dumps(
            {
                key: (round(value, 1) if isinstance(value, float) else value)
                for key, value in self.__dict__.items()
            }
        )


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)


async def _wait_showing(
    topology: Topology,
    progress: Progress,
    predicate: Callable[[pb.ClusterStatus], bool],
    what: str,
    timeout: float,
) -> pb.ClusterStatus:
    """Wait, printing each group's state when it changes, so a long step is never silent."""
    seen: dict[str, str] = {}

    def check(status: pb.ClusterStatus) -> bool:
        for group in status.groups:
            line = group.reason if group.reason.startswith(group.state) else f"{group.state}: {group.reason}"
            if seen.get(group.name) != line:
                seen[group.name] = line
                progress.say(f"  {group.name} {line}")
        return predicate(status)

    return await topology.wait_for(check, timeout, what)


async def _shard_ids(topology: Topology, index: int) -> list[int]:
    async with await topology.coordinator("coord1").connect() as conn:
        cursor = await conn.execute(partition_ids(index, len(topology.plan.datanodes)))
        return [int(row[0]) for row in await cursor.fetchall()]  # type: ignore[call-overload]


def _rerouted_event(topology: Topology, datanode: str, after_epoch: int) -> dict[str, object] | None:
    reply = call(
        topology.target,
        lambda stub: stub.ListEvents(pb.EventsRequest(limit=100000, datanode=datanode), timeout=5),
    )
    for event in reply.events:
        if event.kind == "rerouted" and event.epoch > after_epoch:
            details: dict[str, object] = json.loads(event.details_json)
            return details
    return None


async def run_demo(workdir: Path | None = None, as_json: bool = False, reroute: str = "fdw") -> int:
    if reroute not in REROUTES:
        raise XchaError(f"invalid --reroute {reroute!r}: expected one of {', '.join(REROUTES)}")
    progress = Progress(quiet=as_json)
    base = Path(tempfile.mkdtemp(prefix="xcha-demo-")) if workdir is None else workdir
    topology = Topology(base, demo_plan(reroute))
    report = Report(router=reroute)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await _run(topology, progress, report)
    finally:
        progress.say("tearing down: stopping every process by PID")
        stopped = await topology.down()
        progress.say(f"  stopped {len(stopped)}: {', '.join(stopped)}")
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        loop.remove_signal_handler(signal.SIGTERM)
    ok = report.failed_over and report.lost == 0 and report.unexpected == 0
    if as_json:
        print(report.as_json())
    else:
        verdict = "nothing lost" if report.lost == 0 else f"{report.lost} LOST"
        print(
            f"\n{'OK' if ok else 'FAILED'}: {report.acknowledged} acknowledged commits, {verdict}; "
            f"writes to dn1 resumed {report.rto_ms:.0f} ms after the kill"
            if report.rto_ms is not None
            else f"\n{'OK' if ok else 'FAILED'}: {report.acknowledged} acknowledged commits, {verdict}"
        )
    return 0 if ok else 1


async def _run(topology: Topology, progress: Progress, report: Report) -> None:
    plan = topology.plan
    progress.say(
        f"xcha demo in {topology.workdir}: 1 coordinator, 2 datanodes x (master + synchronous "
        f"standby), router {plan.router}, mTLS"
    )
    topology.write()
    ports = ", ".join(f"{m} :{i.port}" for m, i in topology.members.items())
    progress.say(
        f"starting the controller and 4 agents ({ports}); coordinator coord1 :"
        f"{topology.coordinator_ports['coord1']}"
    )
    topology.start()
    await topology.start_coordinators()
    progress.say("agents bootstrap dn1a and dn2a (initdb) and clone dn1b and dn2b (pg_basebackup):")
    status = await _wait_showing(
        topology,
        progress,
        lambda s: all(g.state == "protected" for g in s.groups),
        "both datanodes to be protected",
        120,
    )
    await topology.setup_sharding()
    progress.say(
        "coordinator: postgres_fdw servers dn1, dn2 and table xcha_writes hash-partitioned over them"
    )
    if not progress.quiet:
        print("\n" + status_table(status))
    coordinator = [topology.coordinator_app_conninfo("coord1")]
    writers = {
        name: Writer(coordinator, ids=iter(await _shard_ids(topology, index)))
        for index, name in enumerate(("dn1", "dn2"))
    }
    tasks = [asyncio.create_task(w.run()) for w in writers.values()]
    try:
        await asyncio.sleep(1.5)
        old = topology.master("dn1")
        epoch = status.epoch
        pid = topology.postmaster_pid(old)
        if pid is None:
            raise XchaError(f"{old} has no postmaster to kill")
        progress.say(
            f"writing through coord1 ({len(writers['dn1'].acknowledged)} + "
            f"{len(writers['dn2'].acknowledged)} commits so far); kill -9 of dn1's master {old} "
            f"(postmaster PID {pid})"
        )
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        new_status = await _wait_showing(
            topology,
            progress,
            lambda s: (
                next(g for g in s.groups if g.name == "dn1").master != old
                and _rerouted_event(topology, "dn1", epoch) is not None
            ),
            "dn1's failover",
            60,
        )
        report.failed_over = True
        report.epoch = new_status.epoch
        while (rto := writers["dn1"].recovery_seconds(killed_at)) is None:
            if time.time() - killed_at > 30:
                raise XchaError("no write reached dn1 through the coordinator within 30 s of the failover")
            await asyncio.sleep(0.01)
        report.rto_ms = rto * 1000
        details = _rerouted_event(topology, "dn1", epoch) or {}
        for key, mark in (
            ("detect_ms", "detected_at"),
            ("promote_ms", "promoted_at"),
            ("reroute_ms", "rerouted_at"),
        ):
            value = details.get(mark)
            if isinstance(value, float):
                setattr(report, key, (value - killed_at) * 1000)
        progress.say("waiting for the old master to rejoin (pg_rewind) as the new synchronous standby:")
        try:
            after = await _wait_showing(
                topology,
                progress,
                lambda s: all(g.state == "protected" for g in s.groups),
                "the old master to rejoin",
                60,
            )
            report.old_master_rejoined = True
        except XchaError as error:
            progress.say(f"  {error}")
            after = topology.status()
        await asyncio.sleep(1.0)
    finally:
        for writer in writers.values():
            writer.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in writers.values():
            await writer.close()
    outcome = await verify_all(list(writers.values()), coordinator)
    report.acknowledged, report.lost, report.unexpected = (
        outcome.acknowledged,
        len(outcome.lost),
        len(outcome.unexpected),
    )
    report.dn2_failed_writes = len(writers["dn2"].failures)
    if not progress.quiet:
        print("\n" + status_table(after))
        print(f"timeline after kill -9 of {old} (dn1's master):")
        for label, value in (
            ("detected", report.detect_ms),
            ("promoted", report.promote_ms),
            ("coordinator re-pointed" if plan.router == "fdw" else "port taken over", report.reroute_ms),
            ("first write through the coordinator", report.rto_ms),
        ):
            print(f"  {label:<38} +{value:7.0f} ms" if value is not None else f"  {label:<38}  (unknown)")
        print(f"  dn2 writes that failed meanwhile:      {report.dn2_failed_writes}")
        print(
            f"commits acknowledged: {outcome.acknowledged}, present on the masters: {outcome.present}, "
            f"lost: {len(outcome.lost)}, present but never sent: {len(outcome.unexpected)}"
        )
        print(
            f"old master {old} rejoined as standby: {'yes' if report.old_master_rejoined else 'no'}; "
            f"epoch {report.epoch}"
        )


async def start_topology(workdir: Path, reroute: str = "fdw") -> int:
    """`xcha up`: the demo's deployment, left running for experiments."""
    if (workdir / "topology.json").exists():
        raise XchaError(f"{workdir} already holds a deployment: `xcha down --workdir {workdir}` first")
    topology = Topology(workdir, demo_plan(reroute))
    progress = Progress(quiet=False)
    topology.write()
    topology.start()
    try:
        await topology.start_coordinators()
        status = await _wait_showing(
            topology,
            progress,
            lambda s: all(g.state == "protected" for g in s.groups),
            "both datanodes to be protected",
            120,
        )
        await topology.setup_sharding()
    except BaseException:
        await topology.down()
        raise
    print("\n" + status_table(status))
    conninfo = topology.coordinator_app_conninfo("coord1").replace(topology.app_password, "***")
    print(f"coordinator coord1: {conninfo} (password in {topology.secrets / 'app.password'})")
    print(
        f"try:  xcha ctl status --workdir {workdir}\n      xcha ctl switchover dn1 --workdir {workdir}\n"
        f"      xcha down --workdir {workdir}"
    )
    return 0
