"""An application's hook endpoints for tidings (docs/proxy.md), in FastAPI.

    hypercorn examples.proxy_backend:app --bind 127.0.0.1:8000
    TIDINGS_PROXY_CONNECT=http://127.0.0.1:8000/tidings/connect \\
    TIDINGS_PROXY_SUBSCRIBE=http://127.0.0.1:8000/tidings/subscribe \\
    TIDINGS_PROXY_PUBLISH=http://127.0.0.1:8000/tidings/publish \\
    TIDINGS_PROXY_RPC=http://127.0.0.1:8000/tidings/rpc \\
    TIDINGS_NAMESPACES='{"room": {"client_publish": true}}' tidings serve

A chat where the browser's session cookie says who is connecting: the
application keeps its own sessions and rooms, and tidings asks it. Any
backend that answers the same JSON works, Centrifugo's included.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

app = FastAPI()

#: The application's own state: its session cookies and its rooms' members.
SESSIONS = {"s-ann": "ann", "s-bob": "bob"}
MEMBERS = {"room:kitchen": {"ann", "bob"}, "room:office": {"ann"}}
BANNED_WORDS = {"darn"}


@app.post("/tidings/connect")
async def connect(request: Request) -> dict[str, Any]:
    user = SESSIONS.get(request.cookies.get("session", ""))
    if user is None:
        return {"error": {"code": 401, "message": "log in first"}}
    # Only room topics (and their methods); no expire_at: the session does not expire.
    return {"result": {"user": user, "topics": ["room:*"]}}


@app.post("/tidings/subscribe")
async def subscribe(request: Request) -> dict[str, Any]:
    body = await request.json()
    if body["user"] not in MEMBERS.get(body["channel"], set()):
        return {"error": {"code": 403, "message": "not a member of this room"}}
    return {"result": {}}


@app.post("/tidings/publish")
async def publish(request: Request) -> dict[str, Any]:
    body = await request.json()
    data = body["data"]
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        return {"error": {"code": 400, "message": "a message is {text}"}}
    words = [("***" if word in BANNED_WORDS else word) for word in data["text"].split()]
    # What the room receives: the cleaned text, signed by the user the node vouches for.
    return {"result": {"data": {"text": " ".join(words), "from": body["user"]}}}


@app.post("/tidings/rpc")
async def rpc(request: Request) -> dict[str, Any]:
    body = await request.json()
    if body["method"] == "room:members":
        room = body["data"]["room"]
        return {"result": {"data": sorted(MEMBERS.get(room, set()))}}
    return {"error": {"code": 404, "message": f"no method {body['method']}"}}
