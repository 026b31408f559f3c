"""`xcha ctl ...` and `xcha report-failure`: what operators and coordinator hooks ask the
controller. Every failure is one line and a non-zero exit."""

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import grpc

from xcha.config import TlsConfig
from xcha.errors import InvalidInput, XchaError
from xcha.names import check_address, check_name
from xcha.pg.lsn import format_lsn
from xcha.rpc import LEADER_METADATA, blocking_channel
from xcha.supervisor import SupervisorStatus, read_status
from xcha.v1 import xcha_pb2 as pb
from xcha.v1 import xcha_pb2_grpc as pb_grpc

T = TypeVar("T")


@dataclass(frozen=True)
class ControllerTarget:
    address: str
    tls: TlsConfig
    workdir: Path | None = None  # found through a deployment directory: its supervisor's status
    fallbacks: tuple[str, ...] = ()  # the other controllers, asked when this one is unreachable


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("finding the controller (first that applies)")
    group.add_argument("--controller", help="HOST:PORT (or XCHA_CONTROLLER)")
    group.add_argument("--workdir", help="a directory made by `xcha up` (or XCHA_WORKDIR)")
    group.add_argument("--config", dest="controller_config", help="the controller's TOML file")
    group.add_argument("--ca", help="CA certificate (or XCHA_CA)")
    group.add_argument("--cert", help="client certificate (or XCHA_CERT)")
    group.add_argument("--key", help="client key (or XCHA_KEY)")
    group.add_argument("--insecure", action="store_true", help="plaintext (or XCHA_INSECURE=1)")


def resolve_target(args: argparse.Namespace) -> ControllerTarget:
    """Command-line flags first (--controller, --workdir, --config), then the environment
    (XCHA_CONTROLLER, XCHA_WORKDIR)."""
    env = os.environ
    if args.controller:
        return _by_address(args, args.controller)
    if args.workdir:
        return _by_workdir(Path(args.workdir))
    if args.controller_config:
        from xcha.controller.config import load_controller_config

        config = load_controller_config(Path(args.controller_config))
        host, port = check_address(config.listen)
        address = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        if config.tls.insecure:
            return ControllerTarget(address, config.tls)
        # The controller's own certificate may not call operator RPCs: an operator's may.
        return _by_address(argparse.Namespace(**{**vars(args), "ca": args.ca or config.tls.ca_file}), address)
    if env.get("XCHA_CONTROLLER"):
        return _by_address(args, env["XCHA_CONTROLLER"])
    if env.get("XCHA_WORKDIR"):
        return _by_workdir(Path(env["XCHA_WORKDIR"]))
    raise InvalidInput(
        "which controller? give --controller HOST:PORT, --workdir DIR or --config FILE "
        "(or set XCHA_CONTROLLER)"
    )


def _by_address(args: argparse.Namespace, address: str) -> ControllerTarget:
    check_address(address, "controller address")
    env = os.environ
    flags = (args.ca, args.cert, args.key)
    if args.insecure or (env.get("XCHA_INSECURE") == "1" and not any(flags)):
        return ControllerTarget(address, TlsConfig(insecure=True))
    files = [
        flag or env.get(name) for flag, name in zip(flags, ("XCHA_CA", "XCHA_CERT", "XCHA_KEY"), strict=True)
    ]
    if not all(files):
        raise InvalidInput(
            "give the operator's --cert and --key (or XCHA_CERT, XCHA_KEY) and the CA's --ca "
            "(or XCHA_CA), or --insecure for plaintext"
        )
    paths = [Path(str(p)) for p in files]
    for path in paths:
        if not path.is_file():
            raise InvalidInput(f"{path} does not exist")
    return ControllerTarget(address, TlsConfig(paths[0], paths[1], paths[2]))


def _by_workdir(workdir: Path) -> ControllerTarget:
    """The controller and the operator's certificate of a deployment `xcha up` made (topology.json)."""
    from xcha.topology import Topology  # PostgreSQL and TLS code: only when asked for by workdir

    try:
        target = Topology.load(workdir).target
    except XchaError as error:
        raise InvalidInput(str(error)) from None
    check_address(target.address, "controller address")
    return replace(target, workdir=workdir)


