"""The controller's state machine on hand-built views: every row of TRANSITIONS fires on a
view made for it, and the pure helpers (failure rule, candidate choice, desired synchronous
standbys, the generated diagram and table) hold their rules. No I/O."""

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from xcha.controller.fsm import (
    ANY,
    CONDITIONS,
    PROMOTE_ATTEMPTS,
    SAME,
    TRANSITIONS,
    Action,
    Decision,
    Step,
    choose_candidate,
    confirming_standbys,
    decide,
    desired_sync,
    master_failure,
    mermaid,
    table_markdown,
)
from xcha.controller.views import NEVER, GroupState, GroupView, MemberView, Request, SyncFailurePolicy
from xcha.names import Endpoint
from xcha.pg.status import Downstream, PgStatus, WalReceiver
from xcha.pg.syncrep import SyncPolicy, SyncStandbys

S = GroupState
TIMEOUT = 2.0
LSN = 0x5000000
PORTS = {"dn1a": 5432, "dn1b": 5433, "dn1c": 5434, "dn1d": 5435}
STRICT = SyncFailurePolicy.STRICT

# ---- builders ------------------------------------------------------------------------------


def endpoint(name: str) -> Endpoint:
    return Endpoint("127.0.0.1", PORTS[name])


def downstream(
    name: str, sync_state: str = "sync", state: str = "streaming", caught_up: bool | None = None
) -> Downstream:
    """A pg_stat_replication row on the master; a confirming (sync / quorum) standby has
    caught up by default (its agent says so)."""
    if caught_up is None:
        caught_up = state == "streaming" and sync_state in ("sync", "quorum")
    return Downstream(name, state, sync_state, LSN, LSN, caught_up=caught_up)


def master(
    name: str = "dn1a",
    *,
    sync_names: str = "FIRST 1 (dn1b)",
    downstreams: tuple[Downstream, ...] = (downstream("dn1b"),),
    position: int = LSN,
    **changes: Any,
) -> MemberView:
    """A running master whose agent reported 0.1 s ago."""
    member = MemberView(
        name=name,
        heartbeat_age=0.1,
        report_age=0.1,
        pg=PgStatus(
            running=True,
            in_recovery=False,
            timeline=1,
            current_lsn=position,
            downstreams=downstreams,
            synchronous_standby_names=sync_names,
        ),
        endpoint=endpoint(name),
        epoch=1,
        has_data=True,
    )
    return replace(member, **changes)


def standby(
    name: str = "dn1b",
    *,
    upstream: str = "dn1a",
    position: int = LSN,
    mode: str = "sync",
    receiver: str = "streaming",
    **changes: Any,
) -> MemberView:
    """A running standby streaming from upstream, reported 0.1 s ago."""
    member = MemberView(
        name=name,
        mode=mode,
        heartbeat_age=0.1,
        report_age=0.1,
        pg=PgStatus(
            running=True,
            in_recovery=True,
            timeline=1,
            flush_lsn=position,
            replay_lsn=position,
            wal_receiver=WalReceiver(receiver, "127.0.0.1", PORTS[upstream], 0.1),
        ),
        endpoint=endpoint(name),
        epoch=1,
        has_data=True,
        streaming_missing_for=0.0,
    )
    return replace(member, **changes)


def promoted(name: str = "dn1b", epoch: int = 2) -> MemberView:
    """A standby that became master in the given epoch (no standbys yet)."""
    return master(name, sync_names="", downstreams=(), epoch=epoch)


def stopped(member: MemberView) -> MemberView:
    """Its agent reports (reachable) that PostgreSQL does not run."""
    return replace(member, pg=PgStatus(running=False))


def crashed(member: MemberView) -> MemberView:
    """Its agent saw PostgreSQL exit without being asked to stop it."""
    return replace(stopped(member), postmaster_died=True)


def fenced(member: MemberView) -> MemberView:
    return replace(stopped(member), fenced=True)


def silent(member: MemberView) -> MemberView:
    """No heartbeat for longer than the failure timeout, and the controller's probe fails."""
    return replace(member, heartbeat_age=5.0, probe_ok=False, probe_age=0.5)


def gone(member: MemberView) -> MemberView:
    """Never heard of since the controller started."""
    return replace(member, heartbeat_age=NEVER)


def cut_off(member: MemberView) -> MemberView:
    """A standby whose agent finds its master no longer answering."""
    return replace(member, upstream_checked=True, upstream_ok=False)


def detached(member: MemberView) -> MemberView:
    """A standby its agent detached (Detach): no WAL receiver, its position final."""
    return replace(member, pg=replace(member.pg, wal_receiver=None), detached=True)


def group(
    state: GroupState = S.PROTECTED, members: tuple[MemberView, ...] | None = None, **changes: Any
) -> GroupView:
    """By default the healthy protected group: master dn1a, synchronous standby dn1b."""
    view = GroupView(
        name="dn1",
        state=state,
        members=(master(), standby()) if members is None else members,
        master="dn1a",
        sync_set=("dn1b",),
        epoch=1,
        failure_timeout=TIMEOUT,
    )
    return replace(view, **changes)


def master_lost(state: GroupState = S.PROTECTED, attached: bool = False, **changes: Any) -> GroupView:
    """dn1a hangs (silent, probe fails, dn1b receives no WAL) for 1 s; dn1b was detached since
    (attached: its WAL receiver still runs, it only finds dn1a no longer answering)."""
    dn1b = cut_off(standby()) if attached else detached(standby())
    return group(state, (silent(master()), dn1b), **{"master_failed_for": 1.0, **changes})


def lost_with_potential(state: GroupState = S.PROTECTED, **changes: Any) -> GroupView:
    """dn1a (FIRST 1 (dn1b, dn1c): dn1c a potential standby) hangs for 1 s; both standbys still
    stream from it and only find it no longer answering: n-k+1 = 2 positions are needed, so
    both are detached before any is promoted."""
    members = (
        silent(
            master(
                sync_names="FIRST 1 (dn1b, dn1c)",
                downstreams=(downstream("dn1b"), downstream("dn1c", "potential")),
            )
        ),
        cut_off(standby()),
        cut_off(standby("dn1c")),
    )
    return group(state, members, **{"master_failed_for": 1.0, **changes})


def lost_unprotected(attached: bool = False, **changes: Any) -> GroupView:
    """A single master (nothing synchronous) hangs; dn1b is an async standby 4096 bytes behind,
    detached since (attached: not yet)."""
    dn1b = standby(mode="async")
    members = (silent(unprotected_master()), cut_off(dn1b) if attached else detached(dn1b))
    return group(S.SINGLE, members, sync_set=(), **{"master_failed_for": 1.0, **changes})


def unprotected_master(position: int = LSN + 4096) -> MemberView:
    """dn1a with dn1b streaming asynchronously (by default 4096 bytes behind)."""
    return master(sync_names="", downstreams=(downstream("dn1b", "async"),), position=position)


def in_failover(candidate: MemberView, **changes: Any) -> GroupView:
    """dn1b is being promoted in epoch 2; the old master dn1a is fenced."""
    members = (fenced(master()), candidate)
    return group(S.FAILOVER, members, master="dn1b", candidate="dn1b", epoch=2, **changes)


def in_switchover(target: MemberView, **changes: Any) -> GroupView:
    """dn1a was stopped cleanly for a switchover to dn1b in epoch 2."""
    return group(S.SWITCHOVER, (stopped(master()), target), candidate="dn1b", epoch=2, **changes)


def rerouting(**changes: Any) -> GroupView:
    members = (fenced(master()), promoted())
    return group(S.REROUTING, members, master="dn1b", candidate="dn1b", epoch=2, **changes)


