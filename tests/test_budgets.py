"""Budgets: what a hostile frame, client or tenant can make the node spend.

The small versions of ``bench/hostile.py``'s attacks (which measures the memory
they cost): here each asserts what the attacker gets (a close code, an error,
a bound on an answer) and that the node keeps serving everyone else.
"""

from __future__ import annotations

import socket
import time

import jwt
import orjson
import trio
from trio_websocket import open_websocket_url

from tidings import Server

from .conftest import (
    TEST_TIMEOUT,
    Disconnects,
    call,
    http_request,
    raw_client,
    receive,
    running_server,
    subscribe,
    ws_client,
)
from .rawws import Closed, RawWebSocket

CENTRIFUGO = "/connection/websocket"
SECRET = "a-secret-long-enough-for-hs256-xxxxxxxx"
API_KEY = "an-api-key-long-enough"


async def healthy(server: Server) -> None:
    """A client that connects, subscribes and gets an event: the node still serves."""
    async with ws_client(server) as ws:
        await subscribe(ws, "healthy")
        await server.publish("healthy", "still here")
        assert (await receive(ws))["payload"] == "still here"


async def centrifugo_connect(server: Server, **kwargs: object) -> RawWebSocket:
    ws = await RawWebSocket.connect("127.0.0.1", server.port, CENTRIFUGO, **kwargs)  # type: ignore[arg-type]
    await ws.send_text('{"id":1,"connect":{}}')
    frame = await ws.receive_json()
    assert "connect" in frame, frame
    return ws


# --- answers bounded at the source, budgets checked between commands ---------------------


async def test_a_history_without_limit_carries_at_most_history_max_reply() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(history_max_reply=7) as server:
            for i in range(20):
                await server.publish("amp", i)
            ws = await centrifugo_connect(server)
            await ws.send_text('{"id":2,"history":{"channel":"amp","limit":-1}}')
            answer = await ws.receive_json()
            publications = answer["history"]["publications"]
            assert [orjson.loads(orjson.dumps(p["data"])) for p in publications] == list(range(7))
            await ws.aclose()


async def test_a_frame_of_history_commands_from_a_non_reader_is_closed_1008() -> None:
    """One frame asking for the history hundreds of times, never read: the answers
    stop at the client's budget, the reader stops, the client is closed."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_queued_bytes="64KiB", write_timeout=0.5) as server:
            disconnects = Disconnects(server)
            for i in range(100):
                await server.publish("amp", {"i": i, "pad": "x" * 1000})
            ws = await centrifugo_connect(server, receive_buffer=4096)
            lines = "\n".join(
                f'{{"id":{k},"history":{{"channel":"amp","limit":-1}}}}' for k in range(2, 300)
            )
            await ws.send_text(lines)
            (closed,) = await disconnects.wait()
            assert closed.code == 1008
            assert closed.reason.startswith("over budget: the client does not read")
            await healthy(server)
            await ws.aclose()


async def test_a_frame_of_more_commands_than_allowed_is_a_bad_request() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_commands_per_frame=10) as server:
            ws = await centrifugo_connect(server)
            await ws.send_text("\n".join(f'{{"id":{k},"ping":{{}}}}' for k in range(2, 20)))
            assert await ws.receive_close() == 3501
            await ws.aclose()


# --- pings and fragments ---------------------------------------------------------------


async def test_a_ping_flood_is_closed_1008_and_costs_one_pong() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            disconnects = Disconnects(server)
            flood = await raw_client(server, receive_buffer=4096)
            for _ in range(300):  # beyond the burst of 100, faster than 10/s
                await flood.send_frame(0x9, b"ping")
            (closed,) = await disconnects.wait()
            assert (closed.code, closed.reason) == (1008, "too many pings")
            await healthy(server)
            await flood.aclose()


async def test_a_message_in_thousands_of_tiny_fragments_is_closed_1009() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            disconnects = Disconnects(server)
            attacker = await raw_client(server)
            await attacker.send_frame(0x1, b"ab", fin=False)
            for _ in range(5000):
                await attacker.send_frame(0x0, b"ab", fin=False)
            (closed,) = await disconnects.wait()
            assert closed.code == 1009
            await healthy(server)
            await attacker.aclose()


async def test_unfinished_messages_past_the_node_budget_close_their_connection() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_partial_bytes="40KiB") as server:
            disconnects = Disconnects(server)
            first, second = await raw_client(server), await raw_client(server)
            await first.send_frame(0x1, b"x" * 30_000, fin=False)  # held: 30 KB of 40
            await second.send_frame(0x1, b"y" * 30_000, fin=False)  # would be 60: refused
            (closed,) = await disconnects.wait()
            assert closed.code == 1009 and "unfinished messages" in closed.reason
            await first.send_frame(0x0, b"!", fin=True)  # the first one still completes
            await healthy(server)
            await first.aclose()
            await second.aclose()


# --- history and replays ----------------------------------------------------------------


async def test_history_is_bounded_by_bytes_and_a_resume_from_it_says_so() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(history_max_bytes="100KiB") as server:
            for i in range(100):
                position = await server.publish("big", {"i": i, "pad": "x" * 10_000})
            events, _ = await server.history("big")
            assert 0 < len(events) < 10  # ~20 KB each, counted twice: 4 or 5 fit
            assert events[-1].seq == position.seq
            async with ws_client(server) as ws:
                reply = await subscribe(ws, "big", since=0, epoch=position.epoch)
                assert reply["payload"]["recovered"] is False
                replayed = [(await receive(ws))["seq"] for _ in range(len(events))]
                assert replayed == [event.seq for event in events]


async def test_a_replay_larger_than_the_budget_arrives_whole_and_in_order() -> None:
    """Paced by the client's budget: read from history as the client drains."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_queued_bytes="32KiB") as server:
            for i in range(200):
                position = await server.publish("t", {"i": i, "pad": "x" * 1000})
            async with ws_client(server) as ws:
                reply = await subscribe(ws, "t", since=0, epoch=position.epoch)
                assert reply["payload"]["recovered"] is True
                await server.publish("t", {"i": 200, "pad": ""})  # live, behind the replay
                seen = [(await receive(ws))["payload"]["i"] for _ in range(201)]
                assert seen == list(range(201))
            assert server.statistics().dropped == 0


