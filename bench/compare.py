"""`./run bench compare`: xcha against Patroni and pg_auto_failover on this machine.

Two scenarios under a client inserting every 10 ms:
  failover  kill -9 of the primary's postmaster;
  hang      SIGSTOP of the primary's manager (agent, Patroni, pg_autoctl) and its whole PostgreSQL
            process tree until writes resumed elsewhere (or the trial timeout), then SIGCONT.
Systems: xcha (a coordinator over one datanode pair, writes through the coordinator),
Patroni 4 + Raft with its default and its tightest valid timings, pg_auto_failover 2 with its
defaults. The anchors' client is the same `Writer`, given both nodes (it writes to the one not
in recovery). RTO = fault -> first acknowledged write after the first failed one. After each
trial: lost commits, who is primary, what became of the old one, and the wait until healthy.
"""

import argparse
import asyncio
import contextlib
import itertools
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import psycopg
from psycopg import sql

from bench.anchors import Anchor, AnchorUnavailable, is_primary
from bench.anchors.patroni import TIGHT_TIMINGS, Patroni
from bench.anchors.pg_auto_failover import PgAutoFailover
from bench.common import (
    QUIET_BEFORE_TRIAL,
    Result,
    one_pair_plan,
    percentile,
    running_deployment,
    say,
    summary,
    table,
)
from xcha.errors import XchaError
from xcha.harness import COORDINATOR, LoadedCluster
from xcha.pg.client import bounded, connect
from xcha.workload import Writer

SYSTEMS = ("xcha", "patroni-default", "patroni-tight", "pg_auto_failover")
SCENARIOS = ("failover", "hang")
TABLE = "bench_writes"
PROBE_TABLE = "bench_probe"  # writes tried on a resumed old primary: split-brain commits, if any
HOLD = 1.0  # s the hung host stays stopped after writes resumed elsewhere
WATCH = 60.0  # s a resumed old primary is watched for, at most
STATE_QUERY = (
    "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), "
    "coalesce((SELECT string_agg(coalesce(application_name, '?') || ' ' || coalesce(state, '?') || ' ' "
    "|| coalesce(sync_state, '?'), ', ') FROM pg_stat_replication), '')"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=3, help="trials per system and scenario")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {', '.join(SYSTEMS)}",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="failover,hang or one of them")
    parser.add_argument("--timeout", type=float, default=120.0, help="per trial and per wait for health, s")
    parser.add_argument("--keep", action="store_true", help="keep every system's directory (logs)")


@dataclass
class Trial:
    system: str
    scenario: str
    index: int
    old_primary: str = ""
    new_primary: str = ""
    rto_ms: float | None = None
    failed_writes: int = 0
    lost: int | None = None
    unexpected: int | None = None
    acknowledged: int = 0
    fate: str = ""  # a category, for the summary
    detail: str = ""  # what was seen, for the per-trial table
    healthy_after_s: float | None = None  # from the fault (failover) or from SIGCONT (hang)
    resumed_writable_s: float | None = None  # hang: last read-write answer of the old primary
    resumed_standby_s: float | None = None  # hang: first in-recovery answer of the old primary
    probe_commits: int = 0  # hang: probe inserts the resumed old primary acknowledged
    probe_blocked: int = 0  # hang: probe inserts it accepted but did not acknowledge within 0.5 s
    marks_ms: dict[str, float | None] = field(default_factory=dict)
    error: str = ""


# ---- measuring -----------------------------------------------------------------------------------


async def wait_writes(writer: Writer, count: int, timeout: float) -> None:
    target = len(writer.acknowledged) + count
    deadline = time.monotonic() + timeout
    while len(writer.acknowledged) < target:
        if time.monotonic() > deadline:
            last = writer.failures[-1][1] if writer.failures else "none"
            raise XchaError(f"no {count} acknowledged writes within {timeout:.0f} s (last failure: {last})")
        await asyncio.sleep(0.02)


