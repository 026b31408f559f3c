"""xcha: high availability for the datanodes of a Postgres-XC style sharded PostgreSQL cluster."""

__version__ = "0.1.0"
