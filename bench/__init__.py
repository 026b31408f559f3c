"""xcha benchmarks: `./run bench NAME` (failover, hang, switchover, scale, compare).

Not tests: they measure, print a markdown table and write it with a JSON file to
bench/results/ (date, machine, PostgreSQL version, settings)."""
