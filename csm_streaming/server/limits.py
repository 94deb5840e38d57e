"""What every request passes before a route: the bearer token, the two connection budgets
(strangers, clients), the body cap while it is read, a write timeout for readers that read
nothing, and JSON errors for all of it. Pure ASGI: it sees WebSockets and streamed bodies."""

from __future__ import annotations

import asyncio
import hmac
import logging

from csm_streaming.server.api import ApiError, ServerSettings, error_body

log = logging.getLogger("csm.server")


def token_matches(given: str | bytes | None, token: str) -> bool:
    """Constant-time comparison of raw bytes (any header bytes, any token characters)."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given, token.encode("utf-8", "surrogatepass"))


KEY_HEADERS = (b"x-api-key", b"xi-api-key")  # Cartesia's and ElevenLabs' key headers


def key_ok(headers: list[tuple[bytes, bytes]], token: str | None) -> bool:
    """`Authorization: Bearer <token>`, or the token as Cartesia's `X-API-Key` or ElevenLabs'
    `xi-api-key` (their clients send only those). True when no token is set."""
    if bearer_ok(headers, token):
        return True
    return any(name.lower() in KEY_HEADERS and token_matches(value.strip(), token)
               for name, value in headers)


KEY_QUERIES = ("token", "api_key", "xi_api_key")  # ours, Cartesia's, ElevenLabs' query forms


def handshake_key_ok(scope, token: str | None) -> bool:
    """A WebSocket's handshake shows the token: in a key header (key_ok) or one of the
    KEY_QUERIES (browsers cannot set headers). Without a token set, any key (or none) is
    accepted: clients that insist on sending one (LiveKit's plugins refuse to start without)
    work as they are."""
    if key_ok(scope["headers"], token):
        return True
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return any(token_matches(v, token) for q in KEY_QUERIES for v in query.get(q, ()))


def bearer_ok(headers: list[tuple[bytes, bytes]], token: str | None) -> bool:
    """Does an ASGI header list carry `Authorization: Bearer <token>`? True when no token is set."""
    if not token:
        return True
    for name, value in headers:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            return token_matches(value[7:].strip(), token)
    return False


# ---------------------------------------------------------------------------------------------
# ASGI middleware: auth, body size while reading, write timeout, metrics by route template
# ---------------------------------------------------------------------------------------------


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class WriteTimeout(Exception):
    """The client read nothing for write_timeout_s: it is dropped and its stream cancelled."""


class StreamAborted(Exception):
    """A stream failed after its response started: the connection is closed mid-body, so the
    client sees an incomplete response, never a clean end."""


def _is_abort(exc: BaseException) -> bool:
    """WriteTimeout or StreamAborted, also inside the exception groups of anyio task groups."""
    if isinstance(exc, (WriteTimeout, StreamAborted)):
        return True
    inner = getattr(exc, "exceptions", None)
    return bool(inner) and all(_is_abort(e) for e in inner)


class Budget:
    """How many connections of one kind may be open at once. The server has two: WebSockets
    that have not sent their authorising first message yet, and authorised requests and
    sockets; strangers can fill only the first. Event-loop only: no lock."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def enter(self) -> bool:
        if self.count >= self.limit:
            return False
        self.count += 1
        return True

    def leave(self):
        self.count -= 1


class AddressBudget(Budget):
    """A Budget that one source address cannot fill alone: at most `per_address` of it each
    (strangers reconnecting from one machine leave room for everyone else's)."""

    def __init__(self, limit: int, per_address: int):
        super().__init__(limit)
        self.per_address, self.by_address = per_address, {}

    def enter(self, address=None) -> bool:
        if self.by_address.get(address, 0) >= self.per_address or not super().enter():
            return False
        self.by_address[address] = self.by_address.get(address, 0) + 1
        return True

    def leave(self, address=None):
        super().leave()
        left = self.by_address.get(address, 0) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)


def busy_error(what: str) -> ApiError:
    return ApiError(503, f"the server has too many {what} open; try again in a moment",
                    {"Retry-After": "1"})


def is_open_path(path: str) -> bool:
    """Routes served without a token: the health check and the page (which asks for one)."""
    return path in ("/health", "/") or path.startswith("/web/")


def route_template(app, scope) -> str:
    """The matched route's path template, or 'other': never the raw path (metrics labels)."""
    from starlette.routing import Match

    def find(routes):
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI's included routers
            if inner is not None:
                found = find(inner.routes)
                if found:
                    return found
            elif route.matches(scope)[0] is Match.FULL:
                return getattr(route, "path", None)
        return None

    return find(app.routes) or "other"


CLEANUP_KEY = "csm.cleanup"  # scope entry: callables the middleware runs when a request ends


class LimitsMiddleware:
    """Pure ASGI (it sees WebSockets and reads bodies as they stream): refuses unauthenticated
    HTTP requests, caps bodies while they are read, and drops readers that never read."""

    def __init__(self, app, settings: ServerSettings, metrics, routes_app):
        self.app, self.settings, self.metrics, self.routes_app = app, settings, metrics, routes_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)  # websockets: the route checks the token
        s = self.settings
        route = route_template(self.routes_app, scope)
        if is_open_path(scope["path"]):
            return await self.app(scope, receive, send)
        if not key_ok(scope["headers"], s.token):
            self.metrics.count_request(route, 401)
            return await _send_json(send, 401, error_body(401, "missing or wrong bearer token: "
                                                          "send 'Authorization: Bearer <token>'"),
                                    {"WWW-Authenticate": "Bearer"})
        clients = self.routes_app.state.ctx.clients
        if not clients.enter():
            self.metrics.count_request(route, 503)
            busy = busy_error("connections")
            return await _send_json(send, 503, error_body(503, busy.message), busy.headers)
        try:
            await self._limited(scope, receive, send, route)
        finally:
            clients.leave()

    async def _limited(self, scope, receive, send, route):
        s = self.settings
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > s.max_body_bytes:
            self.metrics.count_request(route, 413)
            return await _send_json(
                send, 413, error_body(413, BodyTooLarge(s.max_body_bytes).message)
            )
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > s.max_body_bytes:
                    raise BodyTooLarge(s.max_body_bytes)
            return message

        async def timed_send(message):
            if message["type"] != "http.response.body":
                return await send(message)
            try:
                await asyncio.wait_for(send(message), s.write_timeout_s)
            except asyncio.TimeoutError:
                raise WriteTimeout(f"the client read nothing for {s.write_timeout_s:g} s") from None

        try:
            await self.app(scope, capped_receive, timed_send)
        except BaseException as e:  # the response was under way: end the connection, quietly
            if not _is_abort(e):
                raise
            log.warning("%s %s: connection ended mid-response (%s)", scope["method"], route, e)
        finally:  # however it ended, the request's streams are let go now, not when collected
            for cleanup in scope.get(CLEANUP_KEY, ()):
                cleanup()


async def _send_json(send, status: int, body: dict, headers: dict | None = None):
    import json

    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
