"""Shared test kit for fast_ipfix_balancer tests.

Everything here is independent of the product's own code so that the end-to-end
tests check the product against a second opinion:

* **Encoding** uses scapy (``scapy.layers.netflow``) as the IPFIX encoder.  Bulk
  streams are built from one scapy-built record layout that is then re-packed
  with a different serial per record (``octetDeltaCount``), which is byte-for-
  byte what scapy itself would produce (checked by ``test_ipfixkit.py``).
* **Decoding** uses a plain ``struct`` walk for framing (:func:`split_messages`,
  :func:`extract_serials`) and scapy's template handling for records
  (:func:`decode_records`).
* **Peers** (:class:`TcpSink`, :class:`UdpSink`, :func:`tcp_send`,
  :func:`udp_send`) are real sockets on 127.0.0.1, each sink served by its own
  thread.
* :class:`Balancer` runs the real product (``python -m ipfix_balancer run``) as a
  subprocess and reads the status files it writes.

scapy quirks worked around here (scapy 2.6):

* ``NetflowHeaderV10`` computes ``length`` without the 2-byte version field, so
  the message length is always given explicitly.
* ``NetflowDataflowsetV9`` pads sets to 4 bytes when its length is computed, so
  the set length is given explicitly (IPFIX needs no padding).
* ``netflowv9_defragment`` keys templates by template id only (not by
  Observation Domain), so :func:`decode_records` defragments each ODID apart.
* ``NetflowOptionsFlowset10`` cannot build a valid options template (its
  ``post_build`` truncates the option fields), so no options helper is offered.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from scapy.config import conf as scapy_conf
from scapy.layers.netflow import (
    GetNetflowRecordV9,
    NetflowDataflowsetV9,
    NetflowFlowsetV9,
    NetflowHeader,
    NetflowHeaderV10,
    NetflowRecordV9,
    NetflowTemplateFieldV9,
    NetflowTemplateV9,
    NetflowV910TemplateFieldTypes,
    netflowv9_defragment,
)

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- #
# IPFIX constants and templates
# --------------------------------------------------------------------------- #

IPFIX_VERSION = 10
MESSAGE_HEADER = struct.Struct("!HHIII")   # version, length, export time, sequence, ODID
SET_HEADER = struct.Struct("!HH")          # set id, length
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
MIN_DATA_SET_ID = 256
MAX_MESSAGE_LENGTH = 65535


@dataclass(frozen=True)
class InfoElement:
    """One template field: IANA IPFIX name, element id and encoded length."""

    name: str
    ie: int
    length: int

    @property
    def scapy_name(self) -> str:
        """The attribute name scapy gives this element in decoded records."""
        return NetflowV910TemplateFieldTypes[self.ie]


FULLFLOW_TEMPLATE_ID = 256
FULLFLOW_FIELDS: tuple[InfoElement, ...] = (
    InfoElement("sourceIPv4Address", 8, 4),
    InfoElement("destinationIPv4Address", 12, 4),
    InfoElement("sourceTransportPort", 7, 2),
    InfoElement("destinationTransportPort", 11, 2),
    InfoElement("protocolIdentifier", 4, 1),
    InfoElement("octetDeltaCount", 1, 8),
    InfoElement("packetDeltaCount", 2, 8),
    InfoElement("flowStartMilliseconds", 152, 8),
    InfoElement("flowEndMilliseconds", 153, 8),
)
SERIAL_FIELD = "octetDeltaCount"
"""The field that carries each record's unique serial number."""

DEFAULT_RECORD_VALUES: Mapping[str, Any] = {
    "sourceIPv4Address": "10.0.0.1",
    "destinationIPv4Address": "192.0.2.1",
    "sourceTransportPort": 40000,
    "destinationTransportPort": 443,
    "protocolIdentifier": 6,
    "octetDeltaCount": 0,
    "packetDeltaCount": 1,
    "flowStartMilliseconds": 1_700_000_000_000,
    "flowEndMilliseconds": 1_700_000_001_000,
}
"""Values of the fields other than the serial (times in epoch milliseconds)."""

# scapy record attribute -> IANA name, for the elements this kit knows about.
_IANA_NAME = {f.scapy_name: f.name for f in FULLFLOW_FIELDS}


def header(msg: bytes) -> tuple[int, int, int, int, int]:
    """Decode an IPFIX message header: ``(version, length, export_time, seq, odid)``."""
    return MESSAGE_HEADER.unpack_from(msg, 0)


def set_ids(msg: bytes) -> list[int]:
    """The set ids in one message, in order (2 = template set, >= 256 = data set)."""
    ids = []
    off, end = MESSAGE_HEADER.size, header(msg)[1]
    while off + SET_HEADER.size <= end:
        set_id, length = SET_HEADER.unpack_from(msg, off)
        if length < SET_HEADER.size:
            raise ValueError(f"set at offset {off} has length {length}")
        ids.append(set_id)
        off += length
    return ids


def _message(payload: bytes, odid: int, seq: int, export_time: int | None) -> bytes:
    """Prefix ``payload`` (sets) with a scapy-built IPFIX message header."""
    length = MESSAGE_HEADER.size + len(payload)
    if length > MAX_MESSAGE_LENGTH:
        raise ValueError(f"IPFIX message of {length} bytes exceeds {MAX_MESSAGE_LENGTH}")
    hdr = NetflowHeader(version=IPFIX_VERSION) / NetflowHeaderV10(
        length=length,  # explicit: scapy's own computation forgets the version field
        ExportTime=int(time.time()) if export_time is None else export_time,
        flowSequence=seq,
        ObservationDomainID=odid,
    )
    return bytes(hdr) + payload


