"""`./run bench hang`: a hung master host (SIGSTOP of its agent and every PostgreSQL process)
past failure_timeout, N times; then a soak of short stalls (1 s every 20 s by default) that
must cause no failover. Target: RTO <= failure_timeout + 0.5 s; zero failovers in the soak."""

import argparse
import asyncio
import signal
import time

from bench.common import (
    QUIET_BEFORE_TRIAL,
    Result,
    add_workdir_argument,
    one_pair_plan,
    optional_ms,
    running_deployment,
    say,
    summary,
    table,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--stall-seconds", type=float, default=1.0)
    parser.add_argument("--stall-every", type=float, default=20.0)
    add_workdir_argument(parser)


async def run(args: argparse.Namespace) -> int:
    plan = one_pair_plan()
    failure_timeout = plan.failure_timeout
    rows, rto = [], []
    stalls = soak_failovers = 0
    async with running_deployment("hang", args.workdir) as cluster:
        for trial in range(1, args.trials + 1):
            await cluster.wait_protected()
            await asyncio.sleep(QUIET_BEFORE_TRIAL)
            fault = cluster.hang_master()
            try:
                recovery = await cluster.recovery(fault)
            finally:
                cluster.resume(fault.member)
            say(
                f"trial {trial}: SIGSTOP of {fault.member}'s host: writes through the coordinator after "
                f"{optional_ms(recovery.rto_ms)} ms (detected {optional_ms(recovery.detect_ms, '+')})"
            )
            rows.append(
                (
                    trial,
                    fault.member,
                    recovery.new_master,
                    optional_ms(recovery.detect_ms),
                    optional_ms(recovery.rto_ms),
                )
            )
            if recovery.rto_ms is not None:
                rto.append(recovery.rto_ms)
        await cluster.wait_protected()
        epoch_before = cluster.status().epoch
        failovers_before = len(cluster.events("dn1", "failover"))
        say(
            f"soak: a {args.stall_seconds:g} s stall of the master host every {args.stall_every:g} s for "
            f"{args.soak_seconds:g} s"
        )
        deadline = time.monotonic() + args.soak_seconds
        while time.monotonic() + args.stall_every <= deadline + 0.001:
            await asyncio.sleep(args.stall_every - args.stall_seconds)
            member = cluster.master()
            cluster.topology.host_signal(member, signal.SIGSTOP)
            await asyncio.sleep(args.stall_seconds)
            cluster.topology.host_signal(member, signal.SIGCONT)
            stalls += 1
        await asyncio.sleep(2 * failure_timeout)
        soak_failovers = len(cluster.events("dn1", "failover")) - failovers_before
        epoch_after = cluster.status().epoch
        say(f"soak: {stalls} stalls, {soak_failovers} failovers, epoch {epoch_before} -> {epoch_after}")
        outcome = await cluster.finish()
    stats = summary(rto)
    target = failure_timeout * 1000 + 500
    result = Result(
        "hang",
        {
            "trials": args.trials,
            "failure_timeout": failure_timeout,
            "heartbeat_interval": plan.heartbeat_interval,
            "soak_seconds": args.soak_seconds,
            "stall_seconds": args.stall_seconds,
            "stall_every": args.stall_every,
        },
    )
    result.figures = {
        "rto_ms": stats,
        "soak_stalls": stalls,
        "soak_failovers": soak_failovers,
        "acknowledged": outcome.acknowledged,
        "lost": len(outcome.lost),
        "targets_met": stats.get("max", 1e9) <= target and soak_failovers == 0 and not outcome.lost,
    }
    result.tables.append(table(("trial", "stopped", "new master", "detected ms", "first write ms"), rows))
    result.tables.append(
        table(
            ("RTO p50 ms", "p95 ms", "max ms", "target ms", "soak stalls", "soak failovers", "lost"),
            [
                (
                    stats.get("p50"),
                    stats.get("p95"),
                    stats.get("max"),
                    target,
                    stalls,
                    soak_failovers,
                    len(outcome.lost),
                )
            ],
        )
    )
    result.notes.append(f"{outcome.acknowledged} commits acknowledged, {len(outcome.lost)} lost.")
    path = result.write()
    say("\n" + path.read_text())
    return 0 if not outcome.lost else 1
