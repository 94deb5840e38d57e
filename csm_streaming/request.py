"""A request for speech: what to say, who says it, the context, and how to sample.

`GenerationRequest` is the one place the parameters and their defaults live; every front (the
Python API, the batch API, the server, the CLI, the conversation) builds one and validates it
with `validate_request` before any model work, so a bad argument is a ValueError that names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from csm_streaming.audio import FRAME_MS, SAMPLE_RATE

if TYPE_CHECKING:  # torch is imported where tensors are checked: the CLI validates without it
    import torch

DEFAULT_MAX_AUDIO_MS = 90_000  # upstream's default length limit
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOPK = 50
MAX_TEMPERATURE = 10.0  # past this the draw is uniform noise; larger values are surely mistakes
MAX_EMPTY_RETRIES = 2
MAX_SPEAKER = 63  # the speaker ids a server, a named voice and the page accept
MIMI_CODE_LIMIT = 2048  # codes Mimi can decode: 0..2047


@dataclass
class Segment:
    """One turn of context: who spoke, what they said, and the audio of it.

    audio: [samples] or [channels, samples] (or [samples, channels]) at `sample_rate`; mixed to
    mono and resampled to 24 kHz. codes: the turn's Mimi codes [frames, 32] when already known
    (a cached voice, an earlier generated reply): used instead of encoding `audio`. With neither,
    the turn is text only.
    """

    speaker: int
    text: str
    audio: torch.Tensor | None = None
    sample_rate: int = SAMPLE_RATE
    codes: torch.Tensor | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """The arguments of one generation. `max_audio_length_ms=None` means the generator's
    default (90 s for real weights, a few seconds for random ones, which never end)."""

    text: str
    speaker: int = 0
    context: tuple[Segment, ...] = ()
    max_audio_length_ms: float | None = None
    temperature: float = DEFAULT_TEMPERATURE
    topk: int = DEFAULT_TOPK
    seed: int | None = None

    @property
    def max_frames(self) -> int:
        ms = DEFAULT_MAX_AUDIO_MS if self.max_audio_length_ms is None else self.max_audio_length_ms
        return max(1, int(ms // FRAME_MS))

    def validated(self, default_max_ms: float = DEFAULT_MAX_AUDIO_MS) -> GenerationRequest:
        return validate_request(**{f.name: getattr(self, f.name) for f in fields(self)},
                                default_max_ms=default_max_ms)


def validate_request(text, speaker=0, context=(), max_audio_length_ms=None,
                     temperature=DEFAULT_TEMPERATURE, topk=DEFAULT_TOPK, seed=None, *,
                     default_max_ms: float = DEFAULT_MAX_AUDIO_MS) -> GenerationRequest:
    """Check every argument; raise a ValueError that names the bad one and says what is allowed."""
    _check_text(text, "text", allow_empty=False)
    _check_int(speaker, "speaker")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or not 0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a number in (0, {MAX_TEMPERATURE:g}] "
                         f"(got {temperature!r})")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1 (got {topk!r})")
    if max_audio_length_ms is None:
        max_audio_length_ms = default_max_ms
    if isinstance(max_audio_length_ms, bool) or not isinstance(max_audio_length_ms, (int, float)) \
            or not math.isfinite(max_audio_length_ms) or max_audio_length_ms < FRAME_MS:
        raise ValueError(f"max_audio_length_ms must be at least {FRAME_MS} (one frame) "
                         f"(got {max_audio_length_ms!r})")
    if seed is not None:
        _check_int(seed, "seed")
    context = tuple(context or ())
    for i, seg in enumerate(context):
        _check_segment(seg, f"context[{i}]")
    return GenerationRequest(text.strip(), speaker, context, float(max_audio_length_ms),
                             float(temperature), int(topk), seed)


def _check_text(text, name: str, allow_empty: bool):
    if not isinstance(text, str) or (not allow_empty and not text.strip()):
        raise ValueError(f"{name} must be a non-empty string (got {text!r})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, as a JSON "\ud800" escape decodes to
        raise ValueError(f"{name} is not valid Unicode (character {e.start} is a lone "
                         "surrogate): send UTF-8 text") from None


def _check_int(value, name: str):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (got {value!r})")


def _check_segment(seg, where: str):
    import torch

    if not isinstance(seg, Segment):
        raise ValueError(f"{where} must be a Segment (got {type(seg).__name__})")
    _check_int(seg.speaker, f"{where}.speaker")
    _check_text(seg.text, f"{where}.text", allow_empty=True)
    if seg.codes is not None:
        codes = torch.as_tensor(seg.codes)
        if codes.dim() != 2 or codes.shape[1] != 32 or codes.dtype.is_floating_point:
            raise ValueError(f"{where}.codes must be integer Mimi codes [frames, 32] "
                             f"(got {tuple(codes.shape)} {codes.dtype})")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= MIMI_CODE_LIMIT):
            raise ValueError(f"{where}.codes must lie in 0..{MIMI_CODE_LIMIT - 1}")
        return
    if seg.audio is None:
        return  # a text-only turn
    audio = torch.as_tensor(seg.audio)
    if audio.numel() == 0:
        raise ValueError(f"{where}.audio is empty: give the audio of the turn (or None)")
    if audio.dim() > 2:
        raise ValueError(f"{where}.audio must be 1-D or 2-D (got shape {tuple(audio.shape)})")
    if not torch.isfinite(audio.float()).all():
        raise ValueError(f"{where}.audio contains NaN or infinite samples")
    if isinstance(seg.sample_rate, bool) or not isinstance(seg.sample_rate, int) \
            or seg.sample_rate <= 0:
        raise ValueError(f"{where}.sample_rate must be a positive integer")


class EmptyOutputError(RuntimeError):
    """The model ended before any audio frame, on every retry."""

    def __init__(self, tries: int):
        super().__init__(f"the model ended before any audio on {tries} tries; rephrase the text "
                         "(spell out symbols) or raise the temperature")


def retry_request(req: GenerationRequest, attempt: int) -> tuple[GenerationRequest, str]:
    """The next try after an empty output, cooler and narrower, and the text that says so."""
    req = replace(req, temperature=max(0.3, round(req.temperature * 0.7, 4)),
                  topk=max(1, req.topk // 2))
    return req, f"no audio: retry {attempt} with temperature {req.temperature:g}, top-k {req.topk}"


def draw_seed(seed: int | None) -> int:
    """The 32-bit key of a request's random draws; None draws one from torch's global RNG."""
    import torch

    if seed is None:
        return int(torch.randint(0, 2**32, (1,)).item())
    return seed & 0xFFFFFFFF
