"""xcha: high availability for the datanodes of a Postgres-XC style sharded PostgreSQL cluster."""

import os

__version__ = "0.1.0"

# PostgreSQL programs are started with fork() (to switch to the PostgreSQL OS user), which
# gRPC's fork handlers turn into an abort in the child. The children exec at once and never
# use gRPC, so the handlers are not needed.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
