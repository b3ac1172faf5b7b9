"""permessage-deflate on the built-in transport (RFC 7692), over real sockets.

The client here is ``tests/rawws.py``: it sees each frame as sent (RSV1 and
the compressed payload), so a test can check that every subscriber got the
very same compressed bytes, and it can send what no good client would (a
decompression bomb, broken deflate data, RSV1 where it does not belong).
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import pytest
import trio

from tidings.transport.deflate import RESPONSE, DeflateFramer, InboundDeflate, negotiate

from .conftest import TEST_TIMEOUT, raw_client, running_server
from .rawws import Closed, RawWebSocket

CHROMIUM_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
RSV1 = 0x40
TEXT, PING = 0x1, 0x9


def inflate(payload: bytes) -> bytes:
    """What a client with ``client_no_context_takeover`` does with each message."""
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def frame(ws: RawWebSocket) -> tuple[bool, dict[str, Any]]:
    """The next text message: whether it came compressed, and its JSON."""
    while True:
        first, payload = await ws.receive_raw()
        if first & 0x0F == TEXT:
            compressed = bool(first & RSV1)
            return compressed, orjson.loads(inflate(payload) if compressed else payload)
        if first & 0x0F == 0x8:
            raise Closed(int.from_bytes(payload[:2], "big"))


async def raw_frame(ws: RawWebSocket) -> tuple[int, bytes]:
    """The next text frame as sent: its first byte and its payload."""
    while True:
        first, payload = await ws.receive_raw()
        if first & 0x0F != PING:
            return first, payload


async def call(ws: RawWebSocket, message: dict[str, Any], *, compress: bool = False) -> Any:
    data = orjson.dumps(message)
    await ws.send_frame(TEXT, deflate(data) if compress else data, rsv1=compress)
    while True:
        _, reply = await frame(ws)
        if reply.get("requestId") == message.get("requestId"):
            return reply


def big_payload(n: int = 1024) -> dict[str, Any]:
    """About ``n`` bytes of JSON that compress as logs do, not as a run of one letter."""
    lines = [
        f"step {i}: pulled layer sha256:{i * 7919:016x} in {i % 13}.{i % 7}s" for i in range(n)
    ]
    text = ""
    for line in lines:
        if len(text) + len(line) > n:
            break
        text += line + "\n"
    return {"log": text}


# --- negotiation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offers",
    [
        ["permessage-deflate"],
        ["permessage-deflate; client_max_window_bits"],  # Chromium
        ["permessage-deflate; client_max_window_bits=12; server_no_context_takeover"],
        ["permessage-deflate; server_max_window_bits=15; client_no_context_takeover"],
        ["x-webkit-deflate-frame, permessage-deflate"],
        ["permessage-deflate; server_max_window_bits=10, permessage-deflate"],  # the second
    ],
)
def test_offers_tidings_can_honour_are_answered_without_context_takeover(
    offers: list[str],
) -> None:
    assert negotiate(offers) == RESPONSE
    assert RESPONSE == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


@pytest.mark.parametrize(
    "offers",
    [
        ["x-webkit-deflate-frame"],
        # Every subscriber shares one compressed form, made with a 32 KiB window.
        ["permessage-deflate; server_max_window_bits=10"],
        ["permessage-deflate; unknown_parameter"],
        ["permessage-deflate; client_no_context_takeover; client_no_context_takeover"],
        ["permessage-deflate; server_no_context_takeover=1"],
        ["permessage-deflate; client_max_window_bits=99"],
        ["permessage-deflate; " + "x" * 5000],
    ],
)
def test_offers_tidings_cannot_honour_are_declined(offers: list[str]) -> None:
    assert negotiate(offers) is None


def test_a_compressed_message_stands_alone() -> None:
    """No context takeover: each message inflates with a fresh decompressor,
    whatever the framer compressed before it."""
    framer = DeflateFramer(True, min_size=0)
    messages = [orjson.dumps(big_payload(600 + i)) for i in range(5)]
    frames = [framer(message) for message in messages]
    for message, framed in zip(messages, frames, strict=True):
        assert framed[0] == 0x80 | RSV1 | TEXT
        length = framed[1] & 0x7F
        payload = framed[4:] if length == 126 else framed[2:]
        assert inflate(payload) == message
    # Short messages go as they are.
    assert DeflateFramer(True, min_size=256)(b'{"a":1}') == b'\x81\x07{"a":1}'


# --- over real sockets ------------------------------------------------------------------------


async def test_a_browser_offer_is_accepted_and_events_arrive_compressed() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            assert f"sec-websocket-extensions: {RESPONSE}".encode() in ws.head.lower()
            reply = await call(ws, {"type": "subscribe", "topic": "logs", "requestId": 1})
            assert reply["payload"]["status"] == "subscribed"
            payload = big_payload()
            await server.publish("logs", payload)
            compressed, event = await frame(ws)
            assert compressed and event["payload"] == payload and event["seq"] == 1
            await ws.aclose()


async def test_every_subscriber_gets_the_same_compressed_bytes() -> None:
    """Compressed once per event: three compressed clients get identical bytes, a
    client that offered nothing gets the same JSON uncompressed."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            clients = [await raw_client(server, headers=CHROMIUM_OFFER) for _ in range(3)]
            plain = await raw_client(server)
            assert b"sec-websocket-extensions" not in plain.head.lower()
            for i, ws in enumerate([*clients, plain]):
                await call(ws, {"type": "subscribe", "topic": "logs", "requestId": i})
            await server.publish("logs", big_payload())
            seen = [await raw_frame(ws) for ws in clients]
            first, plain_payload = await raw_frame(plain)
            assert first & RSV1 == 0
            assert {bytes(payload) for _, payload in seen} == {seen[0][1]}
            assert all(first & RSV1 for first, _ in seen)
            assert inflate(seen[0][1]) == plain_payload
            assert len(seen[0][1]) < len(plain_payload) / 2
            for ws in [*clients, plain]:
                await ws.aclose()


