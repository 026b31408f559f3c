"""Every decision the controller makes, as one table. No I/O.

A row is (state, event, guard, next state, action, comment). Events and guards are named
conditions over a `GroupView`; `decide` fires the first row whose state matches and whose
event and guard hold, and returns the next state, the concrete actions and a one-line
reason. The failure rule, candidate choice and desired synchronous standbys live here too,
as pure functions. docs/design.md shows the diagram generated from TRANSITIONS.
"""

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeVar, cast

from xcha.controller.views import NEVER, GroupState, GroupView, MemberView, SyncFailurePolicy
from xcha.errors import InvalidInput
from xcha.pg.syncrep import SyncStandbys

S = GroupState
ANY = "*"
SAME = "="
RUNNING_STATES = (S.SINGLE, S.PROTECTED, S.UNPROTECTED, S.DEGRADED)
PROMOTE_ATTEMPTS = 3
T = TypeVar("T")


class Action(StrEnum):
    NONE = "none"
    BOOTSTRAP = "bootstrap"  # initdb the first member as master
    START_MASTER = "start_master"  # restart a crashed master in place
    PROMOTE = "promote"  # bump the epoch, fence the old master, promote the candidate
    RESEND_PROMOTE = "resend_promote"
    SWITCHOVER = "switchover"  # bump the epoch, stop the master cleanly, promote the target
    DETACH = "detach"  # stop the standbys streaming from the old master; their positions are final
    REROUTE = "reroute"  # re-point every coordinator (a barrier)
    FOLLOW = "follow"  # make a member a standby of the master
    SET_SYNC = "set_sync"  # synchronous_standby_names on the master
    FENCE = "fence"  # stop a member that must not serve writes


@dataclass(frozen=True)
class Transition:
    states: tuple[str, ...]  # ("*",): any state
    event: str
    guard: str | None
    next_state: str
    action: Action
    comment: str


@dataclass(frozen=True)
class Step:
    """One concrete thing to do."""

    action: Action
    member: str | None = None
    sync: SyncStandbys | None = None
    best_effort: bool = False  # FENCE: the old master, while its successor is promoted


@dataclass(frozen=True)
class Decision:
    next_state: GroupState
    steps: tuple[Step, ...]
    reason: str
    row: int | None = None  # index in TRANSITIONS, None: nothing matched
    bump_epoch: bool = False
    new_master: str | None = None
    new_candidate: str | None = None
    sync_set: tuple[str, ...] | None = None  # None: unchanged
    clear_request: bool = False
    promote_attempts: int | None = None


def _per_view(compute: Callable[[GroupView], T]) -> Callable[[GroupView], T]:
    """compute(view), computed once per view (views are immutable): one decision asks for
    the same verdict in many conditions and again for its reason."""
    key = compute.__qualname__

    @functools.wraps(compute)
    def once(view: GroupView) -> T:
        memo = view.memo
        if key not in memo:
            memo[key] = compute(view)
        return cast(T, memo[key])

    return once


# ---- the failure rule -----------------------------------------------------------------------


@dataclass(frozen=True)
class FailureVerdict:
    failed: bool
    crashed: bool
    inputs: str


@_per_view
def master_failure(view: GroupView) -> FailureVerdict:
    """Crash: the master's agent reports, as facts acted on at once, that it saw its
    postmaster exit; that it fenced it (it had lost the controller and every synchronous
    standby: nothing serves writes until the controller acts); or that the recorded master is
    a standby (a candidate whose promotion failed) while neither it nor any reachable standby
    receives WAL (a master serving them, the old one back, may acknowledge commits through
    them). A PostgreSQL the agent found stopped when it started is no crash
    (`master_found_stopped`).
    Hang, host loss, partition: no heartbeat for failure_timeout AND the controller's own
    probe fails AND every reachable standby reports it no longer receives WAL."""
    master = view.master_view
    if master is None:
        return FailureVerdict(False, False, "no master")
    timeout = view.failure_timeout
    answering = master.reachable(timeout) and master.activity == "idle" and master.has_data
    stopped = answering and not master.pg.running
    died = stopped and master.postmaster_died and not master.fenced
    fenced = stopped and master.fenced
    silent = not master.reachable(timeout)
    probe_failed = master.probe_ok is False and master.probe_age < timeout
    reachable_standbys = [m for m in view.standbys if m.reachable(timeout) and m.pg.running]
    standbys_lost = all(not m.receiving_wal() for m in reachable_standbys)
    # A recorded master that is a standby (its promotion failed) while it, or another
    # standby, still receives WAL: a master serves them (the old one, back), and it may
    # acknowledge commits through them: no crash.
    standby = (
        answering
        and master.pg.running
        and master.pg.in_recovery is True
        and not master.receiving_wal()
        and standbys_lost
    )
    crashed = died or fenced or standby
    heartbeat = "never" if master.heartbeat_age == float("inf") else f"{master.heartbeat_age:.2f}s ago"
    probe = {None: "not probed", True: "answers", False: "no answer"}[master.probe_ok]
    views = (
        ", ".join(
            f"{m.name} {'receives WAL' if m.receiving_wal() else 'receives no WAL'}"
            for m in reachable_standbys
        )
        or "no standby reachable"
    )
    report = (
        "postmaster gone"
        if died
        else "fenced by its agent"
        if fenced
        else "a standby, not a master"
        if standby
        else ""
    )
    inputs = f"heartbeat {heartbeat}; probe {probe}; {views}" + (
        f"; {report} (agent report)" if report else ""
    )
    # After a (re)start or a controller take-over, silence proves nothing until the grace is
    # over; a crash the master's agent reports at this controller's epoch is a fact at once.
    fact = crashed and master.epoch >= view.epoch
    failed = fact or (not view.in_grace and (crashed or (silent and probe_failed and standbys_lost)))
    return FailureVerdict(failed, crashed, inputs)