@contextlib.contextmanager
def open_channel(target: ControllerTarget, channel: grpc.Channel | None = None) -> Iterator[grpc.Channel]:
    """The given channel, or one opened for the block (certificates read, TLS handshake on use)."""
    if channel is not None:
        yield channel
        return
    with blocking_channel(target.address, target.tls) as opened:
        yield opened


def call(
    target: ControllerTarget,
    work: Callable[[pb_grpc.ControllerStub], T],
    channel: grpc.Channel | None = None,
) -> T:
    """One RPC to the controller, over `channel` when given (callers that poll keep one), else
    over a channel of its own; a gRPC failure becomes one operator-readable XchaError. A
    controller that does not lead names the leader: the call goes there once. An unreachable
    controller: the next of the target's fallbacks is asked."""
    with open_channel(target, channel) as opened:
        try:
            return work(pb_grpc.ControllerStub(opened))
        except grpc.RpcError as error:
            code = error.code()
            details = error.details()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                if not target.fallbacks:
                    raise XchaError(f"controller at {target.address} unreachable: {details}") from None
                following = replace(target, address=target.fallbacks[0], fallbacks=target.fallbacks[1:])
            else:
                leader = dict(error.trailing_metadata() or ()).get(LEADER_METADATA)
                if code != grpc.StatusCode.FAILED_PRECONDITION or not isinstance(leader, str) or not leader:
                    raise XchaError(details) from None
                following = replace(target, address=leader, fallbacks=())
    return call(following, work)


def _age(seconds: float) -> str:
    return "never" if seconds < 0 else f"{seconds:.1f}s"


ROLE = {
    pb.ROLE_MASTER: "master",
    pb.ROLE_STANDBY: "standby",
    pb.ROLE_STOPPED: "stopped",
    pb.ROLE_UNSPECIFIED: "?",
}


def status_table(status: pb.ClusterStatus) -> str:
    header = (
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
    )
    rows = [header]
    notes = []
    for group in status.groups:
        for member in group.members:
            member_status = member.status
            pg = member_status.postgres_status
            address = (
                f"{member_status.postgres.host}:{member_status.postgres.port}"
                if member_status.postgres.host
                else "-"
            )
            role = ROLE[pg.role] if member_status.agent_version else "unknown"
            state = member_status.activity or "-"
            if member_status.fenced:
                state = "fenced"
            rows.append(
                (
                    group.name,
                    member.name,
                    address,
                    role,
                    member.goal,
                    state,
                    str(pg.timeline or "-"),
                    str(member.lag_bytes),
                    member.sync_state or "-",
                    _age(member.heartbeat_age),
                    str(member_status.epoch),
                )
            )
        flags = " (paused)" if group.paused else ""
        pending = (
            f"; coordinators pending: {', '.join(group.reroute_pending)}" if group.reroute_pending else ""
        )
        notes.append(
            f"{group.name}: {group.state}{flags}, master {group.master or '-'}, {group.synchronous} "
            f"{group.sync_policy}: {group.reason}{pending}"
        )
    warnings = [f"WARNING: {warning}" for warning in status.warnings]
    leader = f"leader {status.leader or 'none'}"
    if status.leader_address:
        leader += f" at {status.leader_address} (term {status.term})"
    if not status.leading:
        leader += f"; answered by {status.controller}, which does not lead: groups as last recorded"
    several = len(status.controllers) > 1 or not status.leading
    controllers = f"controllers: {', '.join(status.controllers)}; {leader}" if several else ""
    lines = [*_aligned(rows), "", *notes, f"epoch {status.epoch}", *([controllers] if controllers else [])]
    return "\n".join([*lines, *warnings]) + "\n"


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def supervision_table(supervisor: SupervisorStatus) -> str:
    """What `xcha up`'s supervisor runs: PID, restarts, how each last ended, when restarted."""
    now = time.time()
    if supervisor.running():
        state = "running"
    elif supervisor.stopped:
        state = "stopped"
    else:
        state = "not running: `xcha up` starts one"
    rows = [("PROCESS", "PID", "RESTARTS", "LAST EXIT", "LAST RESTART")]
    for key, process in supervisor.processes.items():
        pid = str(process.pid) if process.pid else "-"
        if not process.pid and process.restart_at is not None:
            pid = f"- (restart in {max(0.0, process.restart_at - now):.1f}s)"
        rows.append(
            (
                key,
                pid,
                str(process.restarts),
                process.last_exit.describe() if process.last_exit else "-",
                f"{now - process.last_restart:.1f}s ago" if process.last_restart else "-",
            )
        )
    title = f"supervised processes (supervisor PID {supervisor.pid}, {state}):"
    return "\n".join([title, *_aligned(rows)]) + "\n"


