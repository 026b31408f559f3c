"""The `takeover` router: the specification's method. The promoted standby restarts on the
former master's port, so coordinators need no change; the controller asks the agents for that
(it looks at the router's kind), so there is nothing to re-point here."""

from xcha.config import Section
from xcha.controller.routers.base import RouterConfig
from xcha.controller.routing import Target

KIND = "takeover"


def parse(section: Section) -> None:
    return None


def build(router: RouterConfig, datanodes: tuple[str, ...]) -> list[Target]:
    return []
