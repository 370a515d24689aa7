"""Effective settings that no key states: the recorders BALANCER_AUTO implies, and defaults that depend on
the host. Pure but for the ``host`` asked, which tests fake."""
from __future__ import annotations

import dataclasses
import ipaddress
import os

from .host import LOCAL, Host
from .model import MEMORY_BYTES_MAX, STREAMS, Config, Listen, Mode, ReceiverConfig

AUTO_INDEX_BASE = 100  # balancer-auto recorders: index 100, 101, … of their stream


def default_memory_bytes(host: Host) -> int:
    """MEMORY_BYTES when not set: 1 GiB, or a quarter of this host's memory when that is less."""
    memory = host.memory_bytes()
    return MEMORY_BYTES_MAX if memory is None else min(MEMORY_BYTES_MAX, memory // 4)


def auto_receivers(config: Config, host: Host = LOCAL) -> list[ReceiverConfig]:
    """Recording receivers implied by BALANCER_AUTO=Enabled on RoundRobin/All receivers.

    Each subreceiver on a local address (loopback, unspecified, or an address of this host) gets a recorder
    listening there (``bind`` = that address, proto = BALANCER_SUB_PROTO) that records into
    ``<parent dump dir>/auto-<port>/``. It inherits the parent's rotation, export, spool and DPI_ID settings;
    it is not pinned to a CPU. Its index is 100, 101, … in its stream (skipping configured indexes), so
    status shows it as e.g. ``fullflow[100]``. A subreceiver whose port another receiver already listens on
    (same proto, same or wildcard address) is that receiver's business and gets no auto recorder.
    """
    used = {(rc.stream, rc.index) for rc in config.receivers}
    listening = [rc.listen for rc in config.receivers]
    next_index = dict.fromkeys(STREAMS, AUTO_INDEX_BASE)
    out: list[ReceiverConfig] = []
    for parent in config.receivers:
        if not parent.forwarding.balancer_auto or parent.forwarding.mode is Mode.DISABLED:
            continue
        for sub in parent.forwarding.subreceivers:
            if not _is_local(sub.host, host):
                continue
            if any(lst.port_type == sub.proto and lst.port == sub.port and
                   (lst.bind == sub.host or ipaddress.ip_address(lst.bind).is_unspecified
                    or ipaddress.ip_address(sub.host).is_unspecified)
                   for lst in listening):
                continue
            index = next_index[parent.stream]
            while (parent.stream, index) in used:
                index += 1
            next_index[parent.stream] = index + 1
            used.add((parent.stream, index))
            listen = Listen(port_type=sub.proto, bind=sub.host, port=sub.port)
            listening.append(listen)
            out.append(dataclasses.replace(
                parent, index=index, listen=listen, taskset=None,
                forwarding=dataclasses.replace(parent.forwarding, mode=Mode.DISABLED, subreceivers=(),
                                               balancer_auto=False),
                recording=dataclasses.replace(parent.recording, dump_dir=os.path.join(
                    parent.recording.dump_dir, f"auto-{sub.port}", ""))))
    return out


def _is_local(address: str, host: Host) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_unspecified or ip in host.local_addresses()