def supervision_json(supervisor: SupervisorStatus) -> dict[str, object]:
    return {
        "pid": supervisor.pid,
        "running": supervisor.running(),
        "processes": {key: asdict(process) for key, process in supervisor.processes.items()},
    }


def status_json(status: pb.ClusterStatus) -> dict[str, object]:
    groups = []
    for group in status.groups:
        members = []
        for member in group.members:
            pg = member.status.postgres_status
            members.append(
                {
                    "member": member.name,
                    "host": member.status.postgres.host,
                    "port": member.status.postgres.port,
                    "role": ROLE[pg.role],
                    "goal": member.goal,
                    "mode": member.mode,
                    "activity": member.status.activity,
                    "fenced": member.status.fenced,
                    "timeline": pg.timeline,
                    "lag_bytes": member.lag_bytes,
                    "sync_state": member.sync_state,
                    "heartbeat_age": member.heartbeat_age if member.heartbeat_age >= 0 else None,
                    "epoch": member.status.epoch,
                    "receiving_wal": member.receiving_wal,
                    "probe": member.probe,
                    "flush_lsn": format_lsn(pg.flush_lsn or pg.current_lsn),
                }
            )
        groups.append(
            {
                "datanode": group.name,
                "state": group.state,
                "master": group.master,
                "paused": group.paused,
                "reason": group.reason,
                "synchronous": group.synchronous,
                "sync_policy": group.sync_policy,
                "reroute_pending": list(group.reroute_pending),
                "failure_inputs": group.failure_inputs,
                "members": members,
            }
        )
    return {
        "epoch": status.epoch,
        "paused": status.paused,
        "groups": groups,
        "warnings": list(status.warnings),
        "controller": status.controller,
        "leading": status.leading,
        "leader": status.leader,
        "leader_address": status.leader_address,
        "term": status.term,
        "controllers": list(status.controllers),
    }


def get_status(target: ControllerTarget, channel: grpc.Channel | None = None) -> pb.ClusterStatus:
    """The leader's status; a follower's own (the groups as last recorded) when the leader it
    names cannot be asked."""
    status: pb.ClusterStatus = call(
        target, lambda stub: stub.GetClusterStatus(pb.ClusterStatusRequest(), timeout=5), channel
    )
    if not status.leading and status.leader_address and status.leader_address != target.address:
        with contextlib.suppress(XchaError):
            return get_status(replace(target, address=status.leader_address))
    return status


def find_group(status: pb.ClusterStatus, datanode: str) -> pb.GroupView:
    for group in status.groups:
        if group.name == datanode:
            return group
    raise XchaError(f"unknown datanode {datanode!r}")


def new_master(status: pb.ClusterStatus, datanode: str, old_master: str) -> str | None:
    """The datanode's master once it is not `old_master` and the group runs again, else None."""
    from xcha.controller.fsm import RUNNING_STATES  # the controller's own list (imported on use)

    group = find_group(status, datanode)
    return group.master if group.master != old_master and group.state in RUNNING_STATES else None


