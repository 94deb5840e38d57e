"""The server's routes over an EngineThread: speech as JSON, bytes, server-sent events or WebSocket.

`create_app(engine_thread, settings)` builds the FastAPI app; the routes are module-level functions
that find what they share (`ServerContext`) on `app.state.ctx`. The contract (bodies, limits,
auth, errors) is in api.py; the process around it (uvicorn, the command) in app.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from csm_streaming.audio import SAMPLE_RATE, wav_bytes
from csm_streaming.server.api import (
    MODEL_IDS,
    ApiError,
    ClientGone,
    GenerateBody,
    SpeechBody,
    StreamMessage,
    error_body,
    field_errors,
    shape_error,
)
from csm_streaming.server.context import ServerContext, context_of, ws_error
from csm_streaming.server.encode import encoder_for
from csm_streaming.server.limits import (
    BodyTooLarge,
    LimitsMiddleware,
    busy_error,
    handshake_key_ok,
    route_template,
    token_matches,
)

log = logging.getLogger("csm.server")


def _error(status: int, message: str, headers=None):
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


# -- errors: always JSON, never a stack trace ----------------------------------------------------


async def _api_error(request, exc: ApiError):
    context_of(request).count(request.scope, exc.status)
    return _error(exc.status, exc.message, exc.headers)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")


async def _validation_error(request, exc):
    message = field_errors(exc.errors())
    if _SURROGATE_ESCAPE.search(await request.body()):  # the JSON parser refused the whole body
        message = ("body: a string is not valid Unicode (a lone surrogate escape such as "
                   "\\ud800): send UTF-8 text")
    context_of(request).count(request.scope, 400)  # OpenAI's status for a bad parameter
    return _error(400, message)


async def _http_error(request, exc):
    if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps errors of reading the body
        context_of(request).count(request.scope, 413)
        return _error(413, exc.__cause__.message)
    context_of(request).count(request.scope, exc.status_code)
    if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # not UTF-8, say
        return _error(400, "the body could not be read as JSON: send one JSON object, encoded "
                           "as UTF-8, with Content-Type: application/json")
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))  # Allow


async def _unexpected_error(request, exc):
    log.exception("unhandled error on %s", route_template(request.app, request.scope))
    context_of(request).count(request.scope, 500)
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


# -- routes ---------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    ctx = context_of(request)
    s = ctx.engine_thread
    # liveness and load only: the voices are listed by /v1/voices, behind the token
    return {"status": "ok", "device": str(ctx.sg.device), "active_streams": s.active,
            "queued": s.queued, "slots": s.slots, "watermark": ctx.sg.watermarked,
            "chat": ctx.chat is not None, "auth": ctx.settings.token is not None}


WEB = Path(__file__).resolve().parent / "web"
_WEB_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@router.get("/")
async def page():
    """The listening page (no token needed to load it; it asks for one when the server has)."""
    return FileResponse(WEB / "index.html", media_type="text/html")


@router.get("/web/{name}")
async def web_file(name: str):
    path = WEB / name
    if not re.fullmatch(r"[\w-]+\.(html|js|css)", name) or not path.is_file():
        raise ApiError(404, f"no such file: /web/{name}")
    return FileResponse(path, media_type=_WEB_TYPES[path.suffix])


@router.get("/metrics")
async def metrics_route(request: Request):
    return Response(context_of(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.post("/api/generate")
async def api_generate(body: GenerateBody, request: Request):
    """The whole utterance as base64 WAV in one JSON answer; a client that leaves cancels it."""
    ctx, t0, left = context_of(request), time.perf_counter(), threading.Event()

    async def client_left():  # the body is read: the next message is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left.set()

    gone = asyncio.create_task(client_left())
    chunks = []
    try:
        req = await ctx.request_from(body.draft(), gone=left)
        ticket = ctx.enqueue(req, request.scope)

        async def collect():
            async for chunk in ctx.marked(ticket):
                chunks.append(chunk)

        task = asyncio.create_task(collect())
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            ticket.cancel()
            task.cancel()
            raise ClientGone()
        task.result()
    except ClientGone:
        ctx.count(request.scope, 499)
        return Response(status_code=499)  # nobody is there to read it
    except ApiError:
        raise
    except Exception as e:
        raise shape_error(e, ctx.retry_after()) from None
    finally:
        gone.cancel()
    import torch

    audio = torch.cat(chunks) if chunks else torch.zeros(0)
    run_ms = (time.perf_counter() - t0) * 1000
    duration_ms = audio.numel() / SAMPLE_RATE * 1000
    ctx.count(request.scope, 200)
    return {"audio_data": base64.b64encode(wav_bytes(audio)).decode(), "format": "wav",
            "encoding": "base64", "sample_rate": SAMPLE_RATE, "duration_ms": duration_ms,
            "run_time_ms": run_ms, "rtf": run_ms / duration_ms if duration_ms else None}


@router.get("/v1/models")
async def models():
    """OpenAI's model list: the ids /v1/audio/speech answers to."""
    return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                        "owned_by": "csm-streaming"} for m in MODEL_IDS]}


