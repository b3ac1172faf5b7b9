"""The Python client SDK against a real server: commands, reconnect, resume."""

from __future__ import annotations

import pytest
import trio

from tidings import CloseCode, Endpoint, RequestContext, Session
from tidings.client import ConnectionRejectedError, TidingsError, connect
from tidings.protocol.json_dialect import JsonDialect
from tidings.protocol.messages import AppMessage

from .conftest import TEST_TIMEOUT, Disconnects, running_server
from .hookbackend import Call, Raw, running_backend


async def test_subscribe_publish_and_request() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:

            @server.on_request("echo")
            async def echo(request: RequestContext) -> object:
                return {"echo": request.payload}

            async with connect(server.url) as client, client.subscribe("t") as events:
                position = await client.publish("t", {"n": 1})
                event = await events.__anext__()
                assert (event.seq, event.epoch, event.payload) == (
                    position.seq,
                    position.epoch,
                    {"n": 1},
                )
                assert await client.request("echo", [1, 2]) == {"echo": [1, 2]}
                await client.ping()


async def test_errors_come_back_as_exceptions_with_the_code() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(topics=("allowed",), request_timeout=5) as server:

            @server.on_request("allowed")
            async def hang(_: RequestContext) -> None:
                await trio.sleep_forever()

            async with connect(server.url) as client:
                with pytest.raises(TidingsError) as refused:
                    await client.publish("forbidden", 1)
                assert refused.value.code == "unknown_topic"
                with pytest.raises(TidingsError) as missing:
                    async with client.subscribe(""):
                        pass
                assert missing.value.code == "invalid_topic"
                with pytest.raises(trio.TooSlowError):
                    await client.request("allowed", timeout=0.1)


async def test_the_client_reconnects_and_resumes_without_loss_or_duplicates() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server, connect(server.url, min_backoff=0.05) as client:
            async with client.subscribe("deploys") as events:
                for i in range(5):
                    await server.publish("deploys", i)
                first = [await events.__anext__() for _ in range(5)]
                [connection] = server.clients()
                server.disconnect(connection.id, CloseCode.SERVICE_RESTART, "restarting")
                # Sequenced after the close began: these can only arrive by resume.
                for i in range(5, 15):
                    await server.publish("deploys", i)
                rest = [await events.__anext__() for _ in range(10)]
                await server.publish("deploys", 15)  # and live again afterwards
                last = await events.__anext__()
            assert [e.payload for e in [*first, *rest, last]] == list(range(16))
            assert [e.seq for e in [*first, *rest, last]] == list(range(1, 17))
            assert client.connections == 2
            assert (events.resumes, events.recovered, events.gaps) == (1, True, 0)


async def test_a_resume_beyond_history_is_counted_as_a_gap() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(history_size=2) as server,
            connect(server.url, min_backoff=0.05) as client,
        ):
            async with client.subscribe("t") as events:
                await server.publish("t", 0)
                assert (await events.__anext__()).seq == 1
                [connection] = server.clients()
                server.disconnect(connection.id, CloseCode.SERVICE_RESTART)
                for i in range(1, 6):  # seq 2..6; history keeps 5 and 6
                    await server.publish("t", i)
                resumed = [await events.__anext__() for _ in range(2)]
            assert [e.seq for e in resumed] == [5, 6]
            assert (events.recovered, events.gaps) == (False, 1)