def wait_for_new_master(
    target: ControllerTarget,
    datanode: str,
    old_master: str,
    timeout: float,
    channel: grpc.Channel | None = None,
) -> str:
    deadline = time.monotonic() + timeout
    with open_channel(target, channel) as opened:
        while time.monotonic() < deadline:
            master = new_master(get_status(target, opened), datanode, old_master)
            if master is not None:
                return master
            time.sleep(0.1)
    raise XchaError(f"{datanode} has no new master after {timeout:.0f} s: see `xcha ctl status`")


def _group(target: ControllerTarget, datanode: str, channel: grpc.Channel | None = None) -> pb.GroupView:
    check_name(datanode, "datanode name")
    return find_group(get_status(target, channel), datanode)


def run_ctl(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    with open_channel(target) as channel:  # one channel (one TLS handshake) for the whole command
        return _run_ctl(args, target, channel)


def _run_ctl(args: argparse.Namespace, target: ControllerTarget, channel: grpc.Channel) -> int:
    command = args.ctl_command
    if command == "status":
        status = get_status(target, channel)
        supervisor = read_status(target.workdir) if target.workdir else None
        if args.json:
            data = status_json(status)
            if supervisor is not None:
                data["supervisor"] = supervision_json(supervisor)
            print(json.dumps(data, indent=2))
        else:
            sys.stdout.write(status_table(status))
            if supervisor is not None:
                sys.stdout.write("\n" + supervision_table(supervisor))
        return 0
    if command in ("switchover", "failover"):
        old_master = _group(target, args.datanode, channel).master
        if command == "switchover":
            reply = call(
                target,
                lambda stub: stub.Switchover(
                    pb.SwitchoverRequest(datanode=args.datanode, to_member=args.to or ""), timeout=10
                ),
                channel,
            )
        else:
            reply = call(
                target,
                lambda stub: stub.Failover(
                    pb.FailoverRequest(
                        datanode=args.datanode, to_member=args.to or "", allow_data_loss=args.allow_data_loss
                    ),
                    timeout=10,
                ),
                channel,
            )
        print(reply.detail)
        if not args.no_wait:
            master = wait_for_new_master(target, args.datanode, old_master, args.timeout, channel)
            print(f"{args.datanode}: {master} is the master")
        return 0
    if command in ("pause", "resume"):
        datanode = args.datanode or ""
        if datanode:
            check_name(datanode, "datanode name")
        reply = call(
            target,
            lambda stub: stub.SetPaused(
                pb.PauseRequest(datanode=datanode, paused=command == "pause"), timeout=10
            ),
            channel,
        )
        print(reply.detail)
        return 0
    if command == "add-standby":
        reply = call(
            target,
            lambda stub: stub.AddStandby(
                pb.AddStandbyRequest(datanode=args.datanode, member=args.member, mode=args.mode), timeout=10
            ),
            channel,
        )
    elif command == "remove-standby":
        reply = call(
            target,
            lambda stub: stub.RemoveStandby(
                pb.RemoveStandbyRequest(datanode=args.datanode, member=args.member), timeout=10
            ),
            channel,
        )
    elif command == "set-mode":
        reply = call(
            target,
            lambda stub: stub.SetStandbyMode(
                pb.StandbyModeRequest(datanode=args.datanode, member=args.member, mode=args.mode), timeout=10
            ),
            channel,
        )
    elif command == "events":
        return _events(target, args, channel)
    else:
        raise InvalidInput(f"unknown command {command}")
    print(reply.detail)
    return 0


def _events(target: ControllerTarget, args: argparse.Namespace, channel: grpc.Channel) -> int:
    datanode = args.datanode or ""
    if datanode:
        check_name(datanode, "datanode name")
    if args.limit < 1:
        raise InvalidInput(f"invalid --limit {args.limit}: expected a whole number of at least 1")
    after = 0
    if not args.follow:
        reply = call(
            target,
            lambda stub: stub.ListEvents(
                pb.EventsRequest(limit=args.limit, datanode=datanode, newest=True), timeout=10
            ),
            channel,
        )
        _print_events(reply.events, args.json)
        return 0
    while True:
        reply = call(
            target,
            lambda stub, after=after: stub.ListEvents(  # type: ignore[misc]
                pb.EventsRequest(after_id=after, limit=1000, datanode=datanode), timeout=10
            ),
            channel,
        )
        _print_events(reply.events, args.json)
        if reply.events:
            after = reply.events[-1].id
        time.sleep(0.5)


def _print_events(events: Sequence[pb.Event], as_json: bool) -> None:
    for event in events:
        if as_json:
            print(
                json.dumps(
                    {
                        "id": event.id,
                        "time": event.time,
                        "datanode": event.datanode,
                        "kind": event.kind,
                        "epoch": event.epoch,
                        "message": event.message,
                        "details": json.loads(event.details_json or "{}"),
                    }
                ),
                flush=True,
            )
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time))
            print(
                f"{stamp}.{int(event.time * 1000) % 1000:03d}  {event.datanode or '-':<8} "
                f"{event.kind:<14} epoch {event.epoch:<4} {event.message}",
                flush=True,
            )


