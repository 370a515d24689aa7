"""Exporters sharing an observation domain (ODID) with conflicting templates.

Collectors that scope templates by (source address, ODID), as nfcapd and nfacctd do, see every exporter
behind the balancer as one: two sessions defining one template id of one ODID differently garble each
other there. ``SharedOdids`` finds that, once per ODID; the handler logs it (a recorder handles its own
files and does not ask).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

S = TypeVar("S")  # a session: compared by identity, never looked into here


class SharedOdids(Generic[S]):
    def __init__(self, templates: Callable[[S, int], Mapping[int, object] | None]):
        self._templates = templates  # a session's templates of one ODID, by template id
        self._announcer: dict[int, tuple[S, str]] = {}  # odid -> the session (and peer) that last announced
        self.conflicting: set[int] = set()  # ODIDs found shared with conflicting templates

    def announced(self, session: S, peer: str, odid: int) -> str | None:
        """``session`` (from ``peer``) sent templates for ``odid``: the peer of another session whose
        templates of that ODID conflict with them, the first time this ODID is found shared; else None.
        Compared only when the announcer changes, so a session's own template stream costs O(1); sessions
        of one peer (its reconnections) are not told apart, as collectors do not tell them apart either."""
        last = self._announcer.get(odid)
        self._announcer[odid] = (session, peer)
        if last is None or last[0] is session or last[1] == peer or odid in self.conflicting:
            return None
        mine = self._templates(session, odid) or {}
        theirs = self._templates(last[0], odid) or {}
        if any(theirs.get(tid, record) != record for tid, record in mine.items()):
            self.conflicting.add(odid)
            return last[1]
        return None