def new_group(*members: MemberView) -> GroupView:
    return group(S.INITIALIZING, members, master=None, sync_set=(), epoch=0)


def promote(target: str = "dn1b", sync: SyncStandbys | None = None) -> tuple[Step, ...]:
    """Fence the old master dn1a (best effort: the promotion does not wait for it), promote the
    target."""
    return (Step(Action.FENCE, "dn1a", best_effort=True), Step(Action.PROMOTE, target, sync))


# ---- every row -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A view made for one row, and the decision expected from it."""

    event: str  # the row's event and guard: the index still names the intended row
    guard: str | None
    view: Callable[[], GroupView]
    state: GroupState
    steps: tuple[Step, ...] = ()
    says: tuple[str, ...] = ()  # fragments of the reason
    bump_epoch: bool = False
    new_master: str | None = None
    new_candidate: str | None = None
    sync_set: tuple[str, ...] | None = None
    clear_request: bool = False
    promote_attempts: int | None = None


PROMOTED: dict[str, Any] = {
    "bump_epoch": True,
    "new_master": "dn1b",
    "new_candidate": "dn1b",
    "promote_attempts": 0,
}

# fmt: off
CASES: dict[int, Case] = {
    0: Case(
        "promoted", None, lambda: in_failover(promoted()), S.REROUTING,
        (Step(Action.REROUTE, "dn1b"),), ("dn1b accepts writes",), new_master="dn1b",
    ),
    1: Case(
        "promote_failed_often", None, lambda: in_failover(standby(), promote_attempts=PROMOTE_ATTEMPTS),
        S.NO_CANDIDATE, (), ("promoting dn1b failed 3 times",),
    ),
    2: Case(
        "idle", None, lambda: in_failover(standby(), promote_attempts=1), S.FAILOVER,
        (Step(Action.RESEND_PROMOTE, "dn1b"),), ("(re)sending Promote to dn1b",), promote_attempts=2,
    ),
    3: Case(
        "promoted", None, lambda: in_switchover(promoted()), S.REROUTING,
        (Step(Action.REROUTE, "dn1b"),), ("switchover: dn1b accepts writes",), new_master="dn1b",
    ),
    4: Case(
        "switchover_failed", None, lambda: in_switchover(standby(), switchover_failed=True), S.SINGLE,
        (Step(Action.START_MASTER, "dn1a"),), ("switchover failed: restarting dn1a",), sync_set=(),
    ),
    5: Case(
        "idle", "target_stopped",
        lambda: in_switchover(crashed(standby()), promote_sent=True), S.FAILOVER, promote(),
        ("switchover: dn1b stopped after Promote went out", "starting it as master, dn1a follows"),
        **PROMOTED,
    ),
    6: Case(
        "idle", None, lambda: in_switchover(standby()), S.SWITCHOVER,
        (Step(Action.SWITCHOVER, "dn1b"),), ("switchover to dn1b",), new_candidate="dn1b",
    ),
    7: Case(
        "rerouted", None, lambda: rerouting(rerouted=True), S.SINGLE,
        (), ("every coordinator points at dn1b",), sync_set=(),
    ),
    8: Case(
        "idle", None, rerouting, S.REROUTING,
        (Step(Action.REROUTE, "dn1b"),), ("reroute barrier for dn1b",), new_master="dn1b",
    ),
    9: Case(
        "in_grace", None, lambda: master_lost(in_grace=True), S.PROTECTED, (), ("no decision yet",),
    ),
    10: Case(
        "switchover_requested", "target_ready", lambda: group(request=Request("switchover")), S.SWITCHOVER,
        (Step(Action.SWITCHOVER, "dn1b"),), ("stopping dn1a cleanly, then promoting dn1b",),
        bump_epoch=True, new_candidate="dn1b", clear_request=True,
    ),
    11: Case(
        "failover_requested", "target_ready", lambda: group(request=Request("failover", "dn1b")), S.FAILOVER,
        promote(), ("failover requested: promoting dn1b",), clear_request=True, **PROMOTED,
    ),
    12: Case(
        "switchover_requested", "target_not_ready",
        lambda: group(
            members=(master(), standby(), gone(standby("dn1c"))), request=Request("switchover", "dn1c")
        ),
        S.PROTECTED, (), ("switchover refused: dn1c is not a running, reachable standby",),
        sync_set=("dn1b",), clear_request=True,
    ),
    13: Case(
        "failover_requested", "target_not_ready",
        lambda: group(
            members=(master(), standby(), stopped(standby("dn1c"))), request=Request("failover", "dn1c")
        ),
        S.PROTECTED, (), ("failover refused: dn1c is not a running, reachable standby",),
        sync_set=("dn1b",), clear_request=True,
    ),
    14: Case("paused", None, lambda: master_lost(paused=True), S.PROTECTED, (), ("paused",)),
    15: Case(
        "master_adoptable", None, lambda: new_group(standby(), master()), S.SINGLE,
        (), ("adopted dn1a as the master",), new_master="dn1a", sync_set=(),
    ),
    16: Case(
        "bootstrap_ready", None,
        lambda: new_group(MemberView("dn1a", heartbeat_age=0.1), MemberView("dn1b", heartbeat_age=0.1)),
        S.INITIALIZING, (Step(Action.BOOTSTRAP, "dn1a"),), ("bootstrapping dn1a",),
        bump_epoch=True, new_master="dn1a",
    ),
    17: Case(
        "master_found_stopped", None,
        lambda: group(S.PROTECTED, (stopped(master()), standby(receiver="waiting"))), S.PROTECTED,
        (Step(Action.START_MASTER, "dn1a"),),
        ("master dn1a was found stopped when its agent started (no crash seen): starting it in place",),
    ),
    18: Case(
        "master_failed", "candidate_ready", master_lost, S.FAILOVER, promote(),
        ("master dn1a lost", "probe no answer", "dn1b receives no WAL",
         "promoting dn1b (synchronous standby)"),
        **PROMOTED,
    ),
    19: Case(
        "master_failed", "not_detached", lambda: lost_with_potential(S.DEGRADED), S.DEGRADED,
        (Step(Action.DETACH, "dn1b"), Step(Action.DETACH, "dn1c")),
        ("master dn1a lost", "detaching the standbys from it before their positions are read"),
    ),
    20: Case(
        "master_failed", "master_restartable",
        lambda: group(S.SINGLE, (crashed(master()), standby()), sync_set=()), S.SINGLE,
        (Step(Action.START_MASTER, "dn1a"),), ("master dn1a crashed", "restarting it"),
    ),
    21: Case(
        "master_failed", "data_loss_candidate", lambda: lost_unprotected(allow_data_loss=True), S.FAILOVER,
        promote(), ("master dn1a lost", "dn1b is the most advanced standby; up to 4096 bytes may be lost"),
        **PROMOTED,
    ),
    22: Case(
        "master_failed", "data_loss_not_detached",
        lambda: lost_unprotected(attached=True, allow_data_loss=True), S.SINGLE,
        (Step(Action.DETACH, "dn1b"),), ("master dn1a lost", "detaching the standbys", "may lose data"),
    ),
    23: Case(
        "master_failed", None, lost_unprotected, S.NO_CANDIDATE,
        (), ("master dn1a lost", "no standby was synchronous when the master was last protected"),
    ),
    24: Case(
        "master_running", None, lambda: group(S.NO_CANDIDATE), S.SINGLE,
        (), ("master dn1a is back",), sync_set=(),
    ),
    25: Case(
        "master_failed", "candidate_ready",
        lambda: master_lost(S.NO_CANDIDATE, master_failed_for=3.0), S.FAILOVER,
        promote(), ("promoting dn1b (synchronous standby)",), **PROMOTED,
    ),
    26: Case(
        "master_failed", "not_detached",
        lambda: lost_with_potential(S.NO_CANDIDATE), S.NO_CANDIDATE,
        (Step(Action.DETACH, "dn1b"), Step(Action.DETACH, "dn1c")),
        ("detaching the standbys from dn1a before their positions are read",),
    ),
    27: Case(
        "master_failed", "data_loss_candidate",
        lambda: replace(lost_unprotected(allow_data_loss=True), state=S.NO_CANDIDATE), S.FAILOVER,
        promote(), ("dn1b is the most advanced standby; up to 4096 bytes may be lost",), **PROMOTED,
    ),
    28: Case(
        "master_restartable", None,
        lambda: group(S.NO_CANDIDATE, (crashed(master()), gone(standby())), master_failed_for=TIMEOUT),
        S.NO_CANDIDATE, (Step(Action.START_MASTER, "dn1a"),),
        ("no synchronous standby (dn1b) is running and reachable", "restarting dn1a"),
    ),
    29: Case(
        "stray_master", None, lambda: group(members=(master(), standby(), promoted("dn1c", epoch=1))),
        S.PROTECTED, (Step(Action.FENCE, "dn1c"),), ("dn1c accepts writes but dn1a is the master",),
        sync_set=("dn1b",),
    ),
    30: Case(
        "member_needs_follow", None,
        lambda: group(members=(master(), standby(), standby("dn1c", upstream="dn1b", mode="async"))),
        S.PROTECTED, (Step(Action.FOLLOW, "dn1c"),), ("dn1c joins as a standby of dn1a",), sync_set=("dn1b",),
    ),
    31: Case(
        "sync_lost", "available",
        lambda: group(members=(master(downstreams=()), replace(gone(standby()), streaming_missing_for=5.0))),
        S.UNPROTECTED, (Step(Action.SET_SYNC, "dn1a", SyncStandbys(SyncPolicy(), ())),),
        ("synchronous standby lost", "synchronous_standby_names = ''", "(available)"), sync_set=(),
    ),
    32: Case(
        "sync_lost", "strict",
        lambda: group(
            members=(master(downstreams=()), replace(gone(standby()), streaming_missing_for=5.0)),
            on_sync_failure=STRICT,
        ),
        S.DEGRADED, (), ("synchronous standby lost", "commits wait for it (strict)"),
    ),
    33: Case(
        "sync_satisfied", None, lambda: group(S.SINGLE, sync_set=()), S.PROTECTED,
        (), ("protected: dn1b confirm(s) every commit",), sync_set=("dn1b",),
    ),
    34: Case(
        "sync_names_differ", None,
        lambda: group(S.SINGLE, (unprotected_master(position=LSN), standby())),
        S.SINGLE, (Step(Action.SET_SYNC, "dn1a", SyncStandbys(SyncPolicy(), ("dn1b",))),),
        ("synchronous_standby_names = 'FIRST 1 (dn1b)'",),
    ),
    35: Case(
        "always", None, group, S.PROTECTED, (), ("protected: master dn1a, confirming standbys: dn1b",),
        sync_set=("dn1b",),
    ),
}
# fmt: on


