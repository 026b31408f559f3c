"""./run bench sim: a deterministic simulation of the controller's decisions.

What is real: the controller itself (xcha.controller.controller.Controller: heartbeats and
observe(), view(), the failure timer, the start-up grace, evaluate() and fsm.decide(), the
persisted epoch and group records in a SqliteStore (in memory, kept across controller
restarts), how each step is carried out (_promote, _fence, _follow, _set_sync, _detach,
_switchover) and the reroute barrier (routing.Router with simulated coordinators). It runs
on an asyncio loop whose clock is virtual (bench/sim/loop.py), so its timers, timeouts and
tasks behave as in production, deterministically, thousands of times faster.

What is simulated (bench/sim/agent.py, world.py): the agents (the rules of agent.py:
epochs, self-fencing, fencing when told it is no master, PostgresInstance.follow's keep /
restart / rewind / clone), PostgreSQL (WAL as a list of commit ids, timelines, WAL
receivers and senders, synchronous_standby_names with FIRST k / ANY k, promotion,
pg_rewind, clones, clean shutdowns), the network (per-host-pair partitions, delay,
loss, duplication and reordering of heartbeats; role messages fail by deadline, by
keepalive (7 s) or by a connection reset), the controller's probe, and clients that
commit on every server that accepts writes, one commit per tick each.

Faults: crash (kill -9 of a postmaster), hang (SIGSTOP of a host: agent and PostgreSQL),
restart (host down, then the agent starts again), partition (from the controller, from the
other members, from everyone), delay, reorder, loss, duplication, agent death, controller
restart (a crash: its tasks die; the store survives), coordinator down, and an operator's
switchover. Each history: start from empty members (initdb, clones) to protected; 1 to 4
faults in a 12 s window, each up to 5 s; every fault healed; then protected again with
every member back within 40 s.

Invariants, after every tick (50 ms) and at every promotion, rewind and clone: never two
servers accepting writes whose agents hold the same epoch (a server whose agent saved
`fenced`, and is killing it, claims none); never a promotion or a start as
master of a server missing an acknowledged commit (unless allow_data_loss); no
acknowledged commit lost (acknowledged commits form one history, every one is held by some
server after any rewind or clone, and by the final master); no group stuck.

Not modelled (yet): ANY k with k > 1, more than one group per controller, operator
failover requests, pause, adding or removing standbys, the port-takeover router,
PostgreSQL that hangs while its agent runs, the time a WAL receiver takes to connect after
a start (it connects at once), WAL recycling, a clone copying the master's
synchronous_standby_names (postgresql.auto.conf), and the agent's snapshot age: agents
read the model directly (fresh) and their upstream probe answers at once.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import replace

from bench.common import Result, say, table
from bench.sim.history import FAULT_KINDS, SHAPES, Outcome, run_history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=10000, help="histories to run (seeds 0..N-1)")
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed and print its trace")
    parser.add_argument(
        "--groups",
        default=",".join(SHAPES),
        help=f"group shapes to draw from (default: all of {', '.join(SHAPES)})",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")


def _shapes(text: str) -> tuple[str, ...]:
    shapes = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise SystemExit(f"unknown group shapes {unknown}: choose from {', '.join(SHAPES)}")
    return shapes


def _one(job: tuple[int, tuple[str, ...]]) -> Outcome:
    """One history in a worker process; only a failing one keeps its trace."""
    outcome = run_history(*job)
    return outcome if outcome.violation is not None else replace(outcome, trace=[])


def replay(seed: int, shapes: tuple[str, ...]) -> int:
    outcome = run_history(seed, shapes)
    print("\n".join(outcome.trace))
    faults = ", ".join(outcome.faults) or "none"
    print(
        f"seed {seed}: {outcome.shape}{' (allow_data_loss)' if outcome.allow_data_loss else ''}, "
        f"faults: {faults}; {outcome.commits} commits, {outcome.acknowledged} acknowledged, "
        f"{outcome.failovers} failovers, {outcome.time:.1f} s virtual"
    )
    if outcome.violation is not None:
        print(f"VIOLATION at step {outcome.step}: {outcome.violation.invariant}: {outcome.violation.detail}")
        return 1
    print("every invariant held")
    return 0


async def run(args: argparse.Namespace) -> int:
    shapes = _shapes(args.groups)
    if args.seed is not None:
        return await asyncio.to_thread(replay, args.seed, shapes)  # its own (virtual) loop
    seeds = range(args.first, args.first + args.seeds)
    started = time.monotonic()
    results: list[Outcome] = []
    jobs = [(seed, shapes) for seed in seeds]
    with multiprocessing.get_context("fork").Pool(max(1, args.workers)) as pool:
        for index, outcome in enumerate(pool.imap(_one, jobs, chunksize=20)):
            results.append(outcome)
            if (index + 1) % 1000 == 0:
                say(f"{index + 1} histories, {time.monotonic() - started:.0f} s")
    wall = time.monotonic() - started
    failing = [(o, o.violation) for o in results if o.violation is not None]
    for outcome, violation in failing:
        say(f"seed {outcome.seed}: {violation.invariant}: {violation.detail}")
        say("\n".join(f"    {line}" for line in outcome.trace[-15:]))
    by_kind = Counter(kind for o in results for kind in set(o.faults))
    virtual = sum(o.time for o in results)
    figures: dict[str, object] = {
        "seeds": len(results),
        "first_seed": args.first,
        "wall_s": round(wall, 1),
        "histories_per_s": round(len(results) / wall, 1),
        "virtual_s": round(virtual),
        "histories_with_fault": {kind: by_kind[kind] for kind in FAULT_KINDS},
        "violations": len(failing),
        "violations_by_invariant": dict(Counter(v.invariant for _, v in failing)),
        "failing_seeds": [o.seed for o, _ in failing],
        "failovers": sum(o.failovers for o in results),
        "commits": sum(o.commits for o in results),
        "acknowledged": sum(o.acknowledged for o in results),
    }
    say(json.dumps(figures))
    if not args.no_write:
        summary = (
            len(results),
            len(failing),
            f"{wall:.0f} s",
            figures["histories_per_s"],
            f"{virtual:.0f} s",
        )
        written = Result(
            "sim",
            {"shapes": ",".join(shapes), "workers": args.workers, "failure_timeout": 2.0, "heartbeat": 0.25},
            figures,
            tables=[
                table(["fault", "histories with it"], [(kind, by_kind[kind]) for kind in FAULT_KINDS]),
                table(["seeds", "violations", "wall", "histories/s", "virtual time"], [summary]),
            ],
            notes=[f"seed {o.seed}: {v.invariant}: {v.detail}" for o, v in failing[:30]],
        ).write()
        say(f"wrote {written}")
    return 1 if failing else 0
