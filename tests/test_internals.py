"""Each place where the code reaches into aiohttp's internals still takes
effect with the installed aiohttp (issue 9, part 5). pyproject.toml bounds
aiohttp below 4; a minor release can still rename what these rely on, and
then these tests fail instead of the server silently losing the effect.

- `DeflateResponse._handshake` and `aiohttp.http.ws_ext_gen`
  (server_no_context_takeover on every accepted permessage-deflate offer):
  tests/test_deflate.py checks the header a real client receives, and that
  each message inflates on its own.
- `_drop_http_parser` (request.protocol._parser, _upgraded, _payload_parser):
  below, in process, on a real socket.
- Graceful shutdown uses the public `site.stop()`, and the Kafka health probe
  the public `consumer.topics()`: tests/test_operations.py and
  tests/test_kafka.py check what they do.
"""
import asyncio

import websockets
from aiohttp import web

from conftest import SECRET, free_port, token
from realtime import config
from realtime.app import make_app
from realtime.transports import websocket as transport


async def test_the_http_parser_is_dropped_after_the_upgrade(monkeypatch):
    protocols = []
    real = transport._drop_http_parser

    def spy(request):
        before = getattr(request.protocol, "_parser", None)
        real(request)
        protocols.append((before, request.protocol))

    monkeypatch.setattr(transport, "_drop_http_parser", spy)
    s = config.Settings(jwt_secret=SECRET, simulate=0)
    s.validate()
    runner = web.AppRunner(make_app(s), handle_signals=False)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?token={token()}") as ws:
            assert '"welcome"' in await asyncio.wait_for(ws.recv(), 10)
            [(before, proto)] = protocols
            # the attributes the code reads and writes are the ones aiohttp uses:
            # the HTTP parser was there under this name until the drop...
            assert before is not None, "aiohttp's RequestHandler keeps its parser elsewhere now"
            assert proto._upgraded is True and proto._payload_parser is not None
            # ...and is gone while the connection lives and works
            assert proto._parser is None
            await ws.send('{"type":"ping","id":"p"}')
            assert '"pong"' in await asyncio.wait_for(ws.recv(), 10)
    finally:
        await runner.cleanup()