# ---- candidates ------------------------------------------------------------------------------


def _complete_and_live(view: GroupView, member: MemberView) -> bool:
    """With k of k (n-k+1 = 1) every commit needed every confirmer: one synchronous when the
    master was last protected holds every acknowledged commit whatever its position, and the
    old master confirms nothing once it is promoted (its WAL receiver stops; what it flushed is
    replayed first). It is promoted at once, without a Detach, when heard within the last
    heartbeat interval (on a stream: its connection is open now). One silent for longer (its
    agent may have died with the master: both hosts lost) is detached first, which also tells
    whether it is there, instead of promoted on a report up to failure_timeout old."""
    return member.name in view.sync_set and member.heartbeat_age <= view.heartbeat_interval


@dataclass(frozen=True)
class CandidateChoice:
    member: MemberView | None
    fresh: bool  # final positions: every standby they were read from is detached
    reason: str
    lost_bytes: int = 0


def _usable(view: GroupView, member: MemberView) -> bool:
    return (
        member.reachable(view.failure_timeout)
        and member.pg.running
        and bool(member.pg.in_recovery)
        and not member.fenced
        and not member.removed
        and not member.busy
    )


def unheard_sync_standbys(view: GroupView) -> list[MemberView]:
    """Synchronous standbys the controller has not heard from since it started (an agent in
    reconnect backoff after a controller restart): asked directly before any conclusion,
    for up to failure_timeout after the failure."""
    return [
        m
        for m in view.standbys
        if m.name in view.sync_set
        and m.heartbeat_age == NEVER
        and view.master_failed_for < view.failure_timeout
    ]


def confirmers(view: GroupView) -> tuple[str, ...]:
    """The standbys through which the master may confirm commits: those synchronous when it
    was last protected, and every one its last report names in synchronous_standby_names
    (FIRST k moves to a potential standby on its own when a synchronous one stops confirming;
    no controller is asked)."""
    names = list(view.sync_set)
    master = view.master_view
    if master is not None and master.pg.synchronous_standby_names:
        with contextlib.suppress(InvalidInput):
            names += SyncStandbys.parse(master.pg.synchronous_standby_names).names
    standbys = {m.name for m in view.standbys}
    return tuple(name for name in dict.fromkeys(names) if name in standbys)


def choose_candidate(
    view: GroupView, allow_data_loss: bool = False, target: str | None = None
) -> CandidateChoice:
    """Only standbys through which the master could confirm commits (`confirmers`), k of n
    for each commit, FIRST or ANY alike, hold them: positions from n-k+1 of them are needed
    to be sure the most advanced one holds every acknowledged commit, and one of them must have
    been synchronous when the master was last protected (it holds what was acknowledged
    before). Positions count only from detached standbys: a standby that still streams from
    the old master (it may hang or be cut off from the controller only) can confirm commits
    after its position was read, and with n-k+1 detached the old master can confirm nothing
    more. A master its agent reports stopped (or a standby) sends nothing more: then a
    position reported after the failure is final too. With k of k (n-k+1 = 1) no position is
    needed: each of them holds every commit. Highest flushed LSN wins. `fresh`: the positions
    are final (or need not be); else the standbys are to be detached first."""
    usable = [m for m in view.standbys if _usable(view, m)]
    quiet = master_failure(view).crashed
    chosen = None
    if target is not None:
        chosen = next((m for m in usable if m.name == target), None)
        if chosen is None:
            return CandidateChoice(None, False, f"{target} is not a running, reachable standby")

    def final(member: MemberView) -> bool:
        return member.detached or (quiet and member.report_age <= view.master_failed_for)

    named = confirmers(view)
    named_usable = [m for m in usable if m.name in named]
    pool: list[MemberView] = []
    fresh = False
    if any(m.name in view.sync_set for m in named_usable):
        needed = len(named) - view.policy.count + 1
        detached = [m for m in named_usable if final(m)]
        method = view.policy.method.upper()
        if len(named_usable) < needed:
            reason = (
                f"{method} {view.policy.count} of {len(named)}: {len(named_usable)} of the "
                f"{needed} standbys needed to be sure of every commit are reachable"
            )
        elif len(detached) >= needed and any(m.name in view.sync_set for m in detached):
            pool, fresh = detached, True
        elif needed <= 1 and (live := [m for m in named_usable if _complete_and_live(view, m)]):
            # Every commit needs every confirmer (k of k): nothing to detach (`_complete_and_live`).
            pool, fresh = live, True
        else:
            pool = named_usable
        if pool:
            reason = "most advanced of the quorum" if view.policy.method == "any" else "synchronous standby"
            if len(named) > 1 and view.policy.method != "any":
                reason = "most advanced of the synchronous and potential standbys"
    elif not view.sync_set:
        reason = "no standby was synchronous when the master was last protected"
    else:
        reason = f"no synchronous standby ({', '.join(view.sync_set)}) is running and reachable"
    if chosen is not None and pool:
        # The operator's target, when it holds what the most advanced of the pool holds.
        most = max(pool, key=lambda m: m.pg.position)
        if chosen in pool and chosen.pg.position >= most.pg.position:
            pool = [chosen]
        elif chosen.name not in view.sync_set and chosen.name not in named:
            pool, reason = [], f"{target} was not a synchronous standby when the master was last protected"
        else:
            pool, reason = [], f"{target} may lack commits {most.name} holds"
    data_loss = False
    if not pool and allow_data_loss and usable:
        pool, data_loss = ([chosen] if chosen is not None else usable), True
        fresh = all(final(m) for m in pool)
    if not pool:
        return CandidateChoice(None, False, reason)
    best = max(pool, key=lambda m: m.pg.position)
    lost = 0
    if data_loss:
        master = view.master_view
        lost = max(0, (master.pg.position if master else 0) - best.pg.position)
        reason = f"allow_data_loss: {best.name} is the most advanced standby; up to {lost} bytes may be lost"
    return CandidateChoice(best, fresh, reason, lost)


