"""`./run bench soak --faults N [--seed S]`: a long soak of random faults, one at a time, on the
deployment `xcha up` starts (a supervisor running the controller and an agent per PostgreSQL
instance; datanodes dn1 and dn2, each a master with a synchronous standby; a postgres_fdw
coordinator) under continuous writes through the coordinator to both datanodes.

Faults come in rounds, each round every kind once in a seeded random order, each on a datanode
drawn at random (the seed also draws the stall lengths); after each the soak waits until every
group is `protected` again, every agent idle and reporting, and writes go through the
coordinator to both datanodes (bounded by --protected-timeout: a group that does not come back is
counted, and the soak goes on once it is back, or stops when it is not within another bound).

Kinds: kill -9 of a master's postmaster, of a standby's postmaster, of an agent, of the controller
(agents and controller are restarted by the supervisor, as `xcha up` runs them); SIGSTOP of a
master host (its agent and every PostgreSQL process) for 0.5-5 s; a master's network namespace
cut off (link down) until the controller moved the master, then healed; a planned switchover
(the controller's Switchover RPC); a lost synchronous standby (SIGSTOP of its host for 1.25-2.5 x
failure_timeout, so that the group degrades per its policy before it comes back).

For the partition fault every process runs on an address of 192.0.2.0/24 in a network namespace
of its own (tests/chaos/netns.py), the benchmark itself (writers, coordinator) in a "client"
namespace; the namespaces are the benchmark's own and are removed however it ends. Without
root or iproute2 the soak runs on loopback and leaves the partition fault out, and says so.

Checked independently of the controller: after every fault, the commits acknowledged since the
last check are read back on the datanode's writable member (asked directly: pg_is_in_recovery()
on each member), and at the end every acknowledged commit is read back through the coordinator
and on each datanode's final master (lost must be 0, nothing present that was never sent).
Writes accepted by a deposed master: from the moment the controller shows a new master until the
fault's cycle ends, a probe keeps trying to commit on the old master directly (its Unix socket,
which no partition cuts); every commit it acknowledges is counted (must be 0).

Per kind: count, failovers, writes interrupted, RTO (fault -> first acknowledged write through
the coordinator after the first failed one, on the faulty datanode), time back to protected (from
the fault's start), groups that did not come back, lost, deposed-master writes, and how long a
cycle (fault, recovery, writes again) takes.
"""

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import RESULTS, say
from bench.soak.check import FinalCheck, final_check, leftovers, prepare_probe
from bench.soak.faults import Soak, rounds
from bench.soak.namespaces import Namespaces
from bench.soak.report import _bad, _line, report
from bench.soak.settings import KINDS, NEEDS_NAMESPACES
from tests.chaos.netns import NamespacesUnavailable
from xcha.demo import demo_plan
from xcha.harness import LoadedCluster
from xcha.topology import TopologyPlan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faults", type=int, default=1000, help="how many faults (default 1000)")
    parser.add_argument("--seed", type=int, help="the random seed (default: drawn, and recorded)")
    parser.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated fault kinds (default all): {', '.join(KINDS)}",
    )
    parser.add_argument(
        "--protected-timeout",
        type=float,
        default=60.0,
        help="s from a fault until every group must be protected again (default 60)",
    )
    parser.add_argument(
        "--loopback",
        action="store_true",
        help="no network namespaces: everything on 127.0.0.1, without the partition fault",
    )
    parser.add_argument(
        "--workdir", type=Path, help="the deployment's directory (default: a temporary one, removed)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help=f"where soak-DATE.md/.json go (default {RESULTS})"
    )


# ---- network namespaces ----------------------------------------------------------------------------


def soak_plan(hosts: dict[str, tuple[str, str]]) -> TopologyPlan:
    return replace(demo_plan("fdw"), hosts=hosts)


