"""Router kinds: how coordinators are re-pointed after a promotion, one module each.

- none: no coordinators (the barrier completes at once);
- fdw: plain PostgreSQL coordinators with postgres_fdw (ALTER SERVER);
- pgxc: Postgres-XC / XL coordinators (ALTER NODE + pgxc_pool_reload);
- takeover: the specification's method: the promoted standby restarts on the former master's
  port, so coordinators need no change (the controller asks the agents; no targets here);
- command: an operator's executable.

A new kind is a module with `KIND`, `parse` and `build` (`xcha.controller.routers.base`),
listed in `KINDS`.
"""

from typing import TYPE_CHECKING

from xcha.config import Problems, Section
from xcha.controller.routers import command, fdw, none, pgxc, takeover
from xcha.controller.routers.base import RETRY_INITIAL, RETRY_MAX, TIMEOUT, RouterConfig, RouterKind
from xcha.controller.routing import Router

if TYPE_CHECKING:
    from xcha.controller.config import ControllerConfig

# In the order `--check-config` lists them.
_MODULES: tuple[RouterKind, ...] = (none, fdw, pgxc, takeover, command)
KINDS: dict[str, RouterKind] = {kind.KIND: kind for kind in _MODULES}


def parse_router(section: Section) -> RouterConfig:
    """The `[router]` table: the settings every kind shares, then the kind's own. A setting of
    another kind is a problem, named as such."""
    kind = section.choice("kind", tuple(KINDS), none.KIND)
    settings = KINDS[kind].parse(section)
    config = RouterConfig(
        kind=kind,
        retry_initial=section.number("retry_initial", RETRY_INITIAL, minimum=0.01, maximum=10),
        retry_max=section.number("retry_max", RETRY_MAX, minimum=0.1, maximum=600),
        timeout=section.number("timeout", TIMEOUT, minimum=0.1, maximum=600),
        settings=settings,
    )
    if section.data.get("kind", none.KIND) == kind:  # else only the kind's problem is listed
        _settings_of_other_kinds(section, kind)
    else:
        section.used.update(section.data)
    section.finish()
    return config


def _settings_of_other_kinds(section: Section, kind: str) -> None:
    unused = set(section.data) - section.used
    owners: dict[str, list[str]] = {}
    for other, module in KINDS.items():
        if other != kind and unused:
            trial = Section(section.data, section.prefix, Problems())
            module.parse(trial)
            for key in unused & trial.used:
                owners.setdefault(key, []).append(other)
    for key, kinds in sorted(owners.items()):
        section.problems.add(
            section.key(key), f"a setting of router kind {' or '.join(kinds)}, not of {kind}"
        )
        section.used.add(key)


def build_router(config: "ControllerConfig") -> Router:
    router = config.router
    datanodes = tuple(d.name for d in config.datanodes)
    targets = KINDS[router.kind].build(router, datanodes)
    return Router(router.kind, targets, router.retry_initial, router.retry_max)


__all__ = ["KINDS", "RouterConfig", "build_router", "parse_router"]