@_per_view
def _candidate(view: GroupView) -> CandidateChoice:
    """The candidate of an automatic failover (no data loss). In no_candidate, a recorded
    master that is a running standby (its promotion failed) may be the one that holds every
    commit: it is a candidate too."""
    master = view.master_view
    if view.state == S.NO_CANDIDATE and master is not None and master.pg.running and master.pg.in_recovery:
        return choose_candidate(replace(view, master=None))
    return choose_candidate(view)


@_per_view
def _data_loss_candidate(view: GroupView) -> CandidateChoice:
    return choose_candidate(view, allow_data_loss=True)


@_per_view
def requested_candidate(view: GroupView) -> CandidateChoice:
    """The candidate of the operator's request (with its target and allow_data_loss)."""
    request = view.request
    if request is None:
        return CandidateChoice(None, False, "no request")
    return choose_candidate(view, request.allow_data_loss or view.allow_data_loss, request.target)


# ---- synchronous replication -----------------------------------------------------------------


def sync_grace(view: GroupView) -> float:
    """How long a synchronous standby may be missing before it counts as lost."""
    return view.failure_timeout / 2


@_per_view
def desired_sync(view: GroupView) -> SyncStandbys:
    """available: the sync-mode standbys that stream (or went missing only just now);
    strict: every sync-mode standby, so that commits wait for them."""
    names = []
    for member in view.standbys:
        if member.mode != "sync":
            continue
        if view.on_sync_failure == SyncFailurePolicy.STRICT or (
            member.streaming_missing_for < sync_grace(view) and not _down(view, member)
        ):
            names.append(member.name)
    return SyncStandbys(view.policy, tuple(names))


def _down(view: GroupView, member: MemberView) -> bool:
    """The member's agent says its PostgreSQL is not running: a fact, no grace needed."""
    return member.reachable(view.failure_timeout) and not member.pg.running and member.activity == "idle"


@_per_view
def _master_report_fresh(view: GroupView) -> bool:
    master = view.master_view
    return (
        master is not None
        and master.reachable(view.failure_timeout)
        and master.pg.running
        and master.pg.in_recovery is False
        and master.activity == "idle"  # not mid-bootstrap or mid-change
    )


@_per_view
def confirming_standbys(view: GroupView) -> tuple[str, ...]:
    """Standbys the master reports as confirming commits now (sync / quorum, streaming) and
    caught up: flushed past every commit the master acknowledged before it confirmed (while
    unprotected, or through another standby); only these hold every acknowledged commit. They
    also report themselves a running standby: a WAL stream alone (a base backup's, say) is no
    standby that could be promoted."""
    master = view.master_view
    if master is None:
        return ()
    return tuple(
        d.name
        for d in master.pg.downstreams
        if d.state == "streaming"
        and d.sync_state in ("sync", "quorum")
        and d.caught_up
        and (member := view.member(d.name)) is not None
        and member.pg.running
        and member.pg.in_recovery is True
    )


def _current_sync(view: GroupView) -> str:
    master = view.master_view
    return master.pg.synchronous_standby_names if master else ""


def _sync_value(sync: SyncStandbys) -> str:
    """The desired setting as the reason sentences show it (the 10+ spelling)."""
    return sync.render(100000)


