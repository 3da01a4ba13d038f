"""A session's message buffer for the HTTP transports (PROTOCOL §4): long
polling reads it by `cursor`, an SSE stream with `session=` by `Last-Event-ID`.

A Mailbox is the Outlet (transports/base.py) of a session that has no socket
of its own. Everything the hub and the client layer write to the session
(batches, replies, `welcome`, `reconnect`) is appended here as one entry with
a position: polls answer with the entries after their cursor, and an SSE
stream attached as the `reader` gets each entry as it is appended.

What it keeps (PROTOCOL §4: at least the last 5 minutes or 10,000 messages):
what a reader has had goes once it is both older than KEEP_S and beyond the
newest KEEP_MESSAGES §3.1 messages; what no reader has had yet stays (it is
bounded by conflation, below). All mailboxes of a worker share one budget,
--session-buffer-bytes (Budget): past it, each trims what its reader has had
as it writes. 5 minutes of a viewport's batches is megabytes per session
(2,000 SSE sessions held 440 KB each after 20 s, benchmarks/bench_transports.py),
so without the budget a worker's memory would grow with sessions x minutes.
A cursor older than what is kept is not a loss: it gets `reset`, the full
state and every event since the acknowledged one. Rights that take something
away drop what a reader had at once, and the rest of what was written under
them once a reader has had it (rights_narrowed): a re-read of any of it is a
reset under the rights in force. Batch bodies are the hub's
shared bytes (one object for every client with the same view); the budget
counts a body once per mailbox that holds it.

Positions start at the creation time in microseconds, so a cursor handed out
by another copy of the session (another instance, or an earlier copy here) is
never mistaken for one of this copy's: it falls outside [first, pos] and the
poll gets `reset`.

Marks: each entry carries the newest event id that every event up to it had
been written by the time the entry was (hub.flushed_eid), or None while events
are held back (a conflating or replaying session). A cursor that ends a
tick's entries acknowledges that mark, and the session record keeps the
newest acknowledged one: a copy that has to start again (another instance, a
cursor older than the buffer, after a 1013) replays the event log from it, so
no event is lost between copies (some may come twice: clients dedupe by eid).
Only what a reader says it has is acknowledged: a poll's cursor, or an SSE
stream's `Last-Event-ID` when it reconnects (seq_marks keeps the mark of each
tick's last batch for that, also after the entries are trimmed). Bytes
written to a socket are not acknowledged: a link that dies loses what was
in flight, and the reconnect asks for it.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque

from ._core._fanout import Outlet
from ._core._schema import FMT_JSON
from .stores.base import eid_key

KEEP_S = 300.0              # PROTOCOL §4: at least 5 minutes ...
KEEP_MESSAGES = 10_000      # ... or 10,000 messages
RESPONSE_BYTES = 4 << 20    # one poll answers with at most about this much (at least one entry)

SEQ_MARKS = 4096            # (seq, mark) pairs kept per session for Last-Event-ID
MARK_RE = b'{"t":"'         # how a §3.1 message starts in a JSON body: counted per batch

# entry fields (a tuple: thousands of them per session)
POS, SEQ, TICK, MARK, KIND, AT, PARTS, SIZE, COUNT = range(9)


class Budget:
    """Bytes that a worker's mailboxes keep after their readers had them."""

    __slots__ = ("limit", "kept")

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = 0


def newer(a: str | None, b: str | None) -> bool:
    """Whether event id `a` is after `b` (None: before everything)."""
    return a is not None and (b is None or eid_key(a) > eid_key(b))