def _template_set(template_id: int, fields: Sequence[InfoElement]) -> NetflowFlowsetV9:
    return NetflowFlowsetV9(
        flowSetID=TEMPLATE_SET_ID,
        templates=[
            NetflowTemplateV9(
                templateID=template_id,
                template_fields=[NetflowTemplateFieldV9(fieldType=f.ie, fieldLength=f.length) for f in fields],
            )
        ],
    )


def template_message(
    odid: int = 1,
    seq: int = 0,
    template_id: int = FULLFLOW_TEMPLATE_ID,
    fields: Sequence[InfoElement] = FULLFLOW_FIELDS,
    export_time: int | None = None,
) -> bytes:
    """One IPFIX message holding one template set with one template (scapy-built).

    ``seq`` is the number of data records sent before in this ODID/session
    (template records do not count, RFC 7011 section 3.1).
    """
    return _message(bytes(_template_set(template_id, fields)), odid, seq, export_time)


@dataclass(frozen=True)
class _RecordLayout:
    """A scapy-built record for one template, ready to be re-packed per serial."""

    fields: tuple[InfoElement, ...]
    record_cls: type            # scapy record class generated from the template
    scapy_values: Mapping[str, Any]
    prefix: bytes               # encoded fields before the serial
    suffix: bytes               # encoded fields after the serial
    serial_length: int

    @property
    def record_length(self) -> int:
        return len(self.prefix) + self.serial_length + len(self.suffix)

    def record(self, serial: int) -> bytes:
        """Encoded record with ``serial`` in the serial field (struct re-pack)."""
        return self.prefix + serial.to_bytes(self.serial_length, "big") + self.suffix

    def scapy_record(self, serial: int):
        """The same record built field by field by scapy."""
        serial_attr = next(f.scapy_name for f in self.fields if f.name == SERIAL_FIELD)
        return self.record_cls(**{**self.scapy_values, serial_attr: serial})


@functools.lru_cache(maxsize=64)
def _layout(fields: tuple[InfoElement, ...], values: tuple[tuple[str, Any], ...]) -> _RecordLayout:
    names = [f.name for f in fields]
    if SERIAL_FIELD not in names:
        raise ValueError(f"template has no {SERIAL_FIELD} field to carry the serial")
    given = dict(values)
    scapy_values = {f.scapy_name: given[f.name] for f in fields if f.name in given and f.name != SERIAL_FIELD}
    record_cls = GetNetflowRecordV9(_template_set(FULLFLOW_TEMPLATE_ID, fields))
    proto = bytes(record_cls(**scapy_values, **{fields[names.index(SERIAL_FIELD)].scapy_name: 0}))
    if len(proto) != sum(f.length for f in fields):
        raise AssertionError(f"scapy encoded a {len(proto)}-byte record for {fields}")
    start = sum(f.length for f in fields[: names.index(SERIAL_FIELD)])
    length = fields[names.index(SERIAL_FIELD)].length
    return _RecordLayout(tuple(fields), record_cls, scapy_values, proto[:start], proto[start + length:], length)


def record_layout(fields: Sequence[InfoElement] = FULLFLOW_FIELDS, values: Mapping[str, Any] | None = None) -> _RecordLayout:
    """The (cached) record layout for ``fields``; ``values`` override DEFAULT_RECORD_VALUES."""
    merged = {**DEFAULT_RECORD_VALUES, **(values or {})}
    return _layout(tuple(fields), tuple(sorted(merged.items())))


def record_length(fields: Sequence[InfoElement] = FULLFLOW_FIELDS) -> int:
    """Encoded length of one data record of ``fields``."""
    return sum(f.length for f in fields)


def data_message(
    serials: Iterable[int],
    odid: int = 1,
    seq: int = 0,
    template_id: int = FULLFLOW_TEMPLATE_ID,
    *,
    fields: Sequence[InfoElement] = FULLFLOW_FIELDS,
    values: Mapping[str, Any] | None = None,
    export_time: int | None = None,
    via_scapy: bool = False,
) -> bytes:
    """One IPFIX message holding one data set with one record per serial.

    ``seq`` must be the number of data records sent before in this ODID/session.
    ``via_scapy=True`` builds every record and the set with scapy (slow, the
    reference the fast struct path is checked against).
    """
    serials = list(serials)
    if not serials:
        raise ValueError("a data message needs at least one record")
    layout = record_layout(fields, values)
    set_length = SET_HEADER.size + len(serials) * layout.record_length
    if via_scapy:
        dataset = NetflowDataflowsetV9(
            templateID=template_id,
            length=set_length,  # explicit: no padding
            records=[layout.scapy_record(s) for s in serials],
        )
        payload = bytes(dataset)
    else:
        payload = SET_HEADER.pack(template_id, set_length) + b"".join([layout.record(s) for s in serials])
    return _message(payload, odid, seq, export_time)


