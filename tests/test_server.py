"""The server over real sockets: delivery, resume, limits, hostile input."""

from __future__ import annotations

import http.client

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from tidings import ErrorCode, OverflowPolicy, RequestContext, RequestError, Server
from tidings.client import retry_hint

from .conftest import (
    TEST_TIMEOUT,
    Disconnects,
    call,
    http_request,
    raw_client,
    receive,
    running_server,
    send,
    subscribe,
    ws_client,
)


async def test_two_clients_receive_the_same_events_in_seq_order(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as a, ws_client(server) as b:
            await subscribe(a, "deploys")
            await subscribe(b, "deploys")
            for i in range(50):
                await server.publish("deploys", {"n": i})
            for ws in (a, b):
                events = [await receive(ws) for _ in range(50)]
                assert [e["seq"] for e in events] == list(range(1, 51))
                assert [e["payload"]["n"] for e in events] == list(range(50))
                assert {e["type"] for e in events} == {"event"}
                assert {e["topic"] for e in events} == {"deploys"}
                assert len({e["epoch"] for e in events}) == 1
                assert all(e["timestamp"].endswith("Z") for e in events)


async def test_a_client_publishes_and_subscribers_receive_it(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as publisher, ws_client(server) as reader:
            await subscribe(reader, "chat")
            reply = await call(
                publisher,
                {"type": "publish", "topic": "chat", "payload": "hello", "requestId": 1},
            )
            assert reply["payload"]["status"] == "published"
            assert reply["payload"]["seq"] == 1
            event = await receive(reader)
            assert (event["seq"], event["payload"]) == (1, "hello")


async def test_unsubscribe_stops_delivery(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            await subscribe(ws, "a")
            await subscribe(ws, "b")
            await server.publish("a", 1)
            assert (await receive(ws))["payload"] == 1
            reply = await call(ws, {"type": "unsubscribe", "topic": "a", "requestId": "u"})
            assert reply["payload"] == {"status": "unsubscribed", "topic": "a"}
            await server.publish("a", 2)
            await server.publish("b", 3)
            # The next frame is b's event: a's second event never came.
            event = await receive(ws)
            assert (event["topic"], event["payload"]) == ("b", 3)
            again = await call(ws, {"type": "unsubscribe", "topic": "a", "requestId": "u2"})
            assert again["payload"]["code"] == ErrorCode.NOT_SUBSCRIBED


async def test_resume_after_a_disconnect_yields_exactly_the_missed_events(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            await subscribe(ws, "deploys")
            for i in range(5):
                await server.publish("deploys", i)
            seen = [await receive(ws) for _ in range(5)]
        last = seen[-1]
        for i in range(5, 12):  # published while the client is away
            await server.publish("deploys", i)
        async with ws_client(server) as ws:
            reply = await subscribe(ws, "deploys", since=last["seq"], epoch=last["epoch"])
            assert reply["payload"]["recovered"] is True
            assert reply["payload"]["replayed"] == 7
            await server.publish("deploys", 12)  # live, after the replay
            events = [await receive(ws) for _ in range(8)]
            assert [e["seq"] for e in events] == list(range(6, 14))
            assert [e["payload"] for e in events] == list(range(5, 13))


async def test_resume_past_the_history_window_answers_recovered_false() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(history_size=3) as server, ws_client(server) as ws:
            first = await server.publish("t", 0)
            for i in range(1, 10):
                await server.publish("t", i)
            reply = await subscribe(ws, "t", since=first.seq, epoch=first.epoch)
            assert reply["payload"]["recovered"] is False
            # What history still holds comes anyway; the seq jump shows the gap.
            assert reply["payload"]["replayed"] == 3
            assert [(await receive(ws))["seq"] for _ in range(3)] == [8, 9, 10]
            stale = await subscribe(ws, "other", since=1, epoch="not-this-stream")
            assert stale["payload"]["recovered"] is False


async def test_a_stalled_client_does_not_slow_others_and_is_dropped_for() -> None:
    payload = {"blob": "x" * 32_000}
    events = 600  # ~19 MB: far more than the socket buffers of a client that never reads
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(outbox_size=16, write_timeout=30) as server:
            stalled = await raw_client(server, receive_buffer=4096)
            await stalled.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
            assert (await stalled.receive_json())["type"] == "response"  # then it stops reading
            [stalled_client] = server.clients()
            async with ws_client(server) as healthy:
                await subscribe(healthy, "t")
                for _ in range(events):
                    await server.publish("t", payload)
                    seq = (await receive(healthy))["seq"]
                assert seq == events  # every event reached the healthy client, in step
                stats = server.client_statistics(stalled_client.id)
                assert stats is not None
                assert stats.dropped > 0
                # Bounded: the stalled client's queue never held more than its outbox.
                assert stats.peak_queued <= 16
                assert server.statistics().dropped == stats.dropped
            await stalled.aclose()


async def test_a_stalled_client_under_policy_disconnect_is_closed_with_1008() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            outbox_size=8,
            overflow_policy=OverflowPolicy.DISCONNECT,
            write_timeout=30,
            close_timeout=0.2,
        ) as server:
            disconnects = Disconnects(server)
            stalled = await raw_client(server, receive_buffer=4096)
            await stalled.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
            assert (await stalled.receive_json())["type"] == "response"
            while server.statistics().dropped == 0:
                await server.publish("t", {"blob": "x" * 32_000})
            # Reading again, the client finds the close frame behind what was
            # already in its socket: 1008, and nothing stale after it.
            assert await stalled.receive_close() == 1008
            [closed] = await disconnects.wait()
            assert (closed.code, closed.reason) == (1008, "outbox overflow")
            await stalled.aclose()


async def test_the_write_timeout_cuts_off_a_client_that_stopped_reading() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(write_timeout=0.5, outbox_size=10_000) as server:
            disconnects = Disconnects(server)
            stalled = await raw_client(server, receive_buffer=4096)
            await stalled.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
            assert (await stalled.receive_json())["type"] == "response"
            for _ in range(300):
                await server.publish("t", {"blob": "x" * 32_000})
            [closed] = await disconnects.wait()
            assert closed.reason == "write timeout"
            assert server.clients() == []
            await stalled.aclose()


async def test_a_message_over_the_limit_closes_with_1009() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server, ws_client(server) as ws:
            await ws.send_message("x" * (600 * 1024))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1009


async def test_text_that_is_not_utf8_closes_with_1007(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        raw = await raw_client(server)
        await raw.send_text(b'{"type": "ping", "x": "\xff\xfe"}')
        assert await raw.receive_close() == 1007
        await raw.aclose()


MALFORMED = [
    ("not json", ErrorCode.INVALID_JSON),
    ("[1]", ErrorCode.INVALID_MESSAGE),
    ('{"type": "subscribe"}', ErrorCode.MISSING_FIELD),
    ('{"type": "teleport", "topic": "t"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": "subscribe", "topic": 12}', ErrorCode.INVALID_FIELD),
    ('{"type": "subscribe", "topic": ""}', ErrorCode.INVALID_TOPIC),
    ('{"type": "ack", "topic": "t", "seq": 1}', ErrorCode.NOT_SUBSCRIBED),
    ('{"type": "request", "topic": "nobody-answers"}', ErrorCode.NOT_FOUND),
]


async def test_each_malformed_frame_gets_its_error_and_the_connection_keeps_working(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as hostile, ws_client(server) as bystander:
            await subscribe(bystander, "t")
            for frame, code in MALFORMED:
                await hostile.send_message(frame)
                error = await receive(hostile)
                assert error["type"] == "error", frame
                assert error["payload"]["code"] == code, frame
                assert error["payload"]["message"]
            await hostile.send_message(b"\x00binary\x01")
            error = await receive(hostile)
            assert error["payload"]["code"] == ErrorCode.UNSUPPORTED_FRAME
            # requestId is echoed on errors when the frame had one.
            echoed = await call(hostile, {"type": "subscribe", "topic": 5, "requestId": "r-9"})
            assert (echoed["type"], echoed["requestId"]) == ("error", "r-9")
            # Still a working connection, and nobody else noticed.
            await subscribe(hostile, "t")
            await server.publish("t", "after")
            assert (await receive(hostile))["payload"] == "after"
            assert (await receive(bystander))["payload"] == "after"


async def test_restricted_topics_refuse_others() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(topics=("deploys", "app.*")) as server, ws_client(server) as ws:
            await subscribe(ws, "deploys")
            await subscribe(ws, "app.billing")
            for kind in ("subscribe", "publish", "request"):
                reply = await call(
                    ws, {"type": kind, "topic": "secrets", "payload": {}, "requestId": kind}
                )
                assert reply["payload"]["code"] == ErrorCode.UNKNOWN_TOPIC


async def test_a_silent_client_is_closed_after_the_read_timeout() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(ping_interval=0.1, read_timeout=0.3, close_timeout=0.2) as server:
            disconnects = Disconnects(server)
            silent = await raw_client(server)  # it never answers the pings
            assert await silent.receive_close() == 1011
            [closed] = await disconnects.wait()
            assert closed.reason == "read timeout"
            await silent.aclose()


async def test_a_client_that_answers_pings_stays_connected_past_the_read_timeout() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(ping_interval=0.05, read_timeout=0.2) as server,
            ws_client(server) as ws,  # trio-websocket answers pings by itself
        ):
            await subscribe(ws, "t")
            # Several read timeouts pass while the client has nothing to say.
            for _ in range(10):
                await server.publish("t", "tick")
                assert (await receive(ws))["payload"] == "tick"
                await trio.sleep(0.1)
            assert len(server.clients()) == 1


async def test_request_handlers_answer_and_their_failures_become_errors() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(request_timeout=0.2) as server:

            @server.on_request("personas")
            async def personas(request: RequestContext) -> dict[str, object]:
                namespace = (request.payload or {}).get("namespace")
                return {"personas": [{"namespace": namespace or "all", "name": "nginx"}]}

            async def broken(_: RequestContext) -> None:
                raise RuntimeError("boom")

            async def refusing(_: RequestContext) -> None:
                raise RequestError("forbidden_cluster", "you may not look at this cluster")

            async def slow(_: RequestContext) -> None:
                await trio.sleep_forever()

            server.on_request("broken", broken)
            server.on_request("refusing", refusing)
            server.on_request("slow", slow)
            async with ws_client(server) as ws:
                answer = await call(
                    ws,
                    {
                        "type": "request",
                        "topic": "personas",
                        "requestId": "req-1",
                        "payload": {"namespace": "production"},
                    },
                )
                assert answer["type"] == "response"
                assert answer["payload"] == {
                    "personas": [{"namespace": "production", "name": "nginx"}]
                }
                for topic, code in [
                    ("broken", ErrorCode.REQUEST_FAILED),
                    ("refusing", "forbidden_cluster"),
                    ("slow", ErrorCode.REQUEST_TIMEOUT),
                ]:
                    reply = await call(ws, {"type": "request", "topic": topic, "requestId": topic})
                    assert reply["type"] == "error"
                    assert reply["payload"]["code"] == code
                assert (await call(ws, {"type": "ping", "requestId": "p"}))["type"] == "pong"


async def test_ack_is_accepted_silently_for_a_subscribed_topic(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            await subscribe(ws, "t")
            await send(ws, {"type": "ack", "topic": "t", "seq": 0})
            # No reply to an ack: the next frame answers the ping that follows it.
            assert (await call(ws, {"type": "ping", "requestId": "p"}))["type"] == "pong"


async def test_health_reports_status_and_counts(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            await subscribe(ws, "t")
            status, headers, body = await http_request(server.port, "GET", "/health")
        assert status == 200
        assert headers["content-type"] == "application/json"
        health = orjson.loads(body)
        assert health["status"] == "ok"
        assert (health["connections"], health["topics"], health["subscriptions"]) == (1, 1, 1)
        assert health["uptime"] >= 0
        missing, _, _ = await http_request(server.port, "GET", "/nothing")
        assert missing == 404
        plain, _, _ = await http_request(server.port, "GET", "/ws")
        assert plain == 426


async def test_leaving_open_server_closes_clients_with_1001() -> None:
    stop = trio.Event()

    async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with running_server() as server:
            task_status.started(server)
            await stop.wait()

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve)
            async with ws_client(server) as ws:
                await subscribe(ws, "t")
                await server.publish("t", "last words")
                stop.set()  # leave open_server while the client is connected
                # The queued event is flushed before the close frame.
                assert (await receive(ws))["payload"] == "last words"
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001


async def test_a_shutdown_spreads_its_clients_reconnects_with_a_retry_hint() -> None:
    """Each client's 1001 says when to come back, at random within reconnect_window."""
    stop = trio.Event()

    async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with running_server(reconnect_window="3s") as server:
            task_status.started(server)
            await stop.wait()

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve)
            clients = [await raw_client(server) for _ in range(8)]
            stop.set()
            reasons = [await client.receive_close_reason() for client in clients]
    hints = [retry_hint(reason) for code, reason in reasons if code == 1001]
    assert len(hints) == 8 and all(hint is not None and 0 <= hint <= 3 for hint in hints)
    assert len(set(hints)) > 1  # spread, not one wave
    assert all(reason.startswith("server shutting down; retry=") for _, reason in reasons)


def test_a_retry_hint_is_read_only_from_the_end_of_a_reason() -> None:
    assert retry_hint("server shutting down; retry=2350") == 2.35
    assert retry_hint("server shutting down") is None
    assert retry_hint("retry=5; but not at the end") is None
    assert retry_hint(None) is None


async def test_connections_over_the_limit_are_refused_with_503() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_connections=1) as server, ws_client(server):
            with pytest.raises(ConnectionError, match="503"):
                await raw_client(server)


async def test_a_replay_longer_than_the_outbox_loses_nothing_to_live_traffic() -> None:
    """A resume replays up to history_size events; live ones must queue behind, not drop."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(outbox_size=8, history_size=500) as server:
            for i in range(300):
                await server.publish("t", i)
            async with ws_client(server) as ws:
                reply = await subscribe(ws, "t", since=0)
                assert reply["payload"] == {
                    "status": "subscribed",
                    "topic": "t",
                    "seq": 300,
                    "epoch": reply["payload"]["epoch"],
                    "recovered": True,
                    "replayed": 300,
                }
                for i in range(300, 306):  # live, while the replay is still queued
                    await server.publish("t", i)
                seqs = [(await receive(ws))["seq"] for _ in range(306)]
            assert seqs == list(range(1, 307))
            assert server.statistics().dropped == 0


async def test_ack_with_a_request_id_is_confirmed_and_cannot_run_ahead(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            await subscribe(ws, "t")
            await server.publish("t", 1)
            await receive(ws)
            reply = await call(ws, {"type": "ack", "topic": "t", "seq": 1, "requestId": "a1"})
            assert reply["payload"] == {"status": "acked", "seq": 1}
            ahead = await call(ws, {"type": "ack", "topic": "t", "seq": 5, "requestId": "a2"})
            assert ahead["payload"]["code"] == ErrorCode.INVALID_FIELD
            [client] = server.clients()
            stats = server.client_statistics(client.id)
            assert stats is not None
            assert stats.acked == {"t": 1}


async def test_an_idle_tcp_connection_is_closed_quietly_after_the_handshake_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(handshake_timeout=0.2) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            assert await stream.receive_some(10) == b""  # the server hung up
            await stream.aclose()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_client_that_pauses_reading_catches_up_in_order_without_loss() -> None:
    """Its socket fills, the server keeps the rest queued and writes it as the client reads
    (within its byte budget, raised here to hold all of it)."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(
            outbox_size=1000, write_timeout=30, max_queued_bytes="16MiB"
        ) as server:
            slow = await raw_client(server, receive_buffer=4096)
            await slow.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
            assert (await slow.receive_json())["type"] == "response"
            for i in range(300):  # ~10 MB: far more than the socket buffers hold
                await server.publish("t", {"i": i, "blob": "x" * 32_000})
            [client] = server.clients()
            stats = server.client_statistics(client.id)
            assert stats is not None
            assert stats.queued > 0  # the socket is full: the rest waits in the outbox
            received = [(await slow.receive_json())["payload"]["i"] for _ in range(300)]
            assert received == list(range(300))
            stats = server.client_statistics(client.id)
            assert stats is not None
            assert (stats.dropped, stats.queued) == (0, 0)
            await slow.aclose()


async def test_a_keep_alive_client_is_told_before_the_connection_closes(server: Server) -> None:
    """The last request a connection may carry is answered with Connection: close."""

    def hundred_and_one_requests() -> list[str | None]:
        seen: list[str | None] = []
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        for _ in range(101):
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            seen.append(response.getheader("connection"))
            if response.getheader("connection") == "close":
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.close()
        return seen

    with trio.fail_after(TEST_TIMEOUT):
        seen = await trio.to_thread.run_sync(hundred_and_one_requests)
    assert seen.index("close") == 99  # the 100th; the 101st went over a new connection
    assert seen.count("close") == 1


async def test_a_plain_get_of_the_websocket_path_is_answered_as_protocol_md_says(
    server: Server,
) -> None:
    """426 ``upgrade_required`` without ``connection: close``: a keep-alive connection
    stays open for the next request."""
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            received = b""

            async def response() -> bytes:
                nonlocal received
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(65536)
                head, _, received = received.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(received) < length:
                    received += await stream.receive_some(65536)
                body, received = received[:length], received[length:]
                return head + b"\r\n\r\n" + body

            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await response()
            assert first.startswith(b"HTTP/1.1 426 ")
            assert b"upgrade: websocket" in first.lower()
            assert b"connection: close" not in first.lower()
            assert orjson.loads(first.partition(b"\r\n\r\n")[2])["error"]["code"] == (
                "upgrade_required"
            )
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await response()).startswith(b"HTTP/1.1 200 ")


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    assert len(payload) < 126
    return (
        bytes([0x81, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


UPGRADE_HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_frames_sent_with_the_upgrade_request_are_served(server) -> None:
    """A client may send its first messages in the same write as its upgrade."""
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            ping = orjson.dumps({"type": "ping", "requestId": "early"})
            await stream.send_all(UPGRADE_HEAD + _masked_text(ping))
            received = b""
            while b'"early"' not in received:
                chunk = await stream.receive_some(65536)
                assert chunk, received
                received += chunk
            head, _, frames = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
            assert frames[0] == 0x81 and b'"type":"pong"' in frames


async def test_an_upgrade_arriving_a_byte_at_a_time_is_accepted(server) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            for i in range(len(UPGRADE_HEAD)):
                await stream.send_all(UPGRADE_HEAD[i : i + 1])
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = await stream.receive_some(65536)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 101 ")


async def test_a_refused_upgrade_gets_a_json_answer_and_the_connection_closes() -> None:
    async with running_server(auth="jwt", jwt_secret="s" * 32) as server:
        with trio.fail_after(TEST_TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(UPGRADE_HEAD)
                received = b""
                while chunk := await stream.receive_some(65536):
                    received += chunk  # until the server closes
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), head
            assert b"connection: close" in head
            assert int(head.split(b"content-length: ")[1].split(b"\r\n")[0]) == len(body)
            assert orjson.loads(body)["error"]["code"]
