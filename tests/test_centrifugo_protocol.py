"""Centrifugo's protocol: the sans-IO codec, and the endpoint's frames seen raw.

The SDK tests (test_centrifugo_python.py, test_centrifugo_node.py) show the
clients work; these pin the frames and the edges the SDKs never produce:
batches, blank lines, bad JSON, unknown methods, commands before connect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from tidings import Config, ConfigError, ErrorCode, Server, Session, open_server
from tidings.broker.outbox import Outbox, OverflowPolicy
from tidings.endpoints.centrifugo import centrifugo_endpoint, send_message, unsubscribe_client
from tidings.protocol import centrifugo as wire
from tidings.protocol.messages import AppMessage, ClientInfo, Error, Event, PresenceChange

from .conftest import TEST_TIMEOUT
from .redis_fixture import RedisServer

SECRET = "centrifugo-protocol-secret-32-bytes"

# --- decoding -------------------------------------------------------------------------


def test_one_command_decodes_to_a_message_named_by_its_method() -> None:
    (message,) = wire.decode_frame('{"id":2,"subscribe":{"channel":"news","flag":1}}')
    assert message == AppMessage("subscribe", {"channel": "news", "flag": 1}, 2)


def test_a_batch_decodes_in_order_skipping_blank_lines_and_a_trailing_newline() -> None:
    frame = '{"id":1,"connect":{}}\n\n{"id":2,"presence":{"channel":"a"}}\n  \n{}\n'
    assert wire.decode_frame(frame) == [
        AppMessage("connect", {}, 1),
        AppMessage("presence", {"channel": "a"}, 2),
        AppMessage(wire.PONG, {}),
    ]
    assert wire.decode_frame(frame.encode()) == wire.decode_frame(frame)  # a binary frame
    assert wire.decode_frame("\n") == []


@pytest.mark.parametrize(
    "command",
    ["{}", '{"id":0}', '{"id":null}', '{"id":0,"connect":{}}', '{"id":0,"whatever":1}'],
)
def test_a_command_without_an_id_is_a_pong(command: str) -> None:
    assert wire.decode_frame(command) == [AppMessage(wire.PONG, {})]


def test_send_has_no_id() -> None:
    assert wire.decode_frame('{"send":{"data":{"x":1}}}') == [
        AppMessage("send", {"data": {"x": 1}})
    ]


def test_unknown_fields_are_ignored_and_the_first_method_counts() -> None:
    (message,) = wire.decode_frame('{"id":5,"extra":{"a":1},"rpc":{"method":"m"}}')
    assert message == AppMessage("rpc", {"method": "m"}, 5)
    (message,) = wire.decode_frame('{"id":5,"connect":null,"refresh":{"token":"t"}}')
    assert message.kind == "refresh"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("{nope", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"id":3,"dance":{}}', "unknown method 'dance'"),
        ('{"id":3}', "no method"),
        ('{"id":-1,"connect":{}}', "unsigned"),
        ('{"id":true,"connect":{}}', "unsigned"),
        ('{"id":4294967296,"connect":{}}', "unsigned"),
        ('{"id":"7","connect":{}}', "unsigned"),
        ('{"id":3,"subscribe":"news"}', "holds an object"),
        ('{"send":[1]}', "holds an object"),
    ],
)
def test_what_breaks_the_protocol_is_a_bad_request(frame: str, reason: str) -> None:
    (message,) = wire.decode_frame(frame)
    assert message.kind == wire.BAD_REQUEST
    assert reason in message.body["reason"]


def test_a_bad_line_ends_the_batch_and_the_commands_before_it_stand() -> None:
    frame = '{"id":1,"connect":{}}\n{bad\n{"id":3,"ping":{}}'
    decoded = wire.decode_frame(frame)
    assert [message.kind for message in decoded] == ["connect", wire.BAD_REQUEST]
    assert wire.decode_frame(b"\xff\xfe")[0].kind == wire.BAD_REQUEST


# --- encoding --------------------------------------------------------------------------


def event(seq: int = 7, payload: Any = None, payload_json: bytes = b"") -> Event:
    return Event("chat:room", seq, "e1", payload, "2026-01-01T00:00:00Z", payload_json)


def test_a_publication_push_embeds_the_payload_as_the_broker_encoded_it() -> None:
    frame = wire.encode_publication_push(event(payload={"a": 1}, payload_json=b'{"a": 1}'))
    assert frame == b'{"push":{"channel":"chat:room","pub":{"data":{"a": 1},"offset":7}}}'
    # Without the broker's bytes (an event built by hand), the payload is encoded.
    frame = wire.encode_publication_push(event(payload=["x"]))
    assert orjson.loads(frame) == {
        "push": {"channel": "chat:room", "pub": {"data": ["x"], "offset": 7}}
    }
    # The channel is JSON-escaped.
    odd = Event('a"b', 1, "e", 1, "t", b"1")
    assert orjson.loads(wire.encode_publication_push(odd))["push"]["channel"] == 'a"b'


def test_replies_errors_and_pushes_have_centrifugos_shapes() -> None:
    publications = [wire.publication(event(3, payload_json=b"[1]"))]
    reply = wire.encode_result(4, "history", {"offset": 3, "publications": publications})
    assert reply == b'{"id":4,"history":{"offset":3,"publications":[{"data":[1],"offset":3}]}}'
    assert orjson.loads(wire.encode_error(5, 103, "no")) == {
        "id": 5,
        "error": {"code": 103, "message": "no"},
    }
    assert orjson.loads(wire.encode_error(5, 100, "later", temporary=True))["error"] == {
        "code": 100,
        "message": "later",
        "temporary": True,
    }
    client = ClientInfo("c1", "127.0.0.1:1", 0.0, "centrifugo", "/connection/websocket", None)
    assert orjson.loads(wire.encode_presence_push(PresenceChange("news", "join", client))) == {
        "push": {"channel": "news", "join": {"info": {"client": "c1", "user": ""}}}
    }
    assert orjson.loads(wire.encode_presence_push(PresenceChange("news", "leave", client))) == {
        "push": {"channel": "news", "leave": {"info": {"client": "c1", "user": ""}}}
    }
    assert orjson.loads(wire.encode_unsubscribe_push("news", 2500, "insufficient state")) == {
        "push": {"channel": "news", "unsubscribe": {"code": 2500, "reason": "insufficient state"}}
    }
    assert orjson.loads(wire.encode_disconnect_push(3503, "force", False)) == {
        "push": {"disconnect": {"code": 3503, "reason": "force", "reconnect": False}}
    }
    assert wire.join_frames([b"{}", b'{"id":1}']) == b'{}\n{"id":1}'
    assert wire.PING == b"{}"


def test_every_error_code_of_tidings_has_a_centrifugo_code() -> None:
    for code in ErrorCode:
        assert code in wire.ERROR_CODES, code
    assert wire.centrifugo_error(ErrorCode.FORBIDDEN) == (103, False, True)
    assert wire.centrifugo_error(ErrorCode.RATE_LIMITED) == (111, True, True)
    assert wire.centrifugo_error(ErrorCode.UNAVAILABLE) == (100, True, True)
    # An application's numeric code goes through; another code is named in the message.
    assert wire.centrifugo_error("4004") == (4004, False, True)
    assert orjson.loads(wire.encode_tidings_error(9, "bad_room", "no such room")) == {
        "id": 9,
        "error": {"code": 100, "message": "bad_room: no such room"},
    }


def test_the_dialect_answers_errors_with_an_id_and_nothing_else() -> None:
    dialect = wire.CentrifugoDialect()
    assert orjson.loads(dialect.encode_reply(Error(ErrorCode.RATE_LIMITED, "slow", 3))) == {
        "id": 3,
        "error": {"code": 111, "message": "slow", "temporary": True},
    }
    assert dialect.encode_reply(Error(ErrorCode.RATE_LIMITED, "slow", None)) == b""
    assert dialect.encode_message(b'{"id":1}') == b'{"id":1}'
    assert dialect.encode_message({"a": 1}) == b'{"a":1}'


async def test_a_lossless_outbox_closes_where_it_would_drop() -> None:
    outbox: Outbox[int] = Outbox(2, OverflowPolicy.DROP)
    outbox.lossless = True
    assert outbox.offer(1) and outbox.offer(2)
    assert not outbox.offer(3, 2, OverflowPolicy.DROP)
    assert outbox.closing is not None and outbox.closing.code == 1008
    assert not outbox.closing.flush


# --- the endpoint, raw --------------------------------------------------------------------


@asynccontextmanager
async def centrifugo(server: Server) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/connection/websocket") as ws:
        yield ws


async def frame(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """One frame from the server, as the JSON objects it holds."""
    text = await ws.get_message()
    assert isinstance(text, str)
    return [orjson.loads(line) for line in text.split("\n")]


async def closed_with(ws: WebSocketConnection) -> tuple[int, str | None]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return closed.value.reason.code, closed.value.reason.reason


@asynccontextmanager
async def serving(**settings: Any) -> AsyncIterator[Server]:
    config = Config(port=0, log_level="warning", **settings)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(config) as server:
            yield server


CONNECT = '{"id":1,"connect":{}}'


async def test_the_answers_to_one_frame_come_in_one_frame() -> None:
    async with serving(presence=True) as server, centrifugo(server) as ws:
        await ws.send_message(
            CONNECT + '\n{"id":2,"subscribe":{"channel":"a"}}\n\n'
            '{"id":3,"subscribe":{"channel":"b"}}\n{"id":4,"unsubscribe":{"channel":"b"}}\n'
        )
        answers = await frame(ws)
        assert [answer["id"] for answer in answers] == [1, 2, 3, 4]
        connect = answers[0]["connect"]
        assert connect["client"] and connect["ping"] == 30 and connect["pong"] is True
        assert "expires" not in connect  # no token, no expiry
        assert answers[3] == {"id": 4, "unsubscribe": {}}
        # Answers that wait (presence here) follow in a frame of their own, errors inline.
        await ws.send_message(
            '{"id":5,"presence":{"channel":"a"}}\n{"id":6,"subscribe":{"channel":"a"}}'
        )
        (presence, again) = await frame(ws)
        assert list(presence["presence"]["presence"]) == [connect["client"]]
        assert again == {"id": 6, "error": {"code": 105, "message": "already subscribed to 'a'"}}


@pytest.mark.parametrize(
    "sent",
    [
        '{"id":1,"subscribe":{"channel":"a"}}',  # before connect
        CONNECT + "\n" + CONNECT,  # twice
        CONNECT + "\n{oops",  # not JSON
        CONNECT + '\n{"id":2,"dance":{}}',  # no such method
        CONNECT + '\n{"id":2,"publish":[]}',  # a request that is not an object
    ],
)
async def test_a_bad_request_closes_with_3501(sent: str) -> None:
    async with serving() as server, centrifugo(server) as ws:
        await ws.send_message(sent)
        if sent.startswith(CONNECT) and sent.count("connect") == 1:
            (connected,) = await frame(ws)  # what came before the bad line is answered
            assert "connect" in connected
        code, reason = await closed_with(ws)
        assert (code, reason) == (3501, "bad request")


async def test_pings_are_empty_objects_and_pongs_before_connect_are_ignored() -> None:
    async with serving(ping_interval=0.2, read_timeout=2) as server, centrifugo(server) as ws:
        await ws.send_message("{}")  # a pong to a ping that raced the connect
        await ws.send_message(CONNECT)
        (connected,) = await frame(ws)
        assert connected["connect"]["ping"] == 1  # whole seconds, at least one
        assert await frame(ws) == [{}]
        await ws.send_message("{}")
        assert await frame(ws) == [{}]


async def test_tokens_are_checked_at_connect() -> None:
    async with serving(jwt_secret=SECRET) as server:
        for request in ('{"id":1,"connect":{}}', '{"id":1,"connect":{"token":"x.y.z"}}'):
            async with centrifugo(server) as ws:
                await ws.send_message(request)
                assert await closed_with(ws) == (3500, "invalid token")
        expired = jwt.encode({"sub": "u", "exp": 1}, SECRET)
        async with centrifugo(server) as ws:
            await ws.send_message(orjson.dumps({"id": 1, "connect": {"token": expired}}).decode())
            (answer,) = await frame(ws)
            assert answer == {"id": 1, "error": {"code": 109, "message": "token expired"}}
            # Not connected: nothing else is served.
            await ws.send_message('{"id":2,"presence":{"channel":"a"}}')
            assert (await closed_with(ws))[0] == 3501
        long_lived = jwt.encode({"sub": "u", "exp": 2**31 - 1}, SECRET)
        other = jwt.encode({"sub": "v", "exp": 2**31 - 1}, SECRET)
        async with centrifugo(server) as ws:
            await ws.send_message(
                orjson.dumps({"id": 1, "connect": {"token": long_lived}}).decode()
            )
            (answer,) = await frame(ws)
            assert answer["connect"]["expires"] is True and answer["connect"]["ttl"] > 10**8
            await ws.send_message(
                orjson.dumps({"id": 2, "refresh": {"token": long_lived}}).decode()
            )
            (refreshed,) = await frame(ws)
            assert refreshed["refresh"]["client"] == answer["connect"]["client"]
            # A token for someone else is not a refresh.
            await ws.send_message(orjson.dumps({"id": 3, "refresh": {"token": other}}).decode())
            assert await closed_with(ws) == (3500, "invalid token")


async def test_recovery_follows_centrifugos_rule() -> None:
    async with serving(namespaces={"quiet": {"history_size": 0}}) as server:
        for n in range(3):
            await server.publish("news", n)
        async with centrifugo(server) as ws:
            await ws.send_message(
                CONNECT + '\n{"id":2,"subscribe":{"channel":"news"}}\n'
                '{"id":3,"history":{"channel":"news","limit":0}}'
            )
            (_, subscribed) = await frame(ws)
            epoch = subscribed["subscribe"]["epoch"]
            assert subscribed["subscribe"] == {
                "recoverable": True,
                "positioned": True,
                "epoch": epoch,
                "offset": 3,
            }
            (history,) = await frame(ws)
            assert history == {"id": 3, "history": {"offset": 3, "epoch": epoch}}

            async def subscribe(command_id: int, channel: str, **fields: Any) -> dict[str, Any]:
                request = {"channel": channel, **fields}
                await ws.send_message(orjson.dumps({"id": command_id, "subscribe": request}))
                (answer,) = await frame(ws)
                await ws.send_message(
                    orjson.dumps({"id": command_id + 1000, "unsubscribe": {"channel": channel}})
                )
                assert await frame(ws) == [{"id": command_id + 1000, "unsubscribe": {}}]
                return answer

            await ws.send_message('{"id":4,"unsubscribe":{"channel":"news"}}')
            await frame(ws)
            # Same epoch, contiguous: recovered, the client's own offset, what it missed.
            answer = await subscribe(5, "news", recover=True, offset=1, epoch=epoch)
            assert answer["subscribe"] == {
                "recoverable": True,
                "positioned": True,
                "epoch": epoch,
                "offset": 1,
                "was_recovering": True,
                "recovered": True,
                "publications": [{"data": 1, "offset": 2}, {"data": 2, "offset": 3}],
            }
            # An empty epoch matches any; nothing missed is a recovery too.
            answer = await subscribe(6, "news", recover=True, offset=3)
            assert answer["subscribe"]["recovered"] is True
            assert "publications" not in answer["subscribe"]
            # Another epoch, or an offset from the future: not recovered, the top.
            for fields in ({"offset": 1, "epoch": "other"}, {"offset": 9, "epoch": epoch}):
                answer = await subscribe(7, "news", recover=True, **fields)
                assert answer["subscribe"]["offset"] == 3
                assert answer["subscribe"]["was_recovering"] is True
                assert "recovered" not in answer["subscribe"]
            # ... or error 112 when the client asked for it (flag 2).
            await ws.send_message(
                orjson.dumps(
                    {
                        "id": 8,
                        "subscribe": {
                            "channel": "news",
                            "recover": True,
                            "epoch": "other",
                            "flag": 3,
                        },
                    }
                )
            )
            (refused,) = await frame(ws)
            assert refused["error"]["code"] == 112
            # A namespace without history is not recoverable: no position, no recovery.
            answer = await subscribe(9, "quiet:x", recover=True, offset=0)
            assert answer["subscribe"] == {}
            await ws.send_message('{"id":10,"history":{"channel":"quiet:x"}}')
            (answer,) = await frame(ws)
            assert answer["error"]["code"] == 108


async def test_a_recovery_under_live_traffic_has_no_gap_and_no_duplicate() -> None:
    """The subscribe answer (with the replay) goes out before any live publication."""
    async with serving() as server, centrifugo(server) as ws:
        await ws.send_message(CONNECT)
        await frame(ws)
        await server.publish("busy", 0)
        count = 300

        async def publish_many() -> None:
            for n in range(1, count):
                await server.publish("busy", n)
                if n % 10 == 0:
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_many)
            await trio.lowlevel.checkpoint()
            request = {"channel": "busy", "recover": True, "offset": 1}
            await ws.send_message(orjson.dumps({"id": 2, "subscribe": request}).decode())
            offsets: list[int] = []
            while not offsets or offsets[-1] < count:
                for item in await frame(ws):
                    if "subscribe" in item:
                        assert not offsets, "live publications came before the answer"
                        assert item["subscribe"]["recovered"] is True
                        offsets.append(item["subscribe"]["offset"])
                        replayed = item["subscribe"].get("publications", [])
                        offsets += [pub["offset"] for pub in replayed]
                    else:
                        assert offsets, "a publication came before the subscribe answer"
                        offsets.append(item["push"]["pub"]["offset"])
        assert offsets == list(range(1, count + 1))


async def test_rate_limited_commands_are_answered_111() -> None:
    async with serving(rate_limit=2, rate_limit_violations=0) as server, centrifugo(server) as ws:
        await ws.send_message(CONNECT + '\n{"id":2,"ping":{}}\n{"id":3,"ping":{}}')
        answers: dict[int, dict[str, Any]] = {}
        while len(answers) < 3:
            answers.update((answer["id"], answer) for answer in await frame(ws))
        assert "connect" in answers[1] and answers[2] == {"id": 2, "ping": {}}
        assert answers[3]["error"]["code"] == 111 and answers[3]["error"]["temporary"] is True


async def test_the_path_is_configurable_and_can_be_turned_off() -> None:
    async with serving(centrifugo_path="") as server:
        with pytest.raises(HandshakeError):
            async with centrifugo(server):
                pass
    async with serving(centrifugo_path="/centrifugo") as server:
        url = f"ws://127.0.0.1:{server.port}/centrifugo"
        async with open_websocket_url(url) as ws:
            await ws.send_message(CONNECT)
            assert "connect" in (await frame(ws))[0]
        assert server.endpoints["/centrifugo"].lossless
    with pytest.raises(ConfigError, match="must differ"):
        Config(centrifugo_path="/ws")
    with pytest.raises(ConfigError, match="start with"):
        Config(centrifugo_path="connection")


async def test_send_reaches_the_application_which_can_push_and_unsubscribe() -> None:
    received: list[Any] = []

    async def on_send(session: Session, data: Any) -> None:
        received.append((session.identity.user, data))
        send_message(session, {"echo": data})
        assert unsubscribe_client(session, "news", 2500, "insufficient state")
        assert not unsubscribe_client(session, "elsewhere")

    async with serving() as server:
        server.add_endpoint(centrifugo_endpoint(server, "/cf", on_send=on_send))
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/cf") as ws:
            await ws.send_message(CONNECT + '\n{"id":2,"subscribe":{"channel":"news"}}')
            await frame(ws)
            await ws.send_message('{"send":{"data":{"hello":1}}}')
            assert await frame(ws) == [{"push": {"message": {"data": {"echo": {"hello": 1}}}}}]
            assert await frame(ws) == [
                {
                    "push": {
                        "channel": "news",
                        "unsubscribe": {"code": 2500, "reason": "insufficient state"},
                    }
                }
            ]
            assert received == [(None, {"hello": 1})]
            # Unsubscribed: a publication no longer comes; a send to the default
            # endpoint (no hook) is accepted and ignored.
            await server.publish("news", 1)
            await ws.send_message('{"id":3,"ping":{}}')
            assert await frame(ws) == [{"id": 3, "ping": {}}]
        async with centrifugo(server) as ws:
            await ws.send_message(CONNECT + '\n{"send":{"data":1}}\n{"id":2,"ping":{}}')
            assert [answer["id"] for answer in await frame(ws)] == [1, 2]


async def test_filters_and_map_subscriptions_are_refused_not_ignored() -> None:
    async with serving() as server, centrifugo(server) as ws:
        await ws.send_message(
            CONNECT + '\n{"id":2,"subscribe":{"channel":"a","tf":{"op":"eq"}}}\n'
            '{"id":3,"subscribe":{"channel":"b","type":1}}'
        )
        (_, filtered, mapped) = await frame(ws)
        assert filtered["error"]["code"] == mapped["error"]["code"] == 108


@pytest.mark.parametrize("transport", ["builtin", "hypercorn"])
async def test_both_transports_serve_the_protocol(transport: str) -> None:
    async with (
        serving(transport=transport, ping_interval=0.5, read_timeout=2) as server,
        centrifugo(server) as ws,
    ):
        await ws.send_message(CONNECT + '\n{"id":2,"subscribe":{"channel":"news"}}')
        (connected, subscribed) = await frame(ws)
        assert connected["connect"]["ping"] == 1 and subscribed["subscribe"]["offset"] == 0
        await server.publish("news", {"n": 1})
        items = await frame(ws)
        while items == [{}]:  # a ping may come first
            items = await frame(ws)
        assert items == [{"push": {"channel": "news", "pub": {"data": {"n": 1}, "offset": 1}}}]
        assert await frame(ws) == [{}]


async def test_two_nodes_on_redis_share_channels_history_presence_and_recovery(
    redis_server: RedisServer,
) -> None:
    """The same protocol over the Redis backplane: subscribe waits for the node to
    follow the channel, and its answer still comes before any live publication."""
    settings: dict[str, Any] = {"backplane": redis_server.url, "presence": True}
    async with (
        serving(node_id="a", **settings) as a,
        serving(node_id="b", **settings) as b,
        centrifugo(a) as on_a,
        centrifugo(b) as on_b,
    ):
        for ws in (on_a, on_b):
            await ws.send_message(CONNECT + '\n{"id":2,"subscribe":{"channel":"news"}}')
            (connected, subscribed) = await frame(ws)
            assert subscribed["subscribe"]["offset"] == 0
        epoch = subscribed["subscribe"]["epoch"]
        client_a = connected["connect"]["client"]
        await a.publish("news", 1)
        await b.publish("news", 2)
        for ws in (on_a, on_b):
            pushes = (await frame(ws)) + (await frame(ws))
            assert [push["push"]["pub"]["offset"] for push in pushes] == [1, 2]
        await on_b.send_message(
            '{"id":3,"presence_stats":{"channel":"news"}}\n'
            '{"id":4,"history":{"channel":"news","limit":-1}}'
        )
        answers: list[dict[str, Any]] = []
        while len(answers) < 2:
            answers += await frame(on_b)
        assert answers[0]["presence_stats"] == {"num_clients": 2, "num_users": 1}
        assert answers[1]["history"]["epoch"] == epoch
        assert [pub["data"] for pub in answers[1]["history"]["publications"]] == [1, 2]
        await on_a.send_message('{"id":5,"unsubscribe":{"channel":"news"}}')
        await frame(on_a)
        await b.publish("news", 3)
        request = {"channel": "news", "recover": True, "offset": 2, "epoch": epoch}
        await on_a.send_message(orjson.dumps({"id": 6, "subscribe": request}).decode())
        (recovered,) = await frame(on_a)
        assert recovered["subscribe"]["recovered"] is True
        assert recovered["subscribe"]["publications"] == [{"data": 3, "offset": 3}]
        assert client_a in {client.id for client in await a.presence_everywhere("news")}
