"""Peer hub for the tidings benchmark: Python asyncio + the ``websockets`` package.

The classic asyncio pub/sub hub, written the way the ``websockets`` documentation
suggests (``websockets.asyncio.server.serve``, a ``process_request`` hook for
plain HTTP, ``broadcast()`` for fan-out). It speaks the small subset of tidings'
native protocol described in ``bench/peers/README.md``.

Fan-out, two modes (``--mode``):

* ``broadcast`` (default): encode the event once, then hand the same bytes to
  ``websockets.broadcast()``, which frames and writes them synchronously to every
  subscriber's transport: no task switch per subscriber. ``broadcast()`` itself
  never applies backpressure, so a subscriber whose transport write buffer
  already holds 256 events' worth of bytes is left out of that event (the event
  is dropped for that client only and counted).
* ``queue``: one ``asyncio.Queue(maxsize=256)`` per client, filled with
  ``put_nowait`` (dropping and counting on ``QueueFull``) and drained by one
  writer task per client that awaits ``send()``.

Run: ``python bench/peers/websockets_hub.py --port 8801`` (``--port 0`` picks a
free port; the line printed says which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import signal
import sys
import time
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

try:  # the same JSON library tidings uses; the stdlib is the fallback
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads = orjson.loads
    JSONError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - depends on the environment
    import json

    _encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

    def dumps(obj: Any) -> bytes:
        return _encoder.encode(obj).encode()

    loads = json.loads  # type: ignore[assignment]
    JSONError = ValueError

HOST = "127.0.0.1"
WS_PATH = "/ws"
QUEUE_SIZE = 256
MAX_MESSAGE = 512 * 1024
PING_INTERVAL = 30.0  # a ping every 30 s ...
PING_TIMEOUT = 30.0  # ... unanswered for 30 more s: closed (silent for ~60 s)
LISTEN_BACKLOG = 4096  # same as tidings


_cached_second = -1
_cached_prefix = ""


def rfc3339_now() -> str:
    """UTC now as ``2026-03-23T10:00:00.123Z``; the date part is cached per second."""
    global _cached_second, _cached_prefix  # noqa: PLW0603 - one-entry cache
    now = time.time()
    second = int(now)
    if second != _cached_second:
        _cached_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _cached_second = second
    return f"{_cached_prefix}.{int((now - second) * 1000):03d}Z"


class Client:
    __slots__ = ("queue", "topics", "transport", "ws")

    def __init__(self, ws: ServerConnection, with_queue: bool) -> None:
        self.ws = ws
        self.transport = ws.transport
        self.topics: set[str] = set()
        self.queue: asyncio.Queue[bytes] | None = (
            asyncio.Queue(maxsize=QUEUE_SIZE) if with_queue else None
        )


class Hub:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.subscribers: dict[str, dict[ServerConnection, Client]] = {}
        self.seqs: dict[str, int] = {}
        self.connections = 0
        self.dropped = 0

    # --- HTTP -----------------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return None
        if path == "/health":
            body = dumps({"status": "ok", "connections": self.connections})
            headers = Headers(
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
            )
            return Response(http.HTTPStatus.OK.value, "OK", headers, body)
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    # --- WebSocket ------------------------------------------------------------------------

    async def handler(self, ws: ServerConnection) -> None:
        client = Client(ws, self.mode == "queue")
        self.connections += 1
        writer = asyncio.create_task(self.writer(client)) if client.queue is not None else None
        try:
            async for message in ws:
                reply = self.handle(client, message)
                if reply is not None:
                    await self.reply(client, reply)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            for topic in client.topics:
                subs = self.subscribers.get(topic)
                if subs is not None:
                    subs.pop(ws, None)
                    if not subs:
                        del self.subscribers[topic]
            client.topics.clear()
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer

    async def reply(self, client: Client, data: bytes) -> None:
        if client.queue is not None:
            try:
                client.queue.put_nowait(data)
            except asyncio.QueueFull:
                self.dropped += 1
        else:
            # Written to the transport synchronously before the first await, so a
            # response always precedes the events broadcast after it.
            await client.ws.send(data, text=True)

    async def writer(self, client: Client) -> None:
        queue = client.queue
        assert queue is not None
        send = client.ws.send
        try:
            while True:
                await send(await queue.get(), text=True)
        except websockets.ConnectionClosed:
            pass

    def handle(self, client: Client, message: str | bytes) -> bytes | None:
        try:
            msg = loads(message)
        except JSONError:
            return error("message is not valid JSON")
        if not isinstance(msg, dict):
            return error("message must be a JSON object")
        kind = msg.get("type")
        topic = msg.get("topic")
        if kind not in ("subscribe", "publish", "unsubscribe"):
            return error("unknown message type")
        if not isinstance(topic, str) or not topic:
            return error("field 'topic' must be a non-empty string")
        request_id = msg.get("requestId")

        if kind == "publish":
            if "payload" not in msg:
                return error("field 'payload' is required")
            seq = self.seqs.get(topic, 0) + 1
            self.seqs[topic] = seq
            subs = self.subscribers.get(topic)
            if subs:
                event = dumps(
                    {
                        "type": "event",
                        "topic": topic,
                        "seq": seq,
                        "payload": msg["payload"],
                        "timestamp": rfc3339_now(),
                    }
                )
                self.fan_out(subs, event)
            return response(topic, request_id, {"status": "published", "seq": seq})

        if kind == "subscribe":
            self.subscribers.setdefault(topic, {})[client.ws] = client
            client.topics.add(topic)
            return response(
                topic,
                request_id,
                {"status": "subscribed", "topic": topic, "seq": self.seqs.get(topic, 0)},
            )

        # unsubscribe
        subs = self.subscribers.get(topic)
        if subs is not None:
            subs.pop(client.ws, None)
            if not subs:
                del self.subscribers[topic]
        client.topics.discard(topic)
        return response(topic, request_id, {"status": "unsubscribed", "topic": topic})

    def fan_out(self, subs: dict[ServerConnection, Client], event: bytes) -> None:
        if self.mode == "broadcast":
            # "Queue full" = the transport already buffers 256 events of this size.
            limit = QUEUE_SIZE * len(event)
            ready = [ws for ws, c in subs.items() if c.transport.get_write_buffer_size() < limit]
            self.dropped += len(subs) - len(ready)
            broadcast(ready, event, text=True)
        else:
            for c in subs.values():
                try:
                    c.queue.put_nowait(event)  # type: ignore[union-attr]
                except asyncio.QueueFull:
                    self.dropped += 1


def response(topic: str, request_id: Any, payload: dict[str, Any]) -> bytes:
    frame: dict[str, Any] = {"type": "response", "topic": topic}
    if request_id is not None:
        frame["requestId"] = request_id
    frame["payload"] = payload
    return dumps(frame)


def error(message: str) -> bytes:
    return dumps({"type": "error", "payload": {"code": "invalid_message", "message": message}})


async def main(port: int, mode: str) -> None:
    hub = Hub(mode)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    server = await serve(
        hub.handler,
        HOST,
        port,
        process_request=hub.process_request,
        compression=None,
        max_size=MAX_MESSAGE,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
        close_timeout=2.0,
        backlog=LISTEN_BACKLOG,
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on ws://{HOST}:{bound}{WS_PATH}", flush=True)
    await stop
    server.close()  # closes open connections with 1001, bounded by close_timeout
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 5.0)
    if hub.dropped:
        print(f"dropped {hub.dropped} messages on full client queues", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8801)
    parser.add_argument(
        "--mode",
        choices=("broadcast", "queue"),
        default="broadcast",
        help="fan-out: websockets.broadcast() with a write-buffer cap, or per-client queues",
    )
    args = parser.parse_args()
    asyncio.run(main(args.port, args.mode))
    sys.exit(0)
