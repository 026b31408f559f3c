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

`xcha demo --xl` / `--xc` runs the same on a Postgres-XL / XC cluster: xcha.demo_pgxc.
"""

import asyncio
import json
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from xcha.ctl import status_table
from xcha.errors import InvalidInput, XchaError
from xcha.harness import LoadedCluster
from xcha.topology import TOPOLOGY_FILE, DatanodePlan, Topology, TopologyPlan, settling
from xcha.v1 import xcha_pb2 as pb


def pgxc_plan(flavor: str) -> TopologyPlan:
    """A Postgres-XL / XC cluster: a GTM, two coordinators, two datanodes each a master with a
    synchronous standby under agents, the `pgxc` router re-pointing both coordinators."""
    return TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")), DatanodePlan("dn2", ("dn2a", "dn2b"))),
        router="pgxc",
        coordinators=("coord1", "coord2"),
        flavor=flavor,
    )


def demo_plan(reroute: str = "fdw") -> TopologyPlan:
    return TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b")), DatanodePlan("dn2", ("dn2a", "dn2b"))),
        router=reroute,
        coordinators=("coord1",),
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
    # PostgreSQL operations as the agents measured them (ms)
    initdb_ms: float | None = None
    clone_ms: float | None = None
    promote_writable_ms: float | None = None
    rewind_ms: float | None = None
    router: str = "fdw"
    error: str | None = None  # what stopped the demo before it could finish

    def as_json(self) -> str:
        return json.dumps(_rounded(self.__dict__))


def _rounded(value: object) -> object:
    """Milliseconds to a tenth, also inside mappings and lists (per coordinator, per transaction)."""
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)


R = TypeVar("R", bound=Report)
Body = Callable[[LoadedCluster, Progress, R], Awaitable[None]]


def demo_workdir(workdir: Path | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="xcha-demo-")) if workdir is None else workdir


async def staged(
    cluster: LoadedCluster, progress: Progress, report: R, body: Body[R], temporary: bool
) -> None:
    """Run a demo's body, keeping what stopped it in report.error; then, also on Ctrl-C or SIGTERM,
    stop every process by PID (and remove a temporary workdir)."""
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await body(cluster, progress, report)
    except Exception as error:  # reported after the teardown; an interrupt goes on
        report.error = str(error) if isinstance(error, XchaError) else f"{type(error).__name__}: {error}"
    finally:
        progress.say("tearing down: stopping every process by PID")
        stopped = await cluster.down()
        progress.say(f"  stopped {len(stopped)}: {', '.join(stopped)}")
        if temporary:
            shutil.rmtree(cluster.topology.workdir, ignore_errors=True)
        loop.remove_signal_handler(signal.SIGTERM)


async def run_demo(workdir: Path | None = None, as_json: bool = False, reroute: str = "fdw") -> int:
    """The demo; 0 when the failover completed and nothing was lost. With as_json, one JSON object
    is the last line of the output whatever happened (`error` says what stopped it)."""
    progress = Progress(quiet=as_json)
    cluster = LoadedCluster(demo_workdir(workdir), demo_plan(reroute))
    report = Report(router=reroute)
    await staged(cluster, progress, report, _run, temporary=workdir is None)
    ok = report.error is None and report.failed_over and report.lost == 0 and report.unexpected == 0
    if as_json:
        print(report.as_json())
    elif report.error is not None:
        print(f"\nFAILED: {report.error}")
    else:
        verdict = "nothing lost" if report.lost == 0 else f"{report.lost} LOST"
        resumed = f"; writes to dn1 resumed {report.rto_ms:.0f} ms after the kill" if report.rto_ms else ""
        print(f"\n{'OK' if ok else 'FAILED'}: {report.acknowledged} acknowledged commits, {verdict}{resumed}")
    return 0 if ok else 1


def _showing(progress: Progress) -> Callable[[pb.ClusterStatus], None]:
    """Print each group's state when it changes, so a long step is never silent."""
    seen: dict[str, str] = {}

    def show(status: pb.ClusterStatus) -> None:
        for group in status.groups:
            line = group.reason if group.reason.startswith(group.state) else f"{group.state}: {group.reason}"
            if seen.get(group.name) != line:
                seen[group.name] = line
                progress.say(f"  {group.name} {line}")

    return show


