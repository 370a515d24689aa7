"""IPFIX template state per exporter session (RFC 7011 §3.4, §8).

The balancer forwards whole messages, but IPFIX is stateful: a data set can only be decoded with the template
it references, scoped by (transport session, Observation Domain ID). ``TemplateTracker`` follows the template
and options template sets of one exporter session so that

* messages carrying templates can be sent to every collector (``inspect`` returns them, or a template-only copy),
* a collector that (re)connects first gets the current templates (``Snapshot.messages``),
* each collector's header sequence number can be rewritten gap-free (``inspect`` counts data records).

Hot path: ``inspect`` runs for every message. It reads the message header, the set headers and the template
sets, never the contents of data records. A fixed-length template's records are counted by one division; only
templates with variable-length fields (length 65535) make it walk the records' length prefixes.

Template state is copy-on-write: every change (add, redefine, withdraw) publishes a new immutable ``Snapshot``,
so whoever holds a snapshot keeps "the templates valid at that point of the stream" without copying anything.
"""

from __future__ import annotations

import struct
from typing import Callable, Iterable

from .wire import (HEADER, HEADER_LEN, MAX_MESSAGE, MIN_DATA_SET, ODID, OPTIONS_TEMPLATE_SET, SET_HEADER,
                   SET_HEADER_LEN, TEMPLATE_SET, U32, VERSION)

__all__ = ["EMPTY", "Snapshot", "TemplateTracker"]

VARLEN = 65535  # field length in a template: the record carries the length

_U16 = struct.Struct("!H")
_NO_LAYOUT: dict = {}              # shared, never written: lookups for an ODID without templates
_FIRST_SET_END = HEADER_LEN + 4
# bound methods at module level: one global lookup each on the hot path
_unpack_set = SET_HEADER.unpack_from
_unpack_odid = U32.unpack_from
_unpack_first = struct.Struct("!12xIHH").unpack_from  # header up to the ODID, then the first set header


class Snapshot:
    """Immutable view of one session's templates at one point of the stream.

    A new Snapshot is created whenever a template is added, redefined or withdrawn (copy-on-write), so a queue
    entry can keep a reference to "the templates valid when this message was dispatched" for free.
    """

    __slots__ = ("_domains", "_count", "_bodies")

    def __init__(self, domains: dict[int, dict[int, tuple[int, bytes]]]):
        # odid -> template id -> (set id 2|3, template record bytes as received). Never mutated after creation.
        self._domains = domains
        self._count = sum(len(d) for d in domains.values())
        self._bodies: tuple[tuple[int, bytes], ...] | None = None

    def odids(self) -> Iterable[int]:
        return self._domains.keys()

    def domain(self, odid: int):
        """The templates of one ODID (template id -> (set id, record bytes)), or None. Shared, not copied:
        equal objects mean equal templates, the same object means nothing changed."""
        return self._domains.get(odid)

    def replace_domain(self, odid: int, templates: dict) -> Snapshot:
        """A new snapshot with ``odid``'s templates replaced (an empty dict removes the ODID)."""
        domains = dict(self._domains)
        if templates:
            domains[odid] = templates
        else:
            domains.pop(odid, None)
        return Snapshot(domains)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<Snapshot {self._count} templates in {len(self._domains)} ODIDs>"

    def messages(self, seq_for: Callable[[int], int], export_time: int) -> list[bytes]:
        """IPFIX messages holding every current template and options template record, per ODID.

        Each message: version 10, the ODID, sequence number ``seq_for(odid)``, export time ``export_time``;
        none exceeds 65535 bytes. ``[]`` when there are no templates.
        """
        bodies = self._bodies
        if bodies is None:
            bodies = self._bodies = self._build_bodies()
        out = []
        pack = HEADER.pack
        seqs: dict[int, int] = {}
        for odid, body in bodies:
            seq = seqs.get(odid)
            if seq is None:
                seq = seqs[odid] = seq_for(odid) & 0xFFFFFFFF
            out.append(pack(VERSION, HEADER_LEN + len(body), export_time & 0xFFFFFFFF, seq, odid) + body)
        return out

    def _build_bodies(self) -> tuple[tuple[int, bytes], ...]:
        """(odid, message body) pairs; computed once per snapshot since it never changes."""
        limit = MAX_MESSAGE - HEADER_LEN
        result = []
        for odid, domain in self._domains.items():
            parts: list[bytes] = []       # sets of the message being filled
            used = 0                      # bytes of those sets
            for kind in (TEMPLATE_SET, OPTIONS_TEMPLATE_SET):
                records: list[bytes] = []
                set_len = SET_HEADER_LEN
                for k, raw in domain.values():
                    if k != kind:
                        continue
                    if used + set_len + len(raw) > limit:
                        if records:
                            parts.append(SET_HEADER.pack(kind, set_len) + b"".join(records))
                            used += set_len
                        result.append((odid, b"".join(parts)))
                        parts, used, records, set_len = [], 0, [], SET_HEADER_LEN
                    records.append(raw)
                    set_len += len(raw)
                if records:
                    parts.append(SET_HEADER.pack(kind, set_len) + b"".join(records))
                    used += set_len
            if parts:
                result.append((odid, b"".join(parts)))
        return tuple(result)


