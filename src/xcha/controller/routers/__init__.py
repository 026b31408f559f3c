"""Router kinds: how coordinators are re-pointed after a promotion.

- none: no coordinators (the barrier completes at once);
- fdw: plain PostgreSQL coordinators with postgres_fdw (ALTER SERVER);
- pgxc: Postgres-XC / XL coordinators (ALTER NODE + pgxc_pool_reload);
- takeover: the specification's method: the promoted standby restarts on the former master's
  port, so coordinators need no change (the controller asks the agents; no targets here);
- command: an operator's executable.
"""

from xcha.controller.config import ControllerConfig
from xcha.controller.routers.command import CommandTarget
from xcha.controller.routers.fdw import FdwTarget
from xcha.controller.routers.pgxc import PgxcTarget
from xcha.controller.routing import Router, Target


def build_router(config: ControllerConfig) -> Router:
    router = config.router
    targets: list[Target] = []
    if router.kind == "fdw":
        targets = [FdwTarget(c.name, c.conninfo, router.timeout) for c in router.coordinators]
    elif router.kind == "pgxc":
        datanodes = tuple(d.name for d in config.datanodes)
        targets = [
            PgxcTarget.connect(
                c.name,
                c.conninfo,
                flavor=router.flavor,
                datanodes=datanodes,
                first=index == 0,
                terminate_writers=router.terminate_writers,
                clean_command=router.clean_command,
                timeout=router.timeout,
            )
            for index, c in enumerate(router.coordinators)
        ]
    elif router.kind == "command":
        targets = [CommandTarget(router.command, router.timeout)]
    return Router(router.kind, targets, router.retry_initial, router.retry_max)