@router.post("/v1/audio/speech")
async def speech(body: SpeechBody, request: Request):
    """OpenAI's speech API: mp3 (OpenAI's default), Ogg Opus, AAC, FLAC, WAV or raw PCM bytes
    as they are generated, or server-sent events; `speed` time-stretches them."""
    ctx, fmt = context_of(request), body.response_format  # checked by SpeechBody
    req = await ctx.request_from(body.draft())
    agen = ctx.marked(ctx.enqueue(req, request.scope))
    if body.speed != 1.0:  # OpenAI's 0.25..4 (checked by SpeechBody): faster, same pitch
        agen = ctx.stretched(agen, body.speed)
    first = await ctx.first_chunk(agen)
    # The requested format in both: the body's bytes, or each SSE delta's (LiveKit's OpenAI
    # plugin asks gpt-4o-mini-tts for SSE and decodes the deltas as the response_format)
    enc = encoder_for(fmt)
    if body.stream_format == "sse":
        return StreamingResponse(
            ctx.sse(request.scope, agen, first, encoder=enc), media_type="text/event-stream"
        )
    return StreamingResponse(ctx.body(request.scope, agen, first, enc.feed, enc.finish),
                             media_type=enc.content_type,
                             headers={"X-Sample-Rate": str(SAMPLE_RATE)})


async def ws_first_message(ws: WebSocket, ctx: ServerContext) -> StreamMessage | None:
    """The first message of a socket, authenticated by header or by its `token` field (browsers
    cannot set headers on a WebSocket); None after answering an error. It must come within
    first_message_timeout_s: a silent socket is closed, it holds nothing for long."""
    wait_s = ctx.settings.first_message_timeout_s
    try:
        first = await asyncio.wait_for(ws.receive(), wait_s)
    except asyncio.TimeoutError:
        ctx.count(ws.scope, 408)
        await ws_error(ws, 408, f"no request within {wait_s:g} s of connecting: send the JSON "
                                "request as the first message")
        return None
    if first["type"] == "websocket.disconnect":
        return None
    if first.get("text") is None:
        ctx.count(ws.scope, 400)
        await ws_error(ws, 400, 'send the request as a text frame of UTF-8 JSON, like '
                                '{"text": "Hello.", "speaker": 0}, not a binary frame')
        return None
    try:
        msg = StreamMessage(**json.loads(first["text"]))
    except Exception as e:  # not JSON, not an object, a wrong field...
        ctx.count(ws.scope, 400)
        await ws_error(ws, 400, describe_bad_json(e))
        return None
    token = ctx.settings.token
    if token and not (handshake_key_ok(ws.scope, token) or token_matches(msg.token, token)):
        ctx.count(ws.scope, 401)
        await ws_error(ws, 401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                                 'or a "token" field in the first message')
        return None
    return msg


@router.websocket("/v1/stream")
async def ws_stream(ws: WebSocket):
    """A socket that shows its token at the handshake (a header, or the `token` query) is a
    client at once and never waits behind strangers. Strangers' sockets wait in a small budget
    of their own, a few per source address, until their first message authorises them; only
    then do they count against the authorised clients' connections. A refusal for load is an
    HTTP 503 with Retry-After at the handshake."""
    ctx = context_of(ws)
    shown = bool(ctx.settings.token) and handshake_key_ok(ws.scope, ctx.settings.token)
    address = ws.client.host if ws.client else None
    if not shown and not ctx.strangers.enter(address):
        busy = busy_error("unauthorised sockets")
        ctx.count(ws.scope, busy.status)
        return await ws.send_denial_response(JSONResponse(
            error_body(busy.status, busy.message + " (or show your token in the handshake)"),
            status_code=busy.status, headers=busy.headers))
    try:
        await ws.accept()
        msg = await ws_first_message(ws, ctx)
    finally:
        if not shown:
            ctx.strangers.leave(address)
    if msg is None:
        return
    if not ctx.clients.enter():
        busy = busy_error("connections")
        ctx.count(ws.scope, busy.status)
        return await ws_error(ws, busy.status, busy.message)
    try:
        await ws_authorised(ws, ctx, msg)
    finally:
        ctx.clients.leave()


async def ws_authorised(ws: WebSocket, ctx: ServerContext, msg: StreamMessage):
    if msg.type == "chat":  # it answers 404 itself when no LLM is configured
        return await ctx.chat_session(ws, ctx, msg)
    try:
        req = await ctx.request_from(msg.draft())
        ticket = ctx.enqueue(req, ws.scope)
    except ApiError as e:
        ctx.count(ws.scope, e.status)
        return await ws_error(ws, e.status, e.message)
    await ctx.ws_stream(ws, ticket)


def describe_bad_json(e: Exception) -> str:
    """What was wrong with a first message, in words a client can act on (no Python internals);
    a wrong field in the same words as on the HTTP routes."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        return field_errors(e.errors())
    what = (f"not valid JSON: {e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError)
            else "the message must be a JSON object")
    return f'send one JSON request first, like {{"text": "Hello.", "speaker": 0}} ({what})'
def add_limits_and_errors(app):
    """The limits middleware and the JSON error handlers, on an app whose `state.ctx` is its
    ServerContext (server.create_app assembles it and mounts the routers)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ctx = app.state.ctx
    app.add_middleware(LimitsMiddleware, settings=ctx.settings, metrics=ctx.metrics, routes_app=app)
    for exc, handler in ((ApiError, _api_error), (RequestValidationError, _validation_error),
                         (StarletteHTTPException, _http_error), (Exception, _unexpected_error)):
        app.add_exception_handler(exc, handler)