EMPTY = Snapshot({})


def _layout(msg, pos: int, end: int, field_count: int):
    """Parse ``field_count`` field specifiers at ``pos``.

    Returns (end of the specifiers, layout) or (-1, None) when they run past ``end``. The layout is what
    counting needs: an int (fixed record length), a tuple (minimum record length, fixed bytes before the first
    variable-length field, fixed bytes after each variable-length field), or None when a record would be empty.
    """
    unpack = SET_HEADER.unpack_from
    gaps = []
    fixed = 0
    for _ in range(field_count):
        if pos + 4 > end:
            return -1, None
        ie, length = unpack(msg, pos)
        pos += 8 if ie & 0x8000 else 4
        if length == VARLEN:
            gaps.append(fixed)
            fixed = 0
        else:
            fixed += length
    if pos > end:  # enterprise number cut off
        return -1, None
    if not gaps:
        return pos, (fixed or None)
    gaps.append(fixed)
    return pos, (sum(gaps) + len(gaps) - 1, gaps[0], tuple(gaps[1:]))


def _count_variable(msg, pos: int, end: int, layout) -> tuple[int, bool]:
    """Count records with variable-length fields in ``msg[pos:end]``: (count, True if a record overran)."""
    min_len, first, rest = layout
    n = 0
    if len(rest) == 1:
        # One variable-length field (the common case): a record start at most end - min_len puts its length
        # byte inside the set, so only the 3-byte form needs a bounds check.
        gap = rest[0] + 1
        last = end - min_len
        while pos <= last:
            p = pos + first
            length = msg[p]
            if length < 255:
                pos = p + length + gap
            else:
                if p + 3 > end:
                    return n, True
                pos = p + ((msg[p + 1] << 8) | msg[p + 2]) + 2 + gap
            n += 1
        if pos > end:
            return n - 1, True
        return n, False
    while end - pos >= min_len:
        p = pos + first
        for gap in rest:
            if p >= end:
                return n, True
            length = msg[p]
            if length < 255:
                p += length + 1 + gap
            else:
                if p + 3 > end:
                    return n, True
                p += ((msg[p + 1] << 8) | msg[p + 2]) + 3 + gap
        if p > end:
            return n, True
        n += 1
        pos = p
    return n, False


