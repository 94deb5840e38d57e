"""The server's contract: request bodies, limits, auth, request building and error shaping.

Everything here is testable without a running server. routes.py holds the routes. Every error
a client can cause is an `ApiError` with a 4xx status and a message that says what to do;
`shape_error` turns anything else into a JSON 5xx without a stack trace.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from csm_streaming.audio import AudioError, AudioLimits, read_audio, to_mono_24k
from csm_streaming.chat.llm import LLMError
from csm_streaming.request import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    MAX_SEED,
    MAX_SPEAKER,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    EmptyOutputError,
    GenerationRequest,
    SamplingParams,
    Segment,
)

log = logging.getLogger("csm.server")

# OpenAI voice names mapped to CSM speaker ids (CSM's speakers are just numbers; "0", "1", ...
# also work; named voices from the voices folder take precedence).
OPENAI_VOICES = {"alloy": 0, "echo": 1, "fable": 2, "onyx": 3, "nova": 4, "shimmer": 5, "ash": 6,
                 "ballad": 7, "coral": 8, "sage": 9, "verse": 10}
# The model ids /v1/audio/speech answers to: ours, and OpenAI's, so an SDK left at its default
# model works; any other is a 404, as OpenAI answers.
MODEL_IDS = ("csm-1b", "sesame/csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")


@dataclass(frozen=True)
class ServerSettings:
    token: str | None = None
    max_text_chars: int = 2000
    max_context: int = 8
    max_context_audio_s: float = 60.0  # per turn
    max_body_bytes: int = 32 * 2**20  # HTTP bodies and WebSocket messages
    max_audio_length_ms: float = 90_000
    watermark_window_ms: int = 2000
    write_timeout_s: float = 30.0  # a client that reads nothing for this long is dropped
    header_timeout_s: float = 10.0  # a connection must send a whole request head within this
    first_message_timeout_s: float = 5.0  # a WebSocket must send its (authorising) request
    max_pending_sockets: int = 64  # WebSockets not yet authorised: a budget of their own
    max_pending_sockets_per_address: int = 8  # ... of which one source address may hold
    max_connections: int = 512  # authorised requests and WebSockets at once
    context_idle_timeout_s: float = 60.0  # a streaming-input context with no text, not ended
    voice_writes: bool = True  # POST / DELETE /v1/voices (off: listening wide with no token)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


def _no_bool(value):
    """JSON true/false where a number is wanted is a mistake, not 1/0."""
    if isinstance(value, bool):
        raise ValueError("a number is wanted here, not true/false")
    return value


class ContextItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    speaker: int = Field(ge=0, le=MAX_SPEAKER)
    text: str
    audio_base64: str


@dataclass(frozen=True)
class RequestDraft:
    """What a body asks for, before the server resolves its voice and decodes its context
    audio (`build_request`): every route's body makes one with `.draft()`.

    voice: a name or number (None: `speaker`); context: turns to decode (base64 files);
    segments: turns already known (a dialogue's, a context's earlier phrases), after the voice's
    clip and before the decoded turns; sampling: the body's SamplingParams, as they travel on;
    phrases: each phrase has its own frame cap, so the default length is the window's, not a
    random model's few seconds.
    """

    text: str
    voice: str | int | None = None
    speaker: int = 0
    context: tuple[ContextItem, ...] = ()
    segments: tuple[Segment, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    phrases: bool = False  # the text comes as phrases with a frame cap each (a context)


class Sampling(BaseModel):
    """The sampling fields every request body takes (on the OpenAI route, as extensions)."""

    # The one set of limits of every route (HTTP and WebSocket): the same checks, same words.
    temperature: float = Field(DEFAULT_TEMPERATURE, gt=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    max_audio_length_ms: float | None = Field(None, ge=80, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value, info):
        if info.field_name in NUMBER_FIELDS:
            return _no_bool(value)
        return value

    def params(self) -> SamplingParams:
        """The body's sampling fields as the request's SamplingParams."""
        return SamplingParams(self.temperature, self.top_k, self.seed, self.max_audio_length_ms)


def _non_blank(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise ValueError(f"{info.field_name} must be a non-empty string: send what to say")
    return value


# A text field holds something to say: the document says so as a pattern (OpenAPI), the body
# model checks it in words a client can act on.
NonBlank = Annotated[str, Field(json_schema_extra={"pattern": r"\S"}), AfterValidator(_non_blank)]


class GenerateBody(Sampling):
    model_config = ConfigDict(extra="forbid")
    text: NonBlank
    speaker_id: int = Field(0, ge=0, le=MAX_SPEAKER)
    voice: str | None = None
    context: list[ContextItem] = Field(default_factory=list)

    def draft(self) -> RequestDraft:
        return RequestDraft(self.text, self.voice, self.speaker_id, tuple(self.context),
                            sampling=self.params())


SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")  # OpenAI's six


class SpeechBody(Sampling):
    model: str = "csm-1b"
    input: NonBlank
    voice: str | int = "0"
    response_format: str = "mp3"  # OpenAI's default
    speed: float = Field(1.0, ge=0.25, le=4.0, allow_inf_nan=False)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        check_model(model)  # a 404, as OpenAI answers, not a 400
        return model

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, fmt: str) -> str:
        if fmt.lower() not in SPEECH_FORMATS:
            raise ValueError(f"'{fmt}' is not supported: use one of {', '.join(SPEECH_FORMATS)}")
        return fmt.lower()

    def draft(self) -> RequestDraft:
        return RequestDraft(self.input, self.voice, sampling=self.params())


class StreamMessage(Sampling):
    """The first message on /v1/stream: speak `text`; or `type: chat` to answer `text`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["speech", "chat"] = "speech"
    token: str | None = None  # browsers cannot send headers on a WebSocket
    text: str
    speaker: int = Field(0, ge=0, le=MAX_SPEAKER)
    voice: str | None = None
    context: list[ContextItem] = Field(default_factory=list)

    def draft(self) -> RequestDraft:
        return RequestDraft(self.text, self.voice, self.speaker, tuple(self.context),
                            sampling=self.params())


