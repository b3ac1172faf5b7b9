"""tidings inside a Trio program: publish from Python, subscribe in-process, handlers, ASGI."""

from __future__ import annotations

import orjson
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

import tidings
from tidings import Config, RequestContext, open_server

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


async def test_publish_from_python_reaches_a_websocket_client_and_an_in_process_subscriber() -> (
    None
):
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(Config(port=0)) as server, ws_client(server) as ws:
            await subscribe(ws, "deploys")
            async with server.subscribe("deploys") as events:
                position = await server.publish("deploys", {"step": "build", "status": "running"})
                event = await events.__anext__()
                frame = await receive(ws)
        assert (event.seq, event.epoch) == (position.seq, position.epoch)
        assert event.payload == {"step": "build", "status": "running"}
        assert (frame["seq"], frame["payload"]) == (position.seq, event.payload)


async def test_in_process_subscribers_resume_like_clients_and_keep_the_replay() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(outbox_size=8, history_size=500, listen=False) as server:
            for i in range(300):
                await server.publish("t", i)
            async with server.subscribe("t", since=0) as events:
                assert events.recovered is True
                # Published while all 300 replayed events still wait to be read:
                # the replay must not use up the buffer meant for live events.
                for i in range(300, 306):
                    await server.publish("t", i)
                received = [await events.__anext__() for _ in range(306)]
        assert [e.seq for e in received] == list(range(1, 307))
        assert events.dropped == 0


async def test_a_slow_in_process_subscriber_drops_and_counts() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            running_server(listen=False) as server,
            server.subscribe("t", buffer=4) as events,
        ):
            for i in range(10):
                await server.publish("t", i)
            assert events.dropped == 6
            assert [(await events.__anext__()).payload for _ in range(4)] == [0, 1, 2, 3]


async def test_request_handlers_registered_by_call_or_decorator_answer_clients() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_server(Config(port=0)) as server:

            @server.on_request("cluster")
            async def cluster(request: RequestContext) -> dict[str, object]:
                assert request.client is not None
                return {
                    "name": (request.payload or {}).get("name", "first"),
                    "client": request.client.id,
                }

            async def personas(_: RequestContext) -> dict[str, object]:
                return {"personas": []}

            assert server.on_request("personas", personas) is personas
            async with ws_client(server) as ws:
                answer = await call(
                    ws,
                    {
                        "type": "request",
                        "topic": "cluster",
                        "requestId": "r1",
                        "payload": {"name": "c1"},
                    },
                )
                assert answer["payload"]["name"] == "c1"
                assert answer["payload"]["client"] == server.clients()[0].id
                assert (
                    await call(ws, {"type": "request", "topic": "personas", "requestId": "r2"})
                )["payload"] == {"personas": []}


async def test_hooks_see_clients_come_and_go(server: tidings.Server) -> None:
    seen: list[str] = []
    gone = trio.Event()

    @server.on_disconnect
    def disconnected(client: tidings.ClientInfo, close: tidings.CloseInfo) -> None:
        seen.append(f"disconnect {client.id} {close.code} by {close.initiated_by}")
        gone.set()

    server.on_connect(lambda client: seen.append(f"connect {client.id}"))
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            await call(ws, {"type": "ping", "requestId": 1})
            [client] = server.clients()
        await gone.wait()
    assert seen == [f"connect {client.id}", f"disconnect {client.id} 1000 by client"]


async def test_server_side_disconnect_closes_one_client_with_the_given_code(
    server: tidings.Server,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ws_client(server) as ws:
            await call(ws, {"type": "ping", "requestId": 1})
            [client] = server.clients()
            assert server.disconnect(client.id, 4000, "go away")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (4000, "go away")
        assert server.disconnect("no-such-client") is False


async def test_publish_rejects_bad_topics_and_values_at_the_call() -> None:
    async with running_server(listen=False) as server:
        with pytest.raises(ValueError, match="empty"):
            await server.publish("", 1)
        with pytest.raises(TypeError):
            await server.publish("t", object())


async def test_the_asgi_app_serves_under_hypercorns_trio_worker() -> None:
    """Mount a server's ASGI app (listen=False) in hypercorn, as a larger app would."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(listen=False) as server, trio.open_nursery() as nursery:
            config = HypercornConfig()
            config.bind = ["127.0.0.1:0"]
            config.accesslog = None
            stop = trio.Event()
            binds = await nursery.start(
                lambda task_status: hypercorn_serve(
                    server.asgi_app, config, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            port = int(binds[0].rsplit(":", 1)[1])
            status, _, body = await http_request(port, "GET", "/health")
            assert status == 200
            assert orjson.loads(body)["status"] == "ok"
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                await subscribe(ws, "t")
                await server.publish("t", {"via": "hypercorn"})
                assert (await receive(ws))["payload"] == {"via": "hypercorn"}
            stop.set()


async def test_serve_with_the_hypercorn_transport() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(transport="hypercorn", max_connections=1) as server:
            async with ws_client(server) as ws:
                await subscribe(ws, "t")
                await server.publish("t", 1)
                assert (await receive(ws))["seq"] == 1
                with pytest.raises(ConnectionRejected) as refused:  # over max_connections
                    await ws_client(server).__aenter__()
                assert refused.value.status_code == 503
            status, _, _ = await http_request(server.port, "GET", "/health")
            assert status == 200
            plain, _, _ = await http_request(server.port, "GET", "/ws")
            assert plain == 426


@pytest.mark.parametrize("transport", ["builtin", "hypercorn"])
async def test_a_clean_close_is_told_from_a_lost_connection(transport: str) -> None:
    """hypercorn reports 1006 after a client's close frame (its issue 127): the
    close a client asked for must be logged and counted as what it said."""
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server(transport=transport) as server:
            disconnects = Disconnects(server)
            async with ws_client(server) as ws:
                await subscribe(ws, "t")
                await ws.aclose(code=1001, reason="leaving")
            clean = (await disconnects.wait(1))[0]
            assert (clean.code, clean.reason, clean.initiated_by) == (1001, "leaving", "client")
            raw = await raw_client(server)
            await raw.aclose()  # no close frame: the connection is lost
            lost = (await disconnects.wait(2))[1]
            assert (lost.code, lost.initiated_by) == (1006, "client")
