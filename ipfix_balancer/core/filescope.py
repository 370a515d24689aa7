"""Template scope of one dump file: which template messages go before a message (docs/configuration.md "Recording mode",
"Each file decodes on its own" and "Exporter sessions that share an ODID").

A file is read like one transport session, so a decoder keeps one template set per ODID. ``FileScope`` keeps,
per ODID, the templates in effect in the file and says when the sending session's templates must be written
before its message: the first message of an ODID in the file, and each change of sender between sessions that
share an ODID with different templates. Pure: the recorder writes, counts and logs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .wire import ODID, TIME_SEQUENCE, EXPORT_TIME, U32, Message

if TYPE_CHECKING:  # the recorder hands in the session's snapshots
    from .templates import Domain, Snapshot

#: template dicts remembered per ODID as equal to the one in effect (sessions with identical templates)
MAX_EQUAL = 16


class Head(NamedTuple):
    """What goes before a message: ``messages`` (template messages, in order), and whether the sender's
    templates replace another session's for this ODID (``switched``), logged once per ODID and file
    (``first_switch``)."""
    messages: tuple[bytes, ...] = ()
    switched: bool = False
    first_switch: bool = False


NOTHING = Head()


class FileScope:
    """Per dump file and ODID, the templates in effect. ``reset()`` when the file changes.

    Hot path contract: ``heads[odid] is snapshot`` means nothing goes before the message (the recorder checks it
    inline, then calls ``enter`` only when it fails). ``heads`` is cleared in place, never replaced.
    """

    __slots__ = ("heads", "_effective", "_equal", "_switched")

    def __init__(self) -> None:
        self.heads: dict[int, Snapshot] = {}  # odid -> snapshot of the last message of that ODID in this file
        self._effective: dict[int, Domain | None] = {}   # odid -> template dict in effect in this file
        self._equal: dict[int, list[Domain | None]] = {}  # odid -> template dicts known to equal the effective one
        self._switched: set[int] = set()  # ODIDs whose sender's templates changed in this file

    def reset(self) -> None:
        """A new file: no templates are in effect."""
        self.heads.clear()
        self._effective.clear()
        self._equal.clear()
        self._switched.clear()

    def enter(self, msg: Message, odid: int, tmpl: Message | None, snapshot: Snapshot) -> Head:
        """``msg`` (of ODID ``odid``, sent with ``snapshot``; ``tmpl`` not None when it carries template sets)
        goes to the file next: what must be written before it."""
        self.heads[odid] = snapshot
        cur = snapshot.domain(odid)   # template id -> (set id, record) of the sender for this ODID
        if odid not in self._effective:
            self._effective[odid] = cur
            self._equal[odid] = [cur]
            return Head(head_messages(msg, odid, snapshot))
        equal = self._equal[odid]
        for known in equal:
            if known is cur:
                return NOTHING
        if not cur or cur == self._effective[odid]:
            # Same templates (another session with identical ones, or the sender changed another ODID).
            # A sender without templates for this ODID cannot be helped: its data is undecodable anyway.
            if cur and len(equal) < MAX_EQUAL:
                equal.append(cur)
            return NOTHING
        self._effective[odid] = cur
        self._equal[odid] = [cur]
        messages = head_messages(msg, odid, snapshot)
        if tmpl is not None:
            return Head(messages)
        # A session's own templates for an ODID only change with a template set in that ODID (tmpl is not None
        # then): a data-only message with other templates comes from another exporter session.
        first = odid not in self._switched
        self._switched.add(odid)
        return Head(messages, switched=True, first_switch=first)


def head_messages(msg: Message, odid: int, snapshot: Snapshot) -> tuple[bytes, ...]:
    """The snapshot's template messages of ``odid``, with the sequence number and export time of ``msg``
    (template records do not count in the sequence, RFC 7011 §3.1: a decoder sees no gap)."""
    if not len(snapshot):
        return ()
    export_time, seq = TIME_SEQUENCE.unpack_from(msg, EXPORT_TIME)
    key = U32.pack(odid)
    return tuple(m for m in snapshot.messages(lambda _odid: seq, export_time) if m[ODID:ODID + 4] == key)
