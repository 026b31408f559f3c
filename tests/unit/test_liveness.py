"""Liveness on Heartbeats streams: between an agent's reports, its open stream (kept open by
HTTP/2 keep-alive pings, which gRPC's transport answers) says it is alive; a stalled agent's
connection is closed by the pings and its silence dated back to before the stall."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xcha import timings
from xcha.controller.config import load_controller_config
from xcha.controller.node import ControllerNode
from xcha.controller.observations import Observation
from xcha.controller.routing import Router
from xcha.controller.service import ControllerService
from xcha.controller.store import SqliteLeadership, SqliteStore
from xcha.rpc import create_server, liveness_options
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

STALE = 4.0


def report(sequence: int = 1) -> pb.MemberStatus:
    return pb.MemberStatus(member="dn1a", datanode="dn1", boot_id="b", sequence=sequence)


def test_an_open_stream_is_heard_now_until_its_reports_are_stale() -> None:
    observation = Observation()
    assert observation.update(report(), 10.0)
    observation.streams = 1
    assert observation.heard_at(13.9, STALE) == 13.9
    assert observation.heard_at(14.0, STALE) == 10.0, "no report for stale_after: a stuck agent"


def test_a_closed_stream_dates_the_silence_back_to_its_last_possible_ping() -> None:
    observation = Observation()
    observation.update(report(), 10.0)
    observation.streams = 1
    observation.closed(12.0, 1.25, STALE)
    assert observation.streams == 0
    assert observation.heard_at(12.5, STALE) == pytest.approx(10.75)


def test_a_stream_closed_long_after_its_reports_stopped_is_no_sign_of_life() -> None:
    observation = Observation()
    observation.update(report(), 10.0)
    observation.streams = 1
    observation.closed(30.0, 1.25, STALE)
    assert observation.heard_at(30.0, STALE) == 14.0


def test_without_a_stream_a_member_is_heard_at_its_last_report() -> None:
    observation = Observation()
    observation.update(report(), 10.0)
    assert observation.heard_at(11.0, STALE) == 10.0


def test_a_stall_is_noticed_by_failure_timeout_and_dated_back_no_further_than_its_start() -> None:
    """A stall is noticed (the connection closed) by keepalive interval + timeout, within
    failure_timeout for the defaults and the config limits (keepalive_interval at most
    failure_timeout / 2), so the controller can probe before it judges; the silence is dated
    back by heartbeat_interval + timeout, which keeps "a stall shorter than failure_timeout -
    heartbeat_interval never fails over"."""
    cases = (
        (timings.HEARTBEAT_INTERVAL, timings.KEEPALIVE_INTERVAL, timings.FAILURE_TIMEOUT),
        (0.25, 0.25, 2.0),
        (0.25, 1.0, 2.0),
        (1.0, 2.5, 5.0),
    )
    for interval, every, failure in cases:
        keepalive = timings.Keepalive.of(interval, every, failure)
        assert keepalive.interval + keepalive.timeout <= failure
        assert keepalive.timeout >= timings.reply_timeout(interval)
        assert keepalive.silence == interval + keepalive.timeout


CLIENT = textwrap.dedent("""
    import asyncio, sys, time
    import grpc
    from xcha.rpc import liveness_options
    from xcha.timings import Keepalive
    from xcha.v1 import xcha_pb2 as pb, xcha_pb2_grpc as pb_grpc

    async def main() -> None:
        options = liveness_options(Keepalive.of(*map(float, sys.argv[2:5])))
        async with grpc.aio.insecure_channel(sys.argv[1], options=options) as channel:
            call = pb_grpc.ControllerStub(channel).Heartbeats()
            status = pb.MemberStatus(member="dn1a", datanode="dn1", boot_id="b", sequence=1)
            await call.write(pb.HeartbeatRequest(status=status, reason="start"))
            await call.read()
            print("answered", flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_a_stalled_agent_is_noticed_by_its_stream_and_its_silence_dated_back(tmp_path: Path) -> None:
    """A real controller and a real gRPC client in another process: one report, then nothing
    but keep-alive pings: heard now, for longer than failure_timeout. SIGSTOP of the client:
    its stream ends within keepalive_interval + its timeout (+ scheduling), and the member
    counts as silent since no later than the stop (dated back by heartbeat_interval + the
    ping timeout: at most keepalive_interval - heartbeat_interval after the last ping answered)."""
    config = tmp_path / "controller.toml"
    config.write_text(f"""
[controller]
listen = "127.0.0.1:0"
state_dir = "{tmp_path}/state"
heartbeat_interval = 0.25
failure_timeout = 1.5
report_interval = 10

[[datanode]]
name = "dn1"
members = ["dn1a", "dn1b"]

[tls]
insecure = true
""")
    loaded = load_controller_config(config)
    leadership = SqliteLeadership(tmp_path / "store.sqlite3", "controller", "127.0.0.1:1")
    node = ControllerNode(
        loaded,
        SqliteStore(tmp_path / "store.sqlite3", leadership),
        leadership,
        router=lambda: Router("none", []),
    )
    run = asyncio.ensure_future(node.run())
    options = liveness_options(loaded.keepalive)
    server, port, _ = create_server("127.0.0.1:0", loaded.tls, options=options)
    pb_grpc.add_ControllerServicer_to_server(ControllerService(node), server)
    await server.start()
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, f"127.0.0.1:{port}", "0.25", "0.5", "1.5"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(client.stdout.readline), 20)
        assert line.strip() == b"answered"
        controller = node.leading()
        assert controller is not None
        observation = controller.observations["dn1a"]
        assert observation.streams == 1
        await asyncio.sleep(2.0)  # > failure_timeout without a report: pings only
        now = controller.clock()
        assert controller.heard_at("dn1a", now) == now, "an open stream is a heartbeat"
        client.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        while observation.streams and time.monotonic() - stopped < 10:
            await asyncio.sleep(0.02)
        noticed = time.monotonic() - stopped
        assert observation.streams == 0, "the stalled agent's stream never ended"
        keepalive = loaded.keepalive
        assert noticed < keepalive.interval + keepalive.timeout + 1.0, f"noticed after {noticed:.2f} s"
        slack = keepalive.interval - keepalive.heartbeat_interval
        assert controller.heard_at("dn1a", controller.clock()) <= stopped + slack + 0.05
    finally:
        client.send_signal(signal.SIGCONT)
        client.kill()
        client.wait()
        await server.stop(None)
        await node.stop()
        await run
        await node.store.close()