def records_for_size(target_size: int, fields: Sequence[InfoElement] = FULLFLOW_FIELDS) -> int:
    """Records per data message so that the message is about ``target_size`` bytes."""
    overhead = MESSAGE_HEADER.size + SET_HEADER.size
    per_record = record_length(fields)
    most = (MAX_MESSAGE_LENGTH - overhead) // per_record
    return max(1, min(most, round((target_size - overhead) / per_record)))


def make_stream(
    n_messages: int,
    records_per_message: int | None = None,
    *,
    odid: int = 1,
    first_serial: int = 0,
    first_seq: int = 0,
    target_size: int | None = None,
    template_id: int = FULLFLOW_TEMPLATE_ID,
    fields: Sequence[InfoElement] = FULLFLOW_FIELDS,
    values: Mapping[str, Any] | None = None,
    export_time: int | None = None,
    with_template: bool = True,
) -> list[bytes]:
    """A template message followed by ``n_messages`` data messages.

    The result has ``n_messages + 1`` entries (``n_messages`` without the
    template).  Data message ``i`` carries serials ``first_serial + i*rpm ...
    first_serial + (i+1)*rpm - 1`` and sequence number ``first_seq + i*rpm``;
    the template message has sequence number ``first_seq``.  Give either
    ``records_per_message`` (default 10) or ``target_size`` in bytes (e.g. 200,
    1400, 8000).
    """
    if records_per_message is not None and target_size is not None:
        raise ValueError("give records_per_message or target_size, not both")
    rpm = records_per_message or (records_for_size(target_size, fields) if target_size else 10)
    export_time = int(time.time()) if export_time is None else export_time
    layout = record_layout(fields, values)
    set_head = SET_HEADER.pack(template_id, SET_HEADER.size + rpm * layout.record_length)
    msg_length = MESSAGE_HEADER.size + len(set_head) + rpm * layout.record_length
    if msg_length > MAX_MESSAGE_LENGTH:
        raise ValueError(f"{rpm} records make a {msg_length}-byte message")
    # The header is scapy-built once; later headers only differ in the sequence number.
    head = bytearray(_message(set_head, odid, first_seq, export_time)[: MESSAGE_HEADER.size])
    struct.pack_into("!H", head, 2, msg_length)
    head_prefix, head_suffix = bytes(head[:8]), bytes(head[12:]) + set_head
    record = layout.record
    out = [template_message(odid, first_seq, template_id, fields, export_time)] if with_template else []
    serial = first_serial
    for i in range(n_messages):
        seq = (first_seq + i * rpm) & 0xFFFFFFFF
        out.append(
            b"".join([head_prefix, seq.to_bytes(4, "big"), head_suffix, *[record(s) for s in range(serial, serial + rpm)]])
        )
        serial += rpm
    return out


def stream_serials(n_messages: int, records_per_message: int, first_serial: int = 0) -> list[int]:
    """The serials :func:`make_stream` puts into a stream of that shape."""
    return list(range(first_serial, first_serial + n_messages * records_per_message))


# --------------------------------------------------------------------------- #
# Independent decoding
# --------------------------------------------------------------------------- #


def _complete_messages(data, start: int = 0) -> Iterator[tuple[int, int]]:
    """Yield ``(offset, length)`` of each complete IPFIX message in ``data`` from ``start``.

    Stops silently at an incomplete tail; raises ValueError on a bad header.
    """
    off, end = start, len(data)
    while end - off >= 4:
        version, length = struct.unpack_from("!HH", data, off)
        if version != IPFIX_VERSION or length < MESSAGE_HEADER.size:
            raise ValueError(f"no IPFIX message header at offset {off}: version={version} length={length}")
        if off + length > end:
            return
        yield off, length
        off += length


def split_messages(data: bytes | bytearray | memoryview, *, partial_ok: bool = False) -> list[bytes]:
    """Split a byte stream into IPFIX messages by walking the RFC 7011 headers.

    A truncated last message raises ValueError unless ``partial_ok`` (then it is
    left out).  A bad version or length always raises ValueError.
    """
    out = [bytes(data[off:off + length]) for off, length in _complete_messages(data)]
    consumed = sum(len(m) for m in out)
    if consumed != len(data) and not partial_ok:
        raise ValueError(f"{len(data) - consumed} trailing bytes after {len(out)} complete messages")
    return out


class UnknownTemplateError(ValueError):
    """Data sets whose template was never seen; ``missing`` lists them as dicts."""

    def __init__(self, missing: list[dict]):
        self.missing = missing
        shown = ", ".join(f"msg {m['msg_index']} odid {m['odid']} template {m['template_id']}" for m in missing[:10])
        super().__init__(f"{len(missing)} data set(s) with unknown template: {shown}")


def _data_sets(pkt) -> Iterator[NetflowDataflowsetV9]:
    layer = pkt
    while layer:
        if isinstance(layer, NetflowDataflowsetV9):
            yield layer
        layer = layer.payload


