"""An HTTP session's buffer (realtime/mailbox.py) when the session's rights
narrow: what was written under the wider rights is not handed out twice, a
reader that goes on from where it is is not reset, and nothing is skipped.
A stand-in for the hub (its tick number and flushed event id are all the
Mailbox reads of it); tests/test_poll.py checks the same through a server."""
import types

from realtime._core._base import CoreBase
from realtime.mailbox import POS, SEQ, Mailbox

envelope = CoreBase.envelope


def _box():
    hub = types.SimpleNamespace(tick_no=1, flushed_eid="1-0")
    return hub, Mailbox(hub, 1 << 20, 1 << 19)


def _batch(hub, box, text: str):
    hub.tick_no += 1
    box.write_batch(envelope, b"i-1", ('[{"t":"pos","v":"%s"}]' % text).encode())
    return box.entries[-1]


def test_what_a_reader_had_goes_at_once_and_the_rest_once_it_is_read():
    hub, box = _box()
    had = [_batch(hub, box, "a%d" % i) for i in range(2)]
    box.handed(had[-1][POS])                      # a poll answered with these
    unread = _batch(hub, box, "a2")               # written under the wider rights, not read yet

    box.rights_narrowed()
    assert not box.holds(had[0][POS] - 1) and not box.holds(had[0][POS])   # a re-read of them: reset
    assert box.holds(had[-1][POS])                # the reader going on from its cursor is not reset
    assert [e[POS] for e in box.after(had[-1][POS])] == [unread[POS]]   # and gets what it had not had

    leave = _batch(hub, box, "leave")             # the diff the hub sends after the change
    box.handed(leave[POS])
    assert not box.holds(had[-1][POS])            # a lost answer's cursor: reset, not a's data again
    assert box.holds(leave[POS]) and box.after(leave[POS]) == []

    later = _batch(hub, box, "b")                 # under the narrower rights: kept as usual
    box.handed(later[POS])
    assert box.holds(leave[POS]) and [e[POS] for e in box.after(leave[POS])] == [later[POS]]
    assert box.narrowed_upto == 0


def test_an_sse_reader_named_by_the_newest_dropped_batch_goes_on():
    hub, box = _box()
    first = _batch(hub, box, "a")
    last = _batch(hub, box, "leave")
    box.handed(last[POS])
    box.rights_narrowed()
    assert not box.entries
    # Last-Event-ID of the newest batch it was sent: it goes on from there
    assert box.index_of_seq(last[SEQ]) == last[POS]
    # an older one names something dropped: a new copy
    assert box.index_of_seq(first[SEQ]) is None

    box.write(b'{"type":"token_expiring","in_s":60}')   # a reply, not a batch
    box.handed(box.pos)
    box.rights_narrowed()
    assert box.index_of_seq(last[SEQ]) is None    # the reply after it may not have reached it


class _Stream:
    """An attached SSE stream that has had everything (SessionStream's side)."""
    def __init__(self):
        self.sent = []

    def caught_up(self, box) -> bool:
        return True

    def send(self, entry) -> None:
        self.sent.append(entry)


def test_entries_sent_straight_to_a_stream_drop_what_the_wider_rights_wrote():
    """A stream that starts past what a reader had (an SSE id it made up)
    has the entries after it sent straight to its socket: `read` moves there
    without handed(), and what the wider rights wrote must go then too."""
    hub, box = _box()
    old = [_batch(hub, box, "a%d" % i) for i in range(2)]   # nobody read these
    box.rights_narrowed()
    assert box.holds(old[0][POS] - 1)             # not read yet: still to be handed out once
    box.reader = _Stream()
    new = _batch(hub, box, "b")
    assert box.reader.sent == [new] and box.read == new[POS]
    assert not box.holds(old[0][POS] - 1) and box.first == new[POS]   # the new one is kept