@_per_view
def _sync_in_effect(view: GroupView) -> bool:
    """The master's synchronous_standby_names means what is desired. Compared by meaning,
    not text: each version echoes its own spelling (9.3: 'dn1b' for FIRST 1 (dn1b))."""
    desired = desired_sync(view)
    try:
        current = SyncStandbys.parse(_current_sync(view))
    except InvalidInput:
        return False
    if not desired.names:
        return not current.names
    return (current.names, current.required, current.policy.method) == (
        desired.names,
        desired.required,
        desired.policy.method,
    )


# ---- named conditions ---------------------------------------------------------------------


@_per_view
def _stray_master(view: GroupView) -> MemberView | None:
    for member in view.members:
        if (
            member.name != view.master
            and member.reachable(view.failure_timeout)
            and member.pg.running
            and member.pg.in_recovery is False
            and not member.busy
        ):
            return member
    return None


@_per_view
def _needs_follow(view: GroupView) -> MemberView | None:
    master = view.master_view
    if master is None or master.endpoint is None or not _master_report_fresh(view):
        return None
    for member in view.standbys:
        if (
            not member.reachable(view.failure_timeout)
            or member.busy
            or member.follow_backoff
            or member.activity != "idle"
        ):
            continue
        receiver = member.pg.wal_receiver
        following = (
            member.pg.running
            and member.pg.in_recovery
            and receiver is not None
            and receiver.upstream_host == master.endpoint.host
            and receiver.upstream_port == master.endpoint.port
        )
        # A standby whose WAL receiver is (re)connecting gets a moment before it is re-done; a
        # detached one (a failover that did not happen) follows again at once.
        starting = (
            not member.detached
            and member.pg.running
            and member.pg.in_recovery
            and receiver is None
            and member.streaming_missing_for < view.failure_timeout
        )
        if not following and not starting:
            return member
    return None


def _to_detach(view: GroupView, everyone: bool) -> list[MemberView]:
    """The standbys whose positions the choice needs final: those the old master may confirm
    commits through (`confirmers`), or every standby for a promotion that may lose data
    (everyone); of them, those reachable (or synchronous and not heard from since this
    controller started), not detached, not busy, not a master. A recorded master that is a
    standby (its promotion failed) is one of them. An asynchronous standby confirms nothing:
    it is not detached for a failover without data loss (a hung one would hold it up)."""
    unheard = unheard_sync_standbys(view)
    named = set(confirmers(view))
    return [
        m
        for m in view.members
        if (m.name != view.master or (m.pg.running and m.pg.in_recovery is True))
        and (everyone or m.name in named or m.name == view.master)
        and (m.reachable(view.failure_timeout) or m in unheard)
        and not m.detached
        and not m.busy
        and not m.removed
        and not m.fenced
        and not (m.pg.running and m.pg.in_recovery is False)
    ]


def _sync_lost(view: GroupView) -> bool:
    if not _master_report_fresh(view):
        return False
    if len(confirming_standbys(view)) >= view.policy.count:
        return False
    sync_members = [m for m in view.standbys if m.mode == "sync"]
    return (
        any(m.streaming_missing_for >= sync_grace(view) or _down(view, m) for m in sync_members)
        or not sync_members
    )


def _sync_satisfied(view: GroupView) -> bool:
    return (
        _master_report_fresh(view)
        and len(confirming_standbys(view)) >= view.policy.count
        and _sync_in_effect(view)
    )


def _sync_names_differ(view: GroupView) -> bool:
    master = view.master_view
    return _master_report_fresh(view) and master is not None and not master.busy and not _sync_in_effect(view)


def _master_running(view: GroupView) -> bool:
    master = view.master_view
    return _master_report_fresh(view) and master is not None and master.epoch >= view.epoch


@_per_view
def _adoptable_master(view: GroupView) -> MemberView | None:
    for member in view.members:
        if (
            member.reachable(view.failure_timeout)
            and member.pg.running
            and member.pg.in_recovery is False
            and member.activity == "idle"
            and not member.busy
        ):
            return member
    return None


@_per_view
def _bootstrap_member(view: GroupView) -> MemberView | None:
    first = view.members[0] if view.members else None
    if first is None or not first.reachable(view.failure_timeout) or first.busy:
        return None
    if any(m.has_data for m in view.members if m.reachable(view.failure_timeout)):
        return None  # data exists somewhere: an operator decides, xcha does not initdb over it
    return first


def _master_stopped(view: GroupView, master: MemberView) -> bool:
    """The master's agent answers and says its PostgreSQL is not running (not on purpose)."""
    return (
        master.reachable(view.failure_timeout)
        and not master.pg.running
        and master.activity == "idle"
        and not master.fenced
        and master.has_data
    )


def _master_found_stopped(view: GroupView) -> bool:
    """The master's agent found its PostgreSQL stopped when it started (a clean restart of
    the deployment, a reboot, maintenance) and saw no crash: still the group's master at
    this epoch, so no standby was promoted meanwhile, and it starts in place."""
    master = view.master_view
    return (
        master is not None
        and _master_stopped(view, master)
        and not master.postmaster_died
        and master.epoch >= view.epoch
        and not master.busy
        and not view.busy
    )