def decode_records(messages: Sequence[bytes], *, strict: bool = True) -> list[dict]:
    """Decode the data records of one transport session's messages with scapy.

    Templates are learnt in message order and apply per ODID.  Each decoded
    record is a dict with ``msg_index``, ``odid``, ``seq``, ``template_id``,
    ``undecodable`` (False), ``serial`` and every template field by its IANA name
    (scapy's name for elements this kit does not know).  Data sets whose
    template is unknown raise :class:`UnknownTemplateError` when ``strict``;
    otherwise they appear as ``{"undecodable": True, "raw": bytes, ...}``.
    Slow (scapy): use :func:`extract_serials` for large volumes.
    """
    pkts = []
    by_odid: dict[int, list] = {}
    for i, msg in enumerate(messages):
        version, length, _, _, odid = header(msg)
        if version != IPFIX_VERSION or length != len(msg):
            raise ValueError(f"message {i} is not one IPFIX message (version {version}, length {length}/{len(msg)})")
        pkt = NetflowHeader(bytes(msg))
        pkts.append(pkt)
        by_odid.setdefault(odid, []).append(pkt)
    verb, scapy_conf.verb = scapy_conf.verb, 0   # no "Ignored templateIDs" warning
    try:
        for group in by_odid.values():
            netflowv9_defragment(group)
    finally:
        scapy_conf.verb = verb

    records, missing = [], []
    for i, (msg, pkt) in enumerate(zip(messages, pkts)):
        _, _, _, seq, odid = header(msg)
        for dataset in _data_sets(pkt):
            meta = {"msg_index": i, "odid": odid, "seq": seq, "template_id": dataset.templateID}
            for rec in dataset.records:
                if type(rec) is NetflowRecordV9:   # still the raw blob: template unknown
                    entry = {**meta, "undecodable": True, "raw": bytes(rec.fieldValue)}
                    missing.append(entry)
                else:
                    entry = {**meta, "undecodable": False}
                    for f in rec.fields_desc:
                        entry[_IANA_NAME.get(f.name, f.name)] = rec.getfieldval(f.name)
                    entry["serial"] = entry.get(SERIAL_FIELD)
                records.append(entry)
    if strict and missing:
        raise UnknownTemplateError(missing)
    return records