class Mailbox(Outlet):
    __slots__ = ("hub", "entries", "pos", "origin", "first", "read", "unread_bytes", "kept_bytes", "_waiters",
                 "reader", "ack", "on_close", "close_info", "session", "starting", "budget",
                 "kept_messages", "seq_marks", "narrowed_upto", "edge", "__weakref__")

    def __init__(self, hub, limit: int, hwm: int, on_close=None, budget: Budget | None = None):
        self.hub = hub
        self.transport = None
        self.fmt = FMT_JSON          # the HTTP transports speak JSON (docs/protocol.md)
        self.deflate = True          # entries are built in Python: the fan-out calls write_batch
        self.limit = limit
        self.hwm = hwm
        self.budget = budget or Budget(64 << 20)
        self.entries: deque = deque()
        self.kept_messages = 0
        self.pos = self.origin = int(time.time() * 1_000_000)   # see the module's docstring
        # batch seqs start there too: an SSE id of another copy is never one of this copy's
        self.seq = self.origin
        self.seq_marks: deque = deque()   # (seq, mark): the last batch of a tick, and its mark
        self.first = self.pos + 1    # the oldest position still kept
        self.read = self.pos         # everything up to here was handed to a reader
        # rights_narrowed: entries up to here were written under wider rights
        # (0: none); each is dropped once a reader has had it
        self.narrowed_upto = 0
        # (seq, position) of the last entry dropped, when it was a batch: an
        # SSE reader whose Last-Event-ID names it goes on from there
        self.edge = None
        self.unread_bytes = 0
        self.kept_bytes = 0
        self._waiters: list[asyncio.Future] = []
        self.reader = None           # an attached SSE stream (transports/sse.py), or None
        # the newest mark a reader acknowledged ("0-0", the log's start, when
        # no event was read yet: a copy made later replays from there)
        self.ack = hub.flushed_eid or "0-0"
        self.on_close = on_close
        self.close_info = None       # (code, reason) once closed
        self.session = None          # the Session it is the Outlet of
        # while a copy starts (welcome, snapshot, until its replay holds
        # events): entries carry no mark, the replay is still to come
        self.starting = False

    # ------------------------------------------------------------ the Outlet side
    def write(self, payload: bytes) -> int:
        try:
            kind = str(json.loads(payload).get("type", "message"))[:40]
        except (ValueError, AttributeError):
            kind = "message"
        return self._append(0, kind, (payload,), len(payload), 1)

    def write_batch(self, envelope_of, batch_id: bytes, body: bytes, req_id=None, more=False,
                    later=False) -> int:
        self.seq += 1
        prefix, suffix = envelope_of(FMT_JSON, batch_id, self.seq, req_id, more)
        return self._append(self.seq, "batch", (prefix, body, suffix), len(prefix) + len(body) + len(suffix),
                            body.count(MARK_RE))

    def _append(self, seq: int, kind: str, parts: tuple, size: int, count: int, check: bool = True) -> int:
        if self.closed:
            return 0
        hub = self.hub
        entries = self.entries
        if entries:
            last = entries[-1]
            if last[TICK] != hub.tick_no and last[MARK] is not None:
                # the last tick's entries are complete: a reader that has its
                # last batch has every event up to its mark
                upto = self.seq - 1 if seq else self.seq
                if upto > self.origin and (not self.seq_marks or self.seq_marks[-1][0] < upto):
                    self.seq_marks.append((upto, last[MARK]))
                    if len(self.seq_marks) > SEQ_MARKS:
                        self.seq_marks.popleft()
        self.pos += 1
        mark = None if self.conflating or self.starting else hub.flushed_eid
        entry = (self.pos, seq, hub.tick_no, mark, kind, time.monotonic(), parts, size, count)
        entries.append(entry)
        self.kept_bytes += size
        self.kept_messages += count
        self.budget.kept += size
        self.messages += 1
        self.nbytes += size
        r = self.reader
        if r is not None and r.caught_up(self):
            r.send(entry)             # straight to the stream's socket: nothing unread
            self.read = self.pos
            if self.narrowed_upto:
                self._drop_narrowed()
        else:
            self.unread_bytes += size
            if check and self.unread_bytes > self.limit:
                self.close(1013, "slow reader: unread messages over the limit")
                return 0
            self.note_backlog(self.unread_bytes)
            for w in self._waiters:
                if not w.done():
                    w.set_result(True)
            self._waiters.clear()
        self._trim()
        return size

    def pending(self) -> int:
        """What the shutdown waits for: an attached stream's socket buffer.
        A poller's unread entries wait for its next poll, wherever it lands."""
        r = self.reader
        return r.pending() if r is not None else 0

    def congested_now(self) -> bool:
        return self.unread_bytes > self.hwm // 4 or (self.reader is not None and self.reader.congested_now())

    def keepalive(self, now: float, every_s: float, timeout_s: float) -> bool:
        """A poller shows it is alive by polling (the registry ends sessions
        nobody polls); an attached stream sends its own comments."""
        r = self.reader
        if r is not None:
            r.keepalive(now, every_s)
        return True

    def close(self, code: int, reason: str) -> None:
        """The session's copy here ends (slow reader, token expiry, shutdown):
        the reason is the last entry, waiting polls are answered, and the
        registry releases it. Its record stays: the next poll or stream, here
        or elsewhere, starts again from it."""
        if self.close_info is not None:   # (Session.close sets `closed` before it calls this)
            return
        self.closed = False
        payload = json.dumps({"type": "error", "code": "closed", "close_code": code,
                              "message": reason}).encode()
        self._append(0, "error", (payload,), len(payload), 1, check=False)
        self.closed = True
        self.close_info = (code, reason)
        self._wake()
        if self.reader is not None:
            self.reader.end(code, reason)
        if self.on_close is not None:
            self.on_close(self)

    # ------------------------------------------------------------ the reader side
    def holds(self, cursor: int) -> bool:
        """Whether the entries after `cursor` are all here (a cursor of this
        copy, not older than what is kept)."""
        return self.first - 1 <= cursor <= self.pos

    def after(self, cursor: int, max_bytes: int = RESPONSE_BYTES) -> list[tuple]:
        """The entries after `cursor` (holds() must be true), at most about
        max_bytes, at least one."""
        out, n = [], 0
        entries = self.entries
        i = max(0, cursor - self.first + 1)   # positions are consecutive
        while i < len(entries):
            e = entries[i]
            if out and n + e[SIZE] > max_bytes:
                break
            out.append(e)
            n += e[SIZE]
            i += 1
        return out

    def index_of_seq(self, seq: int) -> int | None:
        """The position of the batch with this seq, while kept (SSE Last-Event-ID)."""
        entries = self.entries
        lo, hi = 0, len(entries)
        while lo < hi:   # seqs grow with positions; replies carry 0
            mid = (lo + hi) // 2
            s = self._seq_at_or_after(mid)
            if s is None or s >= seq:
                hi = mid
            else:
                lo = mid + 1
        while lo < len(entries) and not entries[lo][SEQ]:   # replies before the batch
            lo += 1
        if lo < len(entries) and entries[lo][SEQ] == seq:
            return entries[lo][POS]
        edge = self.edge
        if edge is not None and edge[0] == seq and edge[1] == self.first - 1:
            return edge[1]   # the newest batch dropped, and nothing after it was
        return None

    def _seq_at_or_after(self, i: int):
        entries = self.entries
        while i < len(entries):
            if entries[i][SEQ]:
                return entries[i][SEQ]
            i += 1
        return None

    def handed(self, pos: int) -> None:
        """The entries up to `pos` went to a reader: no longer unread."""
        if pos <= self.read:
            return
        entries = self.entries
        gone = 0
        for i in range(max(0, self.read - self.first + 1), min(len(entries), pos - self.first + 1)):
            gone += entries[i][SIZE]
        self.unread_bytes = max(0, self.unread_bytes - gone)
        self.read = pos
        if not self.unread_bytes:
            self.congested = False
        if self.narrowed_upto:
            self._drop_narrowed()

    def acknowledge(self, cursor: int) -> bool:
        """The reader says it has everything up to `cursor`: the acknowledged
        mark moves to that entry's, when it has one. True when it moved."""
        i = cursor - self.first
        if not (0 <= i < len(self.entries)):
            return False
        e = self.entries[i]
        # a mark holds only at the end of its tick's entries (the catch-up of
        # a slow session writes the latest state and then what it held)
        if e[MARK] is None or (i + 1 < len(self.entries) and self.entries[i + 1][TICK] == e[TICK]):
            return False
        return self._ack(e[MARK])

    def acknowledge_seq(self, seq: int) -> bool:
        """An SSE reader says (Last-Event-ID) it has every batch up to `seq`:
        the mark of the newest complete tick at or before it."""
        return self._ack(self.mark_of_seq(seq))

    def mark_of_seq(self, seq: int | None) -> str | None:
        """The mark a reader that has batch `seq` of this copy acknowledges
        (None: unknown, or an id this copy never handed out)."""
        if seq is None or not (self.origin < seq <= self.seq):
            return None
        marks = self.seq_marks
        lo, hi = 0, len(marks)
        while lo < hi:
            mid = (lo + hi) // 2
            if marks[mid][0] <= seq:
                lo = mid + 1
            else:
                hi = mid
        return marks[lo - 1][1] if lo > 0 else None

    def _ack(self, mark: str | None) -> bool:
        if newer(mark, self.ack):
            self.ack = mark
            return True
        return False

    async def wait(self, cursor: int, timeout: float) -> None:
        """Until there is something after `cursor`, the copy closes, or timeout."""
        if self.pos > cursor or self.closed or timeout <= 0:
            return
        w = asyncio.get_running_loop().create_future()
        self._waiters.append(w)
        try:
            await asyncio.wait_for(w, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if w in self._waiters:
                self._waiters.remove(w)

    def supersede(self) -> None:
        """A newer poll of the same session: the one waiting answers now."""
        self._wake()

    def _wake(self) -> None:
        for w in self._waiters:
            if not w.done():
                w.set_result(False)
        self._waiters.clear()

    def waiting(self) -> bool:
        return bool(self._waiters)

    def rights_narrowed(self) -> None:
        """What a reader had goes at once, and what it has not had yet goes
        as soon as it has: a poll or stream that asks for it again (a lost
        answer, an SSE reconnect) would otherwise be handed vehicles, or
        driver contacts, that the rights in force no longer show. Such a
        reader gets `reset` instead, a new copy under the rights in force,
        with the events since its acknowledged one (nothing lost). A reader
        that goes on from its latest cursor (or SSE id) is not reset. What no
        reader has had yet is still handed out once, in order before the
        `leave`: it was written before the change, as a socket would have
        sent it."""
        self.narrowed_upto = self.pos
        self._drop_narrowed()

    def _drop_narrowed(self) -> None:
        """What was written under the wider rights goes as soon as a reader
        has had it (a lost answer's cursor then gets `reset`)."""
        upto = min(self.read, self.narrowed_upto)
        entries = self.entries
        while entries and entries[0][POS] <= upto:
            self._drop()
        if self.read >= self.narrowed_upto:
            self.narrowed_upto = 0

    def _trim(self) -> None:
        entries = self.entries
        budget = self.budget
        horizon = time.monotonic() - KEEP_S
        while entries and entries[0][POS] <= self.read and (
                budget.kept > budget.limit
                or (entries[0][AT] < horizon and self.kept_messages - entries[0][COUNT] >= KEEP_MESSAGES)):
            self._drop()

    def _drop(self) -> None:
        e = self.entries.popleft()
        self.edge = (e[SEQ], e[POS]) if e[SEQ] else None
        self.kept_bytes -= e[SIZE]
        self.kept_messages -= e[COUNT]
        self.budget.kept -= e[SIZE]
        self.first += 1

    def release(self) -> None:
        """The copy is gone: what it keeps leaves the budget (a poll still
        waiting on it may read its last entries)."""
        self.budget.kept -= self.kept_bytes
        self.kept_bytes = 0


def message_bytes(entry: tuple) -> bytes:
    return b"".join(entry[PARTS])
