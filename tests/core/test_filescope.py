"""core/filescope.py: which template messages go before a message in a dump file, per ODID; no files, no
sockets: messages from ipfixkit, template state from the real TemplateTracker."""
from __future__ import annotations

from ipfixkit import FULLFLOW_FIELDS, header, make_stream, set_ids
from ipfix_balancer.core.filescope import NOTHING, FileScope, head_messages
from ipfix_balancer.core.templates import EMPTY, TemplateTracker

SHORT_FIELDS = tuple(f for f in FULLFLOW_FIELDS if f.name in ("sourceIPv4Address", "octetDeltaCount"))


class Session:
    """One exporter session: ``send(msg)`` returns what the scope puts before it (and applies the fast check
    the recorder does inline: a message whose snapshot is the ODID's head needs nothing)."""

    def __init__(self, scope: FileScope):
        self.scope = scope
        self.tracker = TemplateTracker()

    def send(self, msg: bytes):
        odid, _nrec, tmpl = self.tracker.inspect(memoryview(msg))
        snapshot = self.tracker.snapshot
        if self.scope.heads.get(odid) is snapshot:
            return None
        return self.scope.enter(msg, odid, tmpl, snapshot)


def test_first_message_of_an_odid_gets_the_senders_templates_with_its_seq_and_time():
    scope = FileScope()
    stream = make_stream(3, 10, first_seq=500, export_time=1_600_000_000)
    s = Session(scope)
    head = s.send(stream[0])               # the exporter's own template message: preceded by its templates
    assert head.messages and not head.switched
    head = s.send(stream[1])               # same snapshot: the fast check says nothing goes before it
    assert head is None
    head = s.send(stream[2])
    assert head is None
    scope.reset()                          # a new file
    (m,) = s.send(stream[3]).messages
    assert set_ids(m) == [2] and header(m)[2:] == (1_600_000_000, 520, 1)   # data message 2: seq 500 + 2 * 10


def test_each_odid_has_its_own_head_and_no_templates_means_nothing_to_write():
    scope = FileScope()
    a, b = Session(scope), Session(scope)
    sa, sb = make_stream(1, 2, odid=1), make_stream(1, 2, odid=2)
    assert [header(m)[4] for m in a.send(sa[0]).messages] == [1]
    assert [header(m)[4] for m in b.send(sb[0]).messages] == [2]
    assert set(scope.heads) == {1, 2}
    orphan = Session(scope)                # data without templates: nothing can help it
    assert orphan.send(make_stream(1, 2, odid=3, with_template=False)[0]).messages == ()


def test_sessions_sharing_an_odid_with_equal_templates_write_nothing_more():
    scope = FileScope()
    a, b = Session(scope), Session(scope)
    sa, sb = make_stream(3, 2), make_stream(3, 2, first_serial=100)
    a.send(sa[0])
    head = b.send(sb[0])
    assert head == NOTHING
    for i in (1, 2, 3):
        assert a.send(sa[i]) == b.send(sb[i]) == NOTHING


def test_sessions_sharing_an_odid_with_different_templates_switch_and_the_first_switch_is_flagged():
    scope = FileScope()
    a, b = Session(scope), Session(scope)
    sa, sb = make_stream(3, 2), make_stream(3, 2, fields=SHORT_FIELDS, first_serial=100)
    a.send(sa[0])
    a.send(sa[1])
    head = b.send(sb[0])                   # b announces its own templates: written, not a switch
    assert head.messages and not head.switched
    b.send(sb[1])
    head = a.send(sa[2])                   # data-only message of a, other templates in effect: a switch
    assert head.messages and head.switched and head.first_switch
    head = b.send(sb[2])
    assert head.messages and head.switched and not head.first_switch   # logged once per ODID per file
    scope.reset()
    head = a.send(sa[3])                   # new file: a plain head again
    assert head.messages and not head.switched
    head = b.send(make_stream(4, 2, fields=SHORT_FIELDS)[4])
    assert head.switched and head.first_switch


def test_redefinition_by_the_same_session_is_not_a_switch():
    scope = FileScope()
    s = Session(scope)
    s.send(make_stream(1, 2)[0])
    head = s.send(make_stream(1, 2, fields=SHORT_FIELDS)[0])   # the exporter redefines template 256
    assert head.messages and not head.switched


def test_head_messages_of_an_empty_snapshot():
    assert head_messages(make_stream(1, 1)[1], 1, EMPTY) == ()
