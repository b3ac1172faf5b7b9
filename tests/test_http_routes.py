"""Application HTTP routes beside /health and /api/: JSON in, JSON out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from tidings import HttpError, HttpRequest

from .conftest import TEST_TIMEOUT, http_request, running_server, subscribe, ws_client


async def test_a_backend_triggers_work_over_an_application_route() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_server() as server:

            @server.http_route("/hooks/deploy")
            async def deploy(request: HttpRequest) -> Any:
                body = request.json()
                if not isinstance(body, dict) or not isinstance(body.get("app"), str):
                    raise HttpError(400, "bad_app", "give the app to deploy")
                position = await server.publish("deploys", {"app": body["app"]})
                return 202, {"accepted": body["app"], "seq": position.seq, "q": request.query}

            @server.http_route("/hooks/status", methods=("GET",))
            async def status(request: HttpRequest) -> Any:
                return {"agent": request.headers.get("x-agent")}

            @server.http_route("/hooks/broken")
            async def broken(request: HttpRequest) -> Any:
                raise RuntimeError("a bug in the handler")

            async with ws_client(server) as ws:
                await subscribe(ws, "deploys")
                status_code, headers, body = await http_request(
                    server.port, "POST", "/hooks/deploy?dry=no", b'{"app": "web"}'
                )
                assert status_code == 202, body
                assert headers["content-type"] == "application/json"
                assert orjson.loads(body) == {"accepted": "web", "seq": 1, "q": {"dry": "no"}}
                event = orjson.loads(await ws.get_message())
                assert (event["type"], event["payload"]) == ("event", {"app": "web"})

            answers = [
                await http_request(server.port, "POST", "/hooks/deploy", b'{"app": 1}'),
                await http_request(server.port, "POST", "/hooks/deploy", b"{nope"),
                await http_request(server.port, "GET", "/hooks/deploy"),
                await http_request(server.port, "POST", "/hooks/broken"),
                await http_request(server.port, "POST", "/hooks/other"),
            ]
            codes = [(status, orjson.loads(body)["error"]["code"]) for status, _, body in answers]
            assert codes == [
                (400, "bad_app"),
                (400, "invalid_json"),
                (405, "method_not_allowed"),
                (500, "internal_error"),
                (404, "not_found"),
            ]
            status_code, _, body = await http_request(
                server.port, "GET", "/hooks/status", headers="X-Agent: a-7\r\n"
            )
            assert (status_code, orjson.loads(body)) == (200, {"agent": "a-7"})


async def test_routes_cannot_take_the_paths_tidings_answers() -> None:
    async with running_server(listen=False) as server:
        for path in ("/health", "/metrics", "/api/publish", "/ws", "relative"):
            with pytest.raises(ValueError):
                server.http_route(path)(_nothing)


async def _nothing(request: HttpRequest) -> Any:
    return None