def add_ctl(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ctl = commands.add_parser("ctl", help="see and steer the cluster through the controller")
    sub = ctl.add_subparsers(dest="ctl_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        add_connection_arguments(parser)
        parser.set_defaults(handler=run_ctl)
        return parser

    status = command("status", "one row per member; --json for machines")
    status.add_argument("--json", action="store_true")
    for name, text in (
        ("switchover", "planned: stop the master cleanly, promote a synchronous standby"),
        ("failover", "promote a standby now"),
    ):
        parser = command(name, text)
        parser.add_argument("datanode")
        parser.add_argument(
            "--to", help="the member to promote (default: the most advanced synchronous standby)"
        )
        parser.add_argument("--no-wait", action="store_true", help="return once the controller accepted it")
        parser.add_argument("--timeout", type=float, default=60.0)
        if name == "failover":
            parser.add_argument(
                "--allow-data-loss",
                action="store_true",
                help="also promote a standby that may lack acknowledged commits",
            )
    for name, text in (
        ("pause", "no automatic action (for DATANODE, or the whole cluster)"),
        ("resume", "automatic actions again"),
    ):
        command(name, text).add_argument("datanode", nargs="?")
    events = command("events", "the controller's event history")
    events.add_argument("--follow", action="store_true")
    events.add_argument("--datanode")
    events.add_argument("--limit", type=int, default=50, help="the newest N (default 50)")
    events.add_argument("--json", action="store_true")
    add = command("add-standby", "admit a member (its agent clones it) as a sync or async standby")
    add.add_argument("datanode")
    add.add_argument("member")
    add.add_argument("--mode", choices=("sync", "async"), default="sync")
    remove = command("remove-standby", "stop a standby and remove it from its group")
    remove.add_argument("datanode")
    remove.add_argument("member")
    mode = command("set-mode", "switch a standby between synchronous and asynchronous")
    mode.add_argument("datanode")
    mode.add_argument("member")
    mode.add_argument("mode", choices=("sync", "async"))


def run_report_failure(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    check_name(args.datanode, "datanode name")
    if args.member:
        check_name(args.member, "member name")
    reply = call(
        target,
        lambda stub: stub.ReportNodeFailure(
            pb.NodeFailureReport(
                datanode=args.datanode, member=args.member or "", reporter=args.reporter, detail=args.detail
            ),
            timeout=10,
        ),
    )
    print(reply.verdict)
    return 0


def add_report_failure(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "report-failure",
        help="a coordinator reports a datanode it cannot reach "
        "(a suspicion: the controller checks before it acts)",
    )
    parser.add_argument("--datanode", required=True)
    parser.add_argument("--member", help="default: the datanode's master")
    parser.add_argument("--reporter", default=os.uname().nodename)
    parser.add_argument("--detail", default="")
    add_connection_arguments(parser)
    parser.set_defaults(handler=run_report_failure)