async def test_a_slow_reader_under_drop_stays_and_sees_its_drops_as_gaps() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_queued_bytes="16KiB", write_timeout=1) as server:
            slow = await raw_client(server, receive_buffer=4096)
            await slow.send_json({"type": "subscribe", "topic": "t", "requestId": "s"})
            assert (await slow.receive_json())["type"] == "response"
            for i in range(300):
                await server.publish("t", {"i": i, "pad": "x" * 1000})
                if i % 20 == 0:  # it reads, slowly: a frame now and then
                    await slow.receive_json()
            await server.publish("t", "last")
            seqs = []
            while not seqs or seqs[-1] != 301:
                seqs.append((await slow.receive_json())["seq"])
            assert seqs == sorted(seqs) and len(seqs) < 300  # gaps: what it missed
            assert len(server.clients()) == 1  # still connected
            await slow.aclose()


# --- tenants ---------------------------------------------------------------------------


def token(tenant: str, **claims: object) -> str:
    body = {"sub": f"user-{tenant}", "tenant": tenant, "exp": time.time() + 600, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


async def test_a_tenant_at_its_topic_quota_affects_only_itself() -> None:
    settings = {
        "jwt_secret": SECRET,
        "api_key": API_KEY,
        "tenant_max_topics": 5,
        "max_topics": 100,
        "client_publish": True,
    }
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(**settings) as server:
            url_a = f"{server.url}?token={token('a')}"
            url_b = f"{server.url}?token={token('b')}"
            async with open_websocket_url(url_a) as a, open_websocket_url(url_b) as b:
                for k in range(5):  # subscribed: in use, nothing can make room
                    await subscribe(a, f"a{k}")
                refused = await call(a, {"type": "subscribe", "topic": "a5", "requestId": "x"})
                assert refused["payload"]["code"] == "too_many_topics"
                await subscribe(b, "b0")  # another tenant is not affected
                published = await call(
                    b, {"type": "publish", "topic": "b0", "payload": 1, "requestId": "p"}
                )
                assert published["type"] == "response"
                assert (await receive(b))["payload"] == 1
                status, _, body = await http_request(
                    server.port,
                    "POST",
                    "/api/publish",
                    orjson.dumps({"topic": "a-api", "payload": 1, "tenant": "a"}),
                    f"Authorization: apikey {API_KEY}\r\n",
                )
                assert status == 200, body  # the trusted API is exempt from the quota


async def test_a_publish_flood_makes_room_with_its_own_idle_topics() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(tenant_max_topics=10, max_topics=20) as server:
            async with ws_client(server) as ws:
                for k in range(50):
                    reply = await call(
                        ws, {"type": "publish", "topic": f"t{k}", "payload": k, "requestId": k}
                    )
                    assert reply["type"] == "response", reply
            assert server.statistics().topics <= 10
            await healthy(server)


async def test_a_tenant_at_its_connection_quota_gets_429_and_others_connect() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET, tenant_max_connections=2) as server:
            url_a = f"{server.url}?token={token('a')}"
            async with open_websocket_url(url_a), open_websocket_url(url_a):
                status, _, body = await http_request(
                    server.port,
                    "GET",
                    f"/ws?token={token('a')}",
                    b"",
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
                )
                assert status == 429 and b"too_many_connections" in body
                async with open_websocket_url(f"{server.url}?token={token('b')}") as other:
                    await subscribe(other, "t")


