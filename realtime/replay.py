"""Resume's event replay (PROTOCOL §3.4), for every transport.

A resuming client first gets the state of every vehicle it sees, then every
event after its `last_event` that is still in the log, however many: read in
pages, sent in batches of at most MAX_MESSAGES messages and MAX_BYTES bytes,
with the event loop free between batches, so that other clients keep their
ticks and this client's own commands (`ping`) are answered meanwhile.

While the replay runs, the hub holds the client's live traffic as it does for
a slow client (Hub.hold_for_replay): position batches are not written, new
events are kept. When the replay ends, one catch-up batch brings every vehicle
up to date and the held events follow, so the stream of events goes on with
no gap and no repeat: the replay covers (last_event, upto], the held events
come after `upto`, the newest event the hub had when the client attached.
"""
from __future__ import annotations

import asyncio
import logging
import re
from contextlib import aclosing

import msgspec

from ._core._schema import FMT_JSON, FMT_MSGPACK, body_of, msgpack_items
from .recent import Recent

log = logging.getLogger("realtime.replay")

MAX_MESSAGES = 1000
MAX_BYTES = 1 << 20
ENVELOPE_ROOM = 512        # batch_id, seq and the JSON or msgpack around the messages
PAGE = 1000                # events read from the log at once
STORE_REPLAYS = 4         # replays reading the log from the stores at once, per worker (Hub.store_replays)
RETRIES = (0.5, 1.0, 2.0)  # a failed read is retried after these pauses, then the client is closed
EID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
U64 = 2 ** 64


def well_formed(last_event: str | None) -> bool:
    """A `last_event` that can name an event in the log."""
    return bool(last_event) and EID.fullmatch(last_event) is not None and \
        all(int(part) < U64 for part in last_event.split("-"))


def place(where: str | None, last_event: str | None) -> tuple[bool, str | None]:
    """(recovered, where the replay starts) from stores.locate's answer for a
    resume's `last_event`:
    - found in the log: every event after it can be replayed (True, it);
    - older than the log's oldest event: some may be gone; what is left is
      replayed (False, "0-0");
    - missing, malformed, or none given: nothing to place a replay after
      (False, None)."""
    if where == "found":
        return True, last_event
    if where == "older":
        return False, "0-0"
    return False, None


async def locate(stores, last_event: str | None) -> tuple[bool, str | None]:
    """place() for a `last_event`, asking the stores where it stands."""
    if not well_formed(last_event):
        return False, None
    return place(await stores.locate(last_event), last_event)


async def run(hub, s, after: str | None, upto: str | None) -> None:
    """Sends the events in (after, upto] that `s` may see, then lets the hub
    catch it up. On a store that keeps failing the client is closed with 1013
    (try again): it resumes, and nothing is skipped silently."""
    try:
        if after is not None and upto is not None:
            await _send_all(hub, s, after, upto)
    except Exception as e:
        log.warning("replay failed; closing so that the client resumes again",
                    extra={"fields": {"client": s.client_id, "error": repr(e)[:200]}})
        s.close(1013, "resume could not be completed: resume again")
    finally:
        hub.replay_done(s)


def batches(pieces: list[bytes]):
    """Encoded messages in runs of at most MAX_MESSAGES and MAX_BYTES (with
    room for the envelope): the held events a catch-up sends after a replay
    or a slow spell."""
    part: list[bytes] = []
    size = 2   # a JSON body's brackets; each message adds its comma (msgpack: its header's share)
    for piece in pieces:
        if part and (len(part) >= MAX_MESSAGES or size + len(piece) > MAX_BYTES - ENVELOPE_ROOM):
            yield part
            part, size = [], 2
        part.append(piece)
        size += len(piece) + 1
    if part:
        yield part


# every message of a JSON body starts so; nested data may too, so counting it
# is a bound from above on how many messages a body holds
MESSAGE_START = b'{"t":"'
_last_split: list = [None, 0, None]   # body, fmt, parts: a body sent to many is split once


