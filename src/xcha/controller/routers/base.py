"""What every router kind provides, and the `[router]` settings the kinds share.

A kind is a module of this package (registered in `xcha.controller.routers.KINDS`) with
- `KIND`: its name, the value of `kind` in `[router]`;
- `parse(section)`: its own settings from the `[router]` table (problems recorded under their
  keys, as every configuration problem is), or None when it has none;
- `build(router, datanodes)`: the coordinators the barrier re-points (`Target`s), possibly none.
"""

from dataclasses import dataclass
from typing import Protocol, TypeVar

from xcha.config import Section
from xcha.controller.routing import Target

# The settings every kind accepts: how the barrier retries, and how long one statement (or
# the operator's command) may take.
RETRY_INITIAL = 0.1
RETRY_MAX = 5.0
TIMEOUT = 5.0
S = TypeVar("S")


@dataclass(frozen=True)
class CoordinatorConfig:
    name: str
    conninfo: str


@dataclass(frozen=True)
class RouterConfig:
    kind: str
    retry_initial: float = RETRY_INITIAL
    retry_max: float = RETRY_MAX
    timeout: float = TIMEOUT
    settings: object = None  # the kind's own (its module's `Settings`), None when it has none


class RouterKind(Protocol):
    """A router kind's module."""

    KIND: str

    def parse(self, section: Section) -> object: ...

    def build(self, router: RouterConfig, datanodes: tuple[str, ...]) -> list[Target]: ...


def parse_coordinators(section: Section, kind: str) -> tuple[CoordinatorConfig, ...]:
    """`[[router.coordinator]]` tables (name, conninfo): at least one, names unique."""
    coordinators = []
    for table in section.tables("coordinator"):
        coordinators.append(CoordinatorConfig(table.name("name"), table.text("conninfo")))
        table.finish()
    names = [c.name for c in coordinators]
    if len(set(names)) != len(names):
        section.problems.add(section.key("coordinator"), "coordinator names repeat")
    if not coordinators:
        section.problems.add(
            section.key("coordinator"), f"router kind {kind} needs at least one [[router.coordinator]]"
        )
    return tuple(coordinators)


def settings_of(router: RouterConfig, kind: type[S]) -> S:
    """The kind's own settings, as its `parse` made them."""
    if not isinstance(router.settings, kind):
        raise TypeError(f"router kind {router.kind} has settings {router.settings!r}, not {kind.__name__}")
    return router.settings