def _master_restartable(view: GroupView) -> bool:
    master = view.master_view
    return (
        not view.busy
        and master is not None
        and master.reachable(view.failure_timeout)
        and not master.pg.running
        and master.has_data
        and not master.busy
        and master.activity == "idle"
    )


def _target_stopped(view: GroupView) -> bool:
    """A switchover's Promote went to the target, and the target's agent now says its
    PostgreSQL does not run (it crashed, fenced itself, or was found stopped). It holds every
    commit the old master had (the old master stopped cleanly and the target had flushed past
    its shutdown checkpoint before Promote went out), and, if it was promoted, commits it may
    have acknowledged as master that the old master lacks: only the target may serve again."""
    target = view.member(view.candidate)
    return (
        view.promote_sent
        and not view.busy
        and target is not None
        and target.name != view.master
        and target.reachable(view.failure_timeout)
        and not target.pg.running
        and target.has_data
        and target.activity == "idle"
        and not target.busy
    )


def _promoted(view: GroupView) -> bool:
    """The promote operation finished and the candidate reports itself master at this epoch
    (and, with a port takeover, on the former master's port)."""
    candidate = view.member(view.candidate)
    return (
        not view.busy
        and candidate is not None
        and candidate.reachable(view.failure_timeout)
        and candidate.pg.running
        and candidate.pg.in_recovery is False
        and candidate.epoch >= view.epoch
        and (
            not view.takeover_port
            or (candidate.endpoint is not None and candidate.endpoint.port == view.takeover_port)
        )
    )


CONDITIONS: dict[str, Callable[[GroupView], bool]] = {
    "always": lambda v: True,
    "paused": lambda v: v.paused,
    "in_grace": lambda v: v.in_grace and not master_failure(v).failed,
    "idle": lambda v: not v.busy,
    "promoted": _promoted,
    "promote_failed_often": lambda v: not v.busy and v.promote_attempts >= PROMOTE_ATTEMPTS,
    "switchover_failed": lambda v: v.switchover_failed and not v.busy,
    "target_stopped": _target_stopped,
    "rerouted": lambda v: v.rerouted,
    "switchover_requested": lambda v: v.request is not None and v.request.kind == "switchover" and not v.busy,
    "failover_requested": lambda v: v.request is not None and v.request.kind == "failover" and not v.busy,
    "target_ready": lambda v: requested_candidate(v).member is not None,
    "target_not_ready": lambda v: requested_candidate(v).member is None,
    "master_running": _master_running,
    "master_adoptable": lambda v: _adoptable_master(v) is not None and not v.busy,
    "bootstrap_ready": lambda v: _bootstrap_member(v) is not None and not v.busy,
    "master_failed": lambda v: master_failure(v).failed and not v.busy,
    "master_found_stopped": _master_found_stopped,
    "candidate_ready": lambda v: (c := _candidate(v)).member is not None and c.fresh,
    "not_detached": lambda v: (
        ((c := _candidate(v)).member is not None and not c.fresh)
        or (c.member is None and bool(unheard_sync_standbys(v)))
    ),
    "data_loss_candidate": lambda v: (
        v.allow_data_loss and (c := _data_loss_candidate(v)).member is not None and c.fresh
    ),
    "data_loss_not_detached": lambda v: (
        v.allow_data_loss and (c := _data_loss_candidate(v)).member is not None and not c.fresh
    ),
    "master_restartable": _master_restartable,
    "stray_master": lambda v: _stray_master(v) is not None,
    "member_needs_follow": lambda v: _needs_follow(v) is not None,
    "sync_lost": _sync_lost,
    "available": lambda v: v.on_sync_failure == SyncFailurePolicy.AVAILABLE,
    "strict": lambda v: v.on_sync_failure == SyncFailurePolicy.STRICT,
    "sync_satisfied": _sync_satisfied,
    "sync_names_differ": _sync_names_differ,
}


RUNNING_OR_LOST = (*RUNNING_STATES, S.NO_CANDIDATE)
MASTER_LOST_WITH_CANDIDATES = (S.PROTECTED, S.DEGRADED)

