"""What the streaming-input sockets (Cartesia's, ElevenLabs') share before their protocol
starts: the key is read from the handshake (headers or query), so an authorised client never
waits behind strangers in the not-yet-authorised budget; a refusal is a real HTTP answer at the
handshake (401, or 503 with Retry-After when the server is full), never an accepted socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from csm_streaming.server.api import ApiError, error_body
from csm_streaming.server.context import ServerContext, context_of
from csm_streaming.server.limits import busy_error, handshake_key_ok

log = logging.getLogger("csm.server")


async def accept_streaming_socket(ws: WebSocket) -> ServerContext | None:
    """Check the key and the connection budget, then accept. Returns the ServerContext (the
    caller calls `clients.leave()` when the socket ends), or None after refusing."""
    ctx = context_of(ws)
    if not handshake_key_ok(ws.scope, ctx.settings.token):
        ctx.count(ws.scope, 401)
        await ws.send_denial_response(JSONResponse(
            error_body(401, "missing or wrong API key: send the server's token as the key"),
            status_code=401))
        return None
    if not ctx.clients.enter():
        busy = busy_error("connections")
        ctx.count(ws.scope, busy.status)
        await ws.send_denial_response(JSONResponse(error_body(busy.status, busy.message),
                                                   status_code=busy.status,
                                                   headers=busy.headers))
        return None
    await ws.accept()
    return ctx


async def send_json(ws: WebSocket, message: dict, timeout_s: float):
    """One JSON message. A client that left is not an error (its contexts stop when the read
    loop sees it); one that reads nothing for timeout_s is dropped, as on every route."""
    try:
        await asyncio.wait_for(ws.send_text(json.dumps(message)), timeout_s)
    except asyncio.TimeoutError:
        log.warning("streaming socket: the client read nothing for %g s; dropped", timeout_s)
        with contextlib.suppress(Exception):
            await ws.close(code=1008)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass


async def read_json_messages(ws: WebSocket, server: ServerContext, handle, report):
    """Each message of the socket, a JSON object, to `await handle(msg)` until the client
    closes; a binary frame, text that is not a JSON object, or an ApiError of handle goes to
    `await report(msg or None, error)` and the socket goes on."""
    try:
        while True:
            message, msg = await ws.receive(), None
            if message["type"] == "websocket.disconnect":
                return
            try:
                if message.get("text") is None:
                    raise ApiError(400, "send JSON text frames, not binary ones")
                try:
                    msg = json.loads(message["text"])
                except ValueError:
                    raise ApiError(400, "a message is not valid JSON") from None
                if not isinstance(msg, dict):
                    raise ApiError(400, "a message must be a JSON object")
                await handle(msg)
            except ApiError as e:
                server.count(ws.scope, e.status)
                await report(msg, e)
    except (WebSocketDisconnect, RuntimeError, asyncio.CancelledError):
        pass  # the client left (or closed the socket with a message)
