"""What the routes share (`ServerContext`, on `app.state.ctx`): the engine thread, the settings, the
voices, and the helpers that turn a ticket's chunks into a response body, server-sent events or
WebSocket messages, each counted once with its real outcome."""

from __future__ import annotations

import asyncio
import base64
import json
import logging

from fastapi import WebSocketDisconnect

from csm_streaming.audio import SAMPLE_RATE, pcm16
from csm_streaming.server.api import ServerSettings, build_request, shape_error
from csm_streaming.server.limits import (
    CLEANUP_KEY,
    AddressBudget,
    Budget,
    StreamAborted,
    route_template,
)

log = logging.getLogger("csm.server")


class ServerContext:
    """What the routes share: the engine thread, the settings, the voices, and the helpers that turn
    a ticket's chunks into a response. One per app, on `app.state.ctx`."""

    def __init__(self, app, engine_thread, settings: ServerSettings, voices=None, chat=None,
                 aligner=None):
        self.app, self.engine_thread, self.settings = app, engine_thread, settings
        self.sg, self.metrics = engine_thread.generator, engine_thread.metrics
        self.voices, self.chat = voices, chat  # chat: an llm.LLMConfig, or None
        self.chat_session = None  # async (ws, ctx, first message): set by server.create_app
        self.aligner = aligner  # engine/word_align.CtcAligner (--word-aligner); None: estimated
        # Open connections: WebSockets not yet authorised, and authorised clients (the routes
        # but /health and the page); /health and the page count in neither.
        # per address only where a token tells strangers from clients: without one every
        # socket is a stranger until its first message, and one machine may open many
        self.strangers = AddressBudget(settings.max_pending_sockets,
                                       settings.max_pending_sockets_per_address
                                       if settings.token else settings.max_pending_sockets)
        self.clients = Budget(settings.max_connections)

    def count(self, scope, status):
        self.metrics.count_request(route_template(self.app, scope), status)

    def retry_after(self) -> int:
        return self.engine_thread.retry_after_s()

    def enqueue(self, req, scope, feed=None):
        """Queue a request; its stream is cancelled when the HTTP request ends, however."""
        from csm_streaming.server.engine_thread import QueueFull

        try:
            ticket = self.engine_thread.enqueue(req, asyncio.get_running_loop(), feed)
        except QueueFull as e:
            raise shape_error(e, self.retry_after()) from None
        scope.setdefault(CLEANUP_KEY, []).append(ticket.cancel)
        return ticket

    async def request_from(self, draft, gone=None):
        """The GenerationRequest of a body's RequestDraft (api.build_request), its voice
        resolved against this server's voices."""
        return await build_request(self.sg, self.settings, draft, self.voices, gone)

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

    async def stretched(self, agen, speed: float):
        """OpenAI's `speed`: the chunks time-stretched, the pitch kept, as they come."""
        import torch

        from csm_streaming.server.encode import Tempo

        tempo = Tempo(speed)
        try:
            async for chunk in agen:
                if (out := tempo.feed(chunk)).size:
                    yield torch.from_numpy(out)
            if (out := tempo.finish()).size:
                yield torch.from_numpy(out)
        finally:
            await agen.aclose()

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
        except (asyncio.CancelledError, GeneratorExit):  # the client left mid-stream
            self.count(scope, 499)
            raise
        except Exception as e:
            err = shape_error(e, self.retry_after())
            self.count(scope, err.status)
            log.warning("stream cut short (%s): %s", err.status, err.message)
            raise StreamAborted(err.message) from e
        finally:
            await agen.aclose()

    async def sse(self, scope, agen, first, before=None, done_extra=None, encoder=None):
        """Server-sent events: deltas, then done; a failure is an `error` event, never a done.
        before(): events (dicts) to send ahead of each audio delta and of done (chat text);
        done_extra(): fields added to the done event; encoder: the deltas' format (an
        encode.encoder_for; None: 16-bit PCM)."""
        n = 0

        def ahead() -> bytes:
            return b"".join(_sse(e) for e in (before() if before else ()))

        def audio_event(data: bytes) -> bytes:
            if not data:  # an encoder holding its first packet back
                return b""
            return _sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})

        def delta(chunk):
            nonlocal n
            n += chunk.numel()
            return ahead() + audio_event(encoder.feed(chunk) if encoder else pcm16(chunk))

        def done():
            tail = audio_event(encoder.finish()) if encoder else b""
            return tail + ahead() + _sse({"type": "speech.audio.done",
                                          "audio_ms": n / SAMPLE_RATE * 1000,
                                          **(done_extra() if done_extra else {})})

        try:
            async for b in self.body(scope, agen, first, delta, done):
                yield b
        except StreamAborted as e:
            yield _sse({"type": "error", "message": str(e)})

    async def ws_stream(self, ws, ticket, gone: asyncio.Event | None = None, session: bool = False,
                        before_chunk=None, before_done=None) -> bool:
        """PCM chunks and progress on a WebSocket, then done (or an error); the client leaving
        cancels. gone: set when the client left (a session reads the socket itself); None:
        watch it here. session: keep the socket open after done (more turns come).
        before_chunk(): messages to send before each chunk and before done (chat text);
        before_done(): awaited once before the last of those (the whole reply's text).
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
            if before_done is not None:  # e.g. the rest of a chat reply's text
                await before_done()
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


ONE_REQUEST = ("one request per socket: this one is still speaking and the socket closes "
               "after its done; send the next request on a new socket (or stream text in "
               "pieces on /tts/websocket)")


async def read_until_closed(ws, gone: asyncio.Event, inbox: asyncio.Queue | None = None):
    """Read a socket until it closes (then set `gone`); text messages go to `inbox`. Without
    an inbox (one request per socket), a message is answered with an error and the stream
    goes on."""
    try:
        while True:
            m = await ws.receive()
            if m.get("type") == "websocket.disconnect":
                break
            if inbox is not None and m.get("text") is not None:
                inbox.put_nowait(m["text"])
            elif inbox is None:
                await ws_error(ws, 409, ONE_REQUEST, close=False)
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