# fmt: off
_TABLE: tuple[tuple[tuple[str, ...] | str, str, str | None, str, Action, str], ...] = (
    # Operations under way finish, even while paused.
    (S.FAILOVER, "promoted", None, S.REROUTING, Action.REROUTE,
     "{candidate} accepts writes: re-point every coordinator"),
    (S.FAILOVER, "promote_failed_often", None, S.NO_CANDIDATE, Action.NONE,
     "promoting {candidate} failed {attempts} times"),
    (S.FAILOVER, "idle", None, SAME, Action.RESEND_PROMOTE,
     "(re)sending Promote to {candidate}"),
    (S.SWITCHOVER, "promoted", None, S.REROUTING, Action.REROUTE,
     "switchover: {candidate} accepts writes: re-point every coordinator"),
    (S.SWITCHOVER, "switchover_failed", None, S.SINGLE, Action.START_MASTER,
     "switchover failed: restarting {master}"),
    # Once Promote went out the target may be a master: a target that stopped is started as
    # master (a failover to it), never the old master, which may lack what it acknowledged.
    (S.SWITCHOVER, "idle", "target_stopped", S.FAILOVER, Action.PROMOTE,
     "switchover: {candidate} stopped after Promote went out; it holds every commit {master} had: "
     "starting it as master, {master} follows"),
    (S.SWITCHOVER, "idle", None, SAME, Action.SWITCHOVER,
     "(re)starting the switchover to {candidate}"),
    (S.REROUTING, "rerouted", None, S.SINGLE, Action.NONE,
     "every coordinator points at {master}: restoring synchronous replication"),
    (S.REROUTING, "idle", None, SAME, Action.REROUTE,
     "(re)starting the reroute barrier for {master}"),
    # After a (re)start the controller first learns what the agents report.
    ((*RUNNING_OR_LOST, S.INITIALIZING), "in_grace", None, SAME, Action.NONE,
     "learning the cluster after a start: no decision yet"),
    # What an operator asks, also while paused.
    (RUNNING_STATES, "switchover_requested", "target_ready", S.SWITCHOVER, Action.SWITCHOVER,
     "switchover requested: stopping {master} cleanly, then promoting {target}"),
    (RUNNING_OR_LOST, "failover_requested", "target_ready", S.FAILOVER, Action.PROMOTE,
     "failover requested: promoting {target}"),
    (ANY, "switchover_requested", "target_not_ready", SAME, Action.NONE,
     "switchover refused: {target_reason}"),
    (ANY, "failover_requested", "target_not_ready", SAME, Action.NONE,
     "failover refused: {target_reason}"),
    # Nothing automatic while paused.
    (ANY, "paused", None, SAME, Action.NONE,
     "paused: no automatic action"),
    # A new group.
    (S.INITIALIZING, "master_adoptable", None, S.SINGLE, Action.NONE,
     "adopted {adoptable} as the master"),
    (S.INITIALIZING, "bootstrap_ready", None, SAME, Action.BOOTSTRAP,
     "bootstrapping {bootstrap} as the master"),
    # A master found stopped by its freshly started agent, no crash seen: start it in place.
    (RUNNING_OR_LOST, "master_found_stopped", None, SAME, Action.START_MASTER,
     "master {master} was found stopped when its agent started (no crash seen): starting it in place"),
    # The master is lost.
    (MASTER_LOST_WITH_CANDIDATES, "master_failed", "candidate_ready", S.FAILOVER, Action.PROMOTE,
     "master {master} lost ({failure}): promoting {candidate_choice} ({candidate_reason})"),
    (MASTER_LOST_WITH_CANDIDATES, "master_failed", "not_detached", SAME, Action.DETACH,
     "master {master} lost ({failure}): detaching the standbys from it before their positions are read"),
    (RUNNING_STATES, "master_failed", "master_restartable", SAME, Action.START_MASTER,
     "master {master} crashed and no standby holds every commit ({candidate_reason}): restarting it"),
    (RUNNING_STATES, "master_failed", "data_loss_candidate", S.FAILOVER, Action.PROMOTE,
     "master {master} lost ({failure}): {data_loss_reason}"),
    (RUNNING_STATES, "master_failed", "data_loss_not_detached", SAME, Action.DETACH,
     "master {master} lost ({failure}): detaching the standbys from it before a promotion that may "
     "lose data"),
    (RUNNING_STATES, "master_failed", None, S.NO_CANDIDATE, Action.NONE,
     "master {master} lost ({failure}) and no standby is safe to promote: {candidate_reason}"),
    (S.NO_CANDIDATE, "master_running", None, S.SINGLE, Action.NONE,
     "master {master} is back"),
    # Only while the failure rule holds: a master that serves again is kept (it may have
    # acknowledged commits the candidate lacks), and never while a restart of it runs.
    (S.NO_CANDIDATE, "master_failed", "candidate_ready", S.FAILOVER, Action.PROMOTE,
     "promoting {candidate_choice} ({candidate_reason})"),
    (S.NO_CANDIDATE, "master_failed", "not_detached", SAME, Action.DETACH,
     "detaching the standbys from {master} before their positions are read"),
    (S.NO_CANDIDATE, "master_failed", "data_loss_candidate", S.FAILOVER, Action.PROMOTE,
     "{data_loss_reason}"),
    (S.NO_CANDIDATE, "master_restartable", None, SAME, Action.START_MASTER,
     "no standby is safe to promote ({candidate_reason}): restarting {master}"),
    # Members that must not serve writes, and members to bring in.
    (RUNNING_OR_LOST, "stray_master", None, SAME, Action.FENCE,
     "{stray} accepts writes but {master} is the master: fencing it"),
    (RUNNING_STATES, "member_needs_follow", None, SAME, Action.FOLLOW,
     "{follower} joins as a standby of {master}"),
    # Synchronous replication.
    (S.PROTECTED, "sync_lost", "available", S.UNPROTECTED, Action.SET_SYNC,
     "synchronous standby lost: synchronous_standby_names = '{desired}' so writes go on (available)"),
    (S.PROTECTED, "sync_lost", "strict", S.DEGRADED, Action.NONE,
     "synchronous standby lost: commits wait for it (strict)"),
    ((S.SINGLE, S.UNPROTECTED, S.DEGRADED), "sync_satisfied", None, S.PROTECTED, Action.NONE,
     "protected: {confirming} confirm(s) every commit"),
    (RUNNING_STATES, "sync_names_differ", None, SAME, Action.SET_SYNC,
     "synchronous_standby_names = '{desired}'"),
    (ANY, "always", None, SAME, Action.NONE,
     "{summary}"),
)
# fmt: on