# --- before the upgrade, and before connect ------------------------------------------------


async def test_slow_handshakes_from_one_address_do_not_lock_out_another() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(max_pending_handshakes_per_ip=8) as server:
            slow = []
            for _ in range(40):  # far more than its share, each sending one byte
                sock = trio.socket.socket()
                await sock.connect(("127.0.0.1", server.port))
                await sock.send(b"G")
                slow.append(sock)
            assert server.builtin is not None
            while server.builtin.refused < 40 - 8:  # noqa: ASYNC110 - counted by the accept loop
                await trio.sleep(0.01)
            other = trio.socket.socket()
            await other.bind(("127.0.0.2", 0))
            await other.connect(("127.0.0.1", server.port))
            stream = trio.SocketStream(other)
            request = (
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await stream.send_all(request.encode())
            assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 101")
            await stream.aclose()
            for sock in slow:
                sock.close()


async def test_a_centrifugo_socket_that_never_connects_is_closed_3502() -> None:
    """With a JWT secret, pings of its own do not keep it open."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET, connect_timeout=0.3) as server:
            ws = await RawWebSocket.connect("127.0.0.1", server.port, CENTRIFUGO)
            async with trio.open_nursery() as nursery:

                async def keep_sending() -> None:
                    while True:
                        await ws.send_text("{}")
                        await trio.sleep(0.05)  # the client's own rhythm, not synchronisation

                nursery.start_soon(keep_sending)
                try:
                    await ws.receive_json()
                except Closed as closed:
                    assert closed.code == 3502
                nursery.cancel_scope.cancel()
            await ws.aclose()


async def test_a_string_number_in_a_centrifugo_command_is_an_error_not_a_traceback(
    caplog: object,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            await server.publish("amp", 1)
            ws = await centrifugo_connect(server)
            await ws.send_text('{"id":2,"history":{"channel":"amp","limit":"²"}}')
            answer = await ws.receive_json()
            assert answer["error"]["code"] == 107
            await ws.aclose()
    assert "Traceback" not in caplog.text  # type: ignore[attr-defined]


async def test_a_jwt_with_a_string_exp_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(jwt_secret=SECRET) as server:
            bad = jwt.encode(
                {"sub": "u", "exp": str(int(time.time()) + 600)}, SECRET, algorithm="HS256"
            )
            status, _, body = await http_request(
                server.port,
                "GET",
                f"/ws?token={bad}",
                b"",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            )
            assert status == 401 and b"not a number" in body


async def test_content_length_with_transfer_encoding_is_400_and_closed() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(
                b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            answer = b""
            while chunk := await stream.receive_some(4096):
                answer += chunk  # until the server closes: it must
            assert answer.startswith(b"HTTP/1.1 400")
            await stream.aclose()


def test_socket_module_binds_127_0_0_2() -> None:
    """The slow-handshake test needs a second loopback address (Linux has 127/8)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
