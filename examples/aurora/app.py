"""The Aurora chatbot's WebSocket service, rebuilt on tidings.

Every frame a chat session's workflow produces is published to the session's
topic (``aurora:session.<id>``): the broker sequences it and keeps it in
history. The socket that currently owns the session is subscribed with
``track=True``, so tidings knows the last frame it wrote there; a new socket
that takes the session over subscribes ``since`` that frame. Workflows run in
the example's own nursery, not in a connection, so they outlive the socket.

The same sessions stream over Server-Sent Events too: the chat page at
``/chat`` posts a query to ``/chat/query`` and follows the session's topic
with an ``EventSource`` on tidings' ``/sse``, whose own reconnect resumes an
answer where the network cut it.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import trio

from tidings import (
    AppMessage,
    AuthError,
    CloseInfo,
    Config,
    Endpoint,
    HttpError,
    HttpRequest,
    HttpResponse,
    Identity,
    JsonDialect,
    Position,
    RequestError,
    Server,
    Session,
    UpgradeRequest,
    messages,
    open_server,
)

LOGGER = logging.getLogger("aurora")
RATE_LIMIT_TEXT = "Rate limit exceeded. Please wait and try again."
TIMEOUT_TEXT = (
    "Workflow timeout - the operation may have completed but the response took too long."
    " Please check your resources manually."
)
CLUSTER = {"cluster_name": "my-cluster", "region": "us-central1", "node_count": 3,
           "machine_type": "e2-medium"}  # fmt: skip
# What each simulated tool prints (in chunks) and returns.
POD = {"name": "api-deployment-abc123", "status": "Running"}
PODS = (["NAME                    READY   STATUS\n", "api-deployment-abc123   1/1     Running\n"],
        {"success": True, "pods": [POD]})  # fmt: skip
CREATE = (["Creating my-cluster...\n"], {"success": True, "cluster": "my-cluster"})
DIRECT_TOOLS = {"github_commit", "kubectl_get"}
CHANGES = re.compile(r"\b(deploy|create|delete|scale|update|apply|install)", re.IGNORECASE)
WEB = Path(__file__).resolve().parent / "web"
#: The chat page's files: (file, content type).
PAGES = {
    "/chat": ("chat.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
#: The page runs its own script only, and talks only to this service.
PAGE_HEADERS = (
    ("content-security-policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("x-content-type-options", "nosniff"),
)
#: What HTTP status the chat's errors get on /chat/query.
HTTP_STATUS = {"SESSION_NOT_FOUND": 404, "FORBIDDEN": 403, "WORKFLOW_RUNNING": 409}


def kind_of(message: dict[str, Any]) -> str | None:
    """Messages are named by ``type``; a chat query has none, only ``query``."""
    kind = message.get("type")
    if isinstance(kind, str) and kind:
        return kind
    return "query" if "query" in message else None


def error_frame(error: messages.Error) -> dict[str, Any]:
    if error.code == "rate_limited":
        return {"type": "error", "data": {"text": RATE_LIMIT_TEXT}}
    return {"type": "error", "data": {"text": error.message, "code": error.code.upper()}}


@attrs.define(eq=False)
class Chat:
    """One chat session: who owns it now, where its last owner stopped, its workflow."""

    id: str
    topic: str  # every frame of the session, sequenced and kept by the broker
    user: Any
    owner: Session | None = None
    mark: Position | None = None  # frames up to here reached an owner's socket
    cost: float = 0.0
    scope: trio.CancelScope | None = None  # of the running workflow
    pending: str | None = None  # the confirmation it waits on
    answered: trio.Event = attrs.Factory(trio.Event)
    approved: bool = False


class Aurora:
    def __init__(
        self,
        *,
        chunk_delay: float = 0.05,
        workflow_timeout: float = 1800.0,
        agent_token: str | None = None,
    ) -> None:
        self.chunk_delay, self.workflow_timeout = chunk_delay, workflow_timeout
        self.agent_token = agent_token
        self.chats: dict[str, Chat] = {}
        self.server: Server
        self.nursery: trio.Nursery
        self.chat = Endpoint("/", JsonDialect("aurora", kind_of=kind_of, encode_error=error_frame))
        self.chat.on_connect(self.greet)
        self.chat.on_disconnect(self.gone)
        self.chat.handlers.update(init=self.init, query=self.query, control=self.control,
                                  confirmation_response=self.confirm)  # fmt: skip
        # Agents are machines, not the chat: the 5-per-minute limit is not theirs.
        self.agent = Endpoint("/kubectl-agent", JsonDialect("agent"), authenticate=self.bearer,
                              limits={"rate_limit": 0})  # fmt: skip
        self.agent.on("hello")(self.agent_hello)

    # --- the chat endpoint ----------------------------------------------------------

    async def greet(self, session: Session) -> None:
        session.reply({"type": "status", "data": {"status": "START"}})

    async def init(self, session: Session, message: AppMessage) -> None:
        session.state["user_id"] = message.body.get("user_id")

    async def query(self, session: Session, message: AppMessage) -> None:
        body = message.body
        chat = self._chat(session, body, create=True)
        if chat.scope is not None:
            raise RequestError("WORKFLOW_RUNNING", "a workflow is already running in this session")
        await self._attach(chat, session)
        chat.scope = trio.CancelScope()
        self.nursery.start_soon(self._run, chat, body)

    async def control(self, session: Session, message: AppMessage) -> None:
        if message.body.get("action") != "cancel":
            raise RequestError("INVALID_ACTION", "the only control action is cancel")
        chat = self._chat(session, message.body)
        await self._attach(chat, session)
        if chat.scope is not None:
            chat.scope.cancel()  # the workflow sends END once it has stopped
        else:
            await self._emit(chat, "status", status="END")

    async def confirm(self, session: Session, message: AppMessage) -> None:
        """Answers a confirmation; without ``confirmation_id``, only refreshes the socket."""
        chat = self._chat(session, message.body)
        await self._attach(chat, session)
        confirmation = message.body.get("confirmation_id")
        if confirmation is None:
            return
        if confirmation != chat.pending:
            raise RequestError("CONFIRMATION_NOT_FOUND", f"no pending confirmation {confirmation}")
        chat.pending, chat.approved = None, message.body.get("approved") is True
        chat.answered.set()

    async def gone(self, session: Session, closed: CloseInfo) -> None:
        for chat in list(session.state.get("chats", ())):
            self._release(chat)

    def _chat(self, session: Session, body: dict[str, Any], *, create: bool = False) -> Chat:
        return self._find(body, body.get("user_id") or session.state.get("user_id"), create)

    def _find(self, body: dict[str, Any], user: Any, create: bool) -> Chat:
        sid = body.get("session_id") or (str(uuid.uuid4()) if create else None)
        if not isinstance(sid, str) or len(sid) > 128 or not sid.isprintable():
            raise RequestError("INVALID_SESSION_ID", "session_id: up to 128 printable characters")
        chat = self.chats.get(sid)
        if chat is None and not create:
            raise RequestError("SESSION_NOT_FOUND", f"no chat session {sid}")
        if chat is None:
            chat = self.chats[sid] = Chat(sid, f"aurora:session.{sid}", user)
        elif chat.user is not None and user != chat.user:
            raise RequestError("FORBIDDEN", "this chat session belongs to another user")
        return chat

    async def _attach(self, chat: Chat, session: Session) -> None:
        """Make ``session`` the chat's socket: it gets every frame after the last owner's."""
        if chat.owner is session:
            return
        if chat.owner is not None:
            self._release(chat)  # a new socket takes over (the old one may be closing)
        since, epoch = (chat.mark.seq, chat.mark.epoch) if chat.mark else (None, None)
        joined = await session.subscribe(chat.topic, since=since, epoch=epoch, track=True)
        chat.owner, chat.mark = session, chat.mark or joined.position
        session.state.setdefault("chats", set()).add(chat)

    def _release(self, chat: Chat) -> None:
        owner = chat.owner
        assert owner is not None
        written = owner.delivered(chat.topic)
        if written is not None and (chat.mark is None or written.seq > chat.mark.seq):
            chat.mark = written
        owner.unsubscribe(chat.topic)
        owner.state["chats"].discard(chat)
        chat.owner = None

    # --- the chat page: a query over HTTP, the answer over Server-Sent Events -------

    async def page(self, request: HttpRequest) -> HttpResponse:
        name, content_type = PAGES[request.path]
        return HttpResponse((WEB / name).read_bytes(), content_type, headers=PAGE_HEADERS)

    async def http_query(self, request: HttpRequest) -> Any:
        """``POST /chat/query``: start a workflow; the page follows its session's topic.

        Answers ``{"session_id", "topic"}``. The session id is what lets a
        page read the session (``/sse?topic=...``): a deployment would give
        each user a token whose ``topics`` claim names their sessions.
        """
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise HttpError(400, "INVALID_QUERY", "a query is a JSON object with a 'query' text")
        try:
            chat = self._find(body, body.get("user_id"), create=True)
            if chat.scope is not None:
                raise RequestError("WORKFLOW_RUNNING", "a workflow is already running here")
        except RequestError as exc:
            raise HttpError(HTTP_STATUS.get(exc.code, 400), exc.code, exc.message) from None
        chat.scope = trio.CancelScope()
        self.nursery.start_soon(self._run, chat, body)
        return {"session_id": chat.id, "topic": chat.topic}

    # --- the simulated agent workflow -------------------------------------------------

    async def _emit(self, chat: Chat, kind: str, **data: Any) -> None:
        await trio.sleep(self.chunk_delay)
        if kind == "tool_result":  # the seed puts session_id inside data here
            frame = {"type": kind, "data": {**data, "session_id": chat.id}}
        else:
            frame = {"type": kind, "data": data, "session_id": chat.id}
        await self.server.publish(chat.topic, frame)

    async def _run(self, chat: Chat, body: dict[str, Any]) -> None:
        assert chat.scope is not None
        try:
            with chat.scope, trio.move_on_after(self.workflow_timeout) as timer:
                await self._emit(chat, "status", status="START")
                if isinstance(call := body.get("direct_tool_call"), dict):
                    await self._direct(chat, call.get("tool_name"), call.get("parameters") or {})
                else:
                    query = str(body.get("query"))  # read-only unless it asks for a change
                    ask = body.get("mode") == "ask" or not CHANGES.search(query)
                    await self._agent(chat, query, ask=ask)
            if timer.cancelled_caught:
                await self._emit(chat, "message", text=TIMEOUT_TEXT)
            chat.pending = None
            await self._emit(chat, "status", status="END")
        except Exception:  # one workflow's failure must not stop the service
            LOGGER.exception("the workflow of chat session %s failed", chat.id)
        finally:
            chat.scope = chat.pending = None

    async def _agent(self, chat: Chat, query: str, *, ask: bool) -> None:
        await self._say(chat, f"I'll help you with: {query}. Let me check your clusters...")
        await self._tool(chat, "kubectl_get", {"resource": "pods", "namespace": "default"}, PODS)
        if ask:
            await self._say(chat, "Your pods are running. I changed nothing.")
        else:
            await self._say(chat, "Your pods are running. A new GKE cluster needs your approval.")
            chat.pending, chat.answered = f"conf_{uuid.uuid4().hex[:12]}", trio.Event()
            await self._emit(chat, "confirmation_request", confirmation_id=chat.pending,
                             action="create_gke_cluster", details=CLUSTER, risk_level="medium",
                             estimated_cost="$150/month")  # fmt: skip
            await chat.answered.wait()
            if chat.approved:
                await self._tool(chat, "gcloud_create_cluster", CLUSTER, CREATE)
                await self._say(chat, "Done: my-cluster is being created in us-central1.")
            else:
                await self._say(chat, "Understood, I won't create the cluster. No change made.")
        chat.cost += 0.05
        await self._emit(chat, "usage_info", total_cost=round(chat.cost, 2))

    async def _direct(self, chat: Chat, name: Any, parameters: dict[str, Any]) -> None:
        """A direct tool call: the tool runs without the agent deciding anything."""
        if name not in DIRECT_TOOLS:
            text, code = f"Failed to execute {name}: unknown tool", "TOOL_EXECUTION_FAILED"
            await self._emit(chat, "error", text=text, code=code)
            await self._emit(chat, "status", status="ERROR")
            return
        await self._tool(chat, name, parameters, ([f"{name}: done\n"], {"success": True}))

    async def _say(self, chat: Chat, text: str) -> None:
        chunks = re.findall(r"\S+\s*", text)
        for i, chunk in enumerate(chunks, 1):
            last = i == len(chunks)
            await self._emit(chat, "message", text=chunk, is_chunk=True, is_complete=last,
                             streaming=not last)  # fmt: skip

    async def _tool(
        self, chat: Chat, name: str, given: dict[str, Any], run: tuple[list[str], Any]
    ) -> None:
        (output, result), ids = run, {"tool_call_id": f"call_{uuid.uuid4().hex[:12]}"}
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await self._emit(chat, "tool_call", tool_name=name, input=given, status="running",
                         timestamp=now, **ids)  # fmt: skip
        for i, line in enumerate(output, 1):
            await self._emit(chat, "tool_output", tool_name=name, output=line, is_chunk=True,
                             is_complete=i == len(output), **ids)  # fmt: skip
        await self._emit(chat, "tool_result", tool_name=name, result=result)

    # --- the kubectl agent endpoint ---------------------------------------------------

    def bearer(self, request: UpgradeRequest) -> Identity:
        given = (request.header("authorization") or "").encode()
        expected = f"Bearer {self.agent_token}".encode()
        if not self.agent_token or not hmac.compare_digest(given, expected):
            raise AuthError("kubectl agents present Authorization: Bearer <token>")
        return Identity("default", user="kubectl-agent", authenticated=True)

    async def agent_hello(self, session: Session, message: AppMessage) -> None:
        session.reply({"type": "welcome", "cluster_id": message.body.get("cluster_id")})


@asynccontextmanager
async def open_aurora(
    port: int = 5006, *, log_level: str = "warning", **options: Any
) -> AsyncIterator[Aurora]:
    """Serve Aurora on 127.0.0.1:``port`` (0: a free one) until the block ends."""
    aurora = Aurora(**options)
    config = Config(
        port=port,
        log_level=log_level,  # type: ignore[arg-type]
        rate_limit=5,  # messages per client ...
        rate_period=60,  # ... per 60 s (a token bucket: one more every 12 s)
        rate_limit_violations=0,  # over the limit: the error frame, never a close
        namespaces={"aurora": {"history_size": 10_000, "history_ttl": 3600}},
    )
    endpoints = [aurora.chat, aurora.agent]
    async with open_server(config, endpoints=endpoints) as server, trio.open_nursery() as nursery:
        aurora.server, aurora.nursery = server, nursery
        for path in PAGES:
            server.http_route(path, methods=("GET", "HEAD"))(aurora.page)
        server.http_route("/chat/query")(aurora.http_query)
        yield aurora
        nursery.cancel_scope.cancel()