@pytest.mark.parametrize("row", sorted(CASES), ids=lambda row: f"{row}-{CASES[row].event}")
def test_row_fires_with_its_decision(row: int) -> None:
    case = CASES[row]
    transition = TRANSITIONS[row]
    assert (transition.event, transition.guard) == (case.event, case.guard), "the table was reordered"
    decision = decide(case.view())
    assert decision.row == row, f"row {decision.row} fired: {decision.reason}"
    expected = Decision(
        case.state,
        case.steps,
        decision.reason,
        row,
        bump_epoch=case.bump_epoch,
        new_master=case.new_master,
        new_candidate=case.new_candidate,
        sync_set=case.sync_set,
        clear_request=case.clear_request,
        promote_attempts=case.promote_attempts,
    )
    assert decision == expected
    for fragment in case.says:
        assert fragment in decision.reason
    assert "{" not in decision.reason


# ---- decisions beyond one row --------------------------------------------------------------


def row(event: str, guard: str | None = None, state: GroupState | None = None) -> int:
    """The index of the one row with this event and guard (and, given a state, for it)."""
    found = [
        index
        for index, transition in enumerate(TRANSITIONS)
        if (transition.event, transition.guard) == (event, guard)
        and (state is None or state in transition.states or ANY in transition.states)
    ]
    assert len(found) == 1, (event, guard, state, found)
    return found[0]


ALWAYS = row("always")
FAILOVER_ROW = row("master_failed", "candidate_ready", S.PROTECTED)


TARGET_STOPPED = row("idle", "target_stopped")


@pytest.mark.parametrize("how", [stopped, crashed, fenced], ids=["found_stopped", "crashed", "fenced"])
def test_a_switchover_target_that_stopped_after_promote_is_started_as_master(
    how: Callable[[MemberView], MemberView],
) -> None:
    """Once Promote went out, the target may be a master that acknowledged commits the old
    master lacks: whether it stopped, crashed or fenced itself, it is the one started (a
    failover to it at a new epoch), never the old master."""
    decision = decide(in_switchover(how(standby()), promote_sent=True))
    assert decision.row == TARGET_STOPPED
    assert decision.steps == promote()
    assert (decision.new_master, decision.bump_epoch) == ("dn1b", True)
    # A fenced, promoted target (it fenced itself while the controller was away) too.
    decision = decide(in_switchover(fenced(promoted(epoch=2)), promote_sent=True))
    assert decision.row == TARGET_STOPPED


def test_a_switchover_target_that_stopped_is_not_started_before_promote_or_while_unsure() -> None:
    """Before Promote went out the old master still holds every commit (switchover_failed
    restarts it); a target not heard from, busy, without data or still running decides nothing."""
    assert decide(in_switchover(crashed(standby()))).row != TARGET_STOPPED
    for target in (
        silent(crashed(standby())),
        replace(crashed(standby()), busy=True),
        replace(crashed(standby()), activity="following"),
        replace(crashed(standby()), has_data=False),
        standby(),
    ):
        assert decide(in_switchover(target, promote_sent=True)).row != TARGET_STOPPED, target
    assert decide(in_switchover(crashed(standby()), promote_sent=True, busy=True)).row != TARGET_STOPPED


def test_a_failover_under_way_is_not_resent_while_the_promotion_runs() -> None:
    decision = decide(in_failover(standby(), busy=True, promote_attempts=1))
    assert decision.row == ALWAYS
    assert decision.steps == ()
    assert decision.promote_attempts is None


def test_operations_under_way_finish_while_paused_or_in_grace() -> None:
    decision = decide(in_failover(promoted(), paused=True, in_grace=True))
    assert decision.next_state == S.REROUTING
    assert decision.steps == (Step(Action.REROUTE, "dn1b"),)


def test_strict_promotes_with_the_sync_mode_members_as_synchronous_standbys() -> None:
    members = (
        silent(master()),
        *(detached(m) for m in (standby(), standby("dn1c"), standby("dn1d", mode="async"))),
    )
    decision = decide(group(members=members, on_sync_failure=STRICT, master_failed_for=1.0))
    assert decision.row == FAILOVER_ROW
    assert decision.steps == promote(sync=SyncStandbys(SyncPolicy(), ("dn1a", "dn1c")))
    resend = decide(in_failover(standby(), on_sync_failure=STRICT))
    assert resend.steps == (Step(Action.RESEND_PROMOTE, "dn1b", SyncStandbys(SyncPolicy(), ("dn1a",))),)


