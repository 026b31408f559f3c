"""The operator's view of a running deployment, through the real command line: every `xcha ctl`
command (found by --workdir, by --controller with certificate files, and by environment
variables), their error paths (one line on stderr, a non-zero exit, never a traceback), the
daemons' --check-config, the Prometheus endpoints, the controller's log (text and JSON), and
`xcha up` / `xcha down`."""

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import xcha
from tests.conftest import processes_under
from tests.integration.conftest import Cluster, ClusterFactory
from xcha.topology import DatanodePlan, Topology, TopologyPlan, free_port
from xcha.v1 import xcha_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

STATUS_COLUMNS = [
    "DATANODE",
    "MEMBER",
    "HOST:PORT",
    "ROLE",
    "GOAL",
    "STATE",
    "TL",
    "LAG",
    "SYNC",
    "HEARTBEAT",
    "EPOCH",
]
EVENT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  (?P<datanode>\S+)\s+(?P<kind>\S+)\s+"
    r"epoch (?P<epoch>\d+)\s+(?P<message>.*)$"
)
DECISION_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} controller INFO dn1: (?P<reason>.+)$")


# ---- running the command line -----------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any XCHA_* variable, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCHA_")}
    env.update(extra)
    return env


def xcha_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xcha", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else clean_env(),
        cwd=cwd,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def ctl(workdir: Path, *args: str) -> str:
    """`xcha ctl ARGS --workdir WORKDIR`, which must succeed; its stdout."""
    return ok(xcha_cli("ctl", *args, "--workdir", str(workdir)))


def ctl_fails(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return xcha_cli("ctl", *args, "--workdir", str(workdir))


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str, code: int = 1) -> str:
    """Exit `code`, nothing on stdout, exactly one line on stderr holding every fragment."""
    stderr = result.stderr
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert "Traceback" not in stderr, f"{result.args[3:]}: a traceback instead of one line, ending {last!r}"
    assert result.returncode == code, f"{result.args}: exit {result.returncode}, stderr {stderr!r}"
    assert result.stdout == "", result.stdout
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), f"not one line: {stderr!r}"
    assert lines[0].startswith("xcha"), lines[0]
    assert ": error: " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def tls_files(topology: Topology) -> tuple[str, str, str]:
    directory = topology.workdir / "tls"
    return str(directory / "ca.pem"), str(directory / "operator.pem"), str(directory / "operator.key")


def flag_arguments(topology: Topology) -> list[str]:
    """--controller HOST:PORT --ca --cert --key, as an operator without a workdir gives them."""
    ca, cert, key = tls_files(topology)
    return ["--controller", f"127.0.0.1:{topology.controller_port}", "--ca", ca, "--cert", cert, "--key", key]


def env_for(topology: Topology) -> dict[str, str]:
    ca, cert, key = tls_files(topology)
    return clean_env(
        XCHA_CONTROLLER=f"127.0.0.1:{topology.controller_port}", XCHA_CA=ca, XCHA_CERT=cert, XCHA_KEY=key
    )


def parse_table(output: str) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """`xcha ctl status`: the header, one dict per row (cut at the header's column starts), the
    notes after the blank line."""
    table, _, notes = output.partition("\n\n")
    lines = table.splitlines()
    header = lines[0].split()
    starts = [lines[0].index(name) for name in header]
    rows = []
    for line in lines[1:]:
        cells = [
            line[start : (starts[i + 1] if i + 1 < len(starts) else None)].strip()
            for i, start in enumerate(starts)
        ]
        rows.append(dict(zip(header, cells, strict=True)))
    return header, rows, notes.splitlines()


def event_ids(topology: Topology, datanode: str) -> list[int]:
    return [event.id for event in topology.events(datanode)]


async def settled(cluster: Cluster, **sync_states: str) -> pb.ClusterStatus:
    """dn1 protected, every agent idle (no clone or restart in flight) and the master reporting each
    standby's sync state (sync unless given)."""

    def check(status: pb.ClusterStatus) -> bool:
        group = status.groups[0]
        return (
            group.state == "protected"
            and all(m.status.activity == "idle" for m in group.members)
            and all(
                m.sync_state == sync_states.get(m.name, "sync")
                for m in group.members
                if m.name != group.master
            )
        )

    return await cluster.wait_for(check, f"dn1 to settle (sync states {sync_states or 'all sync'})")


