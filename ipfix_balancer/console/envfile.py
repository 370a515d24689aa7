"""The console's .env editor: change one receiver's keys and leave every other byte of the file as it was.

The file is the operator's: comments, blank lines, key order, keys the console does not manage (other
receivers, global keys, non-IPFIX_ lines) and the spelling of a key (``PORT`` vs ``PORT[0]``, ``TASKSET``)
survive an edit. The file is split with python-dotenv's own parser, the one ``config.load`` reads it with,
so both agree on where each key is; the pieces joined give the file back byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Mapping

from dotenv.parser import parse_stream

from ..config.parse import receiver_key

TITLES = {"FULLFLOW": "Fullflow", "CLICKSTREAM": "Clickstream", "DNSFLOW": "DNS flow"}
_PLAIN = re.compile(r"[\w./,:\[\]@+-]*")  # values written unquoted; anything else in single quotes
_LEADING_BLANK = re.compile(r"\s*")


def digest(text: str) -> str:
    """What the form carries to detect a file changed on disk since it was loaded."""
    return hashlib.sha256(text.encode()).hexdigest()


class EnvFile:
    """A .env as a list of pieces [original text, key or None]; edits replace or insert pieces."""

    def __init__(self, text: str):
        bindings = list(parse_stream(io.StringIO(text)))
        self.pieces = [[b.original.string, b.key if not b.error else None] for b in bindings]
        self._values = {b.key: b.value or "" for b in bindings if b.key and not b.error}

    def text(self) -> str:
        return "".join(piece for piece, _ in self.pieces)

    def receivers(self) -> dict[tuple[str, int], dict[str, str]]:
        """{(stream, index): {param: value as written}} in file order."""
        out: dict[tuple[str, int], dict[str, str]] = {}
        for _, key in self.pieces:
            named = key and receiver_key(key)
            if named:
                out.setdefault(named[:2], {})[named[2]] = self._values[key]
        return out

    def next_index(self, stream: str) -> int:
        used = [index for s, index in self.receivers() if s == stream]
        return max(used) + 1 if used else 0

    def _positions(self, stream: str, index: int) -> dict[str, int]:
        return {named[2]: i for i, (_, key) in enumerate(self.pieces)
                if key and (named := receiver_key(key)) and named[:2] == (stream, index)}

    def set_receiver(self, stream: str, index: int, values: Mapping[str, str]) -> None:
        """Give the receiver these values (param -> value; empty: remove the key, i.e. the default).
        A key whose value does not change is not touched; a new key goes after the receiver's last key,
        or, for a new receiver, at the end of the file under a comment."""
        positions = self._positions(stream, index)
        added = []
        for param, value in values.items():
            value = value.strip()
            if param in positions:
                i = positions[param]
                piece, key = self.pieces[i]
                if value == self._values[key]:
                    continue
                lead = _LEADING_BLANK.match(piece).group()  # the blank lines before it belong to the file
                self.pieces[i] = [lead + (f"{key}={_quote(value)}\n" if value else ""), key if value else None]
                self._values[key] = value
            elif value:
                key = f"IPFIX_{stream}_{param}[{index}]"
                added.append([f"{key}={_quote(value)}\n", key])
                self._values[key] = value
        if not added:
            return
        if positions:  # edits above kept every piece in its place, so the positions still hold
            at = max(positions.values()) + 1
        else:
            text = self.text()
            if text and not text.endswith("\n"):
                self.pieces.append(["\n", None])
            added.insert(0, [f"\n# {TITLES[stream]} receiver [{index}] (added in the console)\n", None])
            at = len(self.pieces)
        self.pieces[at:at] = added

    def delete_receiver(self, stream: str, index: int) -> None:
        """Remove every key of the receiver (the comments around them stay: they may describe others)."""
        for i in sorted(self._positions(stream, index).values(), reverse=True):
            lead = _LEADING_BLANK.match(self.pieces[i][0]).group()
            self.pieces[i] = [lead, None]


def _quote(value: str) -> str:
    return value if _PLAIN.fullmatch(value) else "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def read(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def write_atomic(path: str, text: str, previous: str) -> None:
    """Replace path with text: a temporary file in the same directory, fsynced, given the file's owner and
    mode, renamed over it, and the directory fsynced. ``previous`` (the text replaced) is kept as
    ``<path>.previous`` the same way, so a bad edit is undone with one ``mv``."""
    st = os.stat(path)
    for target, content in ((path + ".previous", previous), (path, text)):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".env-console-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(content)
                f.flush()
                os.fchmod(f.fileno(), st.st_mode & 0o7777)
                with contextlib.suppress(PermissionError):  # only root may give a file away
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
