"""`./run bench scale`: one controller, many datanode groups of simulated agents speaking the
real gRPC protocol (bench/scale_agents.py, a few processes, no PostgreSQL behind them), at the
default heartbeat interval. Measures the controller's CPU, its heartbeat handling time (its
own histogram) and the agents' round trips, and the time from one injected master crash to
the Promote of its standby, compared with a controller that has a single group.
Targets: CPU < 50 % of one core, handling p99 < 20 ms, detection as with one group."""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import Result, say, table
from xcha.topology import free_port, toml_document

TICKS = os.sysconf("SC_CLK_TCK")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--also", type=int, default=100, help="a smaller size measured too (0: none)")
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    parser.add_argument(
        "--interval", type=float, default=0.25, help="heartbeat interval (controller default)"
    )
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--measure", type=float, default=30.0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def handling_buckets(metrics_port: int) -> list[tuple[float, float]]:
    """The controller's heartbeat handling histogram: (upper bound s, cumulative count) since it
    started."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("xcha_heartbeat_handling_seconds_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.split()[-1])))
    return buckets


def bucket_p99_ms(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """Upper bound (ms) of the bucket that holds the 99th percentile of the heartbeats handled
    between the two readings; None when none were."""
    counts = dict(before)
    window = [(bound, count - counts.get(bound, 0.0)) for bound, count in after]
    if not window or window[-1][1] <= 0:
        return None
    total = window[-1][1]
    return next(bound for bound, count in window if count >= 0.99 * total) * 1000


async def measure(
    groups: int, processes: int, interval: float, warmup: float, window: float, workdir: Path
) -> dict[str, object]:
    port, metrics = free_port(), free_port()
    failure_timeout = max(2.0, 2 * interval + 0.5)
    run_for = warmup + window + failure_timeout + 10  # the simulators stop by themselves then
    config = workdir / f"controller-{groups}.toml"
    tables: list[tuple[str, dict[str, object]]] = [
        (
            "[controller]",
            {
                "listen": f"127.0.0.1:{port}",
                "state_dir": workdir / f"state-{groups}",
                "heartbeat_interval": interval,
                "failure_timeout": failure_timeout,
                "metrics_listen": f"127.0.0.1:{metrics}",
            },
        ),
        ("[router]", {"kind": "none"}),
        ("[tls]", {"insecure": True}),
    ]
    tables += [
        ("[[datanode]]", {"name": f"g{i:04d}", "members": [f"g{i:04d}a", f"g{i:04d}b"]})
        for i in range(groups)
    ]
    config.write_text(toml_document(tables))
    log = open(workdir / f"controller-{groups}.log", "wb")  # noqa: SIM115 - closed below
    controller = subprocess.Popen(
        [sys.executable, "-m", "xcha", "controller", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    simulators: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or controller.poll() is not None:
                    raise RuntimeError(f"the controller did not start: see {workdir}") from None
                await asyncio.sleep(0.2)
        # the measured window, on the machine's monotonic clock that the simulators read too
        measure_start = time.monotonic() + warmup
        measure_end = measure_start + window
        per = -(-groups // processes)
        for index in range(processes):
            first = index * per
            count = min(per, groups - first)
            if count <= 0:
                break
            argv = [
                sys.executable,
                "-m",
                "bench.scale_agents",
                "--controller",
                f"127.0.0.1:{port}",
                "--first",
                str(first),
                "--groups",
                str(count),
                "--interval",
                str(interval),
                "--crash-after",
                str(warmup + window),
                "--run-for",
                str(run_for),
                "--measure-start",
                repr(measure_start),
                "--measure-end",
                repr(measure_end),
            ]
            if index == 0:
                argv += ["--victim", "0"]
            simulators.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent, start_new_session=True
                )
            )
        await asyncio.sleep(max(0.0, measure_start - time.monotonic()))
        buckets_before = handling_buckets(metrics)
        cpu_before, wall_before = cpu_seconds(controller.pid), time.monotonic()
        await asyncio.sleep(max(0.0, measure_end - time.monotonic()))
        cpu = (cpu_seconds(controller.pid) - cpu_before) / (time.monotonic() - wall_before) * 100
        p99 = bucket_p99_ms(buckets_before, handling_buckets(metrics))
        # the injected crash, its promotion, and the simulators stopping by themselves follow
        reports = []
        for simulator in simulators:
            try:
                output, _ = simulator.communicate(timeout=run_for + 120)
            except subprocess.TimeoutExpired:
                simulator.kill()
                output, _ = simulator.communicate()
            lines = output.decode().strip().splitlines()
            if simulator.returncode != 0 or not lines:
                raise RuntimeError(f"a simulator failed (exit {simulator.returncode})")
            reports.append(json.loads(lines[-1]))
    finally:
        for process in [*simulators, controller]:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()
    rtt_p99s = [float(r["rtt_p99_ms"]) for r in reports if r.get("rtt_p99_ms") is not None]
    return {
        "groups": groups,
        "agents": 2 * groups,
        "interval_s": interval,
        "simulator_processes": len(simulators),
        "warmup_s": warmup,
        "window_s": window,
        "controller_cpu_pct": round(cpu, 1),
        "handling_p99_bucket_ms": p99,
        "heartbeats": sum(int(r["heartbeats"]) for r in reports),
        "errors": sum(int(r["errors"]) for r in reports),
        "deadline_exceeded": sum(int(r["deadline_exceeded"]) for r in reports),
        "rtt_samples": sum(int(r["rtt_samples"]) for r in reports),
        "rtt_p99_ms": round(max(rtt_p99s), 1) if rtt_p99s else None,
        "detect_to_promote_ms": reports[0].get("detect_to_promote_ms"),
    }


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="xcha-bench-scale-"))
    sizes = [1, *([args.also] if 0 < args.also < args.groups else []), args.groups]
    say(f"controller with {', '.join(map(str, sizes))} groups in turn; files in {workdir}")
    runs = []
    for groups in sizes:
        processes = 1 if groups == 1 else args.processes
        warmup, window = (5.0, 5.0) if groups == 1 else (args.warmup, args.measure)
        runs.append(await measure(groups, processes, args.interval, warmup, window, workdir))
        say(f"{groups} groups: {runs[-1]}")
    many = runs[-1]
    cores = os.cpu_count() or 1
    cores_text = f"{cores} core{'s' if cores != 1 else ''}"
    result = Result(
        "scale",
        {
            "groups": args.groups,
            "heartbeat_interval": args.interval,
            "tls": f"plaintext (the simulators would otherwise spend the machine's {cores_text} on TLS)",
        },
    )

    def per_heartbeat_us(r: dict[str, object]) -> float:
        offered = float(str(r["agents"])) / args.interval
        return float(round(float(str(r["controller_cpu_pct"])) / 100 / offered * 1e6))

    rows = [
        (
            r["groups"],
            r["agents"],
            r["simulator_processes"],
            f"{r['warmup_s']:g} + {r['window_s']:g}",
            r["controller_cpu_pct"],
            per_heartbeat_us(r),
            "-" if r["handling_p99_bucket_ms"] is None else r["handling_p99_bucket_ms"],
            "-" if r["rtt_p99_ms"] is None else r["rtt_p99_ms"],
            r["detect_to_promote_ms"] and round(float(str(r["detect_to_promote_ms"])), 1),
            r["errors"],
            r["deadline_exceeded"],
        )
        for r in runs
    ]
    result.tables.append(
        table(
            (
                "groups",
                "agents",
                "simulator processes",
                "warm-up + window s",
                "controller CPU % of a core",
                "CPU us per offered heartbeat",
                "handling p99 bucket bound ms",
                "agent round trip p99 ms (worst simulator)",
                "crash -> Promote ms",
                "failed heartbeats (whole run)",
                "of which past the 5 s deadline",
            ),
            rows,
        )
    )
    result.notes.append(
        "Controller CPU, handling p99 and round trips are measured over the window only, after the "
        "warm-up; handling p99 is the upper bound of the xcha_heartbeat_handling_seconds bucket that "
        "holds the 99th percentile of the heartbeats handled in the window (before/after difference "
        "of the controller's histogram); the round trip p99 is that of the heartbeats sent in the "
        "window, the highest of the simulator processes' p99s."
    )
    for r in runs:
        errors, late = int(str(r["errors"])), int(str(r["deadline_exceeded"]))
        if errors:
            result.notes.append(
                f"{r['groups']} groups: {errors} Heartbeat calls failed over the whole run (warm-up, "
                f"window, the injected crash and after, its crash report's retries included), {late} of "
                "them by missing their 5 s deadline"
                + (
                    f": the controller saturated ({r['agents']} agents x {1 / args.interval:g} "
                    "heartbeats/s offered)."
                    if late
                    else "."
                )
            )
    cpu_ok = float(str(many["controller_cpu_pct"])) < 50
    p99 = many["handling_p99_bucket_ms"]
    result.figures = {
        "runs": runs,
        "targets": {
            "cpu_under_50pct": cpu_ok,
            "handling_p99_under_20ms": p99 is not None and float(str(p99)) < 20,
        },
    }
    result.notes.append(
        f"The simulators share the machine's {cores_text} with the controller; their own load "
        "inflates the round trips."
    )
    path = result.write()
    say("\n" + path.read_text())
    return 0