async def run(args: argparse.Namespace) -> int:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or args.faults < 1:
        say(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}" if unknown else "nothing to do")
        return 2
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    rng = random.Random(seed)
    notes: list[str] = []
    temporary = args.workdir is None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="xcha-bench-soak-"))
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    namespaces: Namespaces | None = None
    cluster: LoadedCluster | None = None
    soak: Soak | None = None
    faults_task: asyncio.Task[None] | None = None
    interrupted = ""
    check: FinalCheck | None = None
    error = ""
    setup_s = wall_s = 0.0
    disk: dict[str, object] = {}

    def interrupt(signum: int) -> None:
        """The first Ctrl-C (or SIGTERM): no more faults, the check, then everything stopped;
        the second: everything stopped at once; later ones wait for that."""
        nonlocal interrupted
        name = signal.Signals(signum).name
        if not interrupted:
            interrupted = name
            if faults_task is not None and not faults_task.done():
                say(f"{name}: no more faults; checking, then stopping everything (again: stop at once)")
                faults_task.cancel()
                return
        if interrupted != "twice" and main is not None:
            interrupted = "twice"
            say(f"{name}: stopping everything now")
            main.cancel()
        else:
            say(f"{name}: stopping already")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt, signum)
    try:
        plan = demo_plan("fdw")
        hosts: dict[str, tuple[str, str]] = {}
        if not args.loopback:
            namespaces = Namespaces()
            try:
                hosts = namespaces.create([d.members for d in plan.datanodes])
            except (NamespacesUnavailable, OSError, RuntimeError) as unavailable:
                namespaces = None
                notes.append(
                    f"No network namespaces ({unavailable}): everything on loopback, no partition fault."
                )
        elif any(k in NEEDS_NAMESPACES for k in kinds):
            notes.append("--loopback: everything on 127.0.0.1, no partition fault.")
        if namespaces is None:
            kinds = [k for k in kinds if k not in NEEDS_NAMESPACES]
        cluster = LoadedCluster(workdir, soak_plan(hosts))
        cluster.topology.supervise = True  # as `xcha up` runs it: a supervisor restarts what dies
        soak = Soak(cluster, rng, args.protected_timeout)
        soak.namespaces = namespaces
        say(
            f"soak: {args.faults} faults ({', '.join(kinds)}), seed {seed}, deployment in {workdir}"
            + (f", network namespaces {namespaces.network.prefix}-*" if namespaces else ", loopback")
        )
        began = time.monotonic()
        await cluster.start(timeout=180)
        await prepare_probe(soak)
        setup_s = time.monotonic() - began
        say(f"deployment protected and under writes after {setup_s:.1f} s")
        soak.started = time.time()
        schedule = rounds(rng, kinds)

        async def faults(soak: Soak) -> None:
            for index in range(1, args.faults + 1):
                record = await soak.cycle(index, next(schedule))
                say(_line(record))

        faults_task = asyncio.create_task(faults(soak))
        try:
            await faults_task
        except asyncio.CancelledError:
            if not faults_task.cancelled() or not interrupted:
                raise
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"
            say(f"the soak stopped: {error}")
        wall_s = time.time() - soak.started
        check = await final_check(soak)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        error = error or f"interrupted ({interrupted}) before the check"
    except Exception as failure:
        error = error or f"{type(failure).__name__}: {failure}"
        say(f"the soak stopped: {error}")
    finally:
        if soak is not None:
            soak.resume_hosts()
            soak.heal()
            with contextlib.suppress(Exception):
                await soak._stop_probe()
        if cluster is not None:
            stopped = await cluster.down()
            say(f"stopped {len(stopped)} processes by PID")
        if namespaces is not None:
            namespaces.destroy()
            say(f"removed the network namespaces {namespaces.network.prefix}-*")
        records = soak.records if soak is not None else []
        if workdir.is_dir():
            disk = leftovers(workdir)
        if temporary and not error and not _bad(records, check):
            shutil.rmtree(workdir, ignore_errors=True)
        elif temporary:
            say(f"kept {workdir} (logs, data) for a look")
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    result = report(args, seed, kinds, records, check, setup_s, wall_s, notes, error, interrupted)
    result.figures["disk"] = disk
    loads = soak.loads if soak is not None else []
    if loads:
        result.figures["load_average_1min"] = {"mean": round(statistics.fmean(loads), 2), "max": max(loads)}
        result.notes.append(
            f"The machine's 1-minute load average after each fault: mean {statistics.fmean(loads):.1f}, "
            f"max {max(loads):.1f} ({os.cpu_count()} cores): timings stretch with it."
        )
    if disk:
        result.notes.append(
            f"On disk at the end: {disk['workdir_gib']} GiB in the deployment's directory; "
            f"{disk['rewinds_failed_then_recloned']} rejoins whose pg_rewind failed were re-cloned "
            f"instead (agents' logs), leaving {disk['set_aside_data_dirs']} set-aside data directories."
        )
    path = result.write(args.results_dir)
    say("\n" + path.read_text())
    if interrupted:
        return 130
    return 0 if not _bad(records, check) and not error else 1
