"""What the controller answers an agent ("what should be"), in the states where a wrong
answer makes an agent fence a server that must serve."""

from dataclasses import replace
from pathlib import Path

import pytest

from xcha.controller.config import load_controller_config
from xcha.controller.controller import Controller
from xcha.controller.routing import Router
from xcha.controller.store import SqliteStore
from xcha.controller.views import GroupState
from xcha.v1 import xcha_pb2 as pb


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    config = tmp_path / "controller.toml"
    config.write_text(f"""
[controller]
listen = "127.0.0.1:7000"
state_dir = "{tmp_path}/state"

[[datanode]]
name = "dn1"
members = ["dn1a", "dn1b"]

[tls]
insecure = true
""")
    return Controller(
        load_controller_config(config), SqliteStore(tmp_path / "state.sqlite3"), Router("none", [])
    )


def goal(controller: Controller, member: str) -> int:
    return controller.goal(controller.records[member]).goal


def test_the_master_is_told_master_and_the_others_wait_until_its_address_is_known(
    controller: Controller,
) -> None:
    controller.groups["dn1"] = replace(controller.groups["dn1"], state=GroupState.PROTECTED, master="dn1a")
    assert goal(controller, "dn1a") == pb.GOAL_MASTER
    assert goal(controller, "dn1b") == pb.GOAL_WAIT


def test_a_switchover_target_is_the_master_from_its_promotion_on(controller: Controller) -> None:
    """Before the group record names it, a heartbeat of the just promoted target must not be
    answered "standby": its agent would fence it (measured in a switchover benchmark)."""
    controller.groups["dn1"] = replace(
        controller.groups["dn1"], state=GroupState.SWITCHOVER, master="dn1a", candidate="dn1b"
    )
    assert goal(controller, "dn1b") == pb.GOAL_MASTER
    assert goal(controller, "dn1a") == pb.GOAL_MASTER, "stopped cleanly by the switchover, not by itself"


def test_a_removed_member_is_told_so(controller: Controller) -> None:
    controller.records["dn1b"] = replace(controller.records["dn1b"], removed=True)
    assert goal(controller, "dn1b") == pb.GOAL_REMOVED
