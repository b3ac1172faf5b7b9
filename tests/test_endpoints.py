"""Application endpoints: a path with its own dialect, hooks and message handlers."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from tidings import Config, Endpoint, Session, open_server
from tidings.app import CloseInfo, RequestError
from tidings.auth import AuthError, Identity
from tidings.protocol.json_dialect import JsonDialect
from tidings.protocol.messages import AppMessage
from tidings.transport.base import UpgradeRequest

from .conftest import TEST_TIMEOUT, subscribe, ws_client


def chat_endpoint(log: list[Any], ended: trio.Event) -> Endpoint:
    chat = Endpoint("/chat", JsonDialect("chat"))

    @chat.on_connect
    async def greet(session: Session) -> None:
        session.reply({"type": "status", "data": {"status": "START"}})

    @chat.on("join")
    async def join(session: Session, message: AppMessage) -> None:
        room = message.body.get("room")
        if not isinstance(room, str):
            raise RequestError("bad_room", "room must be a string")
        session.state["room"] = room
        joined = await session.subscribe(f"room.{room}", track=True)
        session.reply({"type": "joined", "room": room, "seq": joined.position.seq})

    @chat.on("say")
    async def say(session: Session, message: AppMessage) -> None:
        session.send({"type": "echo", "text": message.body.get("text")})

    @chat.on_disconnect
    async def gone(session: Session, closed: CloseInfo) -> None:
        log.append((session.state.get("room"), closed.code, session.delivered("room.lobby")))
        ended.set()

    return chat


async def frames(ws: Any, count: int) -> list[dict[str, Any]]:
    return [orjson.loads(await ws.get_message()) for _ in range(count)]


async def test_an_endpoint_speaks_its_own_protocol_beside_the_native_one() -> None:
    log: list[Any] = []
    ended = trio.Event()
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(
            Config(port=0, log_level="warning"), endpoints=[chat_endpoint(log, ended)]
        ) as server:
            url = f"ws://127.0.0.1:{server.port}/chat"
            async with open_websocket_url(url) as ws, ws_client(server) as native:
                assert await frames(ws, 1) == [{"type": "status", "data": {"status": "START"}}]
                await ws.send_message(orjson.dumps({"type": "join", "room": "lobby"}).decode())
                assert await frames(ws, 1) == [{"type": "joined", "room": "lobby", "seq": 0}]
                # Events go out as their payload: the application publishes whole frames.
                await server.publish("room.lobby", {"type": "said", "text": "hi"})
                assert await frames(ws, 1) == [{"type": "said", "text": "hi"}]
                # The same topic, seen by a native client, in the native envelope.
                await subscribe(native, "room.lobby")
                await server.publish("room.lobby", {"type": "said", "text": "again"})
                (event,) = await frames(ws, 1)
                native_event = orjson.loads(await native.get_message())
                assert event == {"type": "said", "text": "again"}
                assert native_event["type"] == "event" and native_event["seq"] == 2
                await ws.send_message(orjson.dumps({"type": "say", "text": "x"}).decode())
                assert await frames(ws, 1) == [{"type": "echo", "text": "x"}]
                # Errors: a handler's own, an unknown type, bad JSON.
                await ws.send_message(orjson.dumps({"type": "join", "room": 1}).decode())
                await ws.send_message(orjson.dumps({"type": "dance"}).decode())
                await ws.send_message("{nope")
                errors = await frames(ws, 3)
                assert [e["code"] for e in errors] == ["bad_room", "unknown_type", "invalid_json"]
            await ended.wait()
    (room, code, delivered) = log[0]
    assert room == "lobby" and code == 1000
    # Both events of the tracked topic were written before the client left.
    assert delivered is not None and delivered.seq == 2


async def test_an_endpoint_can_authenticate_its_own_way() -> None:
    def agents_only(request: UpgradeRequest) -> Identity:
        if request.header("authorization") != "Bearer agent-secret":
            raise AuthError("agents present their bearer token")
        return Identity("default", user="agent-7")

    agents = Endpoint("/agents", JsonDialect("agents"), authenticate=agents_only)

    @agents.on("whoami")
    async def whoami(session: Session, message: AppMessage) -> None:
        session.reply({"user": session.identity.user})

    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(Config(port=0, log_level="warning"), endpoints=[agents]) as server:
            url = f"ws://127.0.0.1:{server.port}/agents"
            with pytest.raises(HandshakeError):
                async with open_websocket_url(url):
                    pass
            headers = [("Authorization", "Bearer agent-secret")]
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await ws.send_message('{"type": "whoami"}')
                assert await frames(ws, 1) == [{"user": "agent-7"}]
            # The native endpoint keeps the server's own authentication (none here).
            async with ws_client(server) as native:
                await subscribe(native, "anything")


async def test_a_session_can_be_closed_by_the_application() -> None:
    kicker = Endpoint("/kick", JsonDialect("kick"))

    @kicker.on("leave")
    async def leave(session: Session, message: AppMessage) -> None:
        session.close(4000, "bye")

    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(Config(port=0, log_level="warning"), endpoints=[kicker]) as server:
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/kick") as ws:
                await ws.send_message('{"type": "leave"}')
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason.code == 4000
            assert closed.value.reason.reason == "bye"


async def test_endpoint_factories_limits_and_query_parameters() -> None:
    """A factory gets the server; an endpoint's limits replace the server's; hooks see ?params."""

    def make(server: Any) -> Endpoint:
        relay = Endpoint("/relay", JsonDialect("relay"), limits={"rate_limit": 0})

        @relay.on_connect
        async def hello(session: Session) -> None:
            session.reply({"type": "hello", "room": session.query.get("room")})

        @relay.on("shout")
        async def shout(session: Session, message: AppMessage) -> None:
            # The handler holds the server: it publishes through it.
            await server.publish("shouts", {"type": "shout", "text": message.body["text"]})

        @relay.on("listen")
        async def listen(session: Session, message: AppMessage) -> None:
            await session.subscribe("shouts")
            session.reply({"type": "listening"})

        return relay

    config = Config(port=0, log_level="warning", rate_limit=1, rate_period=60)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(config, endpoints=[make]) as server:
            url = f"ws://127.0.0.1:{server.port}/relay?room=lobby&x="
            async with open_websocket_url(url) as ws:
                assert await frames(ws, 1) == [{"type": "hello", "room": "lobby"}]
                await ws.send_message('{"type": "listen"}')
                assert await frames(ws, 1) == [{"type": "listening"}]
                # Three messages under a server limit of one a minute: this path has none.
                for text in ("a", "b", "c"):
                    await ws.send_message(orjson.dumps({"type": "shout", "text": text}).decode())
                got = await frames(ws, 3)
            assert [frame["text"] for frame in got] == ["a", "b", "c"]
            # The native endpoint keeps the server's limit.
            async with ws_client(server) as native:
                await native.send_message('{"type": "ping", "requestId": 1}')
                await native.send_message('{"type": "ping", "requestId": 2}')
                replies = await frames(native, 2)
            assert replies[1]["type"] == "error"
            assert replies[1]["payload"]["code"] == "rate_limited"
