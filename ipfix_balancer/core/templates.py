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

Template state is versioned: the changes one message makes (add, redefine, withdraw) bump the session's version
and publish a ``Snapshot`` (the session's store, that version). The store keeps the current templates, each
stamped with the version it appeared in, and only those replaced or withdrawn records that a snapshot still held
somewhere (a queued message) may need. So a change costs O(1) amortised whatever is queued, and a snapshot still
gives "the templates valid at that point of the stream".

Hostile input (README "Hostile input"): a message whose set structure does not parse raises ``MalformedSet`` and
changes nothing; one whose templates would take the session over its ``TemplateLimits`` raises
``TemplateLimit`` and changes nothing.
"""

from __future__ import annotations

import bisect
import struct
from collections import deque
from collections.abc import Mapping
from itertools import repeat
from operator import floordiv, sub
from typing import Callable, Iterable, Never, TypeAlias

from ..config.model import TemplateLimits
from .wire import (HEADER, HEADER_LEN, MAX_MESSAGE, MIN_DATA_SET, ODID, OPTIONS_TEMPLATE_SET, SET_HEADER,
                   SET_HEADER_LEN, TEMPLATE_SET, U32, VERSION, FramingError, Message)

__all__ = ["EMPTY", "MalformedSet", "Snapshot", "TemplateLimit", "TemplateTracker"]

VARLEN = 65535  # field length in a template: the record carries the length
#: what one template costs beyond its record bytes in TEMPLATE_BYTES_MAX (bookkeeping objects), so that the
#: bound on bytes is also a bound on memory for many tiny templates
TEMPLATE_OVERHEAD = 64

#: one ODID's templates as a snapshot gives them: template id -> (set id, record bytes)
Domain: TypeAlias = dict[int, tuple[int, bytes]]
#: a variable-length layout (see ``_layout``): (minimum record length, fixed bytes before the first
#: variable-length field, fixed bytes after each variable-length field)
VarLayout: TypeAlias = tuple[int, int, tuple[int, ...]]
#: what counting a data set's records needs: the fixed record length, or a VarLayout
Layout: TypeAlias = int | VarLayout
#: one message's definition of a template: (set id, record bytes, layout; None when a record would be empty)
_Definition: TypeAlias = tuple[int, bytes, Layout | None]
#: a stored template: (set id 2|3, record bytes as received, version it appeared in)
_Stored: TypeAlias = tuple[int, bytes, int]
#: a replaced or withdrawn template (``_Store.retired``): (version it ended, version it appeared, odid,
#: template id, set id, record)
_Retired: TypeAlias = tuple[int, int, int, int, int, bytes]

_U16 = struct.Struct("!H")
_NO_LAYOUT: Mapping[int, Never] = {}  # shared, never written: lookups for an ODID without templates
_FIRST_SET_END = HEADER_LEN + 4
# bound methods at module level: one global lookup each on the hot path
_unpack_set = SET_HEADER.unpack_from
_unpack_odid = U32.unpack_from
_unpack_first = struct.Struct("!12xIHH").unpack_from  # header up to the ODID, then the first set header


class MalformedSet(FramingError):
    """The message's set structure does not parse (``reason`` names how): drop the message, keep the session,
    whose message boundaries are intact."""


class TemplateLimit(FramingError):
    """Accepting the message's templates would take the session over one of its ``TemplateLimits``."""


class _Store:
    """The versioned templates of one session (see the module docstring); only ``TemplateTracker`` writes it.

    ``domains``: odid -> template id -> (set id 2|3, record bytes as received, version it appeared in).
    ``retired``: (version it ended, version it appeared, odid, template id, set id, record), in the order they
    ended, kept while a live snapshot may see it: dropped from the front once every live snapshot is newer than
    its end, and by a compaction (when the list doubled) once no live snapshot falls between its two versions.
    So it holds at most one record per template id and live snapshot, and never more than the changes since
    the oldest live snapshot.
    """

    __slots__ = ("version", "domains", "kinds", "changed", "retired", "count", "nbytes", "odids", "_views",
                 "_live", "_dead", "_compact_at")

    def __init__(self) -> None:
        self.version = 0
        self.domains: dict[int, dict[int, _Stored]] = {}
        # odid -> set id -> its template ids: a withdraw-all visits only the templates it withdraws
        self.kinds: dict[int, dict[int, set[int]]] = {}
        self.changed: dict[int, int] = {}   # odid -> version of its last change
        self.retired: deque[_Retired] = deque()
        self.count = 0       # current templates
        self.nbytes = 0      # current record bytes + TEMPLATE_OVERHEAD each
        self.odids = 0       # ODIDs with at least one current template
        self._views: dict[int, Domain | None] = {}  # odid -> its current templates
        self._live: deque[int] = deque()   # versions of the snapshots published, oldest first
        self._dead: set[int] = set()       # of those, released out of order
        self._compact_at = 64         # compact ``retired`` when it grows past this

    def publish(self, odid: int) -> Snapshot:
        """The current version, after a change to ``odid``'s templates."""
        self.changed[odid] = self.version
        self._views.pop(odid, None)
        self._live.append(self.version)
        return Snapshot(self, self.version, self.count)

    def retire(self, record: _Retired) -> None:
        self.retired.append(record)
        if len(self.retired) > self._compact_at:
            self._compact()

    def _compact(self) -> None:
        """Forget the records and versions no live snapshot needs. Run when ``retired`` or the versions
        released out of order doubled since the last run: O(log live) amortised per change."""
        live = [v for v in self._live if v not in self._dead]  # increasing: published in order
        self._live, self._dead = deque(live), set()
        self.retired = deque(r for r in self.retired if _sees(live, r[1], r[0]))
        self._compact_at = 2 * max(len(self.retired), len(live)) + 64

    def release(self, version: int) -> None:
        """A snapshot was freed: forget the retired records no live snapshot can see (amortised O(1))."""
        live, dead = self._live, self._dead
        if live[0] != version:
            dead.add(version)
            if len(dead) > self._compact_at:
                self._compact()
            return
        live.popleft()
        while live and live[0] in dead:
            dead.discard(live.popleft())
        floor = live[0] if live else self.version + 1
        retired, domains, changed = self.retired, self.domains, self.changed
        while retired and retired[0][0] <= floor:
            odid = retired.popleft()[2]
            if not domains.get(odid) and changed.get(odid, floor + 1) <= floor:
                domains.pop(odid, None)  # emptied, and no snapshot from before that is left
                self.kinds.pop(odid, None)
                del changed[odid]
                self._views.pop(odid, None)

    def view(self, odid: int) -> Domain | None:
        """The current templates of ``odid`` as an immutable-by-contract dict, built once per change."""
        views = self._views
        if odid in views:
            return views[odid]
        domain = self.domains.get(odid)
        view = views[odid] = {tid: (kind, raw) for tid, (kind, raw, _) in domain.items()} if domain else None
        return view

    def view_at(self, odid: int, version: int) -> Domain | None:
        """The templates of ``odid`` at ``version`` (a snapshot older than the ODID's last change)."""
        out: Domain = {tid: (kind, raw) for tid, (kind, raw, since) in self.domains.get(odid, _NO_LAYOUT).items()
                       if since <= version}
        for until, since, o, tid, kind, raw in self.retired:
            if o == odid and since <= version < until:
                out[tid] = (kind, raw)
        return out or None


def _sees(live: list[int], since: int, until: int) -> bool:
    """True when a version in the sorted list ``live`` is in [since, until)."""
    i = bisect.bisect_left(live, since)
    return i < len(live) and live[i] < until


class Snapshot:
    """Immutable view of one session's templates at one point of the stream (a version of its store).

    One Snapshot is published per message that changes templates, and every queue entry dispatched until the
    next change shares it, so a queued message keeps "the templates valid when it was dispatched" for free.
    """

    __slots__ = ("_store", "_version", "_count", "_bodies", "_views")

    def __init__(self, store: _Store | None, version: int, count: int):
        self._store = store
        self._version = version
        self._count = count
        self._bodies: tuple[tuple[int, bytes], ...] | None = None
        self._views: dict[int, Domain | None] | None = None   # of ODIDs changed since this version, on demand

    def __del__(self) -> None:
        # A snapshot is shared by every queue entry dispatched under it (queued, or kept until acknowledged) and by
        # the recorder's file scope; no one owns it, so none can say when it is done. CPython's reference counting
        # runs this the moment the last holder lets go, which is what lets ``_Store.release`` forget retired records
        # at once: the store's bound ("never more than the changes since the oldest live snapshot") and
        # tests/core/test_templates.py (``del kept`` then ``retired`` is empty) rely on it. Holders must keep
        # snapshots out of reference cycles (a cycle delays this to the cyclic GC: memory held, not a wrong result).
        # It runs once per object (PEP 442), so each version is released once.
        if self._store is not None:
            self._store.release(self._version)

    def odids(self) -> Iterable[int]:
        store = self._store
        return [] if store is None else [odid for odid in store.domains if self.domain(odid)]

    def domain(self, odid: int) -> Domain | None:
        """The templates of one ODID (template id -> (set id, record bytes)), or None. Shared, not copied:
        equal objects mean equal templates, the same object means nothing changed."""
        store = self._store
        if store is None:
            return None
        changed = store.changed.get(odid)
        if changed is None:
            return None
        if changed <= self._version:
            return store.view(odid)
        views = self._views
        if views is None:
            views = self._views = {}
        if odid not in views:
            views[odid] = store.view_at(odid, self._version)
        return views[odid]

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<Snapshot version {self._version}: {self._count} templates>"

    def messages(self, seq_for: Callable[[int], int], export_time: int) -> list[bytes]:
        """IPFIX messages holding every current template and options template record, per ODID.

        Each message: version 10, the ODID, sequence number ``seq_for(odid)``, export time ``export_time``;
        none exceeds 65535 bytes. ``[]`` when there are no templates.
        """
        bodies = self._bodies
        if bodies is None:
            bodies = self._bodies = self._build_bodies()
        out: list[bytes] = []
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
        result: list[tuple[int, bytes]] = []
        for odid in self.odids():
            domain = self.domain(odid)
            assert domain is not None  # odids() lists only ODIDs with templates
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


EMPTY = Snapshot(None, 0, 0)


def _layout(msg: Message, pos: int, end: int, field_count: int) -> tuple[int, Layout | None]:
    """Parse ``field_count`` field specifiers at ``pos``; raises MalformedSet when they run past ``end``.

    Returns (end of the specifiers, layout). The layout is what counting needs: an int (fixed record length),
    a tuple (minimum record length, fixed bytes before the first variable-length field, fixed bytes after each
    variable-length field), or None when a record would be empty.
    """
    unpack = SET_HEADER.unpack_from
    gaps: list[int] = []
    fixed = 0
    for _ in range(field_count):
        if pos + 4 > end:
            raise MalformedSet("template_past_set", f"a template record declares {field_count} fields, more "
                                                    "than its set holds")
        ie, length = unpack(msg, pos)
        pos += 8 if ie & 0x8000 else 4
        if length == VARLEN:
            gaps.append(fixed)
            fixed = 0
        else:
            fixed += length
    if pos > end:
        raise MalformedSet("enterprise_truncated", "the last field specifier's enterprise number is cut off "
                                                   "by the end of its set")
    if not gaps:
        return pos, (fixed or None)
    gaps.append(fixed)
    return pos, (sum(gaps) + len(gaps) - 1, gaps[0], tuple(gaps[1:]))


def _count_variable(msg: Message, pos: int, end: int, layout: VarLayout) -> tuple[int, bool]:
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


class TemplatePool:
    """Template bytes of every session of a handler together, against one ``limit``: TEMPLATE_BYTES_MAX
    bounds a session, this bounds their sum (1,000 sessions at 1 MiB each would be 1 GiB)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0


class TemplateTracker:
    """Templates of one exporter session (one TCP connection, or one UDP exporter address+port)."""

    __slots__ = ("snapshot", "unknown_template", "limits", "pool", "_pooled", "_store", "_layouts")

    def __init__(self, limits: TemplateLimits | None = None) -> None:
        self.snapshot: Snapshot = EMPTY
        self.unknown_template = 0   # data sets whose template is unknown
        self.limits = limits        # None: unbounded (templates a predecessor already accepted)
        self._store: _Store | None = None
        # odid -> template id -> layout (see _layout); only templates whose data can be counted
        self._layouts: dict[int, dict[int, Layout]] = {}
        self.pool: TemplatePool | None = None  # the handler's, once it has one for this session
        self._pooled = 0  # bytes charged to the pool (not a predecessor's templates, learnt before it)

    def inspect(self, msg: Message) -> tuple[int, int, Message | None]:
        """-> (odid, data_record_count, tmpl) for one whole message (header already validated by framing).

        ``tmpl`` is None when the message has no (options) template sets; ``msg`` itself when all its sets are
        template/options template sets; otherwise a new bytes IPFIX message with the same header (length
        adjusted) holding only its template and options template sets, in order. Template sets update the
        tracker. A data set with an unknown template counts in ``unknown_template`` and contributes 0 records
        (forwarded: the template may have been sent before the balancer saw the session). A set with a reserved
        id (0, 1, 4..255) makes the message malformed. Raises MalformedSet or TemplateLimit, and then changes
        nothing.
        """
        end = len(msg)
        if end < _FIRST_SET_END:  # no room for a set header: nothing to walk
            if end > HEADER_LEN:
                raise MalformedSet("stray_bytes", f"{end - HEADER_LEN} bytes after the header, too few for a set")
            return _unpack_odid(msg, ODID)[0], 0, None
        odid, set_id, set_len = _unpack_first(msg)  # ODID and first set header in one call
        layouts = self._layouts.get(odid, _NO_LAYOUT)
        if set_len == end - HEADER_LEN and set_id >= MIN_DATA_SET:
            layout = layouts.get(set_id)  # the common message: one data set of fixed-length records
            if layout.__class__ is int:  # (not isinstance: no call, per message)
                return odid, (set_len - 4) // layout, None
        pos = HEADER_LEN
        count = unknown = 0
        tsets: list[tuple[int, int]] | None = None  # (start, end) of each template set
        pending: _Pending | None = None  # this message's template changes, applied once the whole message parsed
        while True:
            nxt = pos + set_len
            if set_len < 4:
                raise MalformedSet("set_length", f"set {set_id} at offset {pos}: length {set_len}, less than 4")
            if nxt > end:
                raise MalformedSet("set_past_end", f"set {set_id} at offset {pos}: length {set_len} runs past "
                                                   f"the message end ({end})")
            if set_id >= MIN_DATA_SET:
                layout = layouts.get(set_id) if pending is None else pending.layout(set_id, layouts)
                if layout is None:
                    unknown += 1
                elif layout.__class__ is int:
                    count += (set_len - 4) // layout
                else:
                    # (a VarLayout: the type checker narrows ``__class__ is int`` only where it holds)
                    n, overran = _count_variable(msg, pos + 4, nxt, layout)  # type: ignore[arg-type]
                    if overran:
                        raise MalformedSet("varlen_past_end", f"data set {set_id} at offset {pos}: a "
                                                              "variable-length field runs past the set end")
                    count += n
            elif set_id == TEMPLATE_SET or set_id == OPTIONS_TEMPLATE_SET:
                if tsets is None:
                    tsets = []
                    pending = _Pending(self._store, odid)
                tsets.append((pos, nxt))
                _template_set(msg, pos + 4, nxt, set_id, pending)  # type: ignore[arg-type]  # set with tsets
            else:  # no collector can read it, and it is not ours to forward
                raise MalformedSet("reserved_set_id", f"set id {set_id} at offset {pos} is reserved (0, 1, 4..255)")
            pos = nxt
            if pos + 4 > end:
                if pos != end:
                    raise MalformedSet("stray_bytes", f"{end - pos} bytes after the last set, too few for a set")
                break
            set_id, set_len = _unpack_set(msg, pos)
        if tsets is None:
            self.unknown_template += unknown
            return odid, count, None
        self._commit(odid, pending)  # type: ignore[arg-type]  # set with tsets
        self.unknown_template += unknown
        if sum(b - a for a, b in tsets) == end - HEADER_LEN:
            return odid, count, msg
        body = [msg[a:b] for a, b in tsets]
        size = HEADER_LEN + sum(b - a for a, b in tsets)
        version, _, export_time, seq, _ = HEADER.unpack_from(msg)
        return odid, count, b"".join([HEADER.pack(version, size, export_time, seq, odid), *body])

    def inspect_data_run(self, msgs: list[Message]) -> tuple[int, list[int]] | None:
        """The common run, in C-level steps: every message one data set of one ODID and one known template of
        fixed-length records -> (odid, each message's record count), what ``inspect`` would say of each.
        None for any other run (nothing changed): the caller inspects message by message."""
        lengths = list(map(len, msgs))
        if min(lengths) < _FIRST_SET_END:
            return None
        firsts = list(map(_unpack_first, msgs))  # (odid, set id, set length) each
        odid, set_id, _ = firsts[0]
        layout = self._layouts.get(odid, _NO_LAYOUT).get(set_id)  # data templates only: no id below 256
        if layout.__class__ is not int:
            return None
        set_lens = list(map(sub, lengths, repeat(HEADER_LEN)))
        if firsts != list(zip(repeat(odid), repeat(set_id), set_lens)):
            return None
        return odid, list(map(floordiv, map(sub, set_lens, repeat(4)), repeat(layout)))

    def release(self) -> None:
        """The session is gone: its templates leave the pool."""
        if self.pool is not None:
            self.pool.used -= self._pooled
        self._pooled = 0

    def _commit(self, odid: int, pending: _Pending) -> None:
        """Apply one message's template changes as one new version, unless they change nothing (a refresh)
        or would exceed a limit (raises TemplateLimit)."""
        store = self._store
        if store is None:
            store = self._store = _Store()
        domain = store.domains.get(odid)
        before = len(domain) if domain else 0
        count, nbytes = before, store.nbytes
        changes: list[tuple[int, _Definition | None, _Stored | None]] = []  # (template id, new, old)
        for tid, new in pending.final():
            old = domain.get(tid) if domain else None
            if old is None:
                if new is None:
                    continue  # withdrawing what is not there
                count += 1
                nbytes += len(new[1]) + TEMPLATE_OVERHEAD
            elif new is None:
                count -= 1
                nbytes -= len(old[1]) + TEMPLATE_OVERHEAD
            elif old[0] == new[0] and old[1] == new[1]:
                continue  # re-sent unchanged (template refresh)
            else:
                nbytes += len(new[1]) - len(old[1])
            changes.append((tid, new, old))
        if not changes:
            return
        limits = self.limits
        if limits is not None:
            if count > before and count > limits.templates_max:
                raise TemplateLimit("templates_max", f"ODID {odid} would hold {count} templates; TEMPLATES_MAX is "
                                                     f"{limits.templates_max}")
            if not before and count and store.odids >= limits.odids_max:
                raise TemplateLimit("odids_max", f"ODID {odid} would be ODID number {store.odids + 1} with "
                                                 f"templates; ODIDS_MAX is {limits.odids_max}")
            if nbytes > store.nbytes and nbytes > limits.template_bytes_max:
                raise TemplateLimit("template_bytes_max", f"templates would take {nbytes} bytes; "
                                                          f"TEMPLATE_BYTES_MAX is {limits.template_bytes_max}")
        pool = self.pool
        if pool is not None:
            grow = nbytes - store.nbytes
            if grow > 0 and pool.used + grow > pool.limit:
                raise TemplateLimit("template_memory", f"the handler's sessions would hold {pool.used + grow} "
                                                       f"bytes of templates; the cap is {pool.limit} "
                                                       "(MEMORY_BYTES / 8)")
            grow = max(grow, -self._pooled)
            pool.used += grow
            self._pooled += grow
        version = store.version = store.version + 1
        if domain is None:
            domain = store.domains[odid] = {}
            store.kinds[odid] = {TEMPLATE_SET: set(), OPTIONS_TEMPLATE_SET: set()}
        kinds = store.kinds[odid]
        layouts = self._layouts.get(odid)
        if layouts is None:
            layouts = self._layouts[odid] = {}
        retire = store.retire
        for tid, new, old in changes:
            if old is not None:
                retire((version, old[2], odid, tid, old[0], old[1]))
                kinds[old[0]].discard(tid)
            if new is None:
                del domain[tid]
                layouts.pop(tid, None)
                continue
            domain[tid] = (new[0], new[1], version)
            kinds[new[0]].add(tid)
            if new[2] is None:
                layouts.pop(tid, None)  # empty records: data sets count as unknown template
            else:
                layouts[tid] = new[2]
        if not layouts:
            del self._layouts[odid]
        store.odids += (count > 0) - (before > 0)
        store.count += count - before
        store.nbytes = nbytes
        self.snapshot = store.publish(odid)


class _Pending:
    """One message's template changes in one ODID, seen by the data sets after them in the same message.

    ``defs``: template id -> (set id, record, layout), or None when withdrawn. ``cleared``: the set ids whose
    withdraw-all this message carries (it applies to every stored template of that kind not redefined after).
    """

    __slots__ = ("domain", "kinds", "defs", "cleared", "_since_clear")

    def __init__(self, store: _Store | None, odid: int):
        self.domain = store.domains.get(odid) if store else None  # the ODID's stored templates, or None
        self.kinds = store.kinds.get(odid) if store else None     # and their ids per set id
        self.defs: dict[int, _Definition | None] = {}
        self.cleared: set[int] = set()
        self._since_clear: dict[int, list[int]] = {TEMPLATE_SET: [], OPTIONS_TEMPLATE_SET: []}

    def define(self, tid: int, kind: int, raw: bytes, layout: Layout | None) -> None:
        self.defs[tid] = (kind, raw, layout)
        self._since_clear[kind].append(tid)

    def withdraw(self, tid: int) -> None:
        self.defs[tid] = None

    def withdraw_all(self, kind: int) -> None:
        defs = self.defs
        for tid in self._since_clear[kind]:  # each definition is cleared at most once: O(1) amortised
            new = defs.get(tid)
            if new is not None and new[0] == kind:
                defs[tid] = None
        self._since_clear[kind] = []
        self.cleared.add(kind)

    def layout(self, tid: int, layouts: Mapping[int, Layout]) -> Layout | None:
        """The layout data set ``tid`` is counted with at this point of the message."""
        if tid in self.defs:
            new = self.defs[tid]
            return None if new is None else new[2]
        if self.cleared and self.domain and tid in self.domain and self.domain[tid][0] in self.cleared:
            return None
        return layouts.get(tid)

    def final(self) -> list[tuple[int, _Definition | None]]:
        """(template id, (set id, record, layout) or None) for every template this message touches."""
        out = list(self.defs.items())
        if self.cleared and self.kinds:
            defs = self.defs
            for kind in self.cleared:
                out += [(tid, None) for tid in self.kinds[kind] if tid not in defs]
        return out


def _template_set(msg: Message, pos: int, end: int, kind: int, pending: _Pending) -> None:
    """Parse one (options) template set's records into ``pending``; raises MalformedSet."""
    unpack = SET_HEADER.unpack_from
    while end - pos >= 4:  # fewer than 4 bytes left: padding
        start = pos
        tid, field_count = unpack(msg, pos)
        if field_count == 0:
            pos += 4
            if tid == kind:  # withdraw all templates of this kind in this ODID
                pending.withdraw_all(kind)
            elif tid < MIN_DATA_SET:
                raise MalformedSet("template_id", f"withdrawal of template id {tid} in set {kind}")
            else:
                pending.withdraw(tid)
            continue
        if kind == OPTIONS_TEMPLATE_SET:
            if pos + 6 > end:
                raise MalformedSet("template_past_set", f"options template {tid}: header cut off by the set end")
            scope_count = _U16.unpack_from(msg, pos + 4)[0]
            pos += 6
        else:
            scope_count = 1
            pos += 4
        pos, layout = _layout(msg, pos, end, field_count)
        if tid < MIN_DATA_SET:
            raise MalformedSet("template_id", f"template id {tid} (data set ids start at {MIN_DATA_SET})")
        if scope_count == 0 or scope_count > field_count:
            raise MalformedSet("scope_count", f"options template {tid}: scope field count {scope_count} of "
                                              f"{field_count} fields")
        pending.define(tid, kind, bytes(msg[start:pos]), layout)