# ---------------------------------------------------------------------------------------------
# Building a request
# ---------------------------------------------------------------------------------------------


NUMBER_FIELDS = {"temperature", "top_k", "seed", "max_audio_length_ms", "speaker", "speaker_id",
                 "speed", "voice"}


def field_errors(errors: list[dict]) -> str:
    """Pydantic's errors as one line a client can act on: 'field: what is wrong; ...'."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the body is not valid JSON: send one JSON object, encoded as UTF-8"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request body"


def check_model(model: str):
    if model not in MODEL_IDS:
        raise ApiError(404, f"the model {model!r} does not exist here: use one of "
                            f"{', '.join(MODEL_IDS)} (GET /v1/models lists them)")


def voice_to_speaker(voice, voices=None) -> tuple[int, tuple[Segment, ...]]:
    """A voice -> (speaker id, the voice's reference segments). A named voice of the voices
    folder brings its clip as context; a number or an OpenAI name is a bare speaker id."""
    if voices is not None and isinstance(voice, str) and voices.has(voice.strip()):
        v = voices.get(voice.strip())
        return v.speaker, (v.segment,)
    if isinstance(voice, int) and not isinstance(voice, bool):
        sid = voice
    elif isinstance(voice, str) and voice.strip().isascii() and voice.strip().isdecimal():
        sid = int(voice.strip())
    elif isinstance(voice, str) and voice.strip().lower() in OPENAI_VOICES:
        return OPENAI_VOICES[voice.strip().lower()], ()
    else:
        named = f", a voice of the voices folder ({', '.join(voices.names())})" if voices else ""
        raise ApiError(400, f"unknown voice {voice!r}: use a speaker number 0..{MAX_SPEAKER}"
                            f"{named}, or one of {', '.join(OPENAI_VOICES)}")
    if not 0 <= sid <= MAX_SPEAKER:
        raise ApiError(400, f"voice {sid} is out of range 0..{MAX_SPEAKER}")
    return sid, ()


class ClientGone(Exception):
    """The client hung up before its request was ready: nothing more is done for it."""


def decode_context(items: list[ContextItem], settings: ServerSettings,
                   gone: threading.Event | None = None) -> list[Segment]:
    """Context turns from base64 audio files, bounded before decoding (runs off the event loop).

    Rates outside 8..192 kHz, more than 8 channels or longer than max_context_audio_s are
    refused from the header; decoding is mixed to mono block by block, so memory stays small.
    `gone` set (the client left) stops it between turns.
    """
    if len(items) > settings.max_context:
        raise ApiError(400, f"{len(items)} context turns; the limit is {settings.max_context}")
    limits = AudioLimits(max_seconds=settings.max_context_audio_s)
    out = []
    for i, c in enumerate(items):
        if gone is not None and gone.is_set():
            raise ClientGone()
        where = f"context[{i}].audio_base64"
        try:
            raw = base64.b64decode(c.audio_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: not valid base64") from None
        try:
            data, rate = read_audio(raw, mono=True, limits=limits, name=where)
        except AudioError as e:
            raise ApiError(400, str(e)) from None
        if data.size == 0:
            raise ApiError(400, f"{where}: the audio is empty")
        out.append(Segment(c.speaker, c.text, to_mono_24k(data, rate)))
    return out


def _lower_priority():
    if sys.platform.startswith("linux"):  # there, the niceness of a thread is its own
        os.setpriority(os.PRIO_PROCESS, 0, 10)


# Decoding context audio (base64, FLAC/WAV, resampling) runs on these threads, at a lower
# priority than the engine's thread: on a small CPU, clients sending big bodies slow their own
# requests, not the streams already playing. Tokenising, which is cheap, has a lane of its own,
# so a queue of big bodies never delays a plain request.
AUDIO_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="csm-decode",
                                 initializer=_lower_priority)
TEXT_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="csm-tokenize")


async def off_loop(pool, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def build_request(sg, settings: ServerSettings, draft: RequestDraft, voices=None,
                        gone: threading.Event | None = None) -> GenerationRequest:
    """The GenerationRequest of a body's draft, every text segment checked to fit the window:
    a 4xx now, never a failure in the shared engine later. The voice (a name or number) is
    resolved against `voices`; context audio is decoded off the event loop. gone: set when the
    client leaves (ClientGone)."""
    if len(draft.text) > settings.max_text_chars:
        raise ApiError(413, f"text is {len(draft.text)} characters; the limit is "
                            f"{settings.max_text_chars}")
    params = draft.sampling
    if (params.max_audio_length_ms or 0) > settings.max_audio_length_ms:
        raise ApiError(400, f"max_audio_length_ms over the limit of "
                            f"{settings.max_audio_length_ms:g}")
    speaker, voice_context = draft.speaker, ()
    if draft.voice is not None:
        speaker, voice_context = voice_to_speaker(draft.voice, voices)
    context = []
    if draft.context:
        await asyncio.sleep(0)  # a client that sent its body and hung up is seen here
        if gone is not None and gone.is_set():
            raise ClientGone()
        context = await off_loop(AUDIO_POOL, decode_context, list(draft.context), settings, gone)
    if params.max_audio_length_ms is None:  # the longest the window allows (a real model ends
        window_ms = (sg.engine.window - 256) * 80  # speech by itself)
        model_ms = window_ms if draft.phrases else sg.generator.default_max_audio_ms
        params = replace(params, max_audio_length_ms=max(80, min(
            settings.max_audio_length_ms, window_ms, model_ms)))
    try:
        req = GenerationRequest(draft.text, speaker,
                                (*voice_context, *draft.segments, *context), params)
        await off_loop(TEXT_POOL, sg.engine.plan, req)  # tokenises every segment
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return req


def shape_error(e: BaseException, retry_after: int = 2) -> ApiError:
    """Any error of a generation -> the ApiError a client gets."""
    from csm_streaming.server.engine_thread import QueueFull

    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(503, str(e), {"Retry-After": str(retry_after)})
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    if isinstance(e, MemoryError):
        return ApiError(503, str(e), {"Retry-After": str(retry_after)})
    if isinstance(e, EmptyOutputError):
        return ApiError(422, str(e))
    if isinstance(e, LLMError):  # the chat's language model: an upstream fault, never a 500
        retry = {"Retry-After": str(retry_after)} if e.http_status == 503 else None
        return ApiError(e.http_status, str(e), retry)
    return ApiError(500, f"generation failed ({type(e).__name__}: {str(e)[:300]})")


def error_body(status: int, message: str) -> dict:
    return {"error": {"message": message, "status": status}}


# ---------------------------------------------------------------------------------------------
# Auth: one check for HTTP and WebSocket
# ---------------------------------------------------------------------------------------------


class SecretFilter(logging.Filter):
    """Masks token values in log lines (uvicorn's access log prints query strings)."""

    _pattern = re.compile(r"((?:token|api_key|key)=)[^&\s\"]+", re.I)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(self._pattern.sub(r"\1***", a) if isinstance(a, str) else a
                                for a in record.args)
        record.msg = self._pattern.sub(r"\1***", str(record.msg))
        return True
