"""ElevenLabs' input-streaming WebSockets, spoken by our server:
`/v1/text-to-speech/{voice_id}/multi-stream-input` (contexts) and `.../stream-input` (one).

pipecat's `ElevenLabsTTSService(url="ws://HOST:PORT")` and LiveKit's
`elevenlabs.TTS(base_url="http://HOST:PORT/v1")` work unchanged. Key: `xi-api-key`,
`Authorization: Bearer` or the `xi_api_key` query; without `--token` any key is accepted.
Query: `output_format` (pcm_8000 .. pcm_48000, mp3_22050_32, mp3_44100_64/96/128/192; ElevenLabs'
default mp3_44100_128), `sync_alignment`, `model_id` / `auto_mode` / others accepted and ignored.

Messages in (multi): `{text: " ", context_id, voice_settings, generation_config}` opens a
context, `{text, context_id, flush?}`, `{context_id, flush: true}`, `{context_id,
close_context: true}` (ends it: what was sent is spoken, then isFinal, as LiveKit's plugin
expects; with `immediate: true` it stops at once), `{text: ""}` keep-alive, `{close_socket:
true}`. Single: the same without context_id; `{text: ""}` ends the input. Out: `{audio,
contextId, alignment, normalizedAlignment}` (alignment: chars, charStartTimesMs,
charDurationsMs), then `{isFinal: true, contextId}`. Each phrase's alignment comes in a message
of its own (empty audio) once the phrase's audio is out; its times count from the phrase's
start, so that adding up each alignment's end (pipecat) gives the context's time, or with
`sync_alignment=true` (LiveKit) from the context's first sample. Voice settings and generation
config are accepted and ignored; ulaw and other codecs are not supported.
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field

from csm_streaming.server.api import ApiError
from csm_streaming.server.speech_contexts import (
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
SINGLE = "single"  # the context id of a stream-input socket


def output_of(fmt: str) -> AudioOut:
    """ElevenLabs' output_format -> AudioOut (a 400 naming the formats otherwise)."""
    if m := re.fullmatch(r"pcm_(\d+)", fmt):
        return AudioOut("pcm_s16le", int(m.group(1)))
    if m := re.fullmatch(r"mp3_(\d+)_(\d+)", fmt):
        return AudioOut("mp3", int(m.group(1)), int(m.group(2)) * 1000)
    raise ApiError(400, f"output_format {fmt!r} is not supported: use pcm_8000 .. pcm_48000 "
                        "or mp3_22050_32, mp3_44100_128 (and the other mp3_RATE_KBPS)")


class ElevenLabsSink:
    """Context events -> ElevenLabs' server messages."""

    def __init__(self, ws: WebSocket, sync_alignment: bool, multi: bool, timeout_s: float):
        self.ws, self.sync, self.multi, self.timeout_s = ws, sync_alignment, multi, timeout_s

    async def send(self, ctx_id: str | None, message: dict):
        if self.multi:
            message["contextId"] = ctx_id
        await send_json(self.ws, message, self.timeout_s)

    async def audio(self, ctx: SpeechContext, data: bytes):
        if data:
            await self.send(ctx.id, {"audio": base64.b64encode(data).decode(), "isFinal": False,
                                     "alignment": None, "normalizedAlignment": None})

    async def words(self, ctx: SpeechContext, times: WordTimes):
        """Each word's characters timed evenly over the word, the space after it over the gap
        to the next word (the last word's: to the phrase's end): the words' edges are the
        WordTimes', and a message's times add up to its phrase's duration (pipecat sums them;
        LiveKit's sync_alignment reads them from the context's start)."""
        phrase_start, phrase_end = times.phrase
        origin = 0.0 if self.sync else phrase_start
        chars, starts, durations = [], [], []
        nexts = [*times.start[1:], max(phrase_end, times.end[-1])]
        for word, a, b, after in zip(times.words, times.start, times.end, nexts):
            step = (b - a) / len(word)
            chars += [*word, " "]
            starts += [a + i * step for i in range(len(word))] + [b]
            durations += [step] * len(word) + [after - b]
        alignment = {"chars": chars,
                     "charStartTimesMs": [round((t - origin) * 1000, 1) for t in starts],
                     "charDurationsMs": [round(d * 1000, 1) for d in durations]}
        await self.send(ctx.id, {"audio": "", "isFinal": False, "alignment": alignment,
                                 "normalizedAlignment": alignment})

    async def done(self, ctx: SpeechContext):
        await self.send(ctx.id, {"isFinal": True})

    async def error(self, ctx: SpeechContext | None, status: int, message: str):
        await self.send(ctx.id if ctx else None, {"error": message, "status_code": status,
                                                  "message": message})


