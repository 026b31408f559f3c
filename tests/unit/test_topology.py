"""Topology without PostgreSQL: a member's instance comes from the agent.toml written for it,
and `down` stops every process under one deadline without asking which PostgreSQL is installed.
The supervisor `xcha up` leaves in charge, with stand-in programs: restarts with back-off, what
it records, adoption after it was killed, a clean stop."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import xcha.topology.layout
from xcha.ctl import supervision_table
from xcha.supervisor import STATUS_FILE, Backoff, Exit, ProcessStatus, Program, SupervisorStatus, read_status
from xcha.topology import TOPOLOGY_FILE, Topology, TopologyPlan


def plaintext_topology(workdir: Path) -> Topology:
    topology = Topology(workdir, TopologyPlan(tls=False))
    topology.controller_ports = {"controller": 20000}
    topology.secrets.mkdir(parents=True)
    (topology.secrets / "replication.password").write_text("secret\n")
    topology.add_member("dn1", "dn1a", 20001)
    topology.save()
    return topology


def ignores_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        ignored = next(line.split()[1] for line in status if line.startswith("SigIgn:"))
    return bool(int(ignored, 16) & (1 << (15 - 1)))


def no_postgres_programs(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("no PostgreSQL program may run here")

    monkeypatch.setattr(xcha.topology.layout, "find_bindir", refuse)
    monkeypatch.setattr(xcha.topology.layout, "server_version", refuse)


def test_a_members_instance_is_read_from_its_agent_toml(workdir: Path) -> None:
    topology = plaintext_topology(workdir)
    spec = topology.member_spec("dn1a")
    directory = workdir / "dn1" / "dn1a"
    assert (spec.name, spec.port, spec.data_dir, spec.socket_dir) == (
        "dn1a",
        20001,
        directory / "data",
        directory / "run",
    )
    assert spec.archive_dir == workdir / "dn1" / "archive"
    config = Path(topology.members["dn1a"].config)
    config.write_text(config.read_text().replace("port = 20001", "port = 20005"))
    assert topology.member_spec("dn1a").port == 20001, "read once per member"
    assert Topology.load(workdir).member_spec("dn1a").port == 20005, "from the file, not by convention"


def test_topology_json_holds_no_keys_nobody_reads(workdir: Path) -> None:
    plaintext_topology(workdir)
    data = json.loads((workdir / TOPOLOGY_FILE).read_text())
    assert set(data) == {
        "controllers",
        "members",
        "coordinators",
        "metrics",
        "pids",
        "plan",
        "gtm_port",
        "pooler_ports",
    }


def test_down_stops_every_process_under_one_deadline_and_saves(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = plaintext_topology(workdir)
    stubborn = Program(("sh", "-c", "trap '' TERM; exec sleep 60"), "stubborn.log")  # ignored across exec
    for key in ("controller", "agent:dn1a"):
        pid = topology._spawn(key, stubborn)
        deadline = time.monotonic() + 5
        while not ignores_sigterm(pid):
            assert time.monotonic() < deadline, f"{key} does not ignore SIGTERM"
            time.sleep(0.01)
    no_postgres_programs(monkeypatch)
    loaded = Topology.load(workdir)  # as `xcha down` does
    assert set(loaded.pids) == {"controller", "agent:dn1a"}
    started = time.monotonic()
    stopped = asyncio.run(loaded.down(timeout=1.0))
    took = time.monotonic() - started
    assert sorted(stopped) == ["agent:dn1a", "controller"]
    assert took < 1.9, f"{took:.1f} s: the deadline is shared, not one per process"
    for key in ("controller", "agent:dn1a"):
        topology.children[key].wait(5)  # reaped here: the test process is their parent
        assert topology.children[key].returncode == -9, f"{key} ignored SIGTERM: SIGKILL"
    assert json.loads((workdir / TOPOLOGY_FILE).read_text())["pids"] == {}


def test_backoff_doubles_up_to_its_maximum_and_resets_after_a_long_run() -> None:
    backoff = Backoff()
    quick = [backoff.delay(uptime=1.0) for _ in range(9)]
    assert quick == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert backoff.delay(uptime=29.9) == 10.0, "a short run does not reset it"
    assert backoff.delay(uptime=30.0) == 0.1, "30 s up: back to the first delay"
    assert backoff.delay(uptime=0.5) == 0.2


# ---- the supervisor, with stand-in programs ---------------------------------------------------


def stand_in(name: str, code: str) -> Program:
    """A Python one-liner; its name ends the command line, as a config path ends an agent's."""
    return Program((sys.executable, "-c", code, name), f"{name}.log")


PROGRAMS = {
    "steady": stand_in("steady", "import time; time.sleep(120)"),
    "crashing": stand_in("crashing", "raise SystemExit(3)"),
    "stubborn": stand_in(
        "stubborn", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    ),
}


