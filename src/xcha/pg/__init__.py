"""Everything that knows PostgreSQL: rendering its configuration, running its programs,
reading its status. Nothing outside this package starts a PostgreSQL program."""
