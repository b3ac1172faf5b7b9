"""Hostile input: whatever a client sends, it gets an error or a close, and nobody else notices."""

from __future__ import annotations

import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings.protocol.messages import Error
from tidings.protocol.native import NativeDialect

from .conftest import (
    TEST_TIMEOUT,
    http_request,
    raw_client,
    receive,
    running_server,
    subscribe,
    ws_client,
)

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what JSON parsers carry
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["subscribe", "unsubscribe", "publish", "request", "ack", "ping", "x"]
        )
        | json_values,
        "topic": st.text(max_size=300) | json_values,
        "requestId": st.text(max_size=300) | ints | json_values,
        "payload": json_values
        | st.fixed_dictionaries({}, optional={"since": json_values, "epoch": json_values}),
        "seq": ints | json_values,
    },
)


@given(st.text() | st.binary())
def test_decoding_arbitrary_frames_never_raises(frame: str | bytes) -> None:
    (result,) = NativeDialect().decode(frame)
    if isinstance(result, Error):
        assert result.code and result.message


@given(envelopes)
def test_decoding_arbitrary_envelopes_never_raises_and_errors_encode(
    message: dict[str, object],
) -> None:
    dialect = NativeDialect()
    (result,) = dialect.decode(orjson.dumps(message).decode())
    if isinstance(result, Error):
        frame = orjson.loads(dialect.encode_reply(result))
        assert frame["type"] == "error"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=5))
async def test_garbage_after_the_handshake_closes_only_that_connection(chunks: list[bytes]) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(close_timeout=0.1) as server, ws_client(server) as bystander:
            await subscribe(bystander, "t")
            hostile = await raw_client(server)
            for chunk in chunks:
                try:
                    await hostile.stream.send_all(chunk)
                except trio.BrokenResourceError:
                    break  # the server already hung up on it: that is the point
            await hostile.aclose()
            await server.publish("t", "still here")
            assert (await receive(bystander))["payload"] == "still here"


async def test_protocol_violations_close_with_1002(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        for frame in (
            bytes([0x83, 0x80]) + b"mask",  # reserved opcode 3
            bytes([0xC1, 0x80]) + b"mask",  # RSV1 set without an extension
            bytes([0x81, 0x02]) + b"hi",  # unmasked client frame
            bytes([0x89, 0xFE, 0x00, 0xC8]) + b"mask" + b"x" * 200,  # a 200-byte ping
        ):
            raw = await raw_client(server)
            await raw.stream.send_all(frame)
            assert await raw.receive_close() == 1002
            await raw.aclose()


async def test_oversized_and_malformed_http_requests_are_refused(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        # A head past h11's 16 KiB limit: refused with 431, then the connection is
        # closed (so the client may see a reset while it is still sending).
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        try:
            await stream.send_all(b"GET /health HTTP/1.1\r\nX-Big: " + b"y" * 200_000)
            answer = await stream.receive_some(1000)
            assert answer.startswith(b"HTTP/1.1 431")
        except trio.BrokenResourceError:
            pass
        await stream.aclose()
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await stream.receive_some(1000)
        assert answer.startswith(b"HTTP/1.1 400")
        await stream.aclose()
        bad_version, _, _ = await http_request(
            server.port,
            "GET",
            "/ws",
            headers=(
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 8\r\n"
            ),
        )
        assert bad_version == 426
        health, _, _ = await http_request(server.port, "GET", "/health")
        assert health == 200


async def test_fragmented_messages_are_reassembled_and_still_size_limited() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_message_size=1000, close_timeout=0.1) as server:
            raw = await raw_client(server)
            message = b'{"type": "ping", "requestId": "frag"}'
            await raw.send_frame(1, message[:10], fin=False)
            await raw.send_frame(0, message[10:20], fin=False)
            await raw.send_frame(9, b"interleaved ping")  # control frames may interleave
            await raw.send_frame(0, message[20:], fin=True)
            opcode, payload = await raw.receive_frame()
            assert (opcode, payload) == (10, b"interleaved ping")  # the pong
            assert (await raw.receive_json())["requestId"] == "frag"
            for _ in range(5):  # 5 x 300 bytes: over the limit only in total
                await raw.send_frame(0 if _ else 1, b"x" * 300, fin=False)
            assert await raw.receive_close() == 1009
            await raw.aclose()


async def test_no_frame_is_lost_where_a_read_of_tiny_frames_is_split_into_turns() -> None:
    """256 frames are handled per turn; the 257th, here a request, is the next
    turn's first (the loop over wsproto's frames pulled it and dropped it)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            raw = await raw_client(server)
            pong = b"\x8a\x80\x00\x00\x00\x00"  # a masked empty pong: no answer
            request = b'{"type": "ping", "requestId": "after-256"}'
            frame = bytes((0x81, 0x80 | len(request))) + b"\x00\x00\x00\x00" + request
            await raw.stream.send_all(pong * 256 + frame)
            assert (await raw.receive_json())["requestId"] == "after-256"
            await raw.aclose()