def test_a_crashed_master_is_restarted_when_no_synchronous_standby_is_reachable() -> None:
    decision = decide(group(members=(crashed(master()), gone(standby())), master_failed_for=TIMEOUT))
    assert (decision.row, decision.steps) == (
        row("master_failed", "master_restartable"),
        (Step(Action.START_MASTER, "dn1a"),),
    )


def test_a_synchronous_standby_not_heard_since_a_controller_restart_is_asked_before_any_conclusion() -> None:
    """Right after a controller restart a standby's agent may still be reconnecting: the
    controller asks it directly instead of restarting the master in place without it."""
    view = group(members=(crashed(master()), gone(standby())), master_failed_for=0.3)
    decision = decide(view)
    assert (decision.row, decision.steps) == (
        row("master_failed", "not_detached", S.PROTECTED),
        (Step(Action.DETACH, "dn1b"),),
    )
    later = decide(replace(view, master_failed_for=TIMEOUT))
    assert later.steps == (Step(Action.START_MASTER, "dn1a"),), "after failure_timeout it is taken as lost"


def test_a_crashed_master_fails_over_to_its_synchronous_standby() -> None:
    view = group(members=(crashed(master()), standby()), master_failed_for=0.5)
    decision = decide(view)
    assert (decision.row, decision.next_state, decision.steps) == (FAILOVER_ROW, S.FAILOVER, promote())
    assert "postmaster gone" in decision.reason


@pytest.mark.parametrize("state", [S.SINGLE, S.UNPROTECTED, S.DEGRADED])
def test_protection_is_restored_from_every_unprotected_state(state: GroupState) -> None:
    decision = decide(group(state, sync_set=()))
    assert (decision.row, decision.next_state, decision.sync_set) == (
        row("sync_satisfied"),
        S.PROTECTED,
        ("dn1b",),
    )


def test_a_lost_master_with_a_lagging_async_standby_is_not_replaced_without_allow_data_loss() -> None:
    decision = decide(replace(lost_unprotected(), state=S.PROTECTED))
    assert decision.next_state == S.NO_CANDIDATE
    assert not any(step.action == Action.PROMOTE for step in decision.steps)


def test_allow_data_loss_waits_for_final_positions_instead_of_giving_up() -> None:
    """On the tick that detects the failure no standby is detached yet, so no position is
    final: the group must stay and detach them, then promote on a later tick (it once went to
    no_candidate, where no row promotes with data loss)."""
    first = decide(lost_unprotected(attached=True, allow_data_loss=True, master_failed_for=0.0))
    assert (first.next_state, first.steps) == (S.SINGLE, (Step(Action.DETACH, "dn1b"),))
    later = decide(lost_unprotected(allow_data_loss=True, master_failed_for=0.3))
    assert (later.next_state, later.steps) == (S.FAILOVER, promote())


def test_a_master_that_comes_back_is_kept_instead_of_a_data_loss_failover() -> None:
    view = lost_unprotected(allow_data_loss=True)
    assert decide(view).next_state == S.FAILOVER
    back = replace(view, members=(unprotected_master(), standby(mode="async")))
    decision = decide(back)
    assert decision.next_state == S.SINGLE
    assert decision.steps == ()


def apply(view: GroupView, decision: Decision) -> GroupView:
    """What the controller stores from a decision."""
    return replace(
        view,
        state=decision.next_state,
        master=decision.new_master or view.master,
        candidate=decision.new_candidate or view.candidate,
        sync_set=view.sync_set if decision.sync_set is None else decision.sync_set,
        epoch=view.epoch + decision.bump_epoch,
        promote_attempts=view.promote_attempts
        if decision.promote_attempts is None
        else decision.promote_attempts,
        request=None if decision.clear_request else view.request,
    )


def step(view: GroupView, **world: Any) -> tuple[GroupView, Decision]:
    """One tick: the world changed, the machine decides, the controller stores."""
    view = replace(view, **world)
    decision = decide(view)
    return apply(view, decision), decision


def test_a_whole_failover_from_protected_back_to_protected() -> None:
    """FIRST 1 (dn1b): every commit needs dn1b, so it is promoted at once, still streaming
    from the old master (no detach: `test_k_of_k_needs_no_detach`)."""
    view, failover = step(group(), members=(silent(master()), cut_off(standby())), master_failed_for=0.0)
    assert failover.row == FAILOVER_ROW
    assert (view.state, view.master, view.candidate, view.epoch) == (S.FAILOVER, "dn1b", "dn1b", 2)
    view, waiting = step(view, busy=True)
    assert (waiting.row, waiting.steps, view.state) == (ALWAYS, (), S.FAILOVER)
    view, reroute = step(view, busy=False, members=(fenced(master()), promoted("dn1b", epoch=view.epoch)))
    assert (reroute.row, view.state) == (row("promoted", state=S.FAILOVER), S.REROUTING)
    view, rerouted = step(view, rerouted=True)
    assert (rerouted.row, view.state, view.sync_set) == (row("rerouted"), S.SINGLE, ())
    dn1a = standby("dn1a", upstream="dn1b")
    async_master = master("dn1b", sync_names="", downstreams=(downstream("dn1a", "async"),), epoch=2)
    view, set_sync = step(view, members=(dn1a, async_master), master_failed_for=0.0)
    assert (set_sync.row, set_sync.steps) == (
        row("sync_names_differ"),
        (Step(Action.SET_SYNC, "dn1b", SyncStandbys(SyncPolicy(), ("dn1a",))),),
    )
    sync_master = master("dn1b", sync_names="FIRST 1 (dn1a)", downstreams=(downstream("dn1a"),), epoch=2)
    view, protected = step(view, members=(dn1a, sync_master))
    assert (protected.row, view.state, view.sync_set) == (row("sync_satisfied"), S.PROTECTED, ("dn1a",))


# ---- the failure rule ----------------------------------------------------------------------


def test_a_crash_reported_by_the_agent_fails_without_a_timeout() -> None:
    verdict = master_failure(group(members=(crashed(master()), standby())))
    assert (verdict.failed, verdict.crashed) == (True, True)
    assert "postmaster gone" in verdict.inputs


@pytest.mark.parametrize(
    "change", [{"activity": "starting"}, {"has_data": False}], ids=["not-idle", "no-data"]
)
def test_a_stopped_master_is_no_crash_unless_idle_with_data(change: dict[str, Any]) -> None:
    verdict = master_failure(group(members=(replace(crashed(master()), **change), standby())))
    assert (verdict.failed, verdict.crashed) == (False, False)


def test_a_hang_needs_silence_a_failed_probe_and_standbys_without_wal() -> None:
    verdict = master_failure(master_lost())
    assert (verdict.failed, verdict.crashed) == (True, False)
    assert verdict.inputs == "heartbeat 5.00s ago; probe no answer; dn1b receives no WAL"


def test_a_standby_whose_wal_receiver_stopped_counts_as_receiving_no_wal() -> None:
    dn1b = standby(receiver="waiting")
    assert not dn1b.receiving_wal()
    assert master_failure(group(members=(silent(master()), dn1b))).failed


