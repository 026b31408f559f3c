"""syncrep.CatchUp: a master's agent reports a confirming standby as caught up only once it
has flushed every commit the master acknowledged before it confirmed (found by the
simulator, seed 2854: a standby named synchronous again was counted at once, one commit
behind what the master had acknowledged while unprotected, and was then promoted)."""

from dataclasses import replace

from xcha.pg.status import Downstream, PgStatus
from xcha.pg.syncrep import CatchUp


def picture(position: int, *standbys: tuple[str, str, int, int], names: str = "FIRST 1 (dn1b)") -> PgStatus:
    """A master at `position` (read after pg_stat_replication); standbys as (name,
    sync_state, flushed, WAL sender pid)."""
    return PgStatus(
        running=True,
        in_recovery=False,
        current_lsn=position,
        downstreams=tuple(
            Downstream(name, "streaming", state, flushed, flushed, pid=pid)
            for name, state, flushed, pid in standbys
        ),
        synchronous_standby_names=names,
        position_after_senders=position,
    )


def caught_up(status: PgStatus) -> dict[str, bool]:
    return {d.name: d.caught_up for d in status.downstreams}


def test_a_standby_named_again_catches_up_with_what_was_acknowledged_without_it() -> None:
    catch_up = CatchUp()
    unprotected = picture(190, ("dn1b", "async", 150, 7), names="")
    assert caught_up(catch_up.mark(unprotected)) == {"dn1b": False}
    catch_up.reset()  # the agent sets synchronous_standby_names = 'FIRST 1 (dn1b)'
    named = catch_up.mark(picture(190, ("dn1b", "sync", 189, 7)))
    assert caught_up(named) == {"dn1b": False} and catch_up.waiting
    # Commits now wait for dn1b: the position to reach stays the one first read (190).
    assert caught_up(catch_up.mark(picture(195, ("dn1b", "sync", 189, 7)))) == {"dn1b": False}
    assert caught_up(catch_up.mark(picture(195, ("dn1b", "sync", 190, 7)))) == {"dn1b": True}
    assert not catch_up.waiting


def test_a_reconnected_standby_catches_up_again() -> None:
    """A new WAL sender: commits may have been acknowledged through another standby meanwhile."""
    catch_up = CatchUp()
    catch_up.mark(picture(100, ("dn1b", "sync", 100, 7)))
    assert caught_up(catch_up.mark(picture(120, ("dn1b", "sync", 110, 7)))) == {"dn1b": True}
    assert caught_up(catch_up.mark(picture(130, ("dn1b", "sync", 125, 8)))) == {"dn1b": False}
    assert caught_up(catch_up.mark(picture(140, ("dn1b", "sync", 130, 8)))) == {"dn1b": True}


def test_a_potential_standby_that_becomes_sync_catches_up_first() -> None:
    """FIRST 1 (dn1b, dn1c): dn1b goes; dn1c, potential so far, confirms from now on only."""
    names = "FIRST 1 (dn1b, dn1c)"
    catch_up = CatchUp()
    both = catch_up.mark(picture(100, ("dn1b", "sync", 100, 7), ("dn1c", "potential", 90, 9), names=names))
    assert caught_up(both) == {"dn1b": True, "dn1c": False}
    assert caught_up(catch_up.mark(picture(110, ("dn1c", "sync", 95, 9), names=names))) == {"dn1c": False}
    assert caught_up(catch_up.mark(picture(120, ("dn1c", "sync", 110, 9), names=names))) == {"dn1c": True}


def test_changed_names_a_restarted_agent_and_a_standby_role_start_again() -> None:
    catch_up = CatchUp()
    catch_up.mark(picture(100, ("dn1b", "quorum", 100, 7), names="ANY 1 (dn1b)"))
    widened = catch_up.mark(picture(120, ("dn1b", "quorum", 110, 7), names="ANY 1 (dn1b, dn1c)"))
    assert caught_up(widened) == {"dn1b": False}
    assert caught_up(CatchUp().mark(picture(120, ("dn1b", "sync", 110, 7)))) == {"dn1b": False}
    standby = replace(picture(120), in_recovery=True, position_after_senders=None)
    assert catch_up.mark(standby) == standby and not catch_up.waiting


def test_without_a_position_read_after_the_senders_nothing_is_caught_up() -> None:
    """An older picture format, or a server that promoted between the queries."""
    status = replace(picture(100, ("dn1b", "sync", 100, 7)), position_after_senders=None)
    assert caught_up(CatchUp().mark(status)) == {"dn1b": False}
