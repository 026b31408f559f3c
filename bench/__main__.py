"""./run bench NAME [ARGS]: see BENCHMARKS."""

import argparse
import asyncio
import importlib
import sys

BENCHMARKS = {
    "failover": "kill -9 of dn1's master under writes through the coordinator: RTO, split, loss",
    "hang": "SIGSTOP of dn1's master host (agent + PostgreSQL), then a soak of short stalls",
    "switchover": "the write gap of planned switchovers",
    "scale": "one controller, 1,000 groups of simulated agents over real gRPC",
    "compare": "failover and hang against Patroni and pg_auto_failover on this machine",
    "controller-failover": "three controllers on etcd: leader killed at rest and during a datanode crash",
    "sim": "seeded simulation: the real controller against simulated agents, PostgreSQL and faults",
    "soak": "random faults, one at a time, on xcha up's deployment under writes: loss, RTO, recovery",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(
            "usage: ./run bench NAME [--help]\n" + "\n".join(f"  {n:<11} {d}" for n, d in BENCHMARKS.items()),
            file=sys.stderr,
        )
        return 2
    name = sys.argv[1]
    module = importlib.import_module(f"bench.{name.replace('-', '_')}")
    parser = argparse.ArgumentParser(prog=f"./run bench {name}", description=BENCHMARKS[name])
    module.add_arguments(parser)
    args = parser.parse_args(sys.argv[2:])
    return int(asyncio.run(module.run(args)))


if __name__ == "__main__":
    raise SystemExit(main())