@pytest.fixture
def supervisors(workdir: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start supervisors of PROGRAMS in workdir (stop timeout 1 s); each one left is killed."""
    started: list[subprocess.Popen[bytes]] = []
    code = (
        "import json, sys; from pathlib import Path; from xcha.logs import setup_logging; "
        "from xcha.supervisor import Program, Supervisor; setup_logging('text', 'supervisor'); "
        "programs = {k: Program(tuple(a), log) for k, (a, log) in json.loads(sys.argv[2]).items()}; "
        "Supervisor(Path(sys.argv[1]), programs, 1.0).run()"
    )
    programs = json.dumps({key: (program.argv, program.log) for key, program in PROGRAMS.items()})

    def start() -> subprocess.Popen[bytes]:
        with open(workdir / "supervisor.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", code, str(workdir), programs],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(10)
    status = read_status(workdir)
    for key, entry in status.processes.items() if status else ():
        if entry.pid and PROGRAMS[key].runs_as(entry.pid):
            os.kill(entry.pid, signal.SIGKILL)


def wait_status(workdir: Path, check: Callable[[SupervisorStatus], bool], what: str) -> SupervisorStatus:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = read_status(workdir)
        if status is not None and check(status):
            return status
        time.sleep(0.01)
    raise AssertionError(f"no {what} within 30 s: {read_status(workdir)}")


def test_the_supervisor_restarts_with_back_off_adopts_after_a_kill_and_stops_cleanly(
    workdir: Path, supervisors: Callable[[], subprocess.Popen[bytes]]
) -> None:
    first = supervisors()
    status = wait_status(workdir, lambda s: s.pid == first.pid and s.processes["steady"].pid > 0, "start")
    steady = status.processes["steady"].pid
    assert PROGRAMS["steady"].runs_as(steady) and not status.processes["steady"].adopted

    os.kill(steady, signal.SIGKILL)
    killed = time.monotonic()
    status = wait_status(workdir, lambda s: s.processes["steady"].pid not in (0, steady), "restart")
    print(f"\nrestarted {(time.monotonic() - killed) * 1000:.0f} ms after kill -9")
    entry = status.processes["steady"]
    assert entry.restarts == 1 and entry.last_exit is not None and entry.last_exit.signal == signal.SIGKILL
    assert entry.last_restart is not None and entry.last_restart >= time.time() - 30

    # A process that exits at once is restarted ever later: 0.1 + 0.2 + 0.4 + 0.8 s.
    crashing = wait_status(workdir, lambda s: s.processes["crashing"].restarts >= 4, "4 restarts")
    assert crashing.processes["crashing"].last_exit == Exit(
        3, None, crashing.processes["crashing"].last_exit.at
    )
    time.sleep(1.0)
    restarts = read_status(workdir).processes["crashing"].restarts  # type: ignore[union-attr]
    assert restarts <= 5, f"{restarts} restarts in 2.5 s: no back-off"
    log = (workdir / "supervisor.log").read_text()
    assert f"steady: PID {steady} ended (SIGKILL)" in log and "steady: restarted as PID" in log, log

    # Killed, the supervisor leaves its processes running; the next one adopts them.
    first.kill()
    first.wait(10)
    running = {key: e.pid for key, e in status.processes.items() if key != "crashing"}
    assert all(PROGRAMS[key].runs_as(pid) for key, pid in running.items())
    second = supervisors()
    status = wait_status(workdir, lambda s: s.pid == second.pid, "the second supervisor's status")
    assert {key: status.processes[key].pid for key in running} == running
    assert all(status.processes[key].adopted for key in running)
    assert "adopted PID" in (workdir / "supervisor.log").read_text()

    # SIGTERM: every process stopped by PID (SIGKILL for the one ignoring SIGTERM), then itself.
    pids = [e.pid for e in status.processes.values() if e.pid]
    stopped_at = time.monotonic()
    second.terminate()
    assert second.wait(10) == 0
    assert time.monotonic() - stopped_at < 5
    assert not any(PROGRAMS[key].runs_as(pid) for key, pid in running.items())
    final = read_status(workdir)
    assert final is not None and final.stopped and not final.running()
    assert all(e.pid == 0 for e in final.processes.values()), final
    assert "stubborn: PID" in (workdir / "supervisor.log").read_text()
    assert not any(os.path.exists(f"/proc/{pid}") and PROGRAMS["steady"].runs_as(pid) for pid in pids)
    assert (workdir / STATUS_FILE).exists() and not list(workdir.glob(f".{STATUS_FILE}.*"))


def test_ctl_status_shows_what_the_supervisor_runs() -> None:
    now = time.time()
    status = SupervisorStatus(
        os.getpid(),
        {
            "controller": ProcessStatus(4321),
            "agent:dn1a": ProcessStatus(4400, 2, Exit(None, 9, now - 5), now - 4.9),
            "agent:dn1b": ProcessStatus(0, 3, Exit(1, None, now), now - 1, restart_at=now + 0.8),
        },
    )
    lines = supervision_table(status).splitlines()
    assert lines[0] == f"supervised processes (supervisor PID {os.getpid()}, running):"
    assert lines[1].split() == ["PROCESS", "PID", "RESTARTS", "LAST", "EXIT", "LAST", "RESTART"]
    assert lines[2].split() == ["controller", "4321", "0", "-", "-"]
    assert lines[3].split()[:4] == ["agent:dn1a", "4400", "2", "SIGKILL"] and lines[3].endswith("s ago")
    assert lines[4].split()[:6] == ["agent:dn1b", "-", "(restart", "in", "0.8s)", "3"], lines[4]
    assert "exit 1" in lines[4]
