"""Chat over the server: a language model writes the reply, the engine speaks it as it comes.

- POST /v1/chat/speech: the dialogue so far as chat messages in, the spoken reply out, as audio
  bytes or as server-sent events (text deltas, then the audio of each piece as it is made).
  Stateless: the context is the voice's clip and the messages as text.
- WebSocket /v1/stream with {"type": "chat", "text": ...}: a session on one socket, turn after
  turn; each reply's exact codes stay in the context, so the voice stays the same. The reply's
  text comes as {"type": "text", "delta": ...} messages ahead of its audio.

Same auth and limits as the speech routes; without an LLM configured (csm-server --llm) the
routes answer 404, saying how to enable them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator

from csm_streaming.audio import SAMPLE_RATE, pcm16, wav_header
from csm_streaming.chat.conversation import (
    REPLY_TEXT_WAIT_S,
    ChatMetrics,
    Dialogue,
    ReplyText,
)
from csm_streaming.engine.text_feed import TextFeed
from csm_streaming.request import Segment
from csm_streaming.server.api import (
    ApiError,
    RequestDraft,
    Sampling,
    StreamMessage,
    build_request,
    voice_to_speaker,
)
from csm_streaming.server.context import context_of, read_until_closed, ws_error
from csm_streaming.server.limits import CLEANUP_KEY

log = logging.getLogger("csm.server")
router = APIRouter()


class ChatMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str


class ChatBody(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    voice: str | int | None = None
    response_format: Literal["wav", "pcm"] = "wav"  # the reply's audio as it is made
    stream_format: Literal["audio", "sse"] = "audio"

    @field_validator("response_format", mode="before")
    @classmethod
    def _lower(cls, fmt):
        return fmt.lower() if isinstance(fmt, str) else fmt

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user" or not messages[-1].content.strip():
            raise ValueError("the last one must be the user's, and not empty")
        return messages


def _llm(ctx):
    if ctx.chat is None:
        raise ApiError(404, "chat is not configured on this server: start it with --llm gemini "
                            "or --llm openai (and the provider's key in the environment)")
    return ctx.chat


def _check_messages(messages: list[ChatMessage], limit: int) -> list[dict]:
    """The server's size limit (a setting, so not in the body model), then plain dicts."""
    if sum(len(m.content) for m in messages) > limit:
        raise ApiError(413, f"the messages are over {limit} characters together")
    return [{"role": m.role, "content": m.content.strip()} for m in messages]


class ChatTurn:
    """One reply: the LLM's text going into an open TextFeed, the engine's ticket speaking it,
    and the pieces of text queued for the client as they are handed to the engine."""

    def __init__(self, ctx, scope, messages: list[dict], req):
        self.ctx, self.metrics = ctx, ChatMetrics()
        self.texts: list[str] = []
        self._sent = False
        self.feed = TextFeed(closed=False)
        loop = asyncio.get_running_loop()
        self.reply = ReplyText(_llm(ctx), messages, self.feed, self.metrics,
                               on_text=lambda t: loop.call_soon_threadsafe(self.texts.append, t))
        self.ticket = ctx.enqueue(req, scope, self.feed)  # prepares the voice while the LLM thinks
        scope.setdefault(CLEANUP_KEY, []).append(self.reply.cancel)
        self.reply.start()

    def sync(self):
        """The stream's first audio (timed from the same moment) into the chat's metrics."""
        m = self.ticket.metrics
        if self.metrics.first_audio_s is None and m is not None:
            self.metrics.first_audio_s = m.first_audio_s

    def pending_text(self, kind: str) -> list[dict]:
        """The pieces handed to the engine since the last call, as text messages."""
        out = []
        for t in self.texts:
            out.append({"type": kind, "delta": (" " if self._sent else "") + t})
            self._sent = True
        self.texts.clear()
        return out

    async def text_done(self):
        """Speech can end before the text does (the length cap): the client still gets the
        whole reply's text, which the LLM writes much faster than it is spoken."""
        await asyncio.to_thread(self.reply.join, REPLY_TEXT_WAIT_S)

    def finished(self):
        self.sync()
        if self.metrics.llm_first_piece_s is not None:
            self.ctx.metrics.llm_wait.observe(self.metrics.llm_first_piece_s)


async def _request(ctx, text: str, speaker: int, context: tuple, body: Sampling):
    """The request for a reply to `text` (the feed brings what is spoken)."""
    draft = RequestDraft(text[:ctx.settings.max_text_chars], speaker=speaker, segments=context,
                         sampling=body.params())
    return await build_request(ctx.sg, ctx.settings, draft)


