"""Ports for test and demo deployments: never twice, never where client connections get theirs."""

from pathlib import Path

from xcha.topology import free_port


def ephemeral_range() -> range:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def test_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    pair = free_port(2)
    singles = [free_port() for _ in range(300)]
    handed_out = [pair, pair + 1, *singles]
    assert len(set(handed_out)) == len(handed_out)
    assert not set(handed_out) & set(ephemeral_range())