async def test_small_frames_go_out_uncompressed() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(compression_min_size=512) as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            await call(ws, {"type": "subscribe", "topic": "t", "requestId": 1})
            await server.publish("t", {"n": 1})
            await server.publish("t", big_payload(1024))
            assert (await frame(ws))[0] is False
            assert (await frame(ws))[0] is True
            await ws.aclose()


async def test_a_namespace_can_leave_its_events_uncompressed() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(namespaces={"media": {"compression": False}}) as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            await call(ws, {"type": "subscribe", "topic": "media:jpeg", "requestId": 1})
            await call(ws, {"type": "subscribe", "topic": "logs", "requestId": 2})
            await server.publish("media:jpeg", big_payload())
            await server.publish("logs", big_payload())
            compressed, event = await frame(ws)
            assert (compressed, event["topic"]) == (False, "media:jpeg")
            compressed, event = await frame(ws)
            assert (compressed, event["topic"]) == (True, "logs")
            await ws.aclose()


async def test_compression_can_be_turned_off_for_the_node() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(compression=False) as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            assert b"sec-websocket-extensions" not in ws.head.lower()
            await call(ws, {"type": "subscribe", "topic": "t", "requestId": 1})
            await server.publish("t", big_payload())
            assert (await frame(ws))[0] is False
            await ws.aclose()


async def test_what_a_client_compresses_is_inflated() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            await call(ws, {"type": "subscribe", "topic": "t", "requestId": 1}, compress=True)
            payload = big_payload(4000)
            reply = await call(
                ws, {"type": "publish", "topic": "t", "requestId": 2, "payload": payload},
                compress=True,
            )  # fmt: skip
            assert reply["payload"]["status"] == "published"
            assert (await frame(ws))[1]["payload"] == payload
            # In fragments: only the first says it is compressed.
            data = deflate(orjson.dumps({"type": "ping", "requestId": 3}))
            await ws.send_frame(TEXT, data[:5], fin=False, rsv1=True)
            await ws.send_frame(0x0, data[5:])
            pong = (await frame(ws))[1]
            assert (pong["type"], pong["requestId"]) == ("pong", 3)
            await ws.aclose()


