"""Helpers of the config tests: a fake host (``config.host.Host`` made of given facts), the problems or the
one receiver that values parse to, and the values the tests share."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from ipfix_balancer.config.host import LOCAL
from ipfix_balancer.config.parse import ConfigError, load_values

ETC = Path(__file__).resolve().parents[2] / "etc"
CPUS = range(64)
BASE = {"IPFIX_FULLFLOW_PORT[0]": "1500", "IPFIX_FULLFLOW_BALANCER[0]": "RoundRobin",
        "IPFIX_FULLFLOW_BALANCER_SUB[0]": "10.0.0.2/9920"}


class FakeHost:
    """A machine made of the facts given: by default 4 CPUs, 16 GiB, no CAP_NET_RAW, no interface address or
    broadcast address, no readable file, and a file system where only ``files`` exist (below ``/``)."""

    def __init__(self, cpus=range(4), memory: int | None = 16 << 30, cap_net_raw=False, addresses=(),
                 broadcasts=(), readable=(), files=(), name_max=255, path_max=4096):
        self._cpus, self._memory, self._cap_net_raw = frozenset(cpus), memory, cap_net_raw
        self._addresses = {ipaddress.ip_address(a) for a in addresses}
        self._broadcasts = {ipaddress.ip_address(a) for a in broadcasts}
        self._readable, self._files, self._limits = set(readable), set(files), (name_max, path_max)
        self.asked: list[str] = []  # which facts were asked for, in order

    def _tell(self, question, fact):
        self.asked.append(question)
        return fact

    def cpus(self):
        return self._tell("cpus", self._cpus)

    def memory_bytes(self):
        return self._tell("memory_bytes", self._memory)

    def has_cap_net_raw(self):
        return self._tell("has_cap_net_raw", self._cap_net_raw)

    def local_addresses(self):
        return self._tell("local_addresses", self._addresses)

    def local_broadcasts(self):
        return self._tell("local_broadcasts", self._broadcasts)

    def readable(self, path):
        return path in self._readable

    def nearest_existing(self, path):
        path = os.path.normpath(path)
        while path != "/" and path not in self._files:
            path = os.path.dirname(path)
        return path, path not in self._files

    def name_limits(self, directory):
        return self._limits


def problems(values, cpus=CPUS, host=LOCAL):
    """The problems load_values() reports for values (which must be invalid)."""
    with pytest.raises(ConfigError) as err:
        load_values(values, cpus=cpus, host=host)
    return err.value.problems


def one_problem(values, cpus=CPUS, host=LOCAL):
    found = problems(values, cpus, host)
    assert len(found) == 1, found
    return found[0]


def receiver(values, cpus=CPUS, host=LOCAL):
    (rc,) = load_values(values, cpus=cpus, host=host).receivers
    return rc
