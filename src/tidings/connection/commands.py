"""What a client's commands do: subscribe, unsubscribe, publish, request, ack,
ping, presence, refresh, and an endpoint's own messages.

The reader decodes each command and hands it to :meth:`Commands.execute`.
Permission checks (namespace, the token's claims) come first; then the
broker, or the application's handler. Every answer is queued in the outbox
with :meth:`Commands.reply`: never dropped, and charged to the client's
byte budget, which the reader checks before it takes the next command.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import trio

from ..app import ClientInfo, RequestContext, RequestHandler
from ..auth import Authenticator, Identity, may_publish
from ..broker.broker import Broker, Subscriber
from ..broker.namespaces import Namespaces
from ..broker.outbox import Outbox
from ..errors import AuthError, BrokerError, ProxyDisconnect, ProxyError, RequestError
from ..protocol.codes import ErrorCode
from ..protocol.dialect import Dialect
from ..protocol.messages import (
    Ack,
    Acked,
    Answer,
    AppMessage,
    Error,
    Ping,
    Pong,
    Position,
    PresenceList,
    PresenceQuery,
    Publish,
    Published,
    Refresh,
    Refreshed,
    Reply,
    Request,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from ..stats import NodeCounters
from ..transport.base import Framer, Outgoing, WireMessage
from .endpoint import Endpoint
from .hooks import ClientHooks
from .limits import ConnectionLimits
from .session import Session

LOGGER = logging.getLogger("tidings.connection")

T = TypeVar("T")


class _Refused:
    """What :meth:`Commands._ask` returns when the hook refused (the client was told)."""


REFUSED: Final = _Refused()


class Commands:
    """The native protocol's commands and an endpoint's messages, for one connection.

    A mixin of :class:`~tidings.connection.connection.Connection`, which holds
    the attributes named here.
    """

    # The state these methods change lives here; the rest is the connection's.
    __slots__ = ("_requests", "acked", "identity")

    broker: Broker
    subscriber: Subscriber
    identity: Identity
    namespaces: Namespaces
    limits: ConnectionLimits
    handlers: Mapping[str, RequestHandler]
    authenticator: Authenticator | None
    counters: NodeCounters
    info: ClientInfo
    outbox: Outbox[Outgoing]
    dialect: Dialect
    endpoint: Endpoint | None
    hooks: ClientHooks | None
    acked: dict[str, int]
    _requests: trio.Semaphore | None
    _frame: Framer
    _nursery: trio.Nursery | None

    @property
    def session(self) -> Session:
        raise NotImplementedError

    def close(self, code: int, reason: str, *, flush: bool = True) -> None:
        raise NotImplementedError

    async def execute(self, command: Any) -> None:
        """Carry out one decoded command (an :class:`Error` is answered as is)."""
        kind = type(command)
        if kind is Publish:
            await self._publish(command)
        elif kind is Subscribe:
            await self._subscribe(command)
        elif kind is Unsubscribe:
            if self.broker.unsubscribe(self.subscriber, command.topic):
                self.acked.pop(command.topic, None)
                self.reply(Unsubscribed(command.topic, command.request_id))
            else:
                self.reply(self._not_subscribed(command.topic, command.request_id))
        elif kind is Request:
            await self._request(command)
        elif kind is Ack:
            self._ack(command)
        elif kind is Ping:
            self.reply(Pong(command.request_id))
        elif kind is PresenceQuery:
            await self._presence(command)
        elif kind is Refresh:
            self._refresh(command)
        elif kind is AppMessage:
            await self._app_message(command)
        elif kind is Error:
            self.reply(command)

    def reply(self, reply: Reply) -> None:
        """Queue an answer to the client: never dropped, charged to its budget."""
        self.outbox.put(self._frame(self.dialect.encode_reply(reply)))

    # --- publishing ---------------------------------------------------------------------

    async def _publish(self, command: Publish) -> None:
        if self._refused("publish", command.topic, command.request_id):
            return
        tenant = self.identity.tenant
        payload = command.payload
        try:
            hooks = self.hooks
            if hooks is not None and hooks.hooks.publishes:
                # Awaited here, in the reader: a client's publications keep their order.
                asked = await self._ask(
                    hooks.hooks.publish(self.info, hooks.origin, command.topic, payload),
                    command.request_id,
                    command.topic,
                )
                if asked is REFUSED:
                    return
                payload = asked
            try:
                # Without yielding, so every publication of one socket read
                # reaches the broker before it runs, as one batch.
                self.broker.submit_nowait(
                    command.topic,
                    payload,
                    self._publish_reply(command),
                    tenant=tenant,
                    idempotency_key=command.idempotency_key,
                    trusted=False,
                )
            except trio.WouldBlock:  # the broker's inbox is full: wait for room
                await self.broker.submit(
                    command.topic,
                    payload,
                    self._publish_reply(command),
                    tenant=tenant,
                    idempotency_key=command.idempotency_key,
                    trusted=False,
                )
        except TypeError as exc:  # a value orjson cannot write back (e.g. a huge int)
            self.reply(Error(ErrorCode.INVALID_FIELD, str(exc), command.request_id, command.topic))

    def _publish_reply(self, command: Publish) -> Callable[[Position | BrokerError], None]:
        def on_done(result: Position | BrokerError) -> None:
            if isinstance(result, BrokerError):
                self.reply(Error(result.code, result.message, command.request_id, command.topic))
            else:
                self.reply(Published(command.topic, command.request_id, result))

        return on_done

    # --- subscriptions --------------------------------------------------------------------

    async def _subscribe(self, command: Subscribe) -> None:
        if self._refused("subscribe", command.topic, command.request_id):
            return
        hooks = self.hooks
        if (
            hooks is not None
            and hooks.hooks.subscribes
            and command.topic not in self.subscriber.topics  # the broker refuses it anyway
        ):
            asked = await self._ask(
                hooks.hooks.subscribe(self.info, hooks.origin, command.topic),
                command.request_id,
                command.topic,
            )
            if asked is REFUSED:
                return
        try:
            # With a backplane, waits until this node follows the topic; then
            # no await until the replay is queued.
            await self.broker.prepare(command.topic, self.identity.tenant)
            result = self.broker.subscribe(
                self.subscriber, command.topic, since=command.since, epoch=command.epoch
            )
        except BrokerError as exc:
            self.reply(Error(exc.code, exc.message, command.request_id, command.topic))
            return
        # No await from here on: the replay must be queued before the next
        # fan-out can put a live event behind it.
        replay = result.replay
        self.reply(
            Subscribed(
                command.topic, command.request_id, result.position, result.recovered, len(replay)
            )
        )
        # A cursor, not the events: the writer reads them from history as the
        # client's budget allows.
        replay.queue(self.outbox, self.subscriber.encode)

    def _ack(self, command: Ack) -> None:
        if command.topic not in self.subscriber.topics:
            self.reply(self._not_subscribed(command.topic, command.request_id))
            return
        position = self.broker.position(command.topic, self.identity.tenant)
        head = position.seq if position is not None else 0
        if command.seq > head:
            self.reply(
                Error(
                    ErrorCode.INVALID_FIELD,
                    f"seq {command.seq} is beyond the topic's last offset {head}",
                    command.request_id,
                    command.topic,
                )
            )
            return
        if not self.acked:
            self.acked = {}  # its own, not the shared empty one
        self.acked[command.topic] = command.seq
        if command.request_id is not None:
            self.reply(Acked(command.topic, command.request_id, command.seq))

    async def _presence(self, command: PresenceQuery) -> None:
        if self._refused("presence", command.topic, command.request_id):
            return
        try:
            clients = await self.broker.presence_everywhere(command.topic, self.identity.tenant)
        except BrokerError as exc:
            self.reply(Error(exc.code, exc.message, command.request_id, command.topic))
            return
        limit = self.limits.presence_max_reply
        if limit and len(clients) > limit:
            # Bounded at the source: the first ones, and the count says how many there are.
            clients = clients[:limit]
        self.reply(PresenceList(command.topic, command.request_id, clients))

    # --- tokens -----------------------------------------------------------------------------

    def _refresh(self, command: Refresh) -> None:
        if self.authenticator is None or self.authenticator.mode == "none":
            self.reply(Refreshed(command.request_id, None))
            return
        try:
            identity = self.authenticator.verify(command.token)
        except AuthError as exc:
            self.counters.auth_failures += 1
            LOGGER.warning(
                "refresh refused for %s: %s",
                self.info.id,
                exc,
                extra={
                    "event": "auth_failure",
                    "client": self.info.id,
                    "remote": self.info.remote,
                    "reason": str(exc),
                },
            )
            self.reply(Error(ErrorCode.UNAUTHORIZED, str(exc), command.request_id))
            return
        if (identity.user, identity.tenant) != (self.identity.user, self.identity.tenant):
            self.reply(
                Error(ErrorCode.UNAUTHORIZED, "the token is for another user", command.request_id)
            )
            return
        self.identity = identity
        self.reply(Refreshed(command.request_id, identity.expires_at))
        # A narrower token ends the subscriptions it no longer allows.
        for topic in sorted(self.subscriber.topics):
            if not identity.subscribe.allows(topic):
                self.broker.unsubscribe(self.subscriber, topic)
                self.acked.pop(topic, None)
                self.reply(Unsubscribed(topic, None))

    # --- requests -----------------------------------------------------------------------------

    async def _request(self, command: Request) -> None:
        if self._refused("request", command.topic, command.request_id):
            return
        handler = self.handlers.get(command.topic)
        if handler is None and self.hooks is not None and self.hooks.hooks.answers:
            handler = self._forward
        if handler is None:
            self.reply(
                Error(
                    ErrorCode.NOT_FOUND,
                    f"no request handler for topic {command.topic!r}",
                    command.request_id,
                    command.topic,
                )
            )
            return
        if self._requests is None:
            self._requests = trio.Semaphore(self.limits.max_pending_requests)
        await self._requests.acquire()  # at most max_pending_requests in flight
        assert self._nursery is not None
        self._nursery.start_soon(self._answer, handler, command)

    async def _answer(self, handler: RequestHandler, command: Request) -> None:
        topic, request_id = command.topic, command.request_id
        try:
            with trio.fail_after(self.limits.request_timeout):
                result = await handler(RequestContext(topic, command.payload, self.info))
            # Encoded here, inside the try: an answer JSON cannot carry is the
            # handler's failure, not the connection's.
            frame = self._frame(self.dialect.encode_reply(Answer(topic, request_id, result)))
        except trio.TooSlowError:
            frame = self._encode_error(
                ErrorCode.REQUEST_TIMEOUT,
                f"no answer within {self.limits.request_timeout:g} s",
                request_id,
                topic,
            )
        except RequestError as exc:
            frame = self._encode_error(exc.code, exc.message, request_id, topic)
        except ProxyDisconnect as exc:
            self.close(exc.close_code, exc.reason)
            return  # (the finally clause gives the request's slot back)
        except Exception:
            LOGGER.exception("request handler for %r failed", topic)
            frame = self._encode_error(
                ErrorCode.REQUEST_FAILED, "the request handler failed", request_id, topic
            )
        finally:
            assert self._requests is not None
            self._requests.release()
        self.outbox.put(frame)

    async def _forward(self, request: RequestContext) -> Any:
        """Answer a request no in-process handler answers with the rpc hook."""
        hooks = self.hooks
        assert hooks is not None
        return await hooks.hooks.rpc(self.info, hooks.origin, request.topic, request.payload)

    async def _ask(self, call: Awaitable[T], request_id: Any, topic: str) -> T | _Refused:
        """A hook's answer; or, when it refused, the client told (or closed) and REFUSED."""
        try:
            return await call
        except ProxyDisconnect as exc:
            self.close(exc.close_code, exc.reason)
        except ProxyError as exc:
            self.reply(Error(exc.code, exc.message, request_id, topic))
        return REFUSED

    def _encode_error(self, code: str, message: str, request_id: Any, topic: str) -> WireMessage:
        return self._frame(self.dialect.encode_reply(Error(code, message, request_id, topic)))

    # --- an endpoint's own messages --------------------------------------------------------

    async def _app_message(self, message: AppMessage) -> None:
        handler = self.endpoint.handlers.get(message.kind) if self.endpoint else None
        if handler is None:
            self.reply(
                Error(
                    ErrorCode.UNKNOWN_TYPE,
                    f"unknown message type {message.kind[:64]!r}",
                    message.request_id,
                )
            )
            return
        try:
            with trio.fail_after(self.limits.request_timeout):
                await handler(self.session, message)
        except trio.TooSlowError:
            self.reply(
                Error(
                    ErrorCode.REQUEST_TIMEOUT,
                    f"no answer within {self.limits.request_timeout:g} s",
                    message.request_id,
                )
            )
        except RequestError as exc:
            self.reply(Error(exc.code, exc.message, message.request_id))
        except BrokerError as exc:
            self.reply(Error(exc.code, exc.message, message.request_id))
        except Exception:
            LOGGER.exception("handler for %r messages failed", message.kind)
            self.reply(Error(ErrorCode.REQUEST_FAILED, "the handler failed", message.request_id))

    # --- permissions ----------------------------------------------------------------------

    def _refused(self, action: str, topic: str, request_id: Any) -> bool:
        """Whether this client may not ``action`` on ``topic``; if so, it is told why.

        The namespace must exist and allow the topic; subscribing, requests and
        presence need the token's ``topics`` claim to allow it; publishing
        follows the namespace and the token's ``publish`` claim (see
        ``docs/auth.md``).
        """
        problem = self._permission_problem(action, topic)
        if problem is None:
            return False
        code, message = problem
        self.reply(Error(code, message, request_id, topic))
        return True

    def _permission_problem(self, action: str, topic: str) -> tuple[ErrorCode, str] | None:
        namespace = self.namespaces.resolve(topic)
        if namespace is None:
            prefix = topic.partition(":")[0]
            return ErrorCode.UNKNOWN_NAMESPACE, f"namespace {prefix!r} is not configured"
        if not namespace.topics.allows(topic):
            return ErrorCode.UNKNOWN_TOPIC, f"topic {topic!r} is not served here"
        identity = self.identity
        if action == "publish":
            if may_publish(identity, namespace, topic):
                return None
            hooks = self.hooks
            if (
                hooks is not None
                and hooks.hooks.publishes
                and namespace.publish is not False
                and identity.publish is None
            ):
                return None  # where the node has no rule of its own, the publish hook decides
            return ErrorCode.FORBIDDEN, f"publishing to {topic!r} is not allowed"
        if not identity.subscribe.allows(topic):
            return ErrorCode.FORBIDDEN, f"your token does not allow topic {topic!r}"
        if action == "presence" and not namespace.presence:
            return ErrorCode.FORBIDDEN, f"presence is off for topic {topic!r}"
        return None

    @staticmethod
    def _not_subscribed(topic: str, request_id: Any) -> Error:
        return Error(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {topic!r}", request_id, topic)