LIMIT = 64 * 1024


async def closed_with(ws: RawWebSocket) -> int:
    with pytest.raises(Closed) as caught:
        while True:
            await frame(ws)
    return caught.value.code


@pytest.mark.parametrize("fragments", [1, 40])
async def test_a_decompression_bomb_is_closed_with_1009(fragments: int) -> None:
    """10 MB of zeros deflate to about 10 KB: the server inflates at most its
    message limit of it, closes with 1009, and its other clients notice nothing."""
    bomb = deflate(b"0" * 10_000_000)
    assert len(bomb) < LIMIT
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_message_size=LIMIT) as server:
            bystander = await raw_client(server, headers=CHROMIUM_OFFER)
            await call(bystander, {"type": "subscribe", "topic": "t", "requestId": 1})
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            step = -(-len(bomb) // fragments)
            pieces = [bomb[i : i + step] for i in range(0, len(bomb), step)]
            for i, piece in enumerate(pieces):
                await ws.send_frame(TEXT if i == 0 else 0x0, piece, fin=i == len(pieces) - 1,
                                    rsv1=i == 0)  # fmt: skip
            assert await closed_with(ws) == 1009
            await server.publish("t", {"still": "here"})
            assert (await frame(bystander))[1]["payload"] == {"still": "here"}
            for client in (ws, bystander):
                await client.aclose()


async def test_compressed_input_is_bounded_even_when_it_inflates_to_nothing() -> None:
    """Empty deflate blocks, a frame bigger than the limit of them: 1009, not a
    frame read forever."""
    empties = b"\x00\x00\x00\xff\xff" * (LIMIT // 4)  # stored blocks of nothing
    assert len(empties) > LIMIT and inflate(empties) == b""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_message_size=LIMIT) as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            await ws.send_frame(TEXT, empties, rsv1=True)
            assert await closed_with(ws) == 1009
            await ws.aclose()


async def test_broken_deflate_data_closes_with_1007() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER)
            await ws.send_frame(TEXT, b"\xff\xfe\xfd not deflate", rsv1=True)
            assert await closed_with(ws) == 1007
            await ws.aclose()


@pytest.mark.parametrize("offer", [False, True])
async def test_rsv1_where_it_does_not_belong_is_a_protocol_error(offer: bool) -> None:
    """Without the extension, RSV1 means nothing; with it, never on a control frame."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            ws = await raw_client(server, headers=CHROMIUM_OFFER if offer else "")
            if offer:
                await ws.send_frame(PING, b"", rsv1=True)
            else:
                await ws.send_frame(TEXT, deflate(b'{"type":"ping"}'), rsv1=True)
            assert await closed_with(ws) == 1002
            await ws.aclose()


def test_inflating_is_paced_so_small_frames_cannot_buy_unbounded_work() -> None:
    """500 KiB of JSON in 553 bytes of deflate: a connection's messages inflate
    within a budget (twice the message limit at once, then a rate), past which
    the transport waits before it reads more (TCP pushes back on the client)."""
    limit = 512 * 1024
    bomb = deflate(b"a" * (limit - 100))
    framers = (DeflateFramer(True, 256), DeflateFramer(False, 256))
    extension = InboundDeflate(limit, framers, now=0.0)
    assert extension.burst == 2 * limit and extension.rate == 1024 * 1024

    def message() -> bytes:
        extension.begin()
        return extension.inflate(bomb) + extension.finish()

    assert len(message()) == limit - 100 and extension.wait(0.0) == 0.0
    assert len(message()) == limit - 100 and extension.wait(0.0) == 0.0  # the burst
    message()
    owed = extension.wait(0.0)
    assert 0 < owed <= limit / extension.rate  # at most one message's worth to wait
    assert extension.wait(owed) == 0.0  # once that time has passed, reading goes on