async def wait_recovery(writer: Writer, fault_at: float, acked_before: int, timeout: float) -> float | None:
    """RTO in ms as `Writer.recovery_seconds` defines it; None when writes did not resume in time.
    Polls cheaply (only acknowledgements after the fault are looked at)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        first = next((t for t, _ in writer.failures if t >= fault_at), None)
        if first is not None:
            later = itertools.islice(writer.acknowledged.values(), acked_before, None)
            if any(t > first for t in later):
                seconds = writer.recovery_seconds(fault_at)
                return None if seconds is None else seconds * 1000
        elif time.time() - fault_at > 15 and len(writer.acknowledged) > acked_before + 100:
            return 0.0  # the fault never failed a write
        await asyncio.sleep(0.05)
    return None


async def check_lost(writer: Writer, conninfos: list[str]) -> tuple[int, int]:
    """(lost, unexpected) while the writer goes on: acknowledged ids are taken before reading."""
    acknowledged = set(writer.acknowledged)
    reader = Writer(conninfos, table=writer.table)
    conn = await reader._connect()
    async with conn:
        cursor = await conn.execute(sql.SQL("SELECT id FROM {}").format(sql.Identifier(writer.table)))
        present = {int(str(row[0])) for row in await cursor.fetchall()}
    return len(acknowledged - present), len(present - set(writer.sent))


@dataclass
class Watch:
    writable_s: float | None = None
    standby_s: float | None = None
    probe_commits: int = 0
    probe_blocked: int = 0
    evidence: list[str] = field(default_factory=list)  # what the old primary said around a probe commit


def collect_notice(into: list[str], notice: psycopg.errors.Diagnostic) -> None:
    into.append(str(notice.message_primary))


async def watch_old_primary(conninfo: str, resumed_at: float, stop: asyncio.Event) -> Watch:
    """Every 0.1 s after SIGCONT: is the old primary in recovery? While it says no, try one probe
    insert (0.5 s): an acknowledged one is a commit on a second primary."""
    watch = Watch()
    while not stop.is_set() and time.time() - resumed_at < WATCH:
        answer = "no answer"
        try:
            conn = await connect(conninfo, 0.5, autocommit=True)
        except (psycopg.Error, OSError, TimeoutError):
            conn = None
        if conn is not None:
            notices: list[str] = []
            conn.add_notice_handler(partial(collect_notice, notices))
            try:
                cursor = await bounded(conn, conn.execute(STATE_QUERY), 0.5)
                row = await cursor.fetchone()
                if row is not None and row[0]:
                    answer = "standby"
                    watch.standby_s = time.time() - resumed_at
                elif row is not None:
                    answer = "read-write"
                    watch.writable_s = time.time() - resumed_at
                    insert = sql.SQL("INSERT INTO {} DEFAULT VALUES").format(sql.Identifier(PROBE_TABLE))
                    try:
                        await bounded(conn, conn.execute(insert), 0.5)
                        watch.probe_commits += 1
                        watch.evidence.append(
                            f"probe commit at +{watch.writable_s:.2f} s: synchronous_standby_names "
                            f"'{row[1]}', pg_stat_replication [{row[2]}], notices {notices}"
                        )
                    except TimeoutError:
                        watch.probe_blocked += 1
            except (psycopg.Error, OSError, TimeoutError):
                answer = "error"
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 1)
        if answer == "standby":
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    return watch


def describe_watch(watch: Watch) -> str:
    parts = []
    if watch.writable_s is not None:
        parts.append(f"read-write until +{watch.writable_s:.1f} s after SIGCONT")
    else:
        parts.append("never read-write after SIGCONT")
    if watch.standby_s is not None:
        parts.append(f"in recovery at +{watch.standby_s:.1f} s")
    if watch.probe_commits or watch.probe_blocked:
        parts.append(f"probe inserts: {watch.probe_commits} acknowledged, {watch.probe_blocked} blocked")
    parts.extend(watch.evidence)
    return ", ".join(parts)


def apply_watch(trial: Trial, watch: Watch) -> None:
    trial.resumed_writable_s = None if watch.writable_s is None else round(watch.writable_s, 2)
    trial.resumed_standby_s = None if watch.standby_s is None else round(watch.standby_s, 2)
    trial.probe_commits, trial.probe_blocked = watch.probe_commits, watch.probe_blocked


async def with_watch(
    conninfo: str, healthy: Callable[[], Awaitable[float]]
) -> tuple[float | None, Watch, str]:
    """SIGCONT has just been sent: watch the old primary while waiting for health."""
    resumed_at = time.time()
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_old_primary(conninfo, resumed_at, stop))
    error = ""
    healthy_after: float | None = None
    try:
        await healthy()
        healthy_after = time.time() - resumed_at
    except (AnchorUnavailable, XchaError) as failure:
        error = str(failure).splitlines()[0]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(watcher), 5)
    stop.set()
    return healthy_after, await watcher, error


# ---- xcha ----------------------------------------------------------------------------------------


async def run_xcha(args: argparse.Namespace, scenarios: list[str], trials: list[Trial]) -> dict[str, object]:
    plan = one_pair_plan()
    settings: dict[str, object] = {
        "router": plan.router,
        "heartbeat_interval_s": plan.heartbeat_interval,
        "failure_timeout_s": plan.failure_timeout,
        "probe_timeout_s": plan.probe_timeout,
        "startup_grace_s": plan.startup_grace,
        "synchronous": plan.datanodes[0].synchronous,
        "sync_policy": plan.datanodes[0].sync_policy,
        "client": "writes through the coordinator (postgres_fdw)",
    }
    say("xcha: a coordinator and dn1 (dn1a, dn1b)")
    started = time.monotonic()
    async with running_deployment("compare", None, timeout=args.timeout, keep=args.keep) as cluster:
        say(f"xcha: protected after {time.monotonic() - started:.1f} s; master {cluster.master()}")
        writer = cluster.writers["dn1"]
        coordinator = [cluster.topology.coordinator_app_conninfo(COORDINATOR)]
        async with await psycopg.AsyncConnection.connect(
            cluster.topology.app_conninfo(cluster.master()), autocommit=True
        ) as conn:
            await conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY)").format(
                    sql.Identifier(PROBE_TABLE)
                )
            )
        for scenario in scenarios:
            for index in range(1, args.trials + 1):
                trial = Trial("xcha", scenario, index)
                trials.append(trial)
                try:
                    await xcha_trial(cluster, writer, coordinator, trial, args.timeout)
                except (XchaError, psycopg.Error, OSError, ConnectionError) as error:
                    trial.error = str(error).splitlines()[0] if str(error) else type(error).__name__
                    say(f"  xcha {scenario} #{index}: FAILED: {trial.error}")
                    await cluster.wait_protected(args.timeout)
                else:
                    report(trial)
        outcome = await cluster.finish()
        settings["final_check"] = {"acknowledged": outcome.acknowledged, "lost": len(outcome.lost)}
    return settings


async def xcha_trial(
    cluster: LoadedCluster, writer: Writer, coordinator: list[str], trial: Trial, timeout: float
) -> None:
    await cluster.wait_protected(timeout)
    await wait_writes(writer, 20, 30)
    await asyncio.sleep(QUIET_BEFORE_TRIAL)
    failures_before = len(writer.failures)
    fault = cluster.kill_master() if trial.scenario == "failover" else cluster.hang_master()
    trial.old_primary = fault.member
    old_conninfo = cluster.topology.app_conninfo(fault.member)
    try:
        recovery = await cluster.recovery(fault, timeout)
        trial.rto_ms = recovery.rto_ms
        trial.new_primary = recovery.new_master
        trial.marks_ms = {
            "detected": recovery.detect_ms,
            "promoted": recovery.promote_ms,
            "rerouted": recovery.reroute_ms,
        }
        if trial.scenario == "hang":
            await asyncio.sleep(HOLD)
    finally:
        if trial.scenario == "hang":
            cluster.resume(fault.member)
    trial.failed_writes = len(writer.failures) - failures_before
    if trial.scenario == "hang":
        healthy_after, watch, error = await with_watch(
            old_conninfo, lambda: cluster_healthy(cluster, timeout)
        )
        apply_watch(trial, watch)
        trial.healthy_after_s = healthy_after
        trial.error = error
        note = describe_watch(watch)
    else:
        try:
            await cluster.wait_protected(timeout)
            trial.healthy_after_s = time.time() - fault.at
        except XchaError as error:
            trial.error = str(error).splitlines()[0]
        note = ""
    group = cluster.group(fault.datanode)
    old = next((m for m in group.members if m.name == fault.member), None)
    rejoined = group.state == "protected" and group.master != fault.member
    trial.fate = fate_category(trial.new_primary == fault.member, rejoined)
    seen = f"group {group.state}, master {group.master}"
    if old is not None:
        seen += f"; {fault.member}: goal {old.goal}, {old.mode}"
    trial.detail = "; ".join(p for p in (seen, note) if p)
    trial.lost, trial.unexpected = await check_lost(writer, coordinator)
    trial.acknowledged = len(writer.acknowledged)


async def cluster_healthy(cluster: LoadedCluster, timeout: float) -> float:
    started = time.monotonic()
    await cluster.wait_protected(timeout)
    return time.monotonic() - started


def fate_category(restarted_in_place: bool, rejoined: bool) -> str:
    if restarted_in_place:
        return "restarted in place"
    return "failed over, old primary rejoined as standby" if rejoined else "failed over, old primary not back"


# ---- anchors -------------------------------------------------------------------------------------


def make_anchor(system: str, keep: bool) -> Anchor:
    if system == "patroni-default":
        return Patroni(None, keep)
    if system == "patroni-tight":
        return Patroni(dict(TIGHT_TIMINGS), keep)
    if system == "pg_auto_failover":
        return PgAutoFailover(keep)
    raise ValueError(system)


async def run_anchor(
    system: str, args: argparse.Namespace, scenarios: list[str], trials: list[Trial]
) -> dict[str, object]:
    anchor = make_anchor(system, args.keep)
    writer: Writer | None = None
    task: asyncio.Task[None] | None = None
    try:
        say(f"{system}: installing")
        version = await anchor.install()
        say(f"{system}: {version}; starting in {anchor.base}")
        started = time.monotonic()
        await anchor.start(args.timeout)
        roles = await anchor.roles()
        say(f"{system}: healthy after {time.monotonic() - started:.1f} s: {roles}")
        settings = anchor.settings()
        conninfos = [anchor.conninfo(n) for n in anchor.nodes]
        writer = Writer(conninfos, table=TABLE)
        await writer.prepare()
        primary = await anchor.primary()
        assert primary is not None
        async with await psycopg.AsyncConnection.connect(anchor.conninfo(primary), autocommit=True) as conn:
            await conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY)").format(
                    sql.Identifier(PROBE_TABLE)
                )
            )
        task = asyncio.create_task(writer.run())
        await wait_writes(writer, 20, 30)
        for scenario in scenarios:
            for index in range(1, args.trials + 1):
                trial = Trial(system, scenario, index)
                trials.append(trial)
                try:
                    await anchor_trial(anchor, writer, trial, args.timeout)
                except (AnchorUnavailable, XchaError, psycopg.Error, OSError, ConnectionError) as error:
                    trial.error = str(error).splitlines()[0] if str(error) else type(error).__name__
                    say(f"  {system} {scenario} #{index}: FAILED: {trial.error}")
                    await anchor.wait_healthy(args.timeout)  # raises when it cannot recover: next system
                else:
                    report(trial)
        writer.stop()
        await task
        await writer.close()
        lost, unexpected = await check_lost(writer, conninfos)
        settings["final_check"] = {
            "acknowledged": len(writer.acknowledged),
            "lost": lost,
            "unexpected": unexpected,
        }
        return settings
    finally:
        if writer is not None:
            writer.stop()
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await writer.close()
        killed = await anchor.down()
        say(f"{system}: stopped every process" + (f" (SIGKILL of {len(killed)} left over)" if killed else ""))


async def anchor_trial(anchor: Anchor, writer: Writer, trial: Trial, timeout: float) -> None:
    await anchor.wait_healthy(timeout)
    await wait_writes(writer, 20, 30)
    await asyncio.sleep(QUIET_BEFORE_TRIAL)
    old = await anchor.primary()
    if old is None:
        raise AnchorUnavailable("no primary before the fault")
    trial.old_primary = old
    old_pid = anchor.postmaster_pid(old)
    acked_before, failures_before = len(writer.acknowledged), len(writer.failures)
    if trial.scenario == "failover":
        anchor.kill_postmaster(old)
        fault_at = time.time()
    else:
        anchor.host_signal(old, signal.SIGSTOP)
        fault_at = time.time()
        anchor.host_signal(old, signal.SIGSTOP)  # anything forked meanwhile
    try:
        trial.rto_ms = await wait_recovery(writer, fault_at, acked_before, timeout)
        if trial.rto_ms is None:
            trial.error = f"writes did not resume within {timeout:.0f} s"
        trial.new_primary = await current_primary(anchor, 10) or "?"
        if trial.scenario == "hang":
            await asyncio.sleep(HOLD)
    finally:
        if trial.scenario == "hang":
            anchor.host_signal(old, signal.SIGCONT)
    trial.failed_writes = len(writer.failures) - failures_before
    note = ""
    if trial.scenario == "hang":
        healthy_after, watch, error = await with_watch(
            anchor.conninfo(old), lambda: anchor.wait_healthy(timeout)
        )
        apply_watch(trial, watch)
        trial.healthy_after_s = healthy_after
        trial.error = trial.error or error
        note = describe_watch(watch)
    else:
        try:
            await anchor.wait_healthy(timeout)
            trial.healthy_after_s = time.time() - fault_at
        except AnchorUnavailable as error:
            trial.error = trial.error or str(error).splitlines()[0]
    roles = {}
    with contextlib.suppress(Exception):
        roles = await anchor.roles()
    primary_now = next((n for n, r in roles.items() if is_primary(r)), "?")
    rejoined = "standby" in roles.get(old, "")
    in_place = trial.new_primary == old and primary_now == old
    trial.fate = fate_category(in_place, rejoined)
    parts = [f"now: {', '.join(f'{n} {r}' for n, r in sorted(roles.items())) or 'unknown'}"]
    if in_place:
        new_pid = anchor.postmaster_pid(old)
        parts.append(f"postmaster {old_pid} -> {new_pid}")
    if note:
        parts.append(note)
    trial.detail = "; ".join(parts)
    trial.lost, trial.unexpected = await check_lost(writer, writer.conninfos)
    trial.acknowledged = len(writer.acknowledged)


async def current_primary(anchor: Anchor, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            primary = await anchor.primary()
            if primary is not None:
                return primary
        await asyncio.sleep(0.2)
    return None


# ---- reporting -----------------------------------------------------------------------------------


def report(trial: Trial) -> None:
    rto = f"{trial.rto_ms:.0f} ms" if trial.rto_ms is not None else "none"
    healthy = f"{trial.healthy_after_s:.1f} s" if trial.healthy_after_s is not None else "not healthy"
    error = f" [{trial.error}]" if trial.error else ""
    say(
        f"  {trial.system} {trial.scenario} #{trial.index}: RTO {rto}, {trial.failed_writes} failed writes, "
        f"{trial.old_primary} -> {trial.new_primary}: {trial.fate} (healthy after {healthy}); "
        f"lost {trial.lost}; {trial.detail}{error}"
    )


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value / 1000:.1f} s"


def fate_summary(group: list[Trial]) -> str:
    counts = Counter(t.fate for t in group if t.fate)
    text = "; ".join(f"{fate} x{count}" for fate, count in counts.most_common())
    hang = [t for t in group if t.scenario == "hang" and t.fate]
    if hang:
        writable = [t.resumed_writable_s for t in hang if t.resumed_writable_s is not None]
        standby = [t.resumed_standby_s for t in hang if t.resumed_standby_s is not None]
        commits = sum(t.probe_commits for t in hang)
        text += (
            f"; after SIGCONT read-write for up to {max(writable):.1f} s"
            if writable
            else "; never read-write"
        )
        text += f", in recovery after {min(standby):.1f}-{max(standby):.1f} s" if standby else ""
        text += f", {commits} split-brain probe commits"
    healthy = [t.healthy_after_s for t in group if t.healthy_after_s is not None]
    if healthy:
        text += f"; healthy again after {percentile(healthy, 0.5):.0f} s (p50)"
    return text or "-"


def build_result(
    args: argparse.Namespace,
    systems: list[str],
    scenarios: list[str],
    trials: list[Trial],
    settings: dict[str, dict[str, object]],
    unavailable: dict[str, str],
    elapsed: float,
) -> Result:
    result = Result(
        "compare",
        {
            "trials": args.trials,
            "systems": ",".join(systems),
            "scenarios": ",".join(scenarios),
            "write interval": "10 ms",
            "trial timeout": f"{args.timeout:g} s",
            "hang held": f"until writes resumed + {HOLD:g} s",
            **{f"{name} timings": short_timings(name, s) for name, s in settings.items()},
        },
    )
    baseline: dict[str, float] = {}
    rows = []
    figures: dict[str, object] = {}
    for system in systems:
        for scenario in scenarios:
            group = [t for t in trials if t.system == system and t.scenario == scenario]
            if system in unavailable:
                rows.append((system, scenario, "-", "-", "-", f"not run: {unavailable[system]}", "-"))
                continue
            values = [t.rto_ms for t in group if t.rto_ms is not None]
            stats = summary(values)
            p50 = stats.get("p50")
            if system == "xcha" and p50:
                baseline[scenario] = p50
            failed = sum(1 for t in group if t.rto_ms is None)
            lost = [t.lost for t in group if t.lost is not None]
            lost_text = str(max(lost)) if lost else "?"
            if failed:
                lost_text += f" ({failed} trial(s) without recovery)"
            ratio = f"{p50 / baseline[scenario]:.1f}x" if p50 and baseline.get(scenario) else "-"
            rows.append(
                (
                    system,
                    scenario,
                    ms(p50),
                    ms(stats.get("max")),
                    lost_text,
                    fate_summary(group),
                    ratio,
                )
            )
            figures[f"{system}/{scenario}"] = {
                "rto_ms": stats,
                "lost": max(lost) if lost else None,
                "trials_without_recovery": failed,
                "p50_over_xcha": round(p50 / baseline[scenario], 2)
                if p50 and baseline.get(scenario)
                else None,
            }
    result.tables.append(
        table(("system", "scenario", "RTO p50", "max", "lost", "old primary's fate", "p50 / xcha"), rows)
    )
    detail_rows = [
        (
            t.system,
            t.scenario,
            t.index,
            f"{t.rto_ms:.0f}" if t.rto_ms is not None else "-",
            f"{t.old_primary} -> {t.new_primary}",
            f"{t.healthy_after_s:.1f}" if t.healthy_after_s is not None else "-",
            t.lost if t.lost is not None else "?",
            (t.detail + (f" [error: {t.error}]" if t.error else "")).replace("|", "/"),
        )
        for t in trials
    ]
    result.tables.append(
        table(
            ("system", "scenario", "#", "RTO ms", "primary", "healthy after s", "lost", "seen"), detail_rows
        )
    )
    result.figures = {
        "summary": figures,
        "trials": [asdict(t) for t in trials],
        "systems": settings,
        "unavailable": unavailable,
        "elapsed_s": round(elapsed),
    }
    result.notes.append(
        "RTO = fault -> first acknowledged insert after the first failed one (a client inserting every "
        "10 ms; xcha through its coordinator, the anchors through both nodes, writing to the one not in "
        "recovery)."
    )
    result.notes.append(
        "healthy after: from the kill (failover) or from SIGCONT (hang) until a primary with a streaming "
        "synchronous standby again, as the manager and PostgreSQL both report."
    )
    result.notes.append(
        "After SIGCONT the old primary is asked pg_is_in_recovery() every 0.1 s; while it says no, a probe "
        f"insert into {PROBE_TABLE} (0.5 s bound) shows whether it would acknowledge a commit (split brain)."
    )
    for system, why in unavailable.items():
        result.notes.append(f"{system} was not measured: {why}")
    result.notes.append(f"The whole comparison took {elapsed / 60:.1f} min.")
    return result


def short_timings(system: str, settings: dict[str, object]) -> str:
    if system == "xcha":
        return (
            f"heartbeat {settings.get('heartbeat_interval_s')} s, "
            f"failure_timeout {settings.get('failure_timeout_s')} s, "
            f"probe_timeout {settings.get('probe_timeout_s')} s"
        )
    if system.startswith("patroni"):
        running = settings.get("timings_running")
        if isinstance(running, dict) and running:
            return ", ".join(f"{k} {v}" for k, v in running.items() if k != "synchronous_mode")
        return str(settings.get("timings_set"))
    monitor = settings.get("monitor_settings")
    if isinstance(monitor, dict):
        keys = ("health_check_period", "node_considered_unhealthy_timeout", "primary_demote_timeout")
        return ", ".join(f"{k} {monitor.get(k)}" for k in keys)
    return "defaults"


async def run(args: argparse.Namespace) -> int:
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS] + [s for s in scenarios if s not in SCENARIOS]
    if unknown or not systems or not scenarios:
        say(f"unknown or missing systems/scenarios: {unknown}; choose from {SYSTEMS} and {SCENARIOS}")
        return 2
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    orphans = Counter[str]()

    def quiet(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """Writer._connect cancels its slower attempts, and xcha.pg.client.bounded then leaves its
        inner query task behind (or an attempt fails as it is cancelled): counted, not printed."""
        error = context.get("exception")
        if isinstance(error, psycopg.Error | ConnectionError) and "never retrieved" in str(
            context.get("message")
        ):
            orphans[str(error).strip() or type(error).__name__] += 1
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(quiet)
    if main is not None:
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
    started = time.monotonic()
    trials: list[Trial] = []
    settings: dict[str, dict[str, object]] = {}
    unavailable: dict[str, str] = {}
    try:
        for system in systems:
            say(f"== {system}")
            try:
                if system == "xcha":
                    settings[system] = await run_xcha(args, scenarios, trials)
                else:
                    settings[system] = await run_anchor(system, args, scenarios, trials)
            except (AnchorUnavailable, XchaError, psycopg.Error, OSError, ConnectionError) as error:
                why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                done = [t for t in trials if t.system == system]
                if not done:
                    unavailable[system] = why
                    say(f"{system}: COULD NOT BE INSTALLED OR STARTED: {why}; going on with the rest")
                else:
                    say(f"{system}: STOPPED after {len(done)} trial(s): {why}; going on with the rest")
                    settings.setdefault(system, {})["aborted"] = why
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    elapsed = time.monotonic() - started
    result = build_result(args, systems, scenarios, trials, settings, unavailable, elapsed)
    if orphans:
        result.notes.append(
            f"{sum(orphans.values())} client tasks failed unawaited after Writer._connect cancelled them "
            f"(xcha.pg.client.bounded leaves its inner task behind): "
            f"{', '.join(f'{k}: {v}' for k, v in orphans.items())}."
        )
    path = result.write()
    say("\n" + path.read_text())
    say(f"results: {path} and {path.with_suffix('.json')}")
    lost = any(t.lost for t in trials)
    return 1 if lost else 0
