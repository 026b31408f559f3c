"""`[store]` in controller.toml: where controllers keep their state and elect their leader.

kind = "sqlite" (the default): one controller, a file in its state directory.
kind = "etcd": several controllers on one etcd cluster; `endpoints` are its client URLs'
host:port, `prefix` separates clusters sharing an etcd, `lease_ttl` is the leader lease.
"""

from dataclasses import dataclass
from pathlib import Path

from xcha.config import Section

STORE_KINDS = ("sqlite", "etcd")
# A raft leader change in etcd (an election, default timeout 1 s) must not cost the leader its
# lease: measured here, 2 s leases were lost when the etcd leader was killed, 5 s ones were not.
DEFAULT_LEASE_TTL = 5.0


@dataclass(frozen=True)
class StoreConfig:
    kind: str = "sqlite"
    endpoints: tuple[str, ...] = ()
    prefix: str = "/xcha/default/"
    lease_ttl: float = DEFAULT_LEASE_TTL
    timeout: float = 2.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def load(cls, section: Section) -> "StoreConfig":
        kind = section.choice("kind", STORE_KINDS, "sqlite")
        endpoints = section.addresses("endpoints", "etcd endpoint")
        prefix = section.text("prefix", "/xcha/default/")
        if not prefix.startswith("/") or not prefix.endswith("/"):
            section.problems.add(section.key("prefix"), "must start and end with '/'")
        config = cls(
            kind=kind,
            endpoints=endpoints,
            prefix=prefix,
            lease_ttl=section.number("lease_ttl", DEFAULT_LEASE_TTL, minimum=1, maximum=60),
            timeout=section.number("timeout", 2.0, minimum=0.1, maximum=60),
            ca_file=section.optional_path("ca_file"),
            cert_file=section.optional_path("cert_file"),
            key_file=section.optional_path("key_file"),
        )
        if kind == "etcd" and not endpoints:
            section.problems.add(section.key("endpoints"), 'kind "etcd" needs endpoints = ["host:port", ...]')
        if (config.cert_file is None) != (config.key_file is None):
            section.problems.add(section.key("cert_file"), "cert_file and key_file go together")
        section.finish()
        return config