TRANSITIONS = tuple(
    Transition(states if isinstance(states, tuple) else (states,), event, guard, next_state, action, comment)
    for states, event, guard, next_state, action, comment in _TABLE
)


def _summary(view: GroupView) -> str:
    if view.state == S.NO_CANDIDATE:
        return (
            f"no_candidate: master {view.master or 'none'} lost and no standby is safe to promote: "
            f"{_candidate(view).reason}"
        )
    summary = f"{view.state}: master {view.master or 'none'}"
    if view.master_view is not None:
        confirming = confirming_standbys(view)
        summary += f", confirming standbys: {', '.join(confirming) or 'none'}"
        waiting = [_not_confirming(m, view.master_view) for m in view.standbys if m.name not in confirming]
        if waiting and view.state != S.PROTECTED:
            summary += f"; not confirming: {', '.join(waiting)}"
    return summary


def _not_confirming(member: MemberView, master: MemberView) -> str:
    """Why a standby does not count yet, as its own report (and the master's) says."""
    sender = master.pg.downstream(member.name)
    if member.heartbeat_age == NEVER:
        why = "not heard from"
    elif member.activity != "idle":
        why = member.activity
    elif not member.pg.running:
        why = "PostgreSQL not running"
    elif member.mode != "sync":
        why = "asynchronous"
    elif sender is not None and sender.sync_state in ("sync", "quorum") and not sender.caught_up:
        why = "catching up with commits acknowledged without it"
    else:
        why = "not streaming synchronously"
    return f"{member.name} ({why})"


def _name(member: MemberView | None, absent: str = "") -> str:
    return member.name if member else absent


def _target(view: GroupView) -> str | None:
    chosen = requested_candidate(view).member
    return chosen.name if chosen else (view.request.target if view.request else "")


# The values row comments are written with, each computed only when a comment names it.
FACTS: dict[str, Callable[[GroupView], object]] = {
    "master": lambda v: v.master or "none",
    "candidate": lambda v: v.candidate or "none",
    "attempts": lambda v: v.promote_attempts,
    "failure": lambda v: master_failure(v).inputs,
    "candidate_choice": lambda v: _name(_candidate(v).member, "none"),
    "candidate_reason": lambda v: _candidate(v).reason,
    "data_loss_reason": lambda v: _data_loss_candidate(v).reason,
    "target": _target,
    "target_reason": lambda v: requested_candidate(v).reason,
    "stray": lambda v: _name(_stray_master(v)),
    "follower": lambda v: _name(_needs_follow(v)),
    "bootstrap": lambda v: _name(_bootstrap_member(v)),
    "adoptable": lambda v: _name(_adoptable_master(v)),
    "desired": lambda v: _sync_value(desired_sync(v)),
    "confirming": lambda v: ", ".join(confirming_standbys(v)) or "none",
    "summary": _summary,
}


class _Facts(dict[str, object]):
    """FACTS of one view for str.format_map, computed on first use."""

    def __init__(self, view: GroupView) -> None:
        super().__init__()
        self.view = view

    def __missing__(self, key: str) -> object:
        value = self[key] = FACTS[key](self.view)
        return value


