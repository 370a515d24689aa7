"""control/ports.py: the one line an operator gets when a receiver cannot listen."""
import errno
import os
import socket

import psutil

from ipfix_balancer.control.ports import listen_failure, port_holder


def test_holder_of_a_udp_port_bound_on_the_wildcard_address_is_found_for_a_specific_address():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
        assert port_holder("udp", "127.0.0.1", port) == f"pid {os.getpid()} ({psutil.Process().name()})"
        assert port_holder("tcp", "127.0.0.1", port) is None


def test_other_bind_errors_are_said_plainly_with_the_address():
    exc = OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    assert listen_failure("udp", "::1", 1500, exc) == "cannot listen on udp [::1]:1500: cannot assign requested address"
