"""CSM-1B on Cerebrium: each function here is a POST endpoint whose JSON fields are its
keyword arguments (cerebrium.toml: hardware, dependencies).

- `generate`: {"text": ...} -> {"audio_data": base64 WAV, "format": "wav", ...}, one answer.
- `stream`: the same fields -> server-sent events while the speech is made (Cerebrium streams
  what a function yields): {"type": "audio", "audio": base64 16-bit PCM, "sample_rate"} per
  chunk, then {"type": "done", ...} or {"type": "error", ...}.

    curl -X POST https://api.cortex.cerebrium.ai/v4/<project>/csm-streaming/stream \\
         -H "Authorization: Bearer <JWT>" -H "Content-Type: application/json" \\
         -H "Accept: text/event-stream" -d '{"text": "Hello from Cerebrium.", "voice": "alloy"}'

`voice`: a speaker number, an OpenAI voice name or a named voice of the voices folder
(CSM_VOICES_DIR, default voices/ beside main.py: NAME.wav + NAME.txt, see the README);
`context`: earlier turns, as /api/generate. The model loads once per container, on the first
call (CSM_MODEL, default the ungated CSM-1B copy; CSM_MIMI, CSM_DEVICE); `run_time_ms` is the
request's own time, `load_ms` the load when this call paid it. An output with no audio is
retried with adjusted sampling before it is reported. Errors come back with a status_code
field, which Cerebrium uses as the HTTP status.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
for folder in (ROOT, ROOT.parent):  # deployed: the project's files beside it; a checkout: above
    if (folder / "csm_streaming").is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

log = logging.getLogger("csm.cerebrium")
_LOADED: dict = {}  # "generator", "streaming", "voices": loaded once per container
RETRIES = 2  # after the generator's own cooler retries: a new seed, then a warmer draw


def generator():
    """The model, loaded once per container (Cerebrium keeps module state between calls)."""
    if "generator" not in _LOADED:
        from csm_streaming.engine.loader import load_csm_1b
        from csm_streaming.engine.voices import VoiceLibrary
        from csm_streaming.model.hub import DEFAULT_REPO

        gen = load_csm_1b(device=os.environ.get("CSM_DEVICE", "auto"),
                          model=os.environ.get("CSM_MODEL", DEFAULT_REPO),
                          mimi=os.environ.get("CSM_MIMI") or None)
        folder = os.environ.get("CSM_VOICES_DIR") or ROOT / "voices"
        _LOADED["voices"] = VoiceLibrary.load(folder, gen)
        _LOADED["generator"] = gen
    return _LOADED["generator"]


def streaming():
    """The streaming engine over the same model (its own caches), made once."""
    if "streaming" not in _LOADED:
        from csm_streaming.engine.frontend import StreamingGenerator

        _LOADED["streaming"] = StreamingGenerator(generator())
    return _LOADED["streaming"]


def _prepare(text, speaker_id, voice, context):
    """-> (load_ms, speaker, context segments): the model loaded (timed apart) and the request's
    voice and context checked. Raises ApiError / ValueError with what to fix."""
    from csm_streaming.server.api import (
        ContextItem,
        ServerSettings,
        decode_context,
        voice_to_speaker,
    )

    t = time.perf_counter()
    generator()
    load_ms = (time.perf_counter() - t) * 1000
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    speaker, voice_ctx = (voice_to_speaker(voice, _LOADED["voices"]) if voice is not None
                          else (speaker_id, ()))
    items = [ContextItem(**c) for c in (context or [])]
    return load_ms, speaker, list(voice_ctx) + decode_context(items, ServerSettings())


def _error(e: Exception) -> dict:
    """The server's own mapping of a failure to a status (a wrong type is a wrong value)."""
    from csm_streaming.server.api import shape_error

    err = shape_error(ValueError(str(e)) if isinstance(e, TypeError) else e)
    return {"error": err.message, "status_code": err.status}


def generate(text: str, speaker_id: int = 0, voice: str | int | None = None,
             temperature: float = 0.9, top_k: int = 50, max_audio_length_ms: float | None = None,
             seed: int | None = None, context: list | None = None,
             run_id: str | None = None) -> dict:
    """Text (and optional voice, sampling and context turns, as /api/generate:
    [{"speaker", "text", "audio_base64"}]) -> a base64 WAV of the speech."""
    from csm_streaming.audio import SAMPLE_RATE, wav_bytes
    from csm_streaming.request import EmptyOutputError
    from csm_streaming.server.api import ApiError

    try:
        load_ms, speaker, segments = _prepare(text, speaker_id, voice, context)
        t0 = time.perf_counter()
        attempts = _attempts(temperature, top_k, seed)
        for i, (temp, k, s) in enumerate(attempts):
            try:
                audio = generator().generate(text, speaker, segments, max_audio_length_ms, temp,
                                             k, s)
                break
            except EmptyOutputError:
                if i == len(attempts) - 1:
                    raise
                temp, k, _ = attempts[i + 1]
                log.warning("no audio: trying again with temperature %g, top-k %d", temp, k)
    except (ApiError, ValueError, TypeError, EmptyOutputError) as e:
        return _error(e)
    duration_ms = audio.numel() / SAMPLE_RATE * 1000
    run_ms = (time.perf_counter() - t0) * 1000
    return {"audio_data": base64.b64encode(wav_bytes(audio)).decode(), "format": "wav",
            "encoding": "base64", "sample_rate": SAMPLE_RATE, "duration_ms": duration_ms,
            "run_time_ms": run_ms, "load_ms": load_ms, "attempts": i + 1, "run_id": run_id}


def stream(text: str, speaker_id: int = 0, voice: str | int | None = None,
           temperature: float = 0.9, top_k: int = 50, max_audio_length_ms: float | None = None,
           seed: int | None = None, context: list | None = None, run_id: str | None = None):
    """The same request, streamed: JSON events (Cerebrium sends each as a server-sent event)
    as the chunks are made; the first comes after the first chunk, not at the end."""
    from csm_streaming.audio import SAMPLE_RATE, pcm16
    from csm_streaming.request import EmptyOutputError, GenerationRequest, SamplingParams
    from csm_streaming.server.api import ApiError

    try:
        load_ms, speaker, segments = _prepare(text, speaker_id, voice, context)
        sg = streaming()
        t0, first_ms, samples = time.perf_counter(), None, 0
        req = GenerationRequest(text, speaker, tuple(segments), SamplingParams(
            temperature, top_k, seed, max_audio_length_ms))
        for chunk in sg.stream(req):
            first_ms = first_ms or (time.perf_counter() - t0) * 1000
            samples += chunk.numel()
            yield json.dumps({"type": "audio", "audio": base64.b64encode(pcm16(chunk)).decode(),
                              "format": "pcm_s16le", "sample_rate": SAMPLE_RATE})
    except (ApiError, ValueError, TypeError, EmptyOutputError) as e:
        yield json.dumps({"type": "error", **_error(e)})
        return
    yield json.dumps({"type": "done", "duration_ms": samples / SAMPLE_RATE * 1000,
                      "time_to_first_audio_ms": first_ms, "load_ms": load_ms,
                      "run_time_ms": (time.perf_counter() - t0) * 1000, "run_id": run_id})


def _attempts(temperature: float, top_k: int, seed: int | None) -> list[tuple]:
    """The request as asked, then a new seed, then a slightly warmer, wider draw."""
    new_seed = None if seed is None else seed + 1
    return [(temperature, top_k, seed), (temperature, top_k, new_seed),
            (min(1.3, temperature * 1.2), min(100, top_k * 2), new_seed)][:RETRIES + 1]