def _plan(index: int, row: Transition, view: GroupView) -> Decision:
    next_state = GroupState(view.state if row.next_state == SAME else row.next_state)
    reason = row.comment.format_map(_Facts(view))
    master = view.master_view
    match row.action:
        case Action.NONE:
            steps: tuple[Step, ...] = ()
        case Action.BOOTSTRAP:
            member = _bootstrap_member(view)
            assert member is not None
            return Decision(
                next_state,
                (Step(Action.BOOTSTRAP, member.name),),
                reason,
                index,
                bump_epoch=True,
                new_master=member.name,
            )
        case Action.START_MASTER:
            steps = (Step(Action.START_MASTER, view.master),)
        case Action.PROMOTE:
            if row.guard == "target_stopped":
                choice = CandidateChoice(view.member(view.candidate), True, "the switchover's target")
            elif row.event == "failover_requested":
                choice = requested_candidate(view)
            elif "data_loss_candidate" in (row.event, row.guard):
                choice = _data_loss_candidate(view)
            else:
                choice = _candidate(view)
            assert choice.member is not None
            target = choice.member.name
            # Best effort: the old master is usually unreachable, and the promotion must not
            # wait for it (its agent fences it anyway once it learns the new epoch).
            fence = (
                (Step(Action.FENCE, view.master, best_effort=True),)
                if master is not None and master.name != target
                else ()
            )
            return Decision(
                next_state,
                (*fence, Step(Action.PROMOTE, target, _promote_sync(view, target))),
                reason,
                index,
                bump_epoch=True,
                new_master=target,
                new_candidate=target,
                clear_request=row.event == "failover_requested",
                promote_attempts=0,
            )
        case Action.RESEND_PROMOTE:
            return Decision(
                next_state,
                (Step(Action.RESEND_PROMOTE, view.candidate, _promote_sync(view, view.candidate)),),
                reason,
                index,
                promote_attempts=view.promote_attempts + 1,
            )
        case Action.SWITCHOVER:
            switch_to = view.candidate
            if row.event == "switchover_requested":
                chosen = requested_candidate(view).member
                assert chosen is not None
                switch_to = chosen.name
            return Decision(
                next_state,
                (Step(Action.SWITCHOVER, switch_to),),
                reason,
                index,
                bump_epoch=row.event == "switchover_requested",
                new_candidate=switch_to,
                clear_request=row.event == "switchover_requested",
            )
        case Action.DETACH:
            # One step per standby to detach; the controller detaches them all in one group task.
            everyone = row.guard == "data_loss_not_detached"
            steps = tuple(Step(Action.DETACH, m.name) for m in _to_detach(view, everyone))
        case Action.REROUTE:
            new_master = view.candidate if view.state in (S.FAILOVER, S.SWITCHOVER) else view.master
            return Decision(
                next_state, (Step(Action.REROUTE, new_master),), reason, index, new_master=new_master
            )
        case Action.FOLLOW:
            follower = _needs_follow(view)
            assert follower is not None
            steps = (Step(Action.FOLLOW, follower.name),)
        case Action.SET_SYNC:
            steps = (Step(Action.SET_SYNC, view.master, desired_sync(view)),)
        case Action.FENCE:
            stray = _stray_master(view)
            assert stray is not None
            steps = (Step(Action.FENCE, stray.name),)
    sync_set = None
    if (
        next_state == S.PROTECTED
        and _master_report_fresh(view)
        and len(confirming_standbys(view)) >= view.policy.count
    ):
        sync_set = _sync_set(view)
    elif next_state in (S.SINGLE, S.UNPROTECTED) and view.state != next_state:
        sync_set = ()  # commits may now be acknowledged without the former sync standbys
    adopted = _adoptable_master(view) if row.event == "master_adoptable" else None
    return Decision(
        next_state,
        steps,
        reason,
        index,
        sync_set=sync_set,
        new_master=adopted.name if adopted else None,
        clear_request=row.guard == "target_not_ready",
    )


def _sync_set(view: GroupView) -> tuple[str, ...]:
    """The standbys that hold every acknowledged commit: FIRST k the ones the master calls
    sync; ANY k every standby named in the quorum."""
    if view.policy.method == "any":
        return SyncStandbys.parse(_current_sync(view)).names
    return confirming_standbys(view)


def _promote_sync(view: GroupView, target: str | None) -> SyncStandbys | None:
    """strict: the new master waits for its standbys from its first commit on."""
    if view.on_sync_failure != SyncFailurePolicy.STRICT:
        return None
    names = tuple(m.name for m in view.members if m.name != target and m.mode == "sync" and not m.removed)
    return SyncStandbys(view.policy, names) if names else None


def decide(view: GroupView) -> Decision:
    """The first row of TRANSITIONS that matches the view."""
    for index, row in enumerate(TRANSITIONS):
        if ANY not in row.states and view.state not in row.states:
            continue
        if not CONDITIONS[row.event](view):
            continue
        if row.guard is not None and not CONDITIONS[row.guard](view):
            continue
        return _plan(index, row, view)
    raise AssertionError("the last row matches every view")


def mermaid() -> str:
    """The state diagram of TRANSITIONS (docs/design.md)."""
    lines = ["stateDiagram-v2", "    [*] --> initializing"]
    seen = set()
    for row in TRANSITIONS:
        if row.action == Action.NONE and row.next_state == SAME:
            continue
        sources = [s.value for s in GroupState] if ANY in row.states else [str(s) for s in row.states]
        for source in sources:
            target = source if row.next_state == SAME else str(row.next_state)
            label = row.event + (f" [{row.guard}]" if row.guard else "")
            if row.action != Action.NONE:
                label += f" / {row.action.value}"
            key = (source, target, label)
            if key not in seen:
                seen.add(key)
                lines.append(f"    {source} --> {target}: {label}")
    return "\n".join(lines) + "\n"


def table_markdown() -> str:
    """TRANSITIONS as a markdown table (docs/design.md)."""
    lines = ["| # | state | event | guard | next | action | comment |", "|---|---|---|---|---|---|---|"]
    for index, row in enumerate(TRANSITIONS):
        lines.append(
            f"| {index} | {', '.join(row.states)} | {row.event} | {row.guard or ''} | {row.next_state} | "
            f"{row.action.value} | {row.comment} |"
        )
    return "\n".join(lines) + "\n"