class TemplateTracker:
    """Templates of one exporter session (one TCP connection, or one UDP exporter address+port)."""

    __slots__ = ("snapshot", "unknown_template", "malformed_sets", "_layouts")

    def __init__(self) -> None:
        self.snapshot: Snapshot = EMPTY
        self.unknown_template = 0   # data sets whose template is unknown
        # sets with impossible lengths; also template records that are malformed or run past their set, and
        # data sets whose last variable-length record runs past the set end
        self.malformed_sets = 0
        # odid -> template id -> layout (see _layout); only templates whose data can be counted
        self._layouts: dict[int, dict[int, object]] = {}

    def inspect(self, msg: memoryview) -> tuple[int, int, object]:
        """-> (odid, data_record_count, tmpl) for one whole message (header already validated by framing).

        ``tmpl`` is None when the message has no (options) template sets; ``msg`` itself when all its sets are
        template/options template sets; otherwise a new bytes IPFIX message with the same header (length
        adjusted) holding only its template and options template sets, in order. Template sets update the
        tracker. A data set with an unknown template counts in ``unknown_template`` and contributes 0 records.
        Sets 4..255 are skipped. A set shorter than 4 bytes or running past the message end counts in
        ``malformed_sets`` and ends the walk. Never raises on set contents.
        """
        end = len(msg)
        if end < _FIRST_SET_END:  # no room for a set header: nothing to walk
            if end > HEADER_LEN:
                self.malformed_sets += 1
            return _unpack_odid(msg, ODID)[0], 0, None
        odid, set_id, set_len = _unpack_first(msg)  # ODID and first set header in one call
        layouts = self._layouts.get(odid, _NO_LAYOUT)
        if set_len == end - HEADER_LEN and set_id >= MIN_DATA_SET:
            layout = layouts.get(set_id)  # the common message: one data set of fixed-length records
            if layout.__class__ is int:
                return odid, (set_len - 4) // layout, None
        pos = HEADER_LEN
        count = 0
        tsets = None
        work = None
        while True:
            nxt = pos + set_len
            if set_len < 4 or nxt > end:
                self.malformed_sets += 1
                break
            if set_id >= MIN_DATA_SET:
                layout = layouts.get(set_id)
                if layout is None:
                    self.unknown_template += 1
                elif layout.__class__ is int:
                    count += (set_len - 4) // layout
                else:
                    n, overran = _count_variable(msg, pos + 4, nxt, layout)
                    count += n
                    if overran:
                        self.malformed_sets += 1
            elif set_id == TEMPLATE_SET or set_id == OPTIONS_TEMPLATE_SET:
                if tsets is None:
                    tsets = []
                tsets.append((pos, nxt))
                work = self._template_set(msg, pos + 4, nxt, set_id, odid, work)
                layouts = self._layouts.get(odid, _NO_LAYOUT)
            # set ids 4..255 are reserved: skipped
            pos = nxt
            if pos + 4 > end:
                if pos != end:  # 1..3 stray bytes: not even a set header
                    self.malformed_sets += 1
                break
            set_id, set_len = _unpack_set(msg, pos)
        if tsets is None:
            return odid, count, None
        if work is not None:
            self.snapshot = self.snapshot.replace_domain(odid, work)
        if sum(b - a for a, b in tsets) == end - HEADER_LEN:
            return odid, count, msg
        body = [msg[a:b] for a, b in tsets]
        size = HEADER_LEN + sum(b - a for a, b in tsets)
        version, _, export_time, seq, _ = HEADER.unpack_from(msg)
        return odid, count, b"".join([HEADER.pack(version, size, export_time, seq, odid), *body])

    def _template_set(self, msg, pos: int, end: int, kind: int, odid: int, work):
        """Apply one (options) template set's records; returns the copy-on-write template dict of ``odid``.

        ``work`` is that dict when this message already changed something, else None (copied on first change).
        """
        unpack = SET_HEADER.unpack_from
        old = self.snapshot.domain(odid)
        layouts = self._layouts.get(odid)
        while end - pos >= 4:  # fewer than 4 bytes left: padding
            start = pos
            tid, field_count = unpack(msg, pos)
            if field_count == 0:
                pos += 4
                current = work if work is not None else old
                if tid == kind:  # withdraw all templates of this kind in this ODID
                    if current and any(k == kind for k, _ in current.values()):
                        if work is None:
                            work = dict(old)
                        for t in [t for t, (k, _) in work.items() if k == kind]:
                            del work[t]
                            if layouts is not None:
                                layouts.pop(t, None)
                elif tid < MIN_DATA_SET:
                    self.malformed_sets += 1
                elif current and tid in current:  # withdraw one
                    if work is None:
                        work = dict(old)
                    del work[tid]
                    if layouts is not None:
                        layouts.pop(tid, None)
                continue
            if kind == OPTIONS_TEMPLATE_SET:
                if pos + 6 > end:
                    self.malformed_sets += 1
                    return work
                scope_count = _U16.unpack_from(msg, pos + 4)[0]
                pos += 6
            else:
                scope_count = 1
                pos += 4
            pos, layout = _layout(msg, pos, end, field_count)
            if pos < 0:  # the record runs past the set: nothing after it can be found
                self.malformed_sets += 1
                return work
            if tid < MIN_DATA_SET or scope_count == 0 or scope_count > field_count:
                self.malformed_sets += 1
                continue
            raw = bytes(msg[start:pos])
            current = work if work is not None else old
            entry = (kind, raw)
            if current is not None and current.get(tid) == entry:
                continue  # re-sent unchanged (template refresh): no new snapshot
            if work is None:
                work = dict(old) if old else {}
            work[tid] = entry
            if layouts is None:
                layouts = self._layouts[odid] = {}
            if layout is None:
                layouts.pop(tid, None)  # empty records: data sets count as unknown template
            else:
                layouts[tid] = layout
        if layouts is not None and not layouts:
            self._layouts.pop(odid, None)
        return work