async def _run(cluster: LoadedCluster, progress: Progress, report: Report) -> None:
    topology = cluster.topology
    plan = topology.plan
    progress.say(
        f"xcha demo in {topology.workdir}: 1 coordinator, 2 datanodes x (master + synchronous "
        f"standby), router {plan.router}, mTLS"
    )
    progress.say(
        "starting the controller and 4 agents; they bootstrap dn1a and dn2a (initdb) and clone dn1b "
        "and dn2b (pg_basebackup); then the coordinator's postgres_fdw servers and sharded table:"
    )
    show = _showing(progress)
    status = await cluster.start(on_status=show)
    if not progress.quiet:
        print("\n" + status_table(status))
    await asyncio.sleep(1.5)
    writers = cluster.writers
    fault = cluster.kill_master("dn1")
    progress.say(
        f"writing through coord1 ({len(writers['dn1'].acknowledged)} + {len(writers['dn2'].acknowledged)}"
        f" commits so far); killed dn1's master {fault.member} with SIGKILL"
    )
    recovery = await cluster.recovery(fault)
    report.failed_over = True
    report.rto_ms, report.detect_ms = recovery.rto_ms, recovery.detect_ms
    report.promote_ms, report.reroute_ms = recovery.promote_ms, recovery.reroute_ms
    progress.say("waiting for the old master to rejoin (pg_rewind) as the new synchronous standby:")
    try:
        after = await topology.wait_for(settling(show), 60, "the old master to rejoin")
        report.old_master_rejoined = True
    except XchaError as error:
        progress.say(f"  {error}")
        after = topology.status()
    report.epoch = after.epoch
    await asyncio.sleep(1.0)
    outcome = await cluster.finish()
    report.acknowledged, report.lost = outcome.acknowledged, len(outcome.lost)
    report.unexpected = len(outcome.unexpected)
    report.dn2_failed_writes = len([t for t, _ in writers["dn2"].failures if t >= fault.at])
    _operation_timings(cluster, fault.epoch, report)
    if not progress.quiet:
        print("\n" + status_table(after))
        print(f"timeline after kill -9 of {fault.member} (dn1's master):")
        for label, value in (
            ("detected", report.detect_ms),
            ("promoted", report.promote_ms),
            ("coordinator re-pointed" if plan.router == "fdw" else "port taken over", report.reroute_ms),
            ("first write through the coordinator", report.rto_ms),
        ):
            print(f"  {label:<38} +{value:7.0f} ms" if value is not None else f"  {label:<38}  (unknown)")
        print(f"  dn2 writes that failed meanwhile:      {report.dn2_failed_writes}")
        print("PostgreSQL operations, as the agents timed them:")
        for label, value in (
            ("initdb (dn1a)", report.initdb_ms),
            ("pg_basebackup clone (dn1b)", report.clone_ms),
            ("promote until writable", report.promote_writable_ms),
            ("pg_rewind of the old master", report.rewind_ms),
        ):
            print(f"  {label:<38} {value:7.0f} ms" if value is not None else f"  {label:<38}  (not seen)")
        print(
            f"commits acknowledged: {outcome.acknowledged}, present on the masters: {outcome.present}, "
            f"lost: {len(outcome.lost)}, present but never sent: {len(outcome.unexpected)}"
        )
        rejoined = "yes" if report.old_master_rejoined else "no"
        print(f"old master {fault.member} rejoined as standby: {rejoined}; epoch {report.epoch}")


def _operation_timings(cluster: LoadedCluster, fault_epoch: int, report: Report) -> None:
    """The agents report each operation's steps ("initdb 712 ms, start 55 ms") in their replies,
    which the controller keeps in its events."""

    def step(message: str, name: str) -> float | None:
        found = re.search(rf"\b{name} (\d+) ms", message)
        return float(found.group(1)) if found else None

    for event in cluster.events("dn1"):
        if event.kind == "start_master" and report.initdb_ms is None:
            report.initdb_ms = step(event.message, "initdb")
        elif event.kind == "follow" and event.epoch <= fault_epoch and report.clone_ms is None:
            report.clone_ms = step(event.message, "clone")
        elif event.kind == "follow" and event.epoch > fault_epoch and report.rewind_ms is None:
            report.rewind_ms = step(event.message, "rewind")
        elif event.kind == "rerouted" and event.epoch > fault_epoch and report.promote_writable_ms is None:
            seconds = json.loads(event.details_json).get("promote_seconds")
            report.promote_writable_ms = seconds * 1000 if isinstance(seconds, float) and seconds else None


def made_with(plan: TopologyPlan) -> str:
    """The `xcha up` option that makes a deployment of this plan."""
    return f"--{plan.flavor}" if plan.flavor in ("xl", "xc") else f"--reroute {plan.router}"


async def start_topology(
    workdir: Path, reroute: str | None, flavor: str | None = None, controllers: int | None = None
) -> int:
    """`xcha up`: the demo's deployment (router `reroute`, default fdw; or with flavor xl / xc a
    Postgres-XL / XC cluster; with controllers 3 three controllers on a three-member etcd
    cluster), left running under a supervisor. On a directory that holds one, whatever of it is
    not running starts again, as it was made: another option is refused."""
    show = _showing(Progress(quiet=False))
    resumed = (workdir / TOPOLOGY_FILE).exists()
    asked = f"--{flavor}" if flavor else f"--reroute {reroute}" if reroute else None
    if resumed:
        topology = Topology.load(workdir, supervise=True)
        made = made_with(topology.plan)
        if asked is not None and asked != made:
            raise InvalidInput(
                f"{workdir} holds a deployment made with {made}: "
                f"leave out {asked} to start it again, or use another --workdir"
            )
        if controllers is not None and controllers != topology.plan.controllers:
            raise InvalidInput(
                f"{workdir} holds a deployment with {topology.plan.controllers} controller(s): "
                "leave out --controllers to start it again, or use another --workdir"
            )
    else:
        plan = pgxc_plan(flavor) if flavor else demo_plan(reroute or "fdw")
        topology = Topology(workdir, replace(plan, controllers=controllers or 1), supervise=True)
    if resumed and (any(topology.alive(key) for key in topology.pids) or topology.supervised()):
        started, running = await topology.start_missing()
        if not started:
            print(f"everything is already running: {', '.join(running)}")
            return 0
        print(f"started: {', '.join(started)}")
        print(f"already running: {', '.join(running) or 'nothing'}")
        check = settling(show)
        status = await topology.wait_for(
            lambda s: check(s) and all(0 <= m.heartbeat_age < 1 for g in s.groups for m in g.members),
            120,
            "every datanode to be protected and every agent to report",
        )
    else:
        status = await topology.up(show, fresh=not resumed)
    print("\n" + status_table(status))
    for name in topology.plan.coordinators:
        conninfo = topology.coordinator_app_conninfo(name).replace(topology.app_password, "***")
        print(f"coordinator {name}: {conninfo} (password in {topology.secrets / 'app.password'})")
    print(
        f"try:  xcha ctl status --workdir {workdir}\n      xcha ctl switchover dn1 --workdir {workdir}\n"
        f"      xcha down --workdir {workdir}"
    )
    return 0
