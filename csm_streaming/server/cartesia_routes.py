"""Cartesia's TTS WebSocket, spoken by our server: `GET /tts/websocket`.

pipecat's `CartesiaTTSService(url="ws://HOST:PORT/tts/websocket")` and LiveKit's
`cartesia.TTS(base_url="http://HOST:PORT")` work unchanged. The key may come as `X-API-Key`,
`Authorization: Bearer` or the `api_key` query (`cartesia_version` is accepted and ignored);
without `--token` any key, or none, is accepted.

Client messages: `{context_id, transcript, continue, voice: {mode: "id", id}, output_format:
{container: "raw", encoding, sample_rate}, add_timestamps, max_buffer_delay_ms, model_id,
language}`, `{context_id, cancel: true}`; `continue: false` ends a context (its transcript may
be empty). Server messages, each with `context_id`: `chunk` (base64 audio), `timestamps`
(`word_timestamps: {words, start, end}`, seconds from the context's first sample: estimated
inside each phrase, or heard with `--word-aligner`: see speech_contexts.py), `flush_done`,
`done`, `error`. Not supported:
phoneme timestamps, voice embeddings and controls, other containers (accepted and ignored where
harmless, an error where the audio would not be what was asked).
"""

from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter, Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from csm_streaming.server.api import ApiError, field_errors
from csm_streaming.server.speech_contexts import (
    DEFAULT_BUFFER_DELAY_MS,
    AudioOut,
    ContextSocket,
    SpeechContext,
    WordTimes,
    speak_over_http,
)
from csm_streaming.server.stream_sockets import (
    accept_streaming_socket,
    read_json_messages,
    send_json,
)

router = APIRouter()


class CartesiaSink:
    """Context events -> Cartesia's server messages."""

    def __init__(self, ws: WebSocket, timeout_s: float):
        self.ws, self.timeout_s = ws, timeout_s
        self.timestamps: set[str] = set()  # contexts that asked for add_timestamps

    async def send(self, message: dict):
        await send_json(self.ws, message, self.timeout_s)

    async def audio(self, ctx: SpeechContext, data: bytes):
        if data:
            await self.send({"type": "chunk", "context_id": ctx.id, "status_code": 206,
                             "done": False, "data": base64.b64encode(data).decode()})

    async def words(self, ctx: SpeechContext, times: WordTimes):
        if ctx.id in self.timestamps:
            await self.send({"type": "timestamps", "context_id": ctx.id, "status_code": 206,
                             "done": False, "word_timestamps": {
                                 "words": times.words, "start": times.start, "end": times.end}})

    async def done(self, ctx: SpeechContext):
        self.timestamps.discard(ctx.id)
        await self.send({"type": "done", "context_id": ctx.id, "status_code": 206, "done": True})

    async def error(self, ctx: SpeechContext | None, status: int, message: str):
        await self.send({"type": "error", "context_id": ctx.id if ctx else None,
                         "status_code": status, "done": True, "error": message})


class CartesiaVoice(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # __experimental_controls...: ignored
    mode: str = "id"
    id: str | int

    @field_validator("mode")
    @classmethod
    def _by_id(cls, mode: str) -> str:
        if mode != "id":
            raise ValueError('send {"mode": "id", "id": NAME} (a named voice, a speaker number '
                             "or an OpenAI voice name); embeddings are not supported")
        return mode


class CartesiaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    container: Literal["raw"] = "raw"
    encoding: Literal["pcm_s16le", "pcm_f32le"] = "pcm_s16le"
    sample_rate: int = Field(24000, ge=8000, le=48000)


class CartesiaRequest(BaseModel):
    """A context's options (on every socket message) and the one-shot body: the same checks."""

    model_config = ConfigDict(extra="allow", strict=True)  # model_id, language...: accepted
    voice: CartesiaVoice
    output_format: CartesiaFormat = Field(default_factory=CartesiaFormat)

    def output(self) -> AudioOut:
        return AudioOut(self.output_format.encoding, self.output_format.sample_rate)


class CartesiaBytes(CartesiaRequest):
    transcript: str = Field(pattern=r"\S")


def options_of(msg: dict) -> CartesiaRequest:
    """A socket message's context options, checked as the one-shot body is (a 400 naming the
    field otherwise)."""
    try:
        return CartesiaRequest.model_validate(msg)
    except ValidationError as e:
        raise ApiError(400, field_errors(e.errors())) from None


async def handle(socket: ContextSocket, sink: CartesiaSink, msg: dict):
    """One client message."""
    cid = msg.get("context_id")
    if not isinstance(cid, str) or not cid:
        raise ApiError(400, "context_id: every message names its context (a string)")
    ctx = socket.get(cid)
    if msg.get("cancel"):
        if ctx is not None:
            ctx.cancel()
        return
    transcript = msg.get("transcript", "")
    if not isinstance(transcript, str):
        raise ApiError(400, "transcript must be a string")
    if ctx is None and cid in socket.ended:
        if not transcript.strip():  # e.g. the end packet of a context that hit its length cap
            return
        raise ApiError(400, f"context {cid!r} has ended (done or cancelled): use a new "
                            "context_id")
    if ctx is None:
        delay = msg.get("max_buffer_delay_ms", DEFAULT_BUFFER_DELAY_MS)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise ApiError(400, "max_buffer_delay_ms must be a number (0..5000)")
        options = options_of(msg)
        ctx = socket.open(cid, options.voice.id, options.output(), delay)
        if msg.get("add_timestamps"):
            sink.timestamps.add(cid)
    try:
        if transcript:
            await ctx.add_text(transcript)
        if msg.get("continue", True) is False:
            await ctx.end()
        elif msg.get("flush"):
            await ctx.flush()
    except ApiError:  # this context's own trouble (its voice, its text): it alone ends
        ctx.cancel()
        raise
    if msg.get("flush") and msg.get("continue", True) is not False:
        await sink.send({"type": "flush_done", "context_id": cid, "flush_done": True,
                         "flush_id": len(ctx.phrases), "status_code": 206, "done": False})


@router.post("/tts/bytes")
async def cartesia_bytes(body: CartesiaBytes, request: Request):
    """Cartesia's one-shot endpoint (LiveKit's `synthesize`, pipecat's CartesiaHttpTTSService):
    `{transcript, voice, output_format, model_id, language}` -> the audio as it is made."""
    return await speak_over_http(request, body.transcript, body.voice.id, body.output())


@router.websocket("/tts/websocket")
async def cartesia_socket(ws: WebSocket):
    server = await accept_streaming_socket(ws)
    if server is None:
        return
    sink = CartesiaSink(ws, server.settings.write_timeout_s)
    socket = ContextSocket(server, ws.scope, sink)

    async def report(msg, e: ApiError):
        cid = msg.get("context_id") if isinstance(msg, dict) else None
        await sink.send({"type": "error", "context_id": cid, "status_code": e.status,
                         "done": True, "error": e.message})

    try:
        await read_json_messages(ws, server, lambda msg: handle(socket, sink, msg), report)
    finally:
        socket.close()
        server.clients.leave()