# ---- metrics ----------------------------------------------------------------------------------


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text: str = response.read().decode()
        return text


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called `name` whose labels include `labels`."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append((dict(sample.labels), float(sample.value)))
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    """The one sample called `name` with exactly these labels, or None when there is none."""
    exact = [v for found, v in samples(text, name, **labels) if found == labels]
    assert len(exact) <= 1, f"{name}{labels} repeats: {exact}"
    return exact[0] if exact else None


# ---- 1. every ctl command, by --workdir, by flags and by environment ---------------------------


async def test_every_ctl_command_through_the_real_command_line(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster()
    topology = cluster.topology
    workdir = topology.workdir
    status = await settled(cluster)
    group = status.groups[0]
    first = group.master
    standby = next(m.name for m in group.members if m.name != first)

    # status, found by --workdir
    header, rows, notes = parse_table(ctl(workdir, "status"))
    assert header == STATUS_COLUMNS
    assert sorted(row["MEMBER"] for row in rows) == ["dn1a", "dn1b"], rows
    by_member = {row["MEMBER"]: row for row in rows}
    for name, row in by_member.items():
        assert row["DATANODE"] == "dn1"
        assert row["HOST:PORT"] == f"127.0.0.1:{topology.members[name].port}"
        assert row["TL"] == "1" and row["EPOCH"] == str(status.epoch), row
        assert re.fullmatch(r"\d+\.\ds", row["HEARTBEAT"]), row
        assert row["LAG"].isdigit(), row
    assert by_member[first]["ROLE"] == "master" and by_member[first]["GOAL"] == "master"
    assert by_member[standby]["ROLE"] == "standby" and by_member[standby]["SYNC"] == "sync"
    assert notes[0].startswith(f"dn1: protected, master {first}, FIRST 1 available"), notes
    assert notes[-1] == f"epoch {status.epoch}"

    # status --json, found by --controller --ca --cert --key
    data = json.loads(ok(xcha_cli("ctl", "status", "--json", *flag_arguments(topology))))
    assert data["epoch"] == status.epoch and data["paused"] is False
    assert [g["datanode"] for g in data["groups"]] == ["dn1"]
    dn1 = data["groups"][0]
    assert dn1["state"] == "protected" and dn1["master"] == first and dn1["synchronous"] == "FIRST 1"
    members = {m["member"]: m for m in dn1["members"]}
    assert sorted(members) == ["dn1a", "dn1b"]
    assert members[first]["role"] == "master" and members[standby]["role"] == "standby"
    assert members[standby]["sync_state"] == "sync" and members[standby]["receiving_wal"] is True
    assert members[standby]["port"] == topology.members[standby].port
    assert all(m["epoch"] == data["epoch"] for m in members.values()), members

    # status and events, found by XCHA_CONTROLLER / XCHA_CA / XCHA_CERT / XCHA_KEY
    _, env_rows, _ = parse_table(ok(xcha_cli("ctl", "status", env=env_for(topology), cwd=workdir.parent)))
    assert {r["MEMBER"]: r["ROLE"] for r in env_rows} == {r["MEMBER"]: r["ROLE"] for r in rows}
    env_events = ok(xcha_cli("ctl", "events", "--json", "--limit", "3", env=env_for(topology)))
    assert len(env_events.splitlines()) == 3, env_events

    # set-mode: the standby becomes asynchronous (no longer confirms commits), then synchronous again
    assert f"{standby} set to async" in ctl(workdir, "set-mode", "dn1", standby, "async")

    def member(s: pb.ClusterStatus, name: str) -> pb.MemberView:
        return next(m for m in s.groups[0].members if m.name == name)

    await cluster.wait_for(
        lambda s: member(s, standby).mode == "async" and member(s, standby).sync_state == "async",
        f"{standby} to stream as an async standby",
    )
    await cluster.wait_for(lambda s: s.groups[0].state != "protected", "dn1 to be no longer protected")
    await cluster.wait_for_acks(20)  # policy "available": writes go on
    assert f"{standby} set to sync" in ctl(workdir, "set-mode", "dn1", standby, "sync")
    await settled(cluster)

    # failover --to the standby: the master changes, the old master rejoins
    output = ctl(workdir, "failover", "dn1", "--to", standby)
    assert f"failover of dn1 to {standby} started" in output and f"dn1: {standby} is the master" in output
    assert cluster.group().master == standby
    await settled(cluster)  # the old master rejoined as the synchronous standby
    await cluster.wait_for_acks(20)

    # switchover without --to: back to the first master
    output = ctl(workdir, "switchover", "dn1")
    assert f"switchover of dn1 to {first} started" in output and f"dn1: {first} is the master" in output
    assert cluster.group().master == first
    await cluster.wait_protected()
    await cluster.wait_for_acks(20)

    # pause / resume, the whole cluster
    assert ctl(workdir, "pause").strip() == "cluster paused"
    paused = json.loads(ctl(workdir, "status", "--json"))
    assert paused["paused"] is True and paused["groups"][0]["paused"] is True
    assert ctl(workdir, "resume").strip() == "cluster resumed"
    resumed = json.loads(ctl(workdir, "status", "--json"))
    assert resumed["paused"] is False and resumed["groups"][0]["paused"] is False

    # pause / resume, one datanode
    assert ctl(workdir, "pause", "dn1").strip() == "dn1 paused"
    _, _, notes = parse_table(ctl(workdir, "status"))
    assert notes[0].startswith("dn1: protected (paused)"), notes
    assert ctl(workdir, "resume", "dn1").strip() == "dn1 resumed"
    _, _, notes = parse_table(ctl(workdir, "status"))
    assert notes[0].startswith("dn1: protected,"), notes
    assert cluster.group().master == first
    await cluster.wait_for_acks(20)
    await cluster.assert_nothing_lost()

    # events: the history of all of the above, as text
    lines = ctl(workdir, "events").splitlines()
    parsed = [EVENT_LINE.match(line) for line in lines]
    assert all(parsed), [line for line, match in zip(lines, parsed, strict=True) if not match]
    kinds = {(m["datanode"], m["kind"]) for m in parsed if m}
    for expected in (("dn1", "failover"), ("dn1", "switchover"), ("dn1", "mode"), ("dn1", "pause")):
        assert expected in kinds, (expected, kinds)
    assert ("-", "pause") in kinds, kinds
    messages = [m["message"] for m in parsed if m]
    assert f"failover to {standby} requested" in messages and "cluster paused" in messages
    # events --json --datanode dn1 --limit 5: dn1's five newest events, one JSON object a line
    newest = [
        json.loads(line)
        for line in ctl(workdir, "events", "--json", "--datanode", "dn1", "--limit", "5").splitlines()
    ]
    assert all(e["datanode"] == "dn1" for e in newest), newest
    assert len(newest) == 5, f"--limit 5 printed {len(newest)} of dn1's events: {[e['id'] for e in newest]}"
    assert [e["id"] for e in newest] == event_ids(topology, "dn1")[-5:], newest


# ---- 2. error paths against a running controller; --check-config on the real files -------------


async def test_refused_requests_are_one_line_and_change_nothing(make_cluster: ClusterFactory) -> None:
    plan = TopologyPlan(
        datanodes=(DatanodePlan("dn1", ("dn1a", "dn1b", "dn1c"), async_members=("dn1c",)),),
    )
    cluster = await make_cluster(plan, write=False)
    topology = cluster.topology
    workdir = topology.workdir
    before = await settled(cluster, dn1c="async")
    master = before.groups[0].master
    _, rows, _ = parse_table(ctl(workdir, "status"))
    assert {row["MEMBER"]: row["SYNC"] for row in rows} == {master: "-", "dn1b": "sync", "dn1c": "async"}

    assert_one_line_error(ctl_fails(workdir, "switchover", "dn9"), "unknown datanode 'dn9'")
    assert_one_line_error(
        ctl_fails(workdir, "switchover", "dn1", "--to", "dn9z"), "'dn9z' is not a member of datanode 'dn1'"
    )
    assert_one_line_error(
        ctl_fails(workdir, "switchover", "dn1", "--to", "dn1c"), "dn1c", "not a synchronous standby"
    )
    assert_one_line_error(
        ctl_fails(workdir, "failover", "dn1", "--to", "dn1c"), "dn1c", "not a synchronous standby"
    )
    assert_one_line_error(
        ctl_fails(workdir, "switchover", "dn1", "--to", master), f"{master} is already the master of dn1"
    )
    assert_one_line_error(ctl_fails(workdir, "switchover", "DN 1"), "invalid datanode name 'DN 1'")
    assert_one_line_error(ctl_fails(workdir, "pause", "dn9"), "unknown datanode 'dn9'")
    assert_one_line_error(ctl_fails(workdir, "events", "--datanode", "dn9"), "unknown datanode 'dn9'")
    assert_one_line_error(ctl_fails(workdir, "set-mode", "dn1", "dn9z", "sync"), "'dn9z' is not a member")
    assert_one_line_error(
        ctl_fails(workdir, "set-mode", "dn1", "dn1b", "maybe"), "invalid choice: 'maybe'", code=2
    )
    assert_one_line_error(ctl_fails(workdir, "add-standby", "dn1", "dn1b"), "dn1b is already a member")
    assert_one_line_error(
        ctl_fails(workdir, "remove-standby", "dn1", master), f"{master} is the master of dn1"
    )

    after = cluster.status()
    assert after.epoch == before.epoch and after.groups[0].master == master
    assert after.groups[0].state == "protected" and not after.groups[0].paused
    kinds = {
        json.loads(line)["kind"] for line in ctl(workdir, "events", "--json", "--limit", "1000").splitlines()
    }
    assert not kinds & {"switchover", "failover", "pause", "mode", "add_standby", "remove_standby"}, kinds

    for name, info in topology.members.items():
        assert (
            ok(xcha_cli("agent", "--config", info.config, "--check-config")).strip() == f"{info.config}: ok"
        ), name
    config = str(topology.controller_config)
    assert ok(xcha_cli("controller", "--config", config, "--check-config")).strip() == f"{config}: ok"


# ---- 2. error paths without a controller ---------------------------------------------------------


def test_version_and_errors_without_a_controller(workdir: Path) -> None:
    assert ok(xcha_cli("--version")).strip() == f"xcha {xcha.__version__}"
    port = free_port()
    unreachable = xcha_cli("ctl", "status", "--controller", f"127.0.0.1:{port}", "--insecure", timeout=60)
    assert_one_line_error(unreachable, f"controller at 127.0.0.1:{port} unreachable")
    by_env = xcha_cli(
        "ctl", "events", env=clean_env(XCHA_CONTROLLER=f"127.0.0.1:{port}", XCHA_INSECURE="1"), timeout=60
    )
    assert_one_line_error(by_env, "unreachable")
    assert_one_line_error(xcha_cli("ctl", "status", cwd=workdir), "which controller?", "--controller")
    assert_one_line_error(
        xcha_cli("ctl", "status", "--controller", f"127.0.0.1:{port}"), "give the operator's --cert and --key"
    )
    missing = workdir / "missing.pem"
    assert_one_line_error(
        xcha_cli(
            "ctl",
            "status",
            "--controller",
            f"127.0.0.1:{port}",
            "--ca",
            str(missing),
            "--cert",
            "x",
            "--key",
            "y",
        ),
        f"{missing} does not exist",
    )
    assert_one_line_error(
        xcha_cli("ctl", "status", "--controller", "no port", "--insecure"), "invalid controller address"
    )
    empty = workdir / "empty"
    empty.mkdir()
    assert_one_line_error(
        xcha_cli("ctl", "status", "--workdir", str(empty)), f"{empty} holds no topology.json"
    )
    assert_one_line_error(xcha_cli("down", "--workdir", str(empty)), f"{empty} holds no topology.json")
    assert_one_line_error(xcha_cli("ctl", "set-mode", "dn1", "dn1b", "maybe"), "invalid choice", code=2)
    assert_one_line_error(xcha_cli("ctl"), "required", code=2)
    assert_one_line_error(xcha_cli("ctl", "failover", "--workdir", str(empty)), "datanode", code=2)


@pytest.mark.parametrize("content", ["not json", "{}"], ids=["garbage", "empty-object"])
@pytest.mark.parametrize("command", ["ctl", "down"])
def test_a_workdir_with_a_broken_topology_json_is_one_line(workdir: Path, content: str, command: str) -> None:
    (workdir / "topology.json").write_text(content + "\n")
    args = ("ctl", "status") if command == "ctl" else ("down",)
    assert_one_line_error(xcha_cli(*args, "--workdir", str(workdir)), str(workdir))


# ---- 3. daemon configuration and 5. logs ---------------------------------------------------------


def test_log_format_json_is_a_valid_controller_setting(workdir: Path) -> None:
    topology = Topology(workdir / "x")
    topology.write()
    original = topology.controller_config.read_text()
    assert "[controller]\n" in original
    for fmt, good in (("json", True), ("text", True), ("yaml", False)):
        copy = topology.controller_config.with_name(f"controller-{fmt}.toml")
        copy.write_text(original.replace("[controller]\n", f'[controller]\nlog_format = "{fmt}"\n', 1))
        result = xcha_cli("controller", "--config", str(copy), "--check-config")
        if good:
            assert ok(result).strip() == f"{copy}: ok"
        else:
            assert result.returncode == 1 and "Traceback" not in result.stderr
            assert "controller.log_format" in result.stderr and "yaml" in result.stderr, result.stderr


# ---- 4. metrics, and the controller's log as text and as JSON ------------------------------------


async def test_metrics_and_logs_of_controller_and_agents(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(TopologyPlan(metrics=True))
    topology = cluster.topology
    status = await settled(cluster)
    master = status.groups[0].master
    standby = next(m.name for m in status.groups[0].members if m.name != master)
    assert set(topology.metrics_ports) == {"controller", "dn1a", "dn1b"}

    text = scrape(topology.metrics_ports["controller"])
    assert value(text, "xcha_epoch") == status.epoch
    assert value(text, "xcha_group_state", datanode="dn1", state="protected") == 1
    assert value(text, "xcha_member_role", datanode="dn1", member=master, role="master") == 1
    assert value(text, "xcha_member_role", datanode="dn1", member=standby, role="standby") == 1
    for name in (master, standby):
        age = value(text, "xcha_heartbeat_age_seconds", datanode="dn1", member=name)
        assert age is not None and 0 <= age < topology.plan.failure_timeout, (name, age)
        lag = value(text, "xcha_replication_lag_bytes", datanode="dn1", member=name)
        assert lag is not None and lag >= 0, (name, lag)
    assert value(text, "xcha_member_sync_state", datanode="dn1", member=standby, sync_state="sync") == 1
    assert value(text, "xcha_reroute_pending_coordinators", datanode="dn1") == 0
    handled = value(text, "xcha_heartbeat_handling_seconds_bucket", le="+Inf")
    assert handled is not None and handled > 0
    assert samples(text, "xcha_failovers_total") == [], "no failover yet"

    agent_text = scrape(topology.metrics_ports[master])
    assert value(agent_text, "xcha_member_role", datanode="dn1", member=master, role="master") == 1
    assert value(agent_text, "xcha_member_role", datanode="dn1", member=master, role="standby") == 0
    assert value(agent_text, "xcha_agent_epoch", datanode="dn1", member=master) == status.epoch
    current = value(agent_text, "xcha_wal_position_bytes", datanode="dn1", member=master, kind="current")
    assert current is not None and current > 0
    standby_text = scrape(topology.metrics_ports[standby])
    assert value(standby_text, "xcha_member_role", datanode="dn1", member=standby, role="standby") == 1
    replay = value(standby_text, "xcha_wal_position_bytes", datanode="dn1", member=standby, kind="replay")
    assert replay is not None and replay > 0

    # Each agent says where it listens and which PostgreSQL it runs, each value in its place.
    for name in (master, standby):
        info = topology.members[name]
        agent_log = (topology.workdir / "logs" / f"agent-{name}.log").read_text()
        assert (
            f"agent {name} of dn1 listening on port {info.agent_port} "
            f"(PostgreSQL port {info.port}, data {topology.member_spec(name).data_dir})"
        ) in agent_log, agent_log

    # The text log: one line per decision, the state machine's reason, never twice in a row.
    log_file = topology.workdir / "logs" / "controller.log"
    text_log = log_file.read_text()
    reasons = [m["reason"] for line in text_log.splitlines() if (m := DECISION_LINE.match(line))]
    assert any(r.startswith("protected") for r in reasons), reasons
    assert any(r.startswith("initializing") for r in reasons), reasons
    assert all(a != b for a, b in itertools.pairwise(reasons)), reasons

    # The same controller restarted with log_format = "json": one JSON object a line.
    json_config = topology.controller_config.with_name("controller-json.toml")
    json_config.write_text(
        topology.controller_config.read_text().replace(
            "[controller]\n", '[controller]\nlog_format = "json"\n', 1
        )
    )
    assert ok(xcha_cli("controller", "--config", str(json_config), "--check-config")).strip().endswith(": ok")
    old_epoch = status.epoch
    topology.stop_process("controller")
    offset = log_file.stat().st_size
    topology.controller_config = json_config
    topology.start_controller()
    status = await cluster.wait_for(
        lambda s: s.epoch > old_epoch and s.groups[0].state == "protected", "the JSON-logging controller"
    )
    deadline = time.monotonic() + 15
    while True:  # the restarted controller decides once its startup grace is over
        complete, _, _ = log_file.read_bytes()[offset:].decode().rpartition("\n")
        json_lines = complete.splitlines()
        entries = [json.loads(line) for line in json_lines]
        if any(e["message"].startswith("dn1: protected") for e in entries) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert all(set(e) == {"time", "level", "logger", "message"} for e in entries), entries
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in entries), entries
    messages = [e["message"] for e in entries]
    assert any(m.startswith("controller listening on port") for m in messages), messages
    assert any(m.startswith("dn1: protected") for m in messages), messages

    # kill -9 of the master postmaster: a failover, counted and timed by phase
    os.kill(topology.postmaster_pid(master), signal.SIGKILL)  # type: ignore[arg-type]
    new = await cluster.wait_master_changed(master)
    deadline = time.monotonic() + 30
    while not samples(text := scrape(topology.metrics_ports["controller"]), "xcha_failovers_total"):
        assert time.monotonic() < deadline, "xcha_failovers_total never appeared"
        await asyncio.sleep(0.2)
    assert value(text, "xcha_failovers_total", datanode="dn1") == 1
    assert value(text, "xcha_switchovers_total", datanode="dn1") in (None, 0)
    phases = {
        labels["phase"]: seconds
        for labels, seconds in samples(text, "xcha_last_failover_seconds", datanode="dn1")
    }
    assert set(phases) == {"reroute", "detect_to_promoted", "promote", "total"}, phases
    assert all(0 <= seconds < 30 for seconds in phases.values()), phases
    assert phases["total"] >= phases["detect_to_promoted"], phases
    assert value(text, "xcha_member_role", datanode="dn1", member=new, role="master") == 1
    assert value(text, "xcha_epoch") == cluster.status().epoch
    new_agent = scrape(topology.metrics_ports[new])
    assert value(new_agent, "xcha_member_role", datanode="dn1", member=new, role="master") == 1
    await cluster.wait_for_acks(20)
    await cluster.wait_protected()
    await cluster.assert_nothing_lost()


# ---- 6. xcha up / xcha down ------------------------------------------------------------------------


@contextlib.contextmanager
def brought_down(directory: Path) -> Iterator[None]:
    """Whatever happens, `xcha down --workdir DIRECTORY` runs at the end (when `up` wrote anything)."""
    try:
        yield
    finally:
        if (directory / "topology.json").exists():
            xcha_cli("down", "--workdir", str(directory), timeout=120)


def test_up_status_down(workdir: Path) -> None:
    directory = workdir / "up"
    with brought_down(directory):
        up = xcha_cli("up", "--workdir", str(directory), timeout=200)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr
        assert f"xcha down --workdir {directory}" in up.stdout
        header, rows, notes = parse_table(ctl(directory, "status"))
        assert header == STATUS_COLUMNS
        assert sorted(row["MEMBER"] for row in rows) == ["dn1a", "dn1b", "dn2a", "dn2b"], rows
        assert sorted(row["ROLE"] for row in rows) == ["master", "master", "standby", "standby"], rows
        assert [n.split(":")[0] for n in notes[:2]] == ["dn1", "dn2"], notes
        assert processes_under(directory), "xcha up leaves its deployment running"

        again = ok(xcha_cli("up", "--workdir", str(directory)))
        assert again.startswith("everything is already running: supervisor, controller, "), again
        assert len(parse_table(ctl(directory, "status"))[1]) == 4, (
            "an `up` with nothing to start changes nothing"
        )

        down = ok(xcha_cli("down", "--workdir", str(directory), timeout=120))
        assert down.startswith("stopped "), down
        for key in (
            "supervisor",
            "controller",
            "agent:dn1a",
            "agent:dn2b",
            "postgres:dn1a",
            "coordinator:coord1",
        ):
            assert key in down, (key, down)
        left = processes_under(directory)
        assert left == [], f"still running after xcha down: {left}"
        assert ok(xcha_cli("down", "--workdir", str(directory))).strip() == "stopped 0: nothing was running"
        assert_one_line_error(
            xcha_cli("ctl", "status", "--workdir", str(directory), timeout=60), "unreachable"
        )
        # The same deployment starts again from its directory.
        again = xcha_cli("up", "--workdir", str(directory), timeout=200)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr
        _, rows, _ = parse_table(ctl(directory, "status"))
        assert sorted(row["MEMBER"] for row in rows) == ["dn1a", "dn1b", "dn2a", "dn2b"], rows
