"""The server's routes over a Scheduler: speech as JSON, bytes, server-sent events or WebSocket.

`create_app(scheduler, settings)` builds the FastAPI app; the routes are module-level functions
that find what they share (`ServerContext`) on `app.state.ctx`. The contract (bodies, limits,
auth, errors) is in api.py; the process around it (uvicorn, the command) in server.py.
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

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, Response, StreamingResponse

from api import (
    CLEANUP_KEY,
    ApiError,
    BodyTooLarge,
    ClientGone,
    GenerateBody,
    LimitsMiddleware,
    ServerSettings,
    SpeechBody,
    StreamAborted,
    StreamMessage,
    bearer_ok,
    build_request,
    error_body,
    route_template,
    shape_error,
    token_matches,
    voice_to_speaker,
)
from audio import SAMPLE_RATE, pcm16, wav_bytes, wav_header

log = logging.getLogger("csm.server")


class ServerContext:
    """What the routes share: the scheduler, the settings, the voices, and the helpers that turn
    a ticket's chunks into a response. One per app, on `app.state.ctx`."""

    def __init__(self, app, scheduler, settings: ServerSettings, voices=None, chat=None):
        self.app, self.scheduler, self.settings = app, scheduler, settings
        self.sg, self.metrics = scheduler.generator, scheduler.metrics
        self.voices, self.chat = voices, chat  # chat: an llm.LLMConfig, or None
        self.chat_session = None  # async (ws, ctx, first message): set by server.create_app

    def count(self, scope, status):
        self.metrics.count_request(route_template(self.app, scope), status)

    def retry_after(self) -> int:
        return self.scheduler.retry_after_s()

    def submit(self, req, scope, feed=None):
        """Queue a request; its stream is cancelled when the HTTP request ends, however."""
        from scheduler import QueueFull

        try:
            ticket = self.scheduler.submit(req, asyncio.get_running_loop(), feed)
        except QueueFull as e:
            raise shape_error(e, self.retry_after()) from None
        scope.setdefault(CLEANUP_KEY, []).append(ticket.cancel)
        return ticket

    async def request_from(self, text, voice, context, max_ms, temperature, top_k, seed,
                           speaker=0, gone=None):
        """A validated request; `voice` (a name or number) when given, else the bare speaker."""
        speaker, voice_ctx = (
            voice_to_speaker(voice, self.voices) if voice is not None else (speaker, ())
        )
        return await build_request(self.sg, self.settings, text, speaker, context, max_ms,
                                   temperature, top_k, seed, voice_ctx, gone)

    async def marked(self, ticket):
        """The ticket's chunks, watermarked in windows off the event loop, as they come."""
        wm = self.sg.generator.watermarker
        marker = wm.stream_marker(self.settings.watermark_window_ms) if wm is not None else None
        try:
            async for chunk in ticket.chunks():
                if marker is None:
                    yield chunk
                    continue
                for w in await asyncio.to_thread(marker.feed, chunk):
                    yield w
            if marker is not None:
                for w in await asyncio.to_thread(marker.flush):
                    yield w
        finally:
            ticket.cancel()  # a no-op when it finished; frees the slot when the client left

    async def first_chunk(self, agen):
        """Wait for the first chunk, so that an early failure still gets a proper status."""
        try:
            return await agen.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as e:
            await agen.aclose()
            raise shape_error(e, self.retry_after()) from None

    async def body(self, scope, agen, first, encode, done=None):
        """Encoded chunks of a stream; counted once, as 200 only when it is complete. A failure
        after the first byte raises StreamAborted: the client sees the body cut, not an end."""
        try:
            if first is not None:
                yield encode(first)
            async for chunk in agen:
                yield encode(chunk)
            if done is not None:
                yield done()
            self.count(scope, 200)
        except Exception as e:
            err = shape_error(e, self.retry_after())
            self.count(scope, err.status)
            log.warning("stream cut short (%s): %s", err.status, err.message)
            raise StreamAborted(err.message) from e
        finally:
            await agen.aclose()

    async def sse(self, scope, agen, first, before=None, done_extra=None):
        """Server-sent events: deltas, then done; a failure is an `error` event, never a done.
        before(): events (dicts) to send ahead of each audio delta and of done (chat text);
        done_extra(): fields added to the done event."""
        n = 0

        def ahead() -> bytes:
            return b"".join(_sse(e) for e in (before() if before else ()))

        def delta(chunk):
            nonlocal n
            n += chunk.numel()
            audio = base64.b64encode(pcm16(chunk)).decode()
            return ahead() + _sse({"type": "speech.audio.delta", "audio": audio})

        def done():
            return ahead() + _sse({"type": "speech.audio.done", "audio_ms": n / SAMPLE_RATE * 1000,
                                   **(done_extra() if done_extra else {})})

        try:
            async for b in self.body(scope, agen, first, delta, done):
                yield b
        except StreamAborted as e:
            yield _sse({"type": "error", "message": str(e)})

    async def ws_stream(self, ws, ticket, gone: asyncio.Event | None = None, session: bool = False,
                        before_chunk=None) -> bool:
        """PCM chunks and progress on a WebSocket, then done (or an error); the client leaving
        cancels. gone: set when the client left (a session reads the socket itself); None:
        watch it here. session: keep the socket open after done (more turns come).
        before_chunk(): messages to send before each chunk and before done (chat text).
        Returns True when the stream was complete and the socket is still usable."""
        watcher = None
        if gone is None:
            gone = asyncio.Event()
            watcher = asyncio.create_task(read_until_closed(ws, gone))
        cancel_when_gone = asyncio.create_task(_cancel_when(gone, ticket))

        async def send(message):  # a reader that reads nothing is dropped, as on HTTP
            send = ws.send_bytes if isinstance(message, bytes) else ws.send_json
            await asyncio.wait_for(send(message), self.settings.write_timeout_s)

        samples = chunks = 0
        try:
            async for chunk in self.marked(ticket):
                for m in before_chunk() if before_chunk else ():
                    await send(m)
                await send(pcm16(chunk))
                samples += chunk.numel()
                chunks += 1
                m = ticket.metrics
                await send({"type": "progress", "chunk": chunks,
                            "audio_ms": samples / SAMPLE_RATE * 1000,
                            "rtf": m.rtf if m and m.audio_s else None,
                            "time_to_first_audio_ms": _ms(m.first_audio_s if m else None)})
            for m in before_chunk() if before_chunk else ():
                await send(m)
            await send({"type": "done", "audio_ms": samples / SAMPLE_RATE * 1000,
                        "sample_rate": SAMPLE_RATE, "format": "pcm_s16le"})
            self.count(ws.scope, 200)
            if not session:
                await ws.close()
            return True
        except (WebSocketDisconnect, asyncio.TimeoutError) as e:
            ticket.cancel()
            self.count(ws.scope, 499)
            if isinstance(e, asyncio.TimeoutError):
                log.warning("websocket: the client read nothing for %g s; dropped",
                            self.settings.write_timeout_s)
                await ws.close(code=1008)
        except Exception as e:
            ticket.cancel()
            err = shape_error(e, self.retry_after())
            self.count(ws.scope, err.status)
            await ws_error(ws, err.status, err.message, close=not session or gone.is_set())
            return session and not gone.is_set()  # a failed turn: the session goes on
        finally:
            cancel_when_gone.cancel()
            if watcher is not None:
                watcher.cancel()
        return False