async def handle(socket: ContextSocket, msg: dict, voice: str, out_format: str, multi: bool):
    """One client message of either socket. close_context ends a context as the clients use
    it (LiveKit's plugin sends it after the last flush of every segment and waits for
    isFinal): what was sent is spoken, then isFinal; with `immediate: true` (a barge-in) it
    stops at once, nothing more comes but isFinal."""
    if msg.get("close_socket"):
        raise WebSocketDisconnect(1000)
    cid = msg.get("context_id", SINGLE) if multi else SINGLE
    if not isinstance(cid, str) or not cid:
        raise ApiError(400, "context_id must be a string")
    text = msg.get("text")
    if text is not None and not isinstance(text, str):
        raise ApiError(400, "text must be a string")
    ctx = socket.get(cid)
    if ctx is None:
        if not (text and text.strip()) and not msg.get("flush") and not msg.get("close_context"):
            return  # a keep-alive, or an open message that carries nothing yet
        ctx = socket.open(cid, voice, output_of(out_format))
    try:
        if msg.get("close_context") and msg.get("immediate"):
            ctx.cancel()
            await socket.sink.done(ctx)
            return
        if text and text.strip():
            await ctx.add_text(text, flush=bool(msg.get("flush")))
        elif msg.get("flush"):
            await ctx.flush()
        if msg.get("close_context") or (text == "" and not multi):  # single: "" ends input
            await ctx.end()
        else:
            ctx.last_message = time.monotonic()  # a keep-alive counts
    except ApiError:
        ctx.cancel()
        raise


async def run_socket(ws: WebSocket, voice_id: str, multi: bool):
    server = await accept_streaming_socket(ws)
    if server is None:
        return
    query = parse_qs(ws.scope.get("query_string", b"").decode("latin-1"))
    out_format = query.get("output_format", ["mp3_44100_128"])[0]
    sink = ElevenLabsSink(ws, query.get("sync_alignment", ["false"])[0] == "true", multi,
                          server.settings.write_timeout_s)
    socket = ContextSocket(server, ws.scope, sink)

    async def report(msg, e: ApiError):
        cid = msg.get("context_id") if isinstance(msg, dict) else None
        await sink.error(socket.get(cid) if cid else None, e.status, e.message)

    try:
        await read_json_messages(ws, server, lambda msg: handle(socket, msg, voice_id,
                                                                out_format, multi), report)
    finally:
        socket.close()
        server.clients.leave()
        with contextlib.suppress(Exception):  # already closed by the client
            await ws.close()


class ElevenLabsBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # model_id, voice_settings: ignored
    text: str = Field(pattern=r"\S")


FORMAT_PATTERN = r"^(pcm_\d+|mp3_\d+_\d+)$"


@router.post("/v1/text-to-speech/{voice_id}/stream")
@router.post("/v1/text-to-speech/{voice_id}")
async def text_to_speech(voice_id: str, body: ElevenLabsBody, request: Request,
                         output_format: str = Query("mp3_44100_128", pattern=FORMAT_PATTERN)):
    """ElevenLabs' one-shot endpoints (LiveKit's `synthesize`, pipecat's
    ElevenLabsHttpTTSService): `{text, model_id, voice_settings}` and the `output_format`
    query -> the audio as it is made."""
    return await speak_over_http(request, body.text, voice_id, output_of(output_format))


@router.websocket("/v1/text-to-speech/{voice_id}/multi-stream-input")
async def multi_stream_input(ws: WebSocket, voice_id: str):
    await run_socket(ws, voice_id, multi=True)


@router.websocket("/v1/text-to-speech/{voice_id}/stream-input")
async def stream_input(ws: WebSocket, voice_id: str):
    await run_socket(ws, voice_id, multi=False)
