"""CSM-1B on Cerebrium: POST {"text": ...} -> {"audio_data": base64 WAV, "format": "wav", ...}.

Cerebrium turns each function of main.py into a POST endpoint whose JSON fields are its keyword
arguments (cerebrium.toml: hardware, dependencies). `generate` is the endpoint:

    curl -X POST https://api.cortex.cerebrium.ai/v4/<project>/csm-streaming/generate \\
         -H "Authorization: Bearer <JWT>" -H "Content-Type: application/json" \\
         -d '{"text": "Hello from Cerebrium.", "speaker_id": 0}'

The model loads once per container, on the first call (CSM_MODEL, default the ungated CSM-1B
copy; CSM_MIMI, CSM_DEVICE). An output with no audio is retried with adjusted sampling (cooler,
narrower, then a new seed) before it is reported. Errors come back with a status_code field,
which Cerebrium uses as the HTTP status.
"""

from __future__ import annotations

import base64
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
_GENERATOR = None
RETRIES = 2  # after the generator's own cooler retries: a new seed, then a warmer draw


def generator():
    """The model, loaded once per container (Cerebrium keeps module state between calls)."""
    global _GENERATOR
    if _GENERATOR is None:
        from csm_streaming.engine.generator import load_csm_1b
        from csm_streaming.model.hub import DEFAULT_REPO

        _GENERATOR = load_csm_1b(device=os.environ.get("CSM_DEVICE", "auto"),
                                 model=os.environ.get("CSM_MODEL", DEFAULT_REPO),
                                 mimi=os.environ.get("CSM_MIMI") or None)
    return _GENERATOR


def generate(text: str, speaker_id: int = 0, temperature: float = 0.9, top_k: int = 50,
             max_audio_length_ms: float | None = None, seed: int | None = None,
             context: list | None = None, run_id: str | None = None) -> dict:
    """The seeds' endpoint: text (and optional sampling and context turns, as /api/generate:
    [{"speaker", "text", "audio_base64"}]) -> a base64 WAV of the speech."""
    from csm_streaming.audio import SAMPLE_RATE, wav_bytes
    from csm_streaming.request import EmptyOutputError
    from csm_streaming.server.api import ApiError, ContextItem, ServerSettings, decode_context

    t0 = time.perf_counter()
    try:
        items = [ContextItem(**c) for c in (context or [])]
        segments = decode_context(items, ServerSettings())
        gen = generator()
        attempts = _attempts(temperature, top_k, seed)
        for i, (temp, k, s) in enumerate(attempts):
            try:
                audio = gen.generate(text, speaker_id, segments, max_audio_length_ms, temp, k, s)
                break
            except EmptyOutputError:
                if i == len(attempts) - 1:
                    raise
                temp, k, _ = attempts[i + 1]
                log.warning("no audio: trying again with temperature %g, top-k %d", temp, k)
    except ApiError as e:
        return {"error": e.message, "status_code": e.status}
    except (ValueError, TypeError) as e:
        return {"error": str(e), "status_code": 400}
    except EmptyOutputError as e:
        return {"error": str(e), "status_code": 422}
    duration_ms = audio.numel() / SAMPLE_RATE * 1000
    run_ms = (time.perf_counter() - t0) * 1000
    return {"audio_data": base64.b64encode(wav_bytes(audio)).decode(), "format": "wav",
            "encoding": "base64", "sample_rate": SAMPLE_RATE, "duration_ms": duration_ms,
            "run_time_ms": run_ms, "attempts": i + 1, "run_id": run_id}


def _attempts(temperature: float, top_k: int, seed: int | None) -> list[tuple]:
    """The request as asked, then a new seed, then a slightly warmer, wider draw."""
    new_seed = None if seed is None else seed + 1
    return [(temperature, top_k, seed), (temperature, top_k, new_seed),
            (min(1.3, temperature * 1.2), min(100, top_k * 2), new_seed)][:RETRIES + 1]