async def read_until_closed(ws, gone: asyncio.Event, inbox: asyncio.Queue | None = None):
    """Read a socket until it closes (then set `gone`); text messages go to `inbox`."""
    try:
        while True:
            m = await ws.receive()
            if m.get("type") == "websocket.disconnect":
                break
            if inbox is not None and m.get("text") is not None:
                inbox.put_nowait(m["text"])
    except Exception:  # the socket broke: same as closed
        pass
    gone.set()
    if inbox is not None:
        inbox.put_nowait(None)


async def _cancel_when(gone: asyncio.Event, ticket):
    await gone.wait()
    ticket.cancel()


def context_of(request_or_ws) -> ServerContext:
    return request_or_ws.app.state.ctx


def _error(status: int, message: str, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


# -- errors: always JSON, never a stack trace ----------------------------------------------------


async def _api_error(request, exc: ApiError):
    context_of(request).count(request.scope, exc.status)
    return _error(exc.status, exc.message, exc.headers)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")


async def _validation_error(request, exc):
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    if _SURROGATE_ESCAPE.search(await request.body()):  # the JSON parser refused the whole body
        parts = ["body: a string is not valid Unicode (a lone surrogate escape such as \\ud800): "
                 "send UTF-8 text"]
    context_of(request).count(request.scope, 422)
    return _error(422, "; ".join(parts) or "invalid request body")


async def _http_error(request, exc):
    if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps errors of reading the body
        context_of(request).count(request.scope, 413)
        return _error(413, exc.__cause__.message)
    context_of(request).count(request.scope, exc.status_code)
    return _error(exc.status_code, str(exc.detail))


async def _unexpected_error(request, exc):
    log.exception("unhandled error on %s", route_template(request.app, request.scope))
    context_of(request).count(request.scope, 500)
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


# -- routes ---------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    ctx = context_of(request)
    s = ctx.scheduler
    return {"status": "ok", "device": str(ctx.sg.device), "active_streams": s.active,
            "queued": s.queued, "slots": s.slots, "watermark": ctx.sg.watermarked,
            "voices": ctx.voices.names() if ctx.voices else [], "chat": ctx.chat is not None}


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
        req = await ctx.request_from(body.text, body.voice, body.context, body.max_audio_length_ms,
                                     body.temperature, body.top_k, body.seed,
                                     speaker=body.speaker_id, gone=left)
        ticket = ctx.submit(req, request.scope)

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


@router.post("/v1/audio/speech")
async def speech(body: SpeechBody, request: Request):
    """OpenAI's speech API: WAV or raw PCM bytes as they are generated, or server-sent events."""
    ctx = context_of(request)
    fmt = body.response_format.lower()
    if fmt not in ("wav", "pcm"):
        raise ApiError(400, f"response_format '{body.response_format}' is not supported: "
                            "use 'wav' or 'pcm'")
    if body.stream_format not in ("audio", "sse"):
        raise ApiError(400, "stream_format must be 'audio' or 'sse'")
    req = await ctx.request_from(body.input, body.voice, [], body.max_audio_length_ms,
                                 body.temperature, body.top_k, body.seed)
    agen = ctx.marked(ctx.submit(req, request.scope))
    first = await ctx.first_chunk(agen)
    if body.stream_format == "sse":
        return StreamingResponse(
            ctx.sse(request.scope, agen, first), media_type="text/event-stream"
        )
    return StreamingResponse(_with_header(wav_header(None) if fmt == "wav" else b"",
                                          ctx.body(request.scope, agen, first, pcm16)),
                             media_type="audio/wav" if fmt == "wav" else "audio/pcm",
                             headers={"X-Sample-Rate": str(SAMPLE_RATE)})


async def _with_header(header: bytes, body):
    if header:
        yield header
    async for b in body:
        yield b


async def ws_first_message(ws: WebSocket, ctx: ServerContext) -> StreamMessage | None:
    """The first message of a socket, authenticated by header or by its `token` field (browsers
    cannot set headers on a WebSocket); None after answering an error."""
    try:
        msg = StreamMessage(**json.loads(await ws.receive_text()))
    except WebSocketDisconnect:
        return None
    except Exception as e:  # not JSON, not an object, a wrong field...
        await ws_error(ws, 400, 'send one JSON request first, like {"text": "Hello.", '
                                 f'"speaker": 0}} ({type(e).__name__}: {e})')
        return None
    token = ctx.settings.token
    if token and not (bearer_ok(ws.scope["headers"], token) or token_matches(msg.token, token)):
        ctx.count(ws.scope, 401)
        await ws_error(ws, 401, "missing or wrong token: send 'Authorization: Bearer <token>' "
                                 'or a "token" field in the first message')
        return None
    return msg


@router.websocket("/v1/stream")
async def ws_stream(ws: WebSocket):
    ctx = context_of(ws)
    await ws.accept()
    msg = await ws_first_message(ws, ctx)
    if msg is None:
        return
    if msg.type == "chat" and ctx.chat_session is not None:
        return await ctx.chat_session(ws, ctx, msg)
    try:
        if msg.type != "speech":
            raise ApiError(400, f"unknown message type {msg.type!r}: use 'speech' or 'chat'")
        req = await ctx.request_from(msg.text, msg.voice, msg.context, msg.max_audio_length_ms,
                                     msg.temperature, msg.top_k, msg.seed, speaker=msg.speaker)
        ticket = ctx.submit(req, ws.scope)
    except ApiError as e:
        ctx.count(ws.scope, e.status)
        return await ws_error(ws, e.status, e.message)
    await ctx.ws_stream(ws, ticket)


def install(app):
    """The routes of this module, the limits middleware and the JSON error handlers, on an app
    whose `state.ctx` is its ServerContext (server.create_app assembles it)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    ctx = app.state.ctx
    app.include_router(router)
    app.add_middleware(LimitsMiddleware, settings=ctx.settings, metrics=ctx.metrics, routes_app=app)
    for exc, handler in ((ApiError, _api_error), (RequestValidationError, _validation_error),
                         (StarletteHTTPException, _http_error), (Exception, _unexpected_error)):
        app.add_exception_handler(exc, handler)


def _ms(s):
    return None if s is None else s * 1000


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def ws_error(ws, status, message, close: bool = True):
    try:
        await ws.send_json({"type": "error", "status": status, "message": message})
        if close:
            await ws.close(code=1008 if status in (401, 403) else 1003 if status < 500 else 1011)
    except Exception:  # the client is already gone
        pass
