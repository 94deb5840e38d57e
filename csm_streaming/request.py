"""A request for speech: what to say, who says it, the context, and how to sample.

`SamplingParams` (temperature, top-k, seed, length) and `GenerationRequest` (text, speaker,
context, sampling) are the one place the parameters and their defaults live. Every front builds
one (the Python API, the batch API, each server route from its body, the CLI from its flags, the
conversation, the streaming-input contexts) and the same object travels to the engine and the
sampler. Both check themselves when made: a bad argument is a ValueError that names it, before
any model work. Upstream's `Generator.generate(..., topk=50)` keeps upstream's spelling; inside,
the setting is `top_k` everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from csm_streaming.audio import FRAME_MS, SAMPLE_RATE

if TYPE_CHECKING:  # torch is imported where tensors are checked: the CLI validates without it
    import torch

DEFAULT_MAX_AUDIO_MS = 90_000  # upstream's default length limit
DEFAULT_TEMPERATURE = 0.9
DEFAULT_TOP_K = 50
MAX_TEMPERATURE = 10.0  # past this the draw is uniform noise; larger values are surely mistakes
MAX_TOP_K = 2051  # the audio heads' width: the server's bound (the Python API takes any k)
MAX_SEED = 2**63 - 1  # the server's bound (the Python API keeps a seed's low 32 bits)
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
class SamplingParams:
    """How one request is sampled, and for how long. Checked when made.

    max_audio_length_ms=None: the generator's default (90 s for real weights, a few seconds for
    random ones, which never end); `GenerationRequest.with_default_length` fills it in.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    seed: int | None = None
    max_audio_length_ms: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or not 0 < t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in (0, {MAX_TEMPERATURE:g}] "
                             f"(got {t!r})")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:  # over 2048: all codes
            raise ValueError(f"top_k must be an integer >= 1 (got {k!r})")
        if self.seed is not None:
            _check_int(self.seed, "seed")
        ms = self.max_audio_length_ms
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, float))
                               or not math.isfinite(ms) or ms < FRAME_MS):
            raise ValueError(f"max_audio_length_ms must be at least {FRAME_MS} (one frame) "
                             f"(got {ms!r})")
        object.__setattr__(self, "temperature", float(t))
        if ms is not None:
            object.__setattr__(self, "max_audio_length_ms", float(ms))

    @property
    def max_frames(self) -> int:
        ms = DEFAULT_MAX_AUDIO_MS if self.max_audio_length_ms is None else self.max_audio_length_ms
        return max(1, int(ms // FRAME_MS))


SAMPLING_FIELDS = tuple(f.name for f in fields(SamplingParams))


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: text, speaker, context and its SamplingParams. Checked when made (the
    text is stripped, the context becomes a tuple)."""

    text: str
    speaker: int = 0
    context: tuple[Segment, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        _check_text(self.text, "text", allow_empty=False)
        _check_int(self.speaker, "speaker")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams (got "
                             f"{type(self.sampling).__name__})")
        context = tuple(self.context or ())
        for i, seg in enumerate(context):
            _check_segment(seg, f"context[{i}]")
        object.__setattr__(self, "text", self.text.strip())
        object.__setattr__(self, "context", context)

    @classmethod
    def of(cls, text, speaker=0, context=(), **sampling) -> GenerationRequest:
        """From flat keywords (a dict request, a test): the sampling ones go to SamplingParams
        (temperature, top_k, seed, max_audio_length_ms); any other is a ValueError naming it."""
        unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"unknown request field(s) {', '.join(unknown)}: use text, speaker, "
                             f"context, {', '.join(SAMPLING_FIELDS)}")
        return cls(text, speaker, context, SamplingParams(**sampling))

    @property
    def max_frames(self) -> int:
        return self.sampling.max_frames

    def with_default_length(self, default_ms: float) -> GenerationRequest:
        """The request with max_audio_length_ms filled in where it was left to the default."""
        if self.sampling.max_audio_length_ms is not None:
            return self
        return replace(self, sampling=replace(self.sampling, max_audio_length_ms=default_ms))


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
    s = req.sampling
    s = replace(s, temperature=max(0.3, round(s.temperature * 0.7, 4)), top_k=max(1, s.top_k // 2))
    return (replace(req, sampling=s),
            f"no audio: retry {attempt} with temperature {s.temperature:g}, top-k {s.top_k}")


def draw_seed(seed: int | None) -> int:
    """The 32-bit key of a request's random draws; None draws one from torch's global RNG."""
    import torch

    if seed is None:
        return int(torch.randint(0, 2**32, (1,)).item())
    return seed & 0xFFFFFFFF