def split_body(fmt: int, body: bytes) -> list[bytes]:
    """An encoded batch body (the `messages` array) as bodies of at most
    MAX_MESSAGES messages and MAX_BYTES with the envelope (§3.4): a snapshot
    of more than 1,000 vehicles -- a resume, a subscribe, a catch-up -- goes
    as several batches, in order. The body itself when it fits, as nearly
    always: only a body that may not is parsed, for its messages' bounds."""
    room = MAX_BYTES - ENVELOPE_ROOM
    if len(body) <= room:
        if fmt == FMT_JSON:
            if body.count(MESSAGE_START) <= MAX_MESSAGES:
                return [body]
        elif msgpack_items(body)[0] <= MAX_MESSAGES:
            return [body]
    if _last_split[0] is body and _last_split[1] == fmt:
        return _last_split[2]
    parts = _split(fmt, body)
    _last_split[:] = body, fmt, parts
    return parts


# A body's messages as the bytes they already are (msgspec.Raw): only the
# boundaries are parsed, so splitting a 20k-vehicle snapshot takes ~10 ms,
# where decoding and encoding it again held the loop ~450 ms.
_RAW_ITEMS = {FMT_JSON: msgspec.json.Decoder(list[msgspec.Raw]).decode,
              FMT_MSGPACK: msgspec.msgpack.Decoder(list[msgspec.Raw]).decode}


def _split(fmt: int, body: bytes) -> list[bytes]:
    parts = list(batches(_RAW_ITEMS[fmt](body)))
    return [body_of(fmt, part) for part in parts] if len(parts) > 1 else [body]



async def _send_all(hub, s, after: str, upto: str) -> None:
    pieces: list[tuple[str, bytes]] = []   # (vehicle id, encoded event)
    size = 0
    claims = s.claims   # the rights the pieces were chosen under
    async with aclosing(_pages(hub, s, after, upto)) as pages:   # a store slot is released at once
        async for page in pages:
            # rights that narrowed while the page was read sent their `leave`:
            # what was chosen before must not follow it
            if s.claims is not claims:
                pieces, claims = hub.allowed(s.claims, pieces), s.claims
                size = sum(len(p) + 1 for _, p in pieces)
            for pair in hub.event_pieces_for(s, page):
                piece = pair[1]
                if pieces and (len(pieces) >= MAX_MESSAGES or size + len(piece) > MAX_BYTES - ENVELOPE_ROOM):
                    await _send(hub, s, pieces)
                    pieces, size, claims = [], 0, s.claims
                pieces.append(pair)
                size += len(piece) + 1
    if pieces and not s.closed:
        await _send(hub, s, hub.allowed(s.claims, pieces) if s.claims is not claims else pieces)


async def _pages(hub, s, after: str, upto: str):
    """The log entries in (after, upto] as pages of Recent: from the events
    this instance kept (recent.py) when they cover the range, else read from
    the stores a page at a time."""
    kept = hub.recent.between(after, upto)
    if kept is not None:
        for i in range(0, len(kept), PAGE):
            if s.closed:
                return
            yield kept[i:i + PAGE]
        return
    # Reading the log is the expensive kind (a `last_event` older than the
    # log reads all of it): a few at a time per worker, the rest wait.
    async with hub.store_replays:
        cursor = after
        while not s.closed:
            page = await _read(hub.stores, cursor, upto)
            if not page:
                return
            cursor = page[-1].eid
            yield [Recent(ev, None) for ev in page]
            if cursor == upto:
                return


async def _read(stores, cursor: str, upto: str):
    for pause in RETRIES + (None,):
        try:
            return await stores.events_page(cursor, upto, PAGE)
        except Exception:
            if pause is None:
                raise
            await asyncio.sleep(pause)


async def _send(hub, s, pairs: list[tuple[str, bytes]]) -> None:
    if pairs:
        hub.send_events(s, [piece for _, piece in pairs])
    # let the loop run (ticks, this client's ping), and do not outrun the client
    await asyncio.sleep(0)
    while not s.closed and s.transport.congested_now():
        await asyncio.sleep(0.01)