async def test_a_resume_from_beyond_the_topic_carries_on_with_its_next_events() -> None:
    """``since`` past the topic's last seq (another stream's offset) must not hide
    the events that follow as duplicates."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:
            for n in range(3):
                await server.publish("t", n)
            async with connect(server.url) as client, client.subscribe("t", since=99) as events:
                assert events.recovered is False
                assert events.answer["seq"] == 3
                await server.publish("t", "next")
                event = await events.__anext__()
                assert (event.seq, event.payload) == (4, "next")


async def test_a_refused_connection_says_the_status_and_the_servers_reason() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(token="s3cret-s3cret-s3cret") as server:
            with pytest.raises(ConnectionRejectedError) as refused:
                async with connect(server.url, reconnect=False):
                    pass
            assert refused.value.status == 401
            assert refused.value.code == "unauthorized"
            assert refused.value.message.startswith("a token is required")
            assert "a token is required" in str(refused.value)


async def test_commands_issued_during_an_outage_wait_for_the_reconnect() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server, connect(server.url, min_backoff=0.5) as client:
            disconnects = Disconnects(server)
            await client.ping()
            [connection] = server.clients()
            server.disconnect(connection.id, CloseCode.GOING_AWAY)
            await disconnects.wait()  # the close handshake is over: the client is away
            position = await client.publish("t", "after the outage")
            assert position.seq == 1
            assert client.connections == 2


async def test_connecting_to_nothing_fails_at_once() -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(ConnectionError, match="cannot connect"):
        async with connect("ws://127.0.0.1:9/ws"):
            pass


async def test_subscriptions_without_positions_are_renewed_after_a_reconnect() -> None:
    """A server whose replies and events carry no seq/epoch (a trimmed dialect)."""
    trimmed = Endpoint("/plain", JsonDialect("plain"))
    subscribed: list[trio.Event] = [trio.Event(), trio.Event()]

    @trimmed.on("subscribe")
    async def subscribe(session: Session, message: AppMessage) -> None:
        topic = str(message.body["topic"])
        await session.subscribe(topic)
        session.reply(
            {"type": "response", "requestId": message.request_id, "payload": {"topic": topic}}
        )
        next(event for event in subscribed if not event.is_set()).set()

    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(endpoints=[trimmed]) as server:
            url = f"ws://127.0.0.1:{server.port}/plain"
            async with connect(url, min_backoff=0.01) as client, client.subscribe("t") as events:
                await server.publish("t", {"type": "event", "topic": "t", "payload": 1})
                assert (await events.__anext__()).payload == 1
                (info,) = server.clients()
                server.disconnect(info.id, CloseCode.SERVICE_RESTART)
                await subscribed[1].wait()  # the client came back and subscribed again
                await server.publish("t", {"type": "event", "topic": "t", "payload": 2})
                assert (await events.__anext__()).payload == 2


async def test_a_resume_refused_for_a_while_is_retried_and_loses_nothing() -> None:
    """A node that answers a resubscribe ``unavailable`` (its hook is down, or it
    is busy resynchronising after a storm) gets it again until it takes it; the
    events published meanwhile arrive by the resume, once each."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_backend() as backend:
            down, refused = False, trio.Event()

            def answer(_: Call) -> object:
                if down:
                    refused.set()
                    return Raw(500, b"down for a moment")
                return {"result": {}}

            backend.on("/subscribe", answer)
            async with (
                running_server(proxy_subscribe=backend.url("/subscribe")) as server,
                connect(server.url, min_backoff=0.05) as client,
                client.subscribe("deploys") as events,
            ):
                await server.publish("deploys", 0)
                first = await events.__anext__()
                down = True
                [connection] = server.clients()
                server.disconnect(connection.id, CloseCode.SERVICE_RESTART, "restarting")
                for i in range(1, 5):
                    await server.publish("deploys", i)
                await refused.wait()  # the resubscribe on the new connection was refused
                down = False
                rest = [await events.__anext__() for _ in range(4)]
                assert [e.payload for e in [first, *rest]] == list(range(5))
                assert [e.seq for e in [first, *rest]] == list(range(1, 6))
                assert client.connections == 2  # retried on the same connection
                assert events.resumes >= 2 and events.recovered is True, events.answer
                assert events.refused is None


async def test_a_resume_refused_for_good_ends_the_subscription_with_the_reason() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_backend() as backend:
            allowed = True

            def answer(_: Call) -> object:
                return {"result": {}} if allowed else {"error": {"code": 4403, "message": "gone"}}

            backend.on("/subscribe", answer)
            async with (
                running_server(proxy_subscribe=backend.url("/subscribe")) as server,
                connect(server.url, min_backoff=0.05) as client,
                client.subscribe("deploys") as events,
            ):
                allowed = False
                [connection] = server.clients()
                server.disconnect(connection.id, CloseCode.SERVICE_RESTART, "restarting")
                with pytest.raises(TidingsError) as refused:
                    await events.__anext__()
                assert (refused.value.code, str(refused.value)) == ("4403", "4403: gone")
                assert events.refused is refused.value
