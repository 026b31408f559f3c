"""A whole xcha deployment on one machine, as real processes: a controller, an agent per
PostgreSQL instance (each group the specification's master/slave pair on a pair of
adjacent free ports), optional plain PostgreSQL coordinators with postgres_fdw, certificates
for mTLS, and the configuration files an operator would write. Used by `xcha up` /
`xcha down`, the demo, the tests and the benchmarks.

Every process is recorded with its PID in topology.json; stopping is by PID only. A
supervised topology (`xcha up`) starts a supervisor instead of the controller and the agents:
it runs and restarts them and records their PIDs in its own status file (`xcha.supervisor`).
"""

from xcha.topology.client import settled, settling
from xcha.topology.files import Tables, toml_document, toml_value
from xcha.topology.plan import APP_USER, TOPOLOGY_FILE, DatanodePlan, MemberInfo, StatusCallback, TopologyPlan
from xcha.topology.ports import free_port
from xcha.topology.processes import Processes


class Topology(Processes):
    """A deployment on this machine: its layout and files (`layout`), asking its controller and
    servers (`client`), starting and stopping its processes (`processes`)."""


__all__ = [
    "APP_USER",
    "TOPOLOGY_FILE",
    "DatanodePlan",
    "MemberInfo",
    "StatusCallback",
    "Tables",
    "Topology",
    "TopologyPlan",
    "free_port",
    "settled",
    "settling",
    "toml_document",
    "toml_value",
]