@router.post("/v1/chat/speech")
async def chat_speech(body: ChatBody, request: Request):

    ctx, fmt = context_of(request), body.response_format  # checked by ChatBody
    _llm(ctx)
    messages = _check_messages(body.messages, ctx.settings.max_text_chars * 4)
    spk, voice_ctx = voice_to_speaker(body.voice, ctx.voices) if body.voice is not None else (0, ())
    earlier = tuple(_segment(m, spk) for m in messages[:-1])
    req = await _request(ctx, messages[-1]["content"], spk, tuple(voice_ctx) + earlier, body)
    turn = ChatTurn(ctx, request.scope, messages, req)
    agen = ctx.marked(turn.ticket)
    first = await ctx.first_chunk(agen)
    if body.stream_format == "sse":
        def done_extra():
            turn.sync()
            return {"text": turn.reply.text, **turn.metrics.as_dict()}

        async def then_whole_text():  # speech can end first (the cap): done has all the text
            try:
                async for chunk in agen:
                    yield chunk
                await turn.text_done()
            finally:
                await agen.aclose()

        async def events():
            async for b in ctx.sse(request.scope, then_whole_text(), first,
                                   lambda: turn.pending_text("text.delta"), done_extra):
                yield b
            turn.finished()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def audio():
        if fmt == "wav":
            yield wav_header(None)
        async for b in ctx.body(request.scope, agen, first, pcm16):
            yield b
        turn.finished()

    return StreamingResponse(audio(), media_type="audio/wav" if fmt == "wav" else "audio/pcm",
                             headers={"X-Sample-Rate": str(SAMPLE_RATE)})


def _segment(message: dict, speaker: int) -> Segment:
    return Segment(speaker if message["role"] == "assistant" else speaker + 1, message["content"])


async def chat_session(ws: WebSocket, ctx, first: StreamMessage):
    """Turn after turn on one socket; each reply's codes stay in the context (the voice)."""
    try:
        _llm(ctx)
        speaker, voice = first.speaker, None
        if first.voice is not None:
            speaker, _ = voice_to_speaker(first.voice, ctx.voices)
            named = ctx.voices is not None and ctx.voices.has(first.voice)
            voice = ctx.voices.get(first.voice) if named else None
    except ApiError as e:
        return await ws_error(ws, e.status, e.message)
    dialogue = Dialogue(voice, speaker)
    gone, inbox = asyncio.Event(), asyncio.Queue()
    reader = asyncio.create_task(read_until_closed(ws, gone, inbox))
    msg = first
    try:
        while msg is not None and not gone.is_set():
            if not await _chat_turn(ws, ctx, dialogue, msg, gone):
                break
            msg = await _next_message(ws, inbox)
    finally:
        reader.cancel()


async def _chat_turn(ws, ctx, dialogue: Dialogue, msg: StreamMessage, gone) -> bool:
    context = dialogue.context_for(ctx.sg)
    try:
        if msg.type != "chat" or not msg.text.strip():
            raise ApiError(400, "in a chat session, send {\"type\": \"chat\", \"text\": ...}")
        req = await _request(ctx, msg.text, dialogue.speaker, context, msg)
        turn = ChatTurn(ctx, ws.scope, dialogue.messages(msg.text.strip()), req)
    except ApiError as e:
        ctx.count(ws.scope, e.status)
        await ws_error(ws, e.status, e.message, close=False)
        return True
    complete = await ctx.ws_stream(ws, turn.ticket, gone, session=True,
                                   before_chunk=lambda: turn.pending_text("text"),
                                   before_done=turn.text_done)
    turn.finished()
    if complete and turn.ticket.stream is not None and not turn.ticket.stream.error:
        dialogue.add(msg.text.strip(), turn.reply.text, turn.ticket.stream.all_codes)
    return complete


async def _next_message(ws, inbox: asyncio.Queue) -> StreamMessage | None:
    """The next turn's message; None when the client closed the socket."""
    import json

    while True:
        text = await inbox.get()
        if text is None:
            return None
        try:
            return StreamMessage(**{"type": "chat", **json.loads(text)})
        except Exception as e:  # not JSON, a wrong field: say so, the session goes on
            await ws_error(ws, 400, f"not a chat message ({type(e).__name__}: {e})", close=False)

