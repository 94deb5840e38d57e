"""Named voices over HTTP, usable on every route as soon as they are added:

- `GET /v1/voices`: the named voices, OpenAI's voice names and the speaker numbers.
- `POST /v1/voices`: a name, the clip's transcript and the clip (a form with an `audio` file, or
  JSON with `audio_base64`), optional `speaker`; kept in the voices folder (there after a
  restart). 201 with the voice; 409 when the name is taken.
- `DELETE /v1/voices/{name}`: forgets it and deletes its files.

Auth and body limits are the server's (limits.py); each wrong field is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from functools import partial

from fastapi import APIRouter, Request

from csm_streaming.audio import AudioError, AudioLimits, read_audio
from csm_streaming.engine.voices import (
    MAX_UPLOAD_SECONDS,
    UnknownVoice,
    VoiceError,
    VoiceExists,
    check_name,
    is_speaker,
)
from csm_streaming.server.api import AUDIO_POOL, MAX_SPEAKER, OPENAI_VOICES, ApiError, off_loop
from csm_streaming.server.context import context_of

router = APIRouter()
FIELDS = "name, text, audio (a file) or audio_base64, and optionally speaker (0..63)"


def _library(ctx):
    if ctx.voices is None or ctx.voices.folder is None:
        raise ApiError(404, "this server keeps no named voices: start it with --voices-dir DIR")
    return ctx.voices


def _described(voice) -> dict:
    return {"id": voice.name, "type": "named", "speaker": voice.speaker, "text": voice.text,
            "seconds": voice.seconds}


@router.get("/v1/voices")
async def list_voices(request: Request):
    """Every voice a request can name: the named ones first, then OpenAI's names."""
    lib = context_of(request).voices
    named = [_described(v) for v in lib.voices()] if lib is not None else []
    openai = [{"id": n, "type": "openai", "speaker": s} for n, s in OPENAI_VOICES.items()]
    return {"object": "list", "data": named + openai,
            "speakers": {"min": 0, "max": MAX_SPEAKER},
            "skipped": lib.skipped if lib is not None else {}}


def _writable(ctx):
    if not ctx.settings.voice_writes:
        raise ApiError(403, "adding and deleting voices is off on this server: it listens "
                            "beyond this machine without a token (start it with --token, or "
                            "--allow-voice-writes to allow anyone)")


@router.post("/v1/voices", status_code=201)
async def add_voice(request: Request):
    ctx = context_of(request)
    lib = _library(ctx)
    _writable(ctx)
    name, text, speaker, clip = await _fields(request)
    try:
        check_name(name)  # before reading the clip: a wrong name costs nothing
        # on the low-priority decode threads: preparing a voice (decoding, Mimi-encoding up to
        # 30 s) must not slow the speech being made for everyone else
        audio, rate = await off_loop(AUDIO_POOL, partial(
            read_audio, clip, mono=True, name="audio",
            limits=AudioLimits(max_seconds=MAX_UPLOAD_SECONDS)))
        voice = await off_loop(AUDIO_POOL, lib.add, name, text, audio, rate, speaker,
                               ctx.sg.generator)
    except VoiceExists as e:
        raise ApiError(409, str(e)) from None
    except (VoiceError, AudioError) as e:
        raise ApiError(400, str(e)) from None
    ctx.count(request.scope, 201)
    return _described(voice)


@router.delete("/v1/voices/{name}")
async def delete_voice(name: str, request: Request):
    ctx = context_of(request)
    lib = _library(ctx)
    _writable(ctx)
    try:
        check_name(name)
        await asyncio.to_thread(lib.remove, name)
    except UnknownVoice as e:
        raise ApiError(404, str(e)) from None
    except VoiceError as e:
        raise ApiError(400, str(e)) from None
    ctx.count(request.scope, 200)
    return {"id": name, "deleted": True}


async def _fields(request: Request) -> tuple[str, str, int, bytes]:
    """(name, text, speaker, the clip's file bytes) from a form or a JSON body."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("audio")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, f"audio: send the clip as a file field named 'audio' ({FIELDS})")
        fields, clip = dict(form), await upload.read()
    else:
        try:
            fields = json.loads(await request.body())
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise ApiError(400, f"send a form (multipart/form-data) or a JSON object: {FIELDS}")
        try:
            clip = base64.b64decode(str(fields.get("audio_base64", "")), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "audio_base64: not valid base64") from None
    if not clip:
        raise ApiError(400, f"audio: the clip is missing or empty ({FIELDS})")
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "text: the transcript of the clip is missing: send what it says")
    speaker = fields.get("speaker", 0)
    if isinstance(speaker, str) and speaker.strip().isdecimal():  # form fields are text
        speaker = int(speaker)
    if not is_speaker(speaker):  # before the clip is read: a wrong speaker costs nothing
        raise ApiError(400, f"speaker: an integer 0..{MAX_SPEAKER}")
    name = fields.get("name", "")
    if not isinstance(name, str):  # {"name": 123} is a mistake, not the voice "123"
        raise ApiError(400, "name must be a string: the voice's name")
    return name, text, speaker, clip
