"""What an output carries: an *entry*, the plain tuple ``(message, odid, data_records, snapshot)``.

Its fields are read by index (``MSG, ODID_FIELD, NREC, SNAP``): a NamedTuple would cost a quarter of a
microsecond per message. ``ODID_FIELD`` is the entry's index of the observation domain id, not its header
offset (``wire.ODID``). An entry turns into bytes on the wire only when a connection takes it.
"""

from __future__ import annotations

from collections import deque
from operator import itemgetter

MSG, ODID_FIELD, NREC, SNAP = range(4)
msg_of, odid_of, nrec_of = itemgetter(MSG), itemgetter(ODID_FIELD), itemgetter(NREC)
Entry = tuple  # (memoryview | bytes, int, int, Snapshot)
consume = deque(maxlen=0).extend  # runs an iterator to its end at C speed


def entries_size(entries) -> int:
    """The bytes of the messages of ``entries`` (C-level steps: this runs per batch on the hot path)."""
    return sum(map(len, map(msg_of, entries)))