def extract_serials(
    messages: Iterable[bytes],
    template_id: int = FULLFLOW_TEMPLATE_ID,
    fields: Sequence[InfoElement] = FULLFLOW_FIELDS,
) -> list[int]:
    """Serials of all records of ``template_id`` in ``messages`` (fast struct walk).

    Template sets are skipped; any other set id raises ValueError.
    """
    names = [f.name for f in fields]
    start = sum(f.length for f in fields[: names.index(SERIAL_FIELD)])
    size = fields[names.index(SERIAL_FIELD)].length
    rec_len = record_length(fields)
    out: list[int] = []
    for msg in messages:
        off, end = MESSAGE_HEADER.size, header(msg)[1]
        while off + SET_HEADER.size <= end:
            set_id, length = SET_HEADER.unpack_from(msg, off)
            if length < SET_HEADER.size or off + length > end:
                raise ValueError(f"bad set length {length} at offset {off}")
            if set_id == template_id:
                body = off + SET_HEADER.size
                for r in range(body, body + (length - SET_HEADER.size) // rec_len * rec_len, rec_len):
                    out.append(int.from_bytes(msg[r + start:r + start + size], "big"))
            elif set_id not in (TEMPLATE_SET_ID, OPTIONS_TEMPLATE_SET_ID):
                raise ValueError(f"unexpected set id {set_id}")
            off += length
    return out


# --------------------------------------------------------------------------- #
# Loopback peers
# --------------------------------------------------------------------------- #


def wait_until(predicate: Callable[[], Any], what: str = "condition", b: "Balancer | None" = None, *,
               timeout: float = 20.0, diag: Callable[[], str] | None = None):
    """Poll ``predicate`` until it returns something true, and return that. On timeout: AssertionError
    naming ``what``, with ``diag()`` or the balancer ``b``'s log tail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = diag() if diag else (b.log_tail() if b else "")
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail}")
        time.sleep(0.05)


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 that was free a moment ago (``kind`` 'tcp' or 'udp')."""
    with socket.socket(socket.AF_INET, _SOCKTYPE[kind]) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


_SOCKTYPE = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


@dataclass
class _Unit:
    """What arrived from one TCP connection, or one UDP datagram."""

    peer: tuple
    buf: bytearray = field(default_factory=bytearray)
    parsed: int = 0       # end of the last complete message in buf
    messages: int = 0     # complete messages in buf[:parsed]
    bad: bool = False     # a bad header was seen; no further framing
    open: bool = True


class _Sink:
    """A loopback collector served by one thread with a selectors loop.

    Subclasses open the listening socket (``_open``) and turn readable sockets
    into :class:`_Unit` bytes (``_append``).  Everything that touches sockets
    runs in the sink's thread; other threads go through :meth:`_call`.
    """

    kind = ""

    def __init__(self, port: int = 0, *, up: bool = True, host: str = LOOPBACK):
        self.host = host
        self.port = port or (0 if up else free_port(self.kind))
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._units: list[_Unit] = []
        self._total_messages = 0
        self._total_bytes = 0
        self._last_rx = time.monotonic()
        self._sock: socket.socket | None = None       # listener (TCP) / socket (UDP)
        self._readers: dict[socket.socket, Callable] = {}
        self._paused = False
        self._stopping = False
        self._closed = False
        self._ops: list[Callable] = []
        self._ops_lock = threading.Lock()
        self._rxbuf = bytearray(1 << 20)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._thread = threading.Thread(target=self._run, name=f"{type(self).__name__}", daemon=True)
        self._thread.start()
        if up:
            self.up()

    # ---- lifecycle ------------------------------------------------------- #
    def up(self) -> None:
        """Start listening on ``self.port`` (idempotent; the port stays the same)."""
        self._call(self._open_if_down)

    def down(self) -> None:
        """Stop listening and close every connection; what arrived is kept."""
        self._call(self._close_sockets)

    def close(self) -> None:
        """Go down and stop the thread (idempotent).  Data stays readable."""
        if self._closed:
            return
        self.down()
        self._call(self._stop)
        self._thread.join(5)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_up(self) -> bool:
        return self._sock is not None

    @property
    def endpoint(self) -> str:
        """``host/port/proto`` as written in BALANCER_SUB / DUMP_INSERT_PROCESSES."""
        return f"{self.host}/{self.port}/{self.kind}"

    def pause(self) -> None:
        """Stop reading (kernel buffers fill, senders see backpressure/drops)."""
        self._call(self._set_paused, True)

    def resume(self) -> None:
        """Read again after :meth:`pause`."""
        self._call(self._set_paused, False)

    # ---- what arrived ---------------------------------------------------- #
    def _snapshot(self) -> list[bytes]:
        with self._cond:
            return [bytes(u.buf) for u in self._units]

    @property
    def peers(self) -> list[tuple]:
        """Source address of each unit (connection / datagram), in arrival order."""
        with self._cond:
            return [u.peer for u in self._units]

    @property
    def data(self) -> bytes:
        """All bytes received, units concatenated in arrival order."""
        return b"".join(self._snapshot())

    @property
    def bytes_received(self) -> int:
        with self._cond:
            return self._total_bytes

    @property
    def message_count(self) -> int:
        """Complete IPFIX messages received so far (framed incrementally)."""
        with self._cond:
            return self._total_messages

    def messages(self) -> list[bytes]:
        """Complete IPFIX messages, split per unit and concatenated in unit order."""
        with self._cond:
            parts = [bytes(u.buf[:u.parsed]) for u in self._units]
        return [m for part in parts for m in split_messages(part)]

    def wait_messages(self, n: int, timeout: float = 10) -> bool:
        """Wait until at least ``n`` complete messages arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._total_messages >= n, timeout)

    def wait_bytes(self, n: int, timeout: float = 10) -> bool:
        """Wait until at least ``n`` bytes arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._total_bytes >= n, timeout)

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 10) -> bool:
        """Wait until nothing arrived for ``quiet`` seconds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                idle = now - self._last_rx
                if idle >= quiet:
                    return True
                if now >= deadline:
                    return False
                self._cond.wait(min(quiet - idle, deadline - now))

    # ---- loop machinery -------------------------------------------------- #
    def _call(self, fn: Callable, *args):
        """Run ``fn(*args)`` in the sink thread and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        if self._closed or not self._thread.is_alive():
            raise RuntimeError(f"{type(self).__name__} is closed")
        done, box = threading.Event(), {}

        def op():
            try:
                box["result"] = fn(*args)
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            finally:
                done.set()

        with self._ops_lock:
            self._ops.append(op)
        self._wake_w.send(b"!")
        if not done.wait(10):
            raise TimeoutError(f"{type(self).__name__} thread did not answer")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _on_wake(self, sock: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            sock.recv(4096)
        with self._ops_lock:
            ops, self._ops = self._ops, []
        for op in ops:
            op()

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._sel.select(0.5):
                if key.fileobj.fileno() == -1:   # closed earlier in this batch
                    continue
                try:
                    key.data(key.fileobj)
                except Exception as exc:  # keep serving; tests check .errors
                    self.errors.append(f"{type(exc).__name__}: {exc}")
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _stop(self) -> None:
        self._stopping = True

    def _watch(self, sock: socket.socket, handler: Callable) -> None:
        self._readers[sock] = handler
        if not self._paused:
            self._sel.register(sock, selectors.EVENT_READ, handler)

    def _unwatch(self, sock: socket.socket) -> None:
        if self._readers.pop(sock, None) is not None and not self._paused:
            self._sel.unregister(sock)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        for sock, handler in self._readers.items():
            if paused:
                self._sel.unregister(sock)
            else:
                self._sel.register(sock, selectors.EVENT_READ, handler)
        self._paused = paused

    def _open_if_down(self) -> None:
        if self._sock is None:
            self._sock = self._open()
            self.port = self._sock.getsockname()[1]

    def _close_sockets(self) -> None:
        self._close_peers()
        if self._sock is not None:
            if self._sock in self._readers:
                self._unwatch(self._sock)
            else:
                self._sel.unregister(self._sock)
            self._sock.close()
            self._sock = None

    def _new_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, _SOCKTYPE[self.kind])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setblocking(False)
        return s

    def _append(self, unit: _Unit, data) -> None:
        with self._cond:
            unit.buf += data
            self._total_bytes += len(data)
            self._last_rx = time.monotonic()
            if not unit.bad:
                try:
                    for off, length in _complete_messages(unit.buf, unit.parsed):
                        unit.parsed = off + length
                        unit.messages += 1
                        self._total_messages += 1
                except ValueError as exc:
                    unit.bad = True
                    self.errors.append(f"{unit.peer}: {exc}")
            self._cond.notify_all()

    def _new_unit(self, peer: tuple) -> _Unit:
        unit = _Unit(peer)
        with self._cond:
            self._units.append(unit)
            self._cond.notify_all()
        return unit

    # ---- subclass hooks -------------------------------------------------- #
    def _open(self) -> socket.socket:
        raise NotImplementedError

    def _close_peers(self) -> None:
        """Close per-peer sockets (TCP connections); nothing for UDP."""