@pytest.mark.parametrize(
    ("members", "why"),
    [
        (
            (replace(master(), heartbeat_age=5.0, probe_ok=True, probe_age=0.5), standby()),
            "agent dead, PG serving",
        ),
        ((replace(silent(master()), heartbeat_age=1.5), cut_off(standby())), "one missed heartbeat"),
        ((replace(silent(master()), probe_ok=True), cut_off(standby())), "probe answers"),
        ((replace(silent(master()), probe_ok=None, probe_age=NEVER), cut_off(standby())), "not probed"),
        ((replace(silent(master()), probe_age=TIMEOUT), cut_off(standby())), "probe failed long ago"),
        ((silent(master()), standby()), "standby still streaming"),
        ((silent(master()), cut_off(standby()), standby("dn1c")), "one of two standbys streams"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_without_every_input_of_a_hang_the_master_has_not_failed(
    members: tuple[MemberView, ...], why: str
) -> None:
    verdict = master_failure(group(members=members))
    assert (verdict.failed, verdict.crashed) == (False, False), why


def test_a_standby_that_streams_but_finds_its_master_silent_receives_no_wal() -> None:
    assert master_failure(group(members=(silent(master()), cut_off(standby())))).failed
    assert not master_failure(group(members=(silent(master()), standby()))).failed


def test_unreachable_or_stopped_standbys_do_not_vote() -> None:
    members = (silent(master()), gone(standby()), stopped(standby("dn1c")))
    verdict = master_failure(group(members=members))
    assert verdict.failed
    assert "no standby reachable" in verdict.inputs


@pytest.mark.parametrize(
    "lost",
    [master_lost(epoch=2), group(members=(crashed(master()), standby()), epoch=2)],
    ids=["hang", "crash reported at an older epoch"],
)
def test_nothing_fails_during_the_startup_grace(lost: GroupView) -> None:
    assert master_failure(lost).failed
    assert not master_failure(replace(lost, in_grace=True)).failed
    assert decide(replace(lost, in_grace=True)).steps == ()


def test_a_crash_reported_at_the_new_epoch_is_acted_on_during_the_grace() -> None:
    """A controller take-over: the master's agent, already answered by the new leader, reports
    its postmaster gone. That is a fact: no need to wait out the grace (silence would be none)."""
    members = (crashed(replace(master(), epoch=2)), standby(epoch=2))
    view = group(members=members, epoch=2, in_grace=True, master_failed_for=1.0)
    assert master_failure(view).failed
    decision = decide(view)
    assert decision.next_state == S.FAILOVER and decision.steps == promote(), decision


def test_a_master_found_stopped_by_a_fresh_agent_is_no_failure_and_starts_in_place() -> None:
    """`xcha down` then `xcha up`: the master's new agent finds PostgreSQL stopped. No crash
    was seen, so no failover; it is still the master at this epoch, so it starts in place."""
    view = group(members=(stopped(master()), standby(receiver="waiting")))
    assert not master_failure(view).failed
    decision = decide(view)
    assert (decision.row, decision.next_state, decision.steps) == (
        row("master_found_stopped"),
        S.PROTECTED,
        (Step(Action.START_MASTER, "dn1a"),),
    )
    restored_no_candidate = decide(replace(view, state=S.NO_CANDIDATE))
    assert restored_no_candidate.steps == (Step(Action.START_MASTER, "dn1a"),)


def test_a_master_found_stopped_waits_for_its_report_at_the_current_epoch() -> None:
    """A report from before this controller's epoch may predate a promotion: nothing yet."""
    decision = decide(group(members=(stopped(master(epoch=1)), standby()), epoch=2))
    assert decision.row == ALWAYS
    assert decision.steps == ()


def test_a_base_backup_stream_named_like_a_member_confirms_nothing() -> None:
    """While dn1b is still being cloned, a WAL stream under its name shows on the master as
    streaming and sync; dn1b's own report (cloning, no PostgreSQL yet) decides."""
    cloning = replace(standby(), activity="following", pg=PgStatus(running=False))
    view = group(S.SINGLE, (master(), cloning), sync_set=())
    assert confirming_standbys(view) == ()
    decision = decide(view)
    assert decision.next_state == S.SINGLE
    assert "not confirming: dn1b (following)" in decision.reason
    running = decide(replace(view, members=(master(), standby())))
    assert (running.row, running.next_state) == (row("sync_satisfied"), S.PROTECTED)


def test_a_standby_named_synchronous_confirms_only_once_it_has_caught_up() -> None:
    """Found by the simulator (seed 2854): commits acknowledged while unprotected are not on a
    standby named synchronous again until it has flushed past them. Until the master's agent
    says it has caught up, it confirms nothing: no `protected`, and the summary says why."""
    behind = master(downstreams=(downstream("dn1b", caught_up=False),))
    for state in (S.SINGLE, S.UNPROTECTED, S.DEGRADED):
        view = group(state, (behind, standby()), sync_set=())
        assert confirming_standbys(view) == ()
        decision = decide(view)
        assert decision.next_state == state and decision.sync_set is None
        assert "dn1b (catching up with commits acknowledged without it)" in decision.reason
    caught_up = decide(group(S.UNPROTECTED, (master(), standby()), sync_set=()))
    assert (caught_up.row, caught_up.next_state) == (row("sync_satisfied"), S.PROTECTED)
    assert caught_up.sync_set == ("dn1b",)


def test_a_synchronous_standby_not_caught_up_is_no_failover_candidate() -> None:
    """FIRST 1 (dn1b, dn1c): dn1b is lost and dn1c, the potential standby, becomes sync while
    behind. It confirms nothing until caught up: the group is unprotected, dn1c is not
    recorded in sync_set, and a crash of the master then finds no safe candidate."""
    dn1c_behind = master(
        sync_names="FIRST 1 (dn1b, dn1c)", downstreams=(downstream("dn1c", caught_up=False),)
    )
    members = (dn1c_behind, replace(gone(standby()), streaming_missing_for=5.0), standby("dn1c"))
    decision = decide(group(S.PROTECTED, members))
    assert (decision.row, decision.next_state, decision.sync_set) == (
        row("sync_lost", "available"),
        S.UNPROTECTED,
        (),
    )
    view = group(S.UNPROTECTED, (crashed(dn1c_behind), *members[1:]), sync_set=())
    assert decide(view).next_state != S.FAILOVER


def test_a_group_without_master_has_no_master_failure() -> None:
    verdict = master_failure(new_group(standby()))
    assert (verdict.failed, verdict.inputs) == (False, "no master")


# ---- the candidate -------------------------------------------------------------------------


def lost_with(*standbys: MemberView, attached: bool = False, **changes: Any) -> GroupView:
    """dn1a (at LSN + 4096) lost for 1 s, with the given standbys, the running ones detached
    since (attached: as given)."""
    if not attached:
        standbys = tuple(detached(m) if m.pg.running and m.pg.in_recovery else m for m in standbys)
    return group(members=(silent(master(position=LSN + 4096)), *standbys), master_failed_for=1.0, **changes)


def test_only_a_member_of_the_sync_set_is_a_candidate() -> None:
    view = lost_with(standby(), standby("dn1c", position=LSN + 100))
    choice = choose_candidate(view)
    assert choice.member is not None
    assert (choice.member.name, choice.fresh, choice.lost_bytes) == ("dn1b", True, 0)
    assert choice.reason == "synchronous standby"


def test_the_most_advanced_synchronous_standby_wins() -> None:
    view = lost_with(standby(), standby("dn1c", position=LSN + 100), sync_set=("dn1b", "dn1c"))
    choice = choose_candidate(view)
    assert choice.member is not None and choice.member.name == "dn1c"


def test_an_async_standby_is_chosen_only_when_data_loss_is_allowed() -> None:
    view = lost_with(gone(standby()), standby("dn1c", mode="async", position=LSN + 1000))
    refused = choose_candidate(view)
    assert refused.member is None
    assert refused.reason == "no synchronous standby (dn1b) is running and reachable"
    allowed = choose_candidate(view, allow_data_loss=True)
    assert allowed.member is not None
    assert (allowed.member.name, allowed.fresh, allowed.lost_bytes) == ("dn1c", True, 3096)
    assert "dn1c" in allowed.reason and "3096 bytes" in allowed.reason


def test_without_a_sync_set_no_standby_is_safe() -> None:
    choice = choose_candidate(lost_with(standby(position=LSN + 4096), sync_set=()))
    assert choice.member is None
    assert choice.reason == "no standby was synchronous when the master was last protected"


def test_allow_data_loss_prefers_the_synchronous_standby_and_loses_nothing() -> None:
    view = lost_with(standby(), standby("dn1c", mode="async", position=LSN + 100))
    choice = choose_candidate(view, allow_data_loss=True)
    assert choice.member is not None
    assert (choice.member.name, choice.lost_bytes, choice.reason) == ("dn1b", 0, "synchronous standby")


@pytest.mark.parametrize(
    "change",
    [
        {"fenced": True},
        {"busy": True},
        {"removed": True},
        {"heartbeat_age": TIMEOUT},
        {"pg": PgStatus(running=False)},
        {"pg": PgStatus(running=True, in_recovery=False, current_lsn=LSN)},
    ],
    ids=["fenced", "busy", "removed", "unreachable", "stopped", "not-in-recovery"],
)
def test_an_unusable_standby_is_never_chosen(change: dict[str, Any]) -> None:
    view = lost_with(replace(standby(), **change))
    assert choose_candidate(view).member is None
    assert choose_candidate(view, allow_data_loss=True).member is None


def test_any_k_of_n_needs_n_minus_k_plus_one_reachable_quorum_members() -> None:
    quorum = {"sync_set": ("dn1b", "dn1c", "dn1d"), "policy": SyncPolicy("any", 2)}
    two = lost_with(standby(), standby("dn1c", position=LSN + 50), gone(standby("dn1d")), **quorum)
    choice = choose_candidate(two)
    assert choice.member is not None
    assert (choice.member.name, choice.reason) == ("dn1c", "most advanced of the quorum")
    one = lost_with(standby(), gone(standby("dn1c")), gone(standby("dn1d")), **quorum)
    refused = choose_candidate(one)
    assert refused.member is None
    assert refused.reason == (
        "ANY 2 of 3: 1 of the 2 standbys needed to be sure of every commit are reachable"
    )
    any1 = lost_with(standby(), gone(standby("dn1c")), sync_set=("dn1b", "dn1c"), policy=SyncPolicy("any", 1))
    assert choose_candidate(any1).member is None


def test_first_k_of_n_needs_n_minus_k_plus_one_like_any() -> None:
    """FIRST 1 (dn1b, dn1c): when dn1b stops confirming, the master makes dn1c synchronous on
    its own and acknowledges commits dn1b lacks; dn1c, unreachable, cannot be detached (found
    by the simulator: seeds 3193, 4587)."""
    one = lost_with(standby(), gone(standby("dn1c")), sync_set=("dn1b", "dn1c"))
    refused = choose_candidate(one)
    assert refused.member is None
    assert (
        refused.reason == "FIRST 1 of 2: 1 of the 2 standbys needed to be sure of every commit are reachable"
    )
    potential = master(position=LSN + 4096, sync_names="FIRST 1 (dn1b, dn1c)")
    both = group(
        members=(silent(potential), detached(standby()), detached(standby("dn1c", position=LSN + 100))),
        master_failed_for=1.0,
    )
    choice = choose_candidate(both)
    assert choice.member is not None
    assert (choice.member.name, choice.fresh) == ("dn1c", True), "the potential standby may be ahead"
    assert choice.reason == "most advanced of the synchronous and potential standbys"
    pair = choose_candidate(lost_with(standby()))
    assert pair.member is not None and pair.member.name == "dn1b"


@pytest.mark.parametrize(
    ("detach", "fresh"),
    [((True, True), True), ((True, False), False), ((False, True), False), ((False, False), False)],
)
def test_positions_are_final_only_when_every_candidate_is_detached(
    detach: tuple[bool, bool], fresh: bool
) -> None:
    """The old master (silent: it may only be cut off from the controller) can confirm commits
    through a standby still streaming from it, after its position was read."""
    dn1b = standby(position=LSN + 100)
    dn1c = standby("dn1c")
    members = tuple(detached(m) if d else cut_off(m) for m, d in zip((dn1b, dn1c), detach, strict=True))
    choice = choose_candidate(lost_with(*members, attached=True, sync_set=("dn1b", "dn1c")))
    assert choice.member is not None
    assert (choice.member.name, choice.fresh) == ("dn1b", fresh)


def test_any_k_of_n_promotes_once_enough_are_detached_while_others_still_stream() -> None:
    """ANY 2 (dn1b, dn1c, dn1d): two detached are enough (n-k+1 = 2): dn1d, still streaming,
    cannot make a quorum of two alone, so the old master can acknowledge nothing more."""
    quorum = {"sync_set": ("dn1b", "dn1c", "dn1d"), "policy": SyncPolicy("any", 2)}
    view = lost_with(
        detached(standby()),
        detached(standby("dn1c", position=LSN + 50)),
        cut_off(standby("dn1d", position=LSN + 100)),
        attached=True,
        **quorum,
    )
    choice = choose_candidate(view)
    assert choice.member is not None
    assert (choice.member.name, choice.fresh) == ("dn1c", True), "dn1d alone cannot confirm for ANY 2"
    assert [s.member for s in decide(view).steps if s.action == Action.PROMOTE] == ["dn1c"]


@pytest.mark.parametrize(("report_age", "fresh"), [(0.5, True), (1.5, False)])
def test_after_a_reported_crash_a_position_reported_since_is_final(report_age: float, fresh: bool) -> None:
    """The master's agent says its postmaster is gone: nothing more is sent, so no detach is
    needed; a position reported before the failure is not final yet. (ANY 1 of two: a crashed
    master's report names no standbys, the sync set names both.)"""
    view = lost_with_potential(sync_set=("dn1b", "dn1c"), policy=SyncPolicy("any", 1))
    reported = tuple(replace(m, report_age=report_age) for m in view.standbys)
    view = replace(view, members=(crashed(master()), *reported))
    choice = choose_candidate(view)
    assert choice.member is not None and choice.fresh == fresh


def test_a_standby_heard_now_on_its_stream_still_has_positions_as_old_as_its_report() -> None:
    """An open Heartbeats stream says the agent is alive (heartbeat_age 0), not that the
    positions of its last report, sent before the failure, are current."""
    view = lost_with_potential(sync_set=("dn1b", "dn1c"), policy=SyncPolicy("any", 1))
    heard = tuple(replace(m, heartbeat_age=0.0, report_age=1.5) for m in view.standbys)
    choice = choose_candidate(replace(view, members=(crashed(master()), *heard)))
    assert choice.member is not None and not choice.fresh


def test_k_of_k_detaches_a_standby_not_heard_within_a_heartbeat_interval() -> None:
    """Master and synchronous standby lost together (both hosts): the standby's stream ended
    with its agent, so it was last heard 1.25 s before (not yet failure_timeout). It is detached
    first, which fails at once, instead of promoted on its old report (found by a chaos test:
    the group went to no_candidate with the dead standby recorded as the master)."""
    lost = cut_off(replace(standby(), heartbeat_age=1.25))
    view = group(members=(silent(master()), lost), master_failed_for=0.0)
    decision = decide(view)
    assert (decision.row, decision.steps) == (
        row("master_failed", "not_detached", S.PROTECTED),
        (Step(Action.DETACH, "dn1b"),),
    )
    heard = replace(view, members=(silent(master()), replace(lost, heartbeat_age=0.0)))
    assert decide(heard).row == FAILOVER_ROW


@pytest.mark.parametrize("fault", ["crashed", "silent"])
@pytest.mark.parametrize(
    ("names", "sync_set", "policy"),
    [
        ("FIRST 1 (dn1b)", ("dn1b",), SyncPolicy("first", 1)),
        ("ANY 2 (dn1b, dn1c)", ("dn1b", "dn1c"), SyncPolicy("any", 2)),
    ],
)
def test_k_of_k_needs_no_detach(
    fault: str, names: str, sync_set: tuple[str, ...], policy: SyncPolicy
) -> None:
    """Every commit needs every confirmer (n-k+1 = 1): each one synchronous when the master was
    last protected holds every acknowledged commit whatever its (stale) position, and the old
    master confirms nothing once one of them is promoted. So the standby is promoted at once,
    even while it still streams from a master that only hangs: the Detach round trip is off
    the crash path. A confirmer named since (not in the sync set) is no candidate."""
    lost = crashed if fault == "crashed" else silent
    streaming = (downstream("dn1b"), downstream("dn1c", "quorum"))
    old = lost(master(sync_names=names, downstreams=streaming))
    dn1c = standby("dn1c", position=LSN + 100)
    view = group(
        members=(old, cut_off(standby(report_age=5.0)), cut_off(replace(dn1c, report_age=5.0))),
        sync_set=sync_set,
        policy=policy,
        master_failed_for=1.0,
    )
    decision = decide(view)
    candidate = "dn1c" if len(sync_set) == 2 else "dn1b"
    assert decision.row == FAILOVER_ROW, decision.reason
    assert [s.member for s in decision.steps if s.action == Action.PROMOTE] == [candidate]
    assert not any(s.action == Action.DETACH for s in decision.steps)


def test_a_non_candidate_still_streaming_does_not_make_the_choice_stale() -> None:
    view = lost_with(detached(standby()), cut_off(standby("dn1c", mode="async")), attached=True)
    assert choose_candidate(view).fresh


@pytest.mark.parametrize(
    "target",
    ["dn1a", "dn1c", "dn1d", "dn1x"],
    ids=["the-master", "stopped", "unreachable", "not-a-member"],
)
def test_a_target_that_is_not_a_usable_standby_is_refused(target: str) -> None:
    view = lost_with(standby(), stopped(standby("dn1c")), gone(standby("dn1d")))
    choice = choose_candidate(view, allow_data_loss=True, target=target)
    assert (choice.member, choice.fresh) == (None, False)
    assert choice.reason == f"{target} is not a running, reachable standby"


def test_a_target_is_chosen_only_when_it_holds_what_the_most_advanced_holds() -> None:
    quorum = {"sync_set": ("dn1b", "dn1c"), "policy": SyncPolicy("any", 1)}
    view = lost_with(standby(), standby("dn1c", position=LSN + 100), **quorum)
    refused = choose_candidate(view, target="dn1b")
    assert (refused.member, refused.reason) == (None, "dn1b may lack commits dn1c holds")
    allowed = choose_candidate(view, allow_data_loss=True, target="dn1b")
    assert allowed.member is not None and allowed.member.name == "dn1b"
    level = lost_with(standby(), standby("dn1c"), **quorum)
    choice = choose_candidate(level, target="dn1b")
    assert choice.member is not None and choice.member.name == "dn1b"


def test_an_async_target_needs_allow_data_loss() -> None:
    view = lost_with(standby(), standby("dn1c", mode="async"))
    assert choose_candidate(view, target="dn1c").member is None
    allowed = choose_candidate(view, allow_data_loss=True, target="dn1c")
    assert allowed.member is not None and allowed.member.name == "dn1c"


# ---- synchronous standbys ------------------------------------------------------------------


def sync_view(policy: SyncFailurePolicy, *standbys: MemberView, sync: SyncPolicy | None = None) -> GroupView:
    return group(members=(master(), *standbys), on_sync_failure=policy, policy=sync or SyncPolicy())


def test_available_lists_sync_mode_standbys_missing_for_less_than_half_the_timeout() -> None:
    view = sync_view(
        SyncFailurePolicy.AVAILABLE,
        standby(),  # streams
        standby("dn1c", streaming_missing_for=TIMEOUT / 2 - 0.01),  # missing only just now
        standby("dn1d", streaming_missing_for=TIMEOUT / 2),  # lost
    )
    assert desired_sync(view) == SyncStandbys(SyncPolicy(), ("dn1b", "dn1c"))


def test_available_drops_a_standby_whose_agent_reports_postgres_down_at_once() -> None:
    view = sync_view(SyncFailurePolicy.AVAILABLE, stopped(standby()), standby("dn1c"))
    assert desired_sync(view).names == ("dn1c",)
    starting = replace(stopped(standby()), activity="starting")  # not idle: not known to be down
    assert desired_sync(sync_view(SyncFailurePolicy.AVAILABLE, starting)).names == ("dn1b",)


def test_strict_lists_every_sync_mode_standby() -> None:
    view = sync_view(
        STRICT,
        stopped(standby()),
        gone(standby("dn1c", streaming_missing_for=NEVER)),
        standby("dn1d", mode="async"),
        sync=SyncPolicy("any", 2),
    )
    assert desired_sync(view) == SyncStandbys(SyncPolicy("any", 2), ("dn1b", "dn1c"))


@pytest.mark.parametrize("policy", list(SyncFailurePolicy))
def test_async_mode_standbys_are_never_listed(policy: SyncFailurePolicy) -> None:
    view = sync_view(policy, standby(mode="async"), standby("dn1c", mode="async"))
    assert desired_sync(view) == SyncStandbys(SyncPolicy(), ())


def test_removed_members_and_the_master_are_not_standbys() -> None:
    view = sync_view(SyncFailurePolicy.AVAILABLE, standby(), standby("dn1c", removed=True))
    assert desired_sync(view).names == ("dn1b",)


# ---- the table itself ----------------------------------------------------------------------


def test_every_event_and_guard_is_a_condition_and_every_condition_is_used() -> None:
    named = {t.event for t in TRANSITIONS} | {t.guard for t in TRANSITIONS if t.guard}
    assert named == set(CONDITIONS)
    last = TRANSITIONS[-1]
    assert (last.states, last.event, last.guard, last.next_state) == ((ANY,), "always", None, SAME)


def test_every_row_names_real_states() -> None:
    states = {s.value for s in GroupState}
    for transition in TRANSITIONS:
        assert set(transition.states) <= states | {ANY}
        assert transition.next_state in states | {SAME}


def test_the_markdown_table_has_one_line_per_row() -> None:
    lines = table_markdown().splitlines()
    assert lines[0] == "| # | state | event | guard | next | action | comment |"
    assert len(lines) == 2 + len(TRANSITIONS)
    for index, (line, transition) in enumerate(zip(lines[2:], TRANSITIONS, strict=True)):
        assert line.startswith(f"| {index} | ")
        assert f"| {transition.event} |" in line
        assert f"| {transition.action.value} |" in line
    for state in GroupState:
        assert state.value in table_markdown()


def test_the_diagram_has_one_line_per_distinct_transition() -> None:
    lines = mermaid().splitlines()
    assert lines[:2] == ["stateDiagram-v2", "    [*] --> initializing"]
    edges = lines[2:]
    assert len(edges) == len(set(edges))
    pattern = re.compile(r" {4}(\w+) --> (\w+): (\w+)(?: \[(\w+)\])?(?: / (\w+))?")
    parsed = {}
    for edge in edges:
        match = pattern.fullmatch(edge)
        assert match is not None, edge
        parsed[edge] = match.groups()
    states = {s.value for s in GroupState}
    expected = set()
    for transition in TRANSITIONS:
        if transition.action == Action.NONE and transition.next_state == SAME:
            continue  # nothing happens: no arrow
        sources = states if ANY in transition.states else set(transition.states)
        for source in sources:
            target = source if transition.next_state == SAME else transition.next_state
            action = None if transition.action == Action.NONE else transition.action.value
            expected.add((source, target, transition.event, transition.guard, action))
    assert set(parsed.values()) == expected
    assert {source for source, *_ in expected} | {target for _, target, *_ in expected} == states
    assert "paused" not in mermaid()  # a row that changes nothing draws nothing


# ---- coverage of the table (keep last) -----------------------------------------------------


def test_every_row_of_the_table_is_driven_by_a_case() -> None:
    assert set(CASES) == set(range(len(TRANSITIONS)))


def test_a_setting_in_an_older_spelling_is_the_same_setting() -> None:
    """PostgreSQL 9.3 (Postgres-XC 1.2) echoes FIRST 1 (dn1b) as 'dn1b': the group is
    protected, and no SET_SYNC is sent again and again."""
    view = group(S.SINGLE, (master(sync_names="dn1b"), standby()), sync_set=())
    decision = decide(view)
    assert (decision.row, decision.next_state) == (row("sync_satisfied"), S.PROTECTED)
    assert decide(replace(view, state=S.PROTECTED)).steps == ()
    differing = decide(replace(view, members=(master(sync_names="dn1c"), standby())))
    assert [step.action for step in differing.steps] == [Action.SET_SYNC]


def test_a_master_fenced_by_its_own_agent_has_failed() -> None:
    """It lost the controller and every synchronous standby and fenced itself; when the
    controller hears it again nothing serves writes: fail over to a standby that holds every
    commit, else start it in place (found by the simulator: the group stayed 'protected')."""
    view = group(members=(fenced(master()), cut_off(standby())), master_failed_for=1.0)
    verdict = master_failure(view)
    assert (verdict.failed, verdict.crashed) == (True, True)
    assert "fenced by its agent" in verdict.inputs
    assert decide(view).row == FAILOVER_ROW
    alone = decide(group(members=(fenced(master()), gone(standby())), master_failed_for=TIMEOUT))
    assert alone.steps == (Step(Action.START_MASTER, "dn1a"),)


def test_no_candidate_keeps_a_master_that_serves_again() -> None:
    """The master hung, then its agent died and its PostgreSQL resumed: its agent is silent
    but the probe answers and the standby streams from it again. It may have acknowledged
    commits the other standby lacks: nothing is promoted (found by the simulator)."""
    serving = replace(master(), heartbeat_age=5.0, probe_ok=True, probe_age=0.1)
    view = group(S.NO_CANDIDATE, (serving, standby()), master_failed_for=3.0)
    assert not master_failure(view).failed
    assert decide(view).steps == ()


def test_no_candidate_promotes_nothing_while_a_restart_of_the_master_runs() -> None:
    """A START_MASTER in flight (the group is busy) must finish before any promotion (found by
    the simulator: the old master came up as master beside the promoted standby)."""
    view = master_lost(S.NO_CANDIDATE, master_failed_for=3.0, busy=True)
    assert decide(view).steps == ()
    assert not CONDITIONS["master_restartable"](
        group(S.NO_CANDIDATE, (crashed(master()), gone(standby())), busy=True)
    )


def test_a_candidate_whose_promotion_failed_is_promoted_again_when_it_holds_every_commit() -> None:
    """Promote failed three times: no_candidate with the candidate recorded as master. It is
    a running standby that was synchronous: promote it again (found by the simulator: the
    group stayed no_candidate for ever)."""
    view = group(
        S.NO_CANDIDATE,
        (fenced(master()), detached(standby())),
        master="dn1b",
        candidate="dn1b",
        epoch=2,
        master_failed_for=3.0,
    )
    assert master_failure(view).failed, "a standby recorded as the master serves no writes"
    decision = decide(view)
    assert (decision.next_state, decision.new_master) == (S.FAILOVER, "dn1b")
    assert decision.steps == (Step(Action.PROMOTE, "dn1b"),)


def test_a_failed_candidate_recorded_as_master_is_detached_too() -> None:
    """no_candidate after Promote failed: dn1b, recorded as the master, is a running standby
    still streaming; it is one to detach (the group would otherwise wait for ever)."""
    view = group(
        S.NO_CANDIDATE,
        (fenced(master()), cut_off(standby()), cut_off(standby("dn1c"))),
        master="dn1b",
        candidate="dn1b",
        sync_set=("dn1b", "dn1c"),
        epoch=2,
        master_failed_for=3.0,
    )
    decision = decide(view)
    assert (decision.row, decision.steps) == (
        row("master_failed", "not_detached", S.NO_CANDIDATE),
        (Step(Action.DETACH, "dn1b"), Step(Action.DETACH, "dn1c")),
    )


def test_detach_skips_masters_busy_and_detached_standbys() -> None:
    members = (
        silent(master()),
        cut_off(standby()),
        detached(standby("dn1c")),
        cut_off(standby("dn1d", busy=True)),
    )
    quorum = {"sync_set": ("dn1b", "dn1c", "dn1d"), "policy": SyncPolicy("any", 2)}
    view = group(members=members, master_failed_for=1.0, **quorum)
    assert decide(view).steps == (Step(Action.DETACH, "dn1b"),)


def test_an_asynchronous_standby_is_not_detached_unless_data_may_be_lost() -> None:
    """It confirms nothing: a failover without data loss does not wait for it (found by a
    chaos test: a hung asynchronous standby held a Detach, and the group, for 30 s). A
    promotion that may lose data reads its position too, so it is detached then."""
    view = lost_with_potential()
    view = replace(view, members=(*view.members, cut_off(standby("dn1d", mode="async"))))
    assert decide(view).steps == (Step(Action.DETACH, "dn1b"), Step(Action.DETACH, "dn1c"))
    lossy = lost_unprotected(attached=True, allow_data_loss=True)
    lossy = replace(lossy, members=(*lossy.members, cut_off(standby("dn1c", mode="async"))))
    lossy = replace(lossy, members=(*lossy.members, cut_off(standby("dn1d", mode="async"))))
    assert {step.member for step in decide(lossy).steps} == {"dn1b", "dn1c", "dn1d"}


def test_a_detached_standby_follows_the_master_again_at_once() -> None:
    """A failover that did not happen (the master came back): a detached standby is not a
    WAL receiver still connecting; it is told to follow at once."""
    view = group(members=(master(downstreams=()), replace(detached(standby()), streaming_missing_for=0.1)))
    decision = decide(view)
    assert Step(Action.FOLLOW, "dn1b") in decision.steps


def test_a_failed_candidate_is_not_promoted_again_while_the_old_master_streams_to_the_standbys() -> None:
    """Found by the simulator (seed 39222, FIRST 1 (dn1b, dn1c)): Promote to dn1b failed three
    times (no_candidate, dn1b recorded as the master); the old master dn1a resumed with its
    agent dead (no report, no self-fencing) and serves, dn1b and dn1c streaming from it. dn1b,
    "a standby, not a master", counted as a crash at once: dn1b was promoted while dn1a
    acknowledged a commit through dn1c that dn1b lacked. A recorded master that is a standby
    is a crash only while neither it nor another standby receives WAL."""
    streaming_c = standby("dn1c")
    view = group(
        S.NO_CANDIDATE,
        (gone(master()), standby(), streaming_c),
        master="dn1b",
        candidate="dn1b",
        epoch=2,
        master_failed_for=3.0,
    )
    assert not master_failure(view).failed, "dn1b streams from a master that serves"
    assert decide(view).steps == ()
    other = replace(view, members=(gone(master()), cut_off(standby()), streaming_c))
    assert not master_failure(other).failed, "dn1c streams from a master that serves"
    lost = replace(view, members=(gone(master()), cut_off(standby()), cut_off(streaming_c)))
    assert master_failure(lost).failed
