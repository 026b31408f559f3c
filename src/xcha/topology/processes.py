"""Starting and stopping a deployment's processes, by PID: the GTM, coordinators, the
controller and the agents (or the supervisor that runs them)."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

from xcha import pgxc_cluster
from xcha.errors import XchaError
from xcha.etcd_cluster import STATE_FILE as ETCD_STATE_FILE
from xcha.procfs import alive
from xcha.supervisor import Program, SupervisorStatus, read_status
from xcha.topology.client import Client, settling
from xcha.topology.plan import StatusCallback
from xcha.v1 import xcha_pb2 as pb


class Processes(Client):
    """Every process started is recorded by PID (topology.json) and stopped by PID only."""

    async def start_gtm(self) -> None:
        """XL / XC: the GTM, before any node (none starts without it)."""
        if self.gtm_port:
            gtm = pgxc_cluster.gtm(self.workdir, self.pgxc_layout, self.runner)
            await pgxc_cluster.start_gtm(gtm)
            self.pids["gtm"] = gtm.pid() or 0
            self.save()

    async def start_coordinators(self) -> None:
        for name in self.plan.coordinators:
            instance = self.coordinator(name)
            if instance.has_cluster():
                await instance.start()
            else:
                await instance.bootstrap_master()
            self.pids[f"coordinator:{name}"] = instance.postmaster_pid() or 0
        self.save()

    # ---- processes ------------------------------------------------------------------------------

    def _program(self, argv: list[str], log: str, netns: str = "") -> Program:
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]  # it execs argv: the PID stays the same
        return Program(tuple(argv), log)

    def programs(self) -> dict[str, Program]:
        """The controller and an agent per member, by key, as they run (also supervised)."""
        xcha = [sys.executable, "-m", "xcha"]
        programs = {
            self.controller_key(name): self._program(
                [*xcha, "controller", "--config", str(self.controller_config_of(name))],
                "controller.log" if name == "controller" else f"controller-{name}.log",
                self.netns(name),
            )
            for name in self.controller_names
        }
        for member, info in self.members.items():
            programs[f"agent:{member}"] = self._program(
                [*xcha, "agent", "--config", info.config], f"agent-{member}.log", self.netns(member)
            )
        return programs

    @property
    def supervisor_program(self) -> Program:
        return Program(
            (sys.executable, "-m", "xcha", "supervise", "--workdir", str(self.workdir.absolute())),
            "supervisor.log",
        )

    def _spawn(self, key: str, program: Program) -> int:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / program.log, "ab") as log:
            process = subprocess.Popen(
                program.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.children[key] = process
        self.pids[key] = process.pid
        self.save()
        return process.pid

    def start_controller(self, name: str | None = None) -> int:
        key = self.controller_key(name or self.controller_names[0])
        return self._spawn(key, self.programs()[key])

    def start_agent(self, member: str) -> int:
        return self._spawn(f"agent:{member}", self.programs()[f"agent:{member}"])

    def start(self) -> None:
        """The controller and the agents, or (supervise) the supervisor that runs them."""
        if self.supervise:
            self._spawn("supervisor", self.supervisor_program)
            return
        for name in self.controller_names:
            self.start_controller(name)
        for member in self.members:
            self.start_agent(member)

    def supervisor_status(self) -> SupervisorStatus | None:
        return read_status(self.workdir)

    def supervised(self) -> dict[str, int]:
        """Key -> PID of what the supervisor's status file says runs, checked against each PID's
        command line (the file may be older than a PID's reuse)."""
        status = self.supervisor_status()
        programs = self.programs()
        return {
            key: process.pid
            for key, process in (status.processes.items() if status else ())
            if key in programs and process.pid and programs[key].runs_as(process.pid)
        }

    async def start_missing(self, timeout: float = 60) -> tuple[list[str], list[str]]:
        """`xcha up` on a deployment that partly runs: a supervisor unless one runs (it adopts the
        controller and agents still running and starts the others) and the stopped coordinators.
        Returns (started, already running), by key."""
        started: list[str] = []
        running: list[str] = []
        if self.gtm_port:
            (running if self.gtm().pid() else started).append("gtm")
            await self.start_gtm()
        if self.plan.controllers > 1:
            etcd = self.etcd()
            for member in etcd.members:
                (running if etcd.pid(member.name) else started).append(f"etcd:{member.name}")
            await self.start_etcd()
        if self.alive("supervisor"):
            running.append("supervisor")
            status = self.supervisor_status()
            for key, process in status.processes.items() if status else ():
                running.append(key if process.pid else f"{key} (restart pending)")
        else:
            self._spawn("supervisor", self.supervisor_program)
            status = await self._supervisor_started(timeout)
            started.append("supervisor")
            for key, process in status.processes.items():
                (running if process.adopted else started).append(key)
        for name in self.plan.coordinators:
            (running if self.coordinator(name).postmaster_pid() else started).append(f"coordinator:{name}")
        await self.start_coordinators()  # those running are left as they are
        return started, running

    async def _supervisor_started(self, timeout: float) -> SupervisorStatus:
        """The first status the supervisor just started writes (what it adopted, what it started)."""
        child = self.children["supervisor"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.supervisor_status()
            if status is not None and status.pid == child.pid:
                return status
            if child.poll() is not None:
                break
            await asyncio.sleep(0.05)
        self._reap("supervisor")
        log = self.workdir / "logs" / self.supervisor_program.log
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.exists() else ""
        raise XchaError(f"the supervisor wrote no status within {timeout:.0f} s, see {log}:\n{tail}")

    async def up(
        self, on_status: StatusCallback | None = None, timeout: float = 120, fresh: bool = True
    ) -> pb.ClusterStatus:
        """The whole start: (fresh) write every file, start the controller and the agents (or the
        supervisor that runs them) and the coordinators, wait until every group is protected and
        every agent idle, then (fresh) create the application role and the sharded table. If any
        step fails or is interrupted, everything started is stopped before the error goes on."""
        try:
            if fresh:
                self.write()
            await self.start_gtm()
            await self.start_etcd()
            self.start()
            await self.start_coordinators()
            status = await self.wait_for(settling(on_status), timeout, "every datanode to be protected")
            if fresh:
                await self.setup_sharding()
        except BaseException:
            await self.down()
            raise
        return status

    async def start_etcd(self, timeout: float = 60) -> None:
        """Several controllers: the three etcd members they elect their leader on (those not
        running), until each serves."""
        if self.plan.controllers > 1:
            etcd = self.etcd()
            etcd.start()
            await etcd.wait_ready(timeout)

    def alive(self, key: str) -> bool:
        pid = self.pids.get(key)
        if pid is None:
            return False
        child = self.children.get(key)
        if child is not None:
            return child.poll() is None
        if key == "supervisor":  # `xcha up` starts another unless this one runs: no PID reuse
            return self.supervisor_program.runs_as(pid)
        return alive(pid)

    def signal(self, key: str, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(self.pids[key], signum)

    def _reap(self, key: str) -> None:
        """Forget a process that was told to end (reaped when it is a child); not saved."""
        child = self.children.pop(key, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
        self.pids.pop(key, None)

    def stop_process(self, key: str, timeout: float = 10) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit; reaps it when it is a child."""
        if key not in self.pids:
            return
        for signum in (signal.SIGCONT, signal.SIGTERM):
            self.signal(key, signum)
        deadline = time.monotonic() + timeout
        while self.alive(key) and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.alive(key):
            self.signal(key, signal.SIGKILL)
        self._reap(key)
        self.save()

    def kill_process(self, key: str) -> None:
        """kill -9, as a fault: the process gets no chance to clean up."""
        self.signal(key, signal.SIGKILL)
        self._reap(key)
        self.save()

    async def _stop_all(self, keys: list[str], timeout: float) -> None:
        """SIGTERM to every one at once, then one deadline for all; SIGKILL for stragglers."""
        for key in keys:
            for signum in (signal.SIGCONT, signal.SIGTERM):
                self.signal(key, signum)
        deadline = time.monotonic() + timeout
        while any(self.alive(key) for key in keys) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for key in keys:
            if self.alive(key):
                self.signal(key, signal.SIGKILL)
            self._reap(key)

    def postmaster_pid(self, member: str) -> int | None:
        return self.instance(member).postmaster_pid()

    def postgres_pids(self, member: str) -> list[int]:
        return self.instance(member).processes()

    def host_signal(self, member: str, signum: int) -> list[int]:
        """A hung (SIGSTOP) or resumed (SIGCONT) host: the agent and every PostgreSQL process."""
        pids = self.postgres_pids(member)
        if f"agent:{member}" in self.pids:
            pids.append(self.pids[f"agent:{member}"])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return pids

    async def down(self, timeout: float = 10) -> list[str]:
        """Stop everything this topology started, by PID: the supervisor first (so nothing is
        restarted; it stops what it runs), then what a killed supervisor left running, agents
        and controller (so nothing restarts a server), then every PostgreSQL process of members
        and coordinators."""
        self.close_channel()
        stopped = []
        if "supervisor" in self.pids:
            stopped = ["supervisor", *self.supervised()]
            # Its own deadline for its processes is 10 s, then SIGKILL (`xcha.supervisor`).
            await self._stop_all(["supervisor"], max(timeout, 10) + 6)
        self.pids.update(self.supervised())
        daemons = [k for k in self.pids if k.startswith(("agent:", "controller"))]
        await self._stop_all(daemons, timeout)
        etcd = []
        if self.plan.controllers > 1 and (self.etcd_dir / ETCD_STATE_FILE).exists():
            cluster = self.etcd()
            etcd = [f"etcd:{m.name}" for m in cluster.members if cluster.pid(m.name) is not None]
            await cluster.stop(timeout)
        instances = [(f"postgres:{m}", self._to_stop(self.member_spec(m))) for m in self.members]
        instances += [  # those written so far (a start that failed early has none)
            (f"coordinator:{c}", self._to_stop(self.coordinator_spec(c))) for c in self.coordinator_ports
        ]
        running = [(key, i) for key, i in instances if i.processes() or i.postmaster_pid()]
        await asyncio.gather(*(instance.kill() for _, instance in running))
        gtm = ["gtm"] if self.gtm_port and self.gtm().pid() is not None else []
        if gtm:  # after every node that uses it
            await self.gtm().kill()
        self.pids.pop("gtm", None)
        for name in self.coordinator_ports:
            self.pids.pop(f"coordinator:{name}", None)
        if self.workdir.is_dir():  # else nothing was written, nor started
            self.save()
        return list(dict.fromkeys(stopped + daemons)) + etcd + [key for key, _ in running] + gtm
