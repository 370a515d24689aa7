"""Typed records core hands to ``control``: what it counts, by field, so a renamed field fails where it is
built (and under a type checker), not when the status document is read. ``control/status.py`` makes them
part of its documents and owns their JSON form."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SubreceiverStatus:
    """Counters for one subreceiver, summed over every output session to it."""
    subreceiver: str
    state: str  # up | probation | stalled | down | idle (no exporter session open)
    sessions: int
    msgs_out: int
    bytes_out: int
    drops: int  # messages lost: the sum of drops_by_reason
    queued_bytes: int
    last_error: str = ""
    drop_records: int = 0
    drops_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    drop_records_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    resent: int = 0  # written but not acknowledged when a connection failed: sent again
    unacked_bytes: int = 0  # written, not yet acknowledged by the collector's TCP
    draining: int = 0  # outputs of sessions whose exporter left, still delivering


@dataclasses.dataclass(frozen=True)
class Loss:
    """Everything a handler lost or refused so far (``core.ledger.LossLedger``)."""
    drops: int  # messages: the sum of drops_by_reason
    drop_records: int
    drops_by_reason: dict[str, int]
    drop_records_by_reason: dict[str, int]
    malformed: int  # messages refused as not IPFIX or over a limit: the sum of malformed_by_reason
    malformed_by_reason: dict[str, int]
    rcvbuf_overflow: int  # UDP datagrams the kernel dropped before the handler read them


@dataclasses.dataclass(frozen=True)
class Held:
    """What a handler's send queues hold now: lost if the process dies (the supervisor counts it then)."""
    queued_bytes: int  # every send queue together, with the copies kept until acknowledged (MEMORY_BYTES)
    memory_bytes: float  # the limit of that (MEMORY_BYTES: an int in a handler)
    queued_msgs: int  # messages every output holds, queued or not yet acknowledged
    queued_records: int  # the data records in them
    draining: int  # sessions whose exporter left, their outputs still delivering (DRAIN_SECONDS)
    draining_bytes: int  # what those still hold