class TcpSink(_Sink):
    """A TCP collector on 127.0.0.1 recording the bytes of each connection.

    ``TcpSink()`` listens on a fresh port at once; ``TcpSink(port=p, up=False)``
    reserves nothing and starts listening on ``p`` at :meth:`up`.  ``rcvbuf``
    sets SO_RCVBUF (small values make backpressure appear sooner).
    """

    kind = "tcp"

    def __init__(self, port: int = 0, *, up: bool = True, host: str = LOOPBACK, rcvbuf: int | None = None):
        self.rcvbuf = rcvbuf
        super().__init__(port, up=up, host=host)

    @property
    def connections(self) -> list[bytes]:
        """Bytes received per connection, in accept order."""
        return self._snapshot()

    @property
    def connection_count(self) -> int:
        """Connections accepted so far (open or not)."""
        with self._cond:
            return len(self._units)

    @property
    def open_connections(self) -> int:
        with self._cond:
            return sum(u.open for u in self._units)

    def wait_connections(self, n: int, timeout: float = 10) -> bool:
        """Wait until ``n`` connections were accepted in total; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._units) >= n, timeout)

    def drop_connections(self, reset: bool = False) -> int:
        """Close every accepted connection (RST if ``reset``), keep listening.

        Returns how many were closed.
        """
        return self._call(self._close_peers, reset)

    def _open(self) -> socket.socket:
        s = self._new_socket()
        if self.rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        s.bind((self.host, self.port))
        s.listen(128)
        self._sel.register(s, selectors.EVENT_READ, self._on_accept)
        return s

    def _on_accept(self, listener: socket.socket) -> None:
        try:
            conn, addr = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        unit = self._new_unit(addr)
        self._watch(conn, lambda c, u=unit: self._on_data(c, u))

    def _on_data(self, conn: socket.socket, unit: _Unit) -> None:
        for _ in range(16):
            try:
                n = conn.recv_into(self._rxbuf)
            except BlockingIOError:
                return
            except ConnectionError:
                n = 0
            if n == 0:
                self._unwatch(conn)
                conn.close()
                with self._cond:
                    unit.open = False
                return
            self._append(unit, memoryview(self._rxbuf)[:n])

    def _close_peers(self, reset: bool = False) -> int:
        conns = list(self._readers)
        for conn in conns:
            self._unwatch(conn)
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        with self._cond:
            for unit in self._units:
                unit.open = False
        return len(conns)


class UdpSink(_Sink):
    """A UDP collector on 127.0.0.1 recording every datagram and its source."""

    kind = "udp"
    RCVBUF = 32 << 20

    @property
    def datagrams(self) -> list[bytes]:
        """Datagrams received, in arrival order (sources in :attr:`peers`)."""
        return self._snapshot()

    def _open(self) -> socket.socket:
        s = self._new_socket()
        try:  # beyond rmem_max needs CAP_NET_ADMIN
            s.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), self.RCVBUF)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        s.bind((self.host, self.port))
        self._watch(s, self._on_datagram)
        return s

    def _on_datagram(self, sock: socket.socket) -> None:
        for _ in range(256):
            try:
                n, addr = sock.recvfrom_into(self._rxbuf)
            except BlockingIOError:
                return
            self._append(self._new_unit(addr), memoryview(self._rxbuf)[:n])


def _chunks(messages: Sequence[bytes], chunking, seed: int) -> Iterator[bytes]:
    """Cut the concatenated stream per ``chunking`` (see :meth:`TcpExporter.send`)."""
    if chunking == "message":
        yield from messages
        return
    data = b"".join(messages)
    if chunking is None:
        yield data
    elif chunking == "random":
        rng, off = random.Random(seed), 0
        while off < len(data):
            step = rng.randint(1, 3000)
            yield data[off:off + step]
            off += step
    elif isinstance(chunking, int) and chunking > 0:
        for off in range(0, len(data), chunking):
            yield data[off:off + chunking]
    else:
        raise ValueError(f"bad chunking {chunking!r}")


class TcpExporter:
    """One exporter connection to 127.0.0.1:``port`` (TCP_NODELAY, blocking sends)."""

    def __init__(self, port: int, *, host: str = LOOPBACK, src_port: int | None = None, timeout: float = 30):
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(host, src_port) if src_port else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def send(self, messages: Sequence[bytes], chunking=None, *, delay: float = 0.0, seed: int = 0) -> None:
        """Send ``messages`` as one byte stream.

        ``chunking``: None (one sendall), ``"message"`` (one send per message),
        an int n (n-byte pieces cutting through messages) or ``"random"``
        (1..3000-byte pieces from ``seed``).  ``delay`` sleeps between pieces
        so the receiver really sees them apart.
        """
        for chunk in _chunks(messages, chunking, seed):
            self.sock.sendall(chunk)
            if delay:
                time.sleep(delay)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tcp_send(port: int, messages: Sequence[bytes], chunking=None, *, delay: float = 0.0,
             seed: int = 0, host: str = LOOPBACK, timeout: float = 30) -> int:
    """Connect, send ``messages`` (see :meth:`TcpExporter.send`), close; returns the local port."""
    with TcpExporter(port, host=host, timeout=timeout) as exporter:
        exporter.send(messages, chunking, delay=delay, seed=seed)
        return exporter.local_port


def udp_send(port: int, messages: Iterable[bytes], src_port: int | None = None, *,
             delay: float = 0.0, batch: int = 1, host: str = LOOPBACK) -> int:
    """Send each message as one datagram from ``src_port`` (0 = any); returns the source port.

    ``delay`` seconds are slept after every ``batch`` datagrams (pacing, so a
    slow receiver's socket buffer does not overflow).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, src_port or 0))
        for i, msg in enumerate(messages, 1):
            s.sendto(msg, (host, port))
            if delay and i % batch == 0:
                time.sleep(delay)
        return s.getsockname()[1]


# --------------------------------------------------------------------------- #
# The product as a subprocess
# --------------------------------------------------------------------------- #


class BalancerError(AssertionError):
    """The balancer process did not behave (died early, never got ready, ...)."""


def product_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for product subprocesses: the repo on PYTHONPATH, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("IPFIX_BALANCER_USER", "")  # root stays root (tmp dirs are root's): tests/security drops
    env.update(extra or {})
    return env


def fault_env(directory: Path, code: str) -> dict[str, str]:
    """The environment that makes every product process run ``code`` first (a ``sitecustomize`` in
    ``directory``): test-only faults, switched by the files ``code`` looks at."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": f"{directory}:{REPO_ROOT}"}


def forwarding_env(port: int, sinks, mode: str = "RoundRobin", extra: str = "") -> str:
    """The .env of one Fullflow receiver on 127.0.0.1:``port`` forwarding to ``sinks``, plus ``extra`` lines."""
    subs = ",".join(f"127.0.0.1/{s.port}" for s in sinks)
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER[0]={mode}\nIPFIX_FULLFLOW_BALANCER_SUB[0]={subs}\n{extra}")


def run_cli(*args, env: Mapping[str, str] | None = None, timeout: float = 60,
            module: str = "ipfix_balancer", input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ipfix_balancer <args>``; captured text stdout/stderr, no check."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True, text=True, env=product_env(env), timeout=timeout, cwd=REPO_ROOT, input=input,
    )


_NAME_RE = re.compile(r"^([A-Za-z]+)\[(\d+)\]$")


def status_filename(name: str) -> str:
    """``"fullflow[0]"`` -> ``"handler-fullflow-0.json"``."""
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(f"handler name {name!r} is not like 'fullflow[0]'")
    return f"handler-{m.group(1).lower()}-{m.group(2)}.json"


def _read_json(path: Path) -> dict | None:
    """The JSON in ``path``, or None when it does not exist (retries torn reads)."""
    for _ in range(20):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            time.sleep(0.01)
    raise BalancerError(f"{path} does not hold valid JSON")


class Balancer:
    """The real product run as ``python -m ipfix_balancer run`` in ``tmp_path``.

    Writes ``env_text`` (dedented) to ``tmp_path/balancer.env``, runs with
    ``--run-dir tmp_path/run --log-format json``, stdout+stderr appended to
    ``tmp_path/balancer.log``.  Started at construction unless ``start=False``;
    the process runs in its own session and is killed (with every descendant)
    on context exit.
    """

    def __init__(self, tmp_path, env_text: str, *, start: bool = True, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, module: str = "ipfix_balancer", dedent: bool = True):
        self.dir = Path(tmp_path)
        self.config_path = self.dir / "balancer.env"
        self.run_dir = self.dir / "run"
        self.log_path = self.dir / "balancer.log"
        self.args = tuple(args)
        self.env = dict(env or {})
        self.module = module
        self.proc: subprocess.Popen | None = None
        self.orphans: list[int] = []   # descendants still alive after the last stop()
        self.write_config(env_text, dedent=dedent)
        if start:
            self.start()

    # ---- process control ------------------------------------------------- #
    def write_config(self, env_text: str, *, dedent: bool = True) -> None:
        """(Re)write the .env file (then :meth:`reload` or restart to apply)."""
        self.config_path.write_text(textwrap.dedent(env_text).lstrip() if dedent else env_text)

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, "run", "--config", str(self.config_path),
                "--run-dir", str(self.run_dir), "--log-format", "json", *self.args]

    def start(self) -> "Balancer":
        if self.running:
            raise BalancerError("balancer already running")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=product_env(self.env), cwd=REPO_ROOT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def reload(self) -> None:
        """SIGHUP the supervisor."""
        self.send_signal(signal.SIGHUP)

    def wait_exit(self, timeout: float = 15) -> int:
        """Wait for the process to exit by itself; returns its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BalancerError(f"balancer still running after {timeout}s\n{self.log_tail()}") from None

    def _descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit code.

        Descendants still alive 2 s after the supervisor exited are listed in
        :attr:`orphans` and killed.  Raises BalancerError (after SIGKILL) if the
        supervisor does not exit within ``timeout``.
        """
        if self.proc is None:
            raise BalancerError("balancer was never started")
        children = self._descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BalancerError(f"balancer did not exit within {timeout}s of SIGTERM\n{self.log_tail()}") from None
        _, alive = psutil.wait_procs(children, timeout=2)
        self.orphans = [p.pid for p in alive]
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        return rc

    def kill(self) -> None:
        """SIGKILL the supervisor and all its descendants."""
        if self.proc is None or self.proc.poll() is not None:
            return   # exited and reaped: its pid (and group id) may be reused
        procs = self._descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)   # the session we created
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait(5)

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.running:
            with contextlib.suppress(BalancerError):
                self.stop()
        self.kill()

    # ---- run directory --------------------------------------------------- #
    def supervisor(self) -> dict | None:
        """``run/supervisor.json`` or None when not written yet."""
        return _read_json(self.run_dir / "supervisor.json")

    def status_path(self, name: str) -> Path:
        return self.run_dir / status_filename(name)

    def status(self, name: str) -> dict:
        """The status JSON of handler ``name`` (e.g. ``"fullflow[0]"``)."""
        st = _read_json(self.status_path(name))
        if st is None:
            raise BalancerError(f"no status file {self.status_path(name)}\n{self.log_tail()}")
        return st

    def handler_pid(self, name: str) -> int:
        """The pid of handler ``name`` as recorded by the supervisor."""
        for h in (self.supervisor() or {}).get("handlers", []):
            if h.get("name") == name:
                return h["pid"]
        return self.status(name)["pid"]

    def _not_ready(self) -> str | None:
        """Why the balancer is not ready yet, or None when it is."""
        sup = self.supervisor()
        if sup is None:
            return "no supervisor.json"
        if sup.get("pid") != self.pid:
            return f"supervisor.json pid {sup.get('pid')} is not the process {self.pid}"
        for h in sup.get("handlers", []):
            st = _read_json(self.status_path(h["name"]))
            if st is None:
                return f"no status file for {h['name']}"
            if h.get("pid") is not None and st.get("pid") != h["pid"]:
                return f"status of {h['name']} is from pid {st.get('pid')}, handler is {h['pid']}"
            if (st.get("listen") or {}).get("listening") is not True:
                return f"{h['name']} not listening: {st.get('listen')}"
        return None

    def wait_ready(self, timeout: float = 15) -> dict[str, dict]:
        """Wait until every handler in supervisor.json reports ``listen.listening``.

        Status files must come from the current processes (pids checked).
        Returns ``{name: status}``; raises BalancerError on exit or timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise BalancerError(f"balancer exited with {self.proc.returncode} before ready\n{self.log_tail()}")
            why = self._not_ready()
            if why is None:
                return {h["name"]: self.status(h["name"]) for h in self.supervisor().get("handlers", [])}
            if time.monotonic() > deadline:
                raise BalancerError(f"balancer not ready after {timeout}s: {why}\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_status(self, name: str, predicate: Callable[[dict], bool], timeout: float = 10) -> dict:
        """Poll handler ``name``'s status until ``predicate(status)``; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            st = _read_json(self.status_path(name))
            if st is not None and predicate(st):
                return st
            if time.monotonic() > deadline:
                raise BalancerError(f"status of {name} never matched; last: {st}\n{self.log_tail()}")
            time.sleep(0.1)

    # ---- logs ------------------------------------------------------------ #
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "--- balancer.log (tail) ---\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def logs(self) -> list[dict]:
        """The JSON log lines (non-JSON lines, e.g. tracebacks, are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def wait_log(self, match: str | Callable[[dict], bool], timeout: float = 10) -> dict:
        """Wait for a JSON log line whose ``event`` equals ``match`` (or ``match(line)``)."""
        pred = match if callable(match) else (lambda line: line.get("event") == match)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.logs():
                if pred(line):
                    return line
            if time.monotonic() > deadline:
                raise BalancerError(f"no log line matching {match!r} within {timeout}s\n{self.log_tail()}")
            time.sleep(0.1)


def manual_receivers(text: str) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """STREAM -> (listening port, [(collector host, port), ...]) of receiver [0] in the manual's example
    (etc/manual-example.env) or a file made from it."""
    out = {}
    for stream in ("FULLFLOW", "CLICKSTREAM", "DNSFLOW"):
        port = int(re.search(rf"^IPFIX_{stream}_PORT\[0\]=(\d+)$", text, re.M).group(1))
        subs = re.search(rf"^IPFIX_{stream}_BALANCER_SUB\[0\]=(\S+)$", text, re.M).group(1)
        out[stream] = (port, [(h, int(p)) for h, p in (s.split("/") for s in subs.split(","))])
    return out


class InNs:
    """Sockets made in this block belong to namespace ``name`` (setns on this thread only; threads started
    here stay there)."""

    def __init__(self, netns, name):
        self.netns, self.name = netns, name

    def __enter__(self):
        self.netns.pushns(self.name)

    def __exit__(self, *exc):
        self.netns.popns()


def link_up(netns_name: str, ifname: str, addrs: Iterable[str], prefixlen: int = 24) -> None:
    """In network namespace ``netns_name``: loopback up, ``ifname`` up with ``addrs`` (pyroute2)."""
    from pyroute2 import NetNS
    with NetNS(netns_name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        index = ns.link_lookup(ifname=ifname)[0]
        for addr in addrs:
            ns.addr("add", index=index, address=addr, prefixlen=prefixlen)
        ns.link("set", index=index, state="up")
