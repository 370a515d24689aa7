"""What an output carries: an *entry*, the plain tuple ``(message, odid, data_records, snapshot)``.

Its fields are read by index (``MSG, ODID_FIELD, NREC, SNAP``): a NamedTuple would cost a quarter of a
microsecond per message. ``ODID_FIELD`` is the entry's index of the observation domain id, not its header
offset (``wire.ODID``). An entry turns into bytes on the wire only when a connection takes it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any, Final, TypeAlias

from .templates import Snapshot
from .wire import Message

# (Final: mypy then knows ``entry[MSG]`` is the message, not any field)
MSG: Final = 0
ODID_FIELD: Final = 1
NREC: Final = 2
SNAP: Final = 3
#: (message, odid, data records, snapshot)
Entry: TypeAlias = tuple[Message, int, int, Snapshot]
# (typeshed's itemgetter returns Any: these say what they take from an entry)
msg_of: Callable[[Entry], Message] = itemgetter(MSG)
odid_of: Callable[[Entry], int] = itemgetter(ODID_FIELD)
nrec_of: Callable[[Entry], int] = itemgetter(NREC)
# (Any: it runs iterators of whatever the calls it drives return, e.g. ``pack_into``'s None)
consume: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend  # runs an iterator to its end at C speed


def entries_size(entries: Iterable[Entry]) -> int:
    """The bytes of the messages of ``entries`` (C-level steps: this runs per batch on the hot path)."""
    return sum(map(len, map(msg_of, entries)))
