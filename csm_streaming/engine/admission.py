"""Whether a request fits, decided before it is admitted: its text cut into segments (sentences,
up to max_segment_chars), each checked against the engine's window, so that a text too long
for it is a ValueError now rather than a failure mid-stream."""

from __future__ import annotations

from csm_streaming.engine.reference import Generator
from csm_streaming.engine.segmenting import split_sentences
from csm_streaming.request import GenerationRequest


def plan_segments(gen: Generator, request: GenerationRequest, window: int,
                  max_segment_chars: int) -> list[str]:
    """The segments of a request's text (spelled out, at sentence ends), each checked."""
    text = " ".join(gen.prepare_text(request.text).split())
    segments = split_sentences(text, max_segment_chars)
    check_segments(gen, segments, gen.complete(request), window)
    return segments


def check_segments(gen: Generator, segments: list[str], request: GenerationRequest,
                   window: int, segmented: bool = False):
    """Each segment must fit the window with room for audio (a plain text of one segment:
    with room for all of max_audio_length_ms, as the reference loop needs; segmented: the
    caller cut the text itself)."""
    for i, seg in enumerate(segments):
        n = len(gen.tokenize_text(seg, request.speaker)[0])
        if not segmented and len(segments) == 1 and n + request.max_frames > window:
            raise ValueError(f"text is too long: {n} tokens + {request.max_frames} frames of "
                             f"audio exceed the {window}-position window; split the text or "
                             "lower max_audio_length_ms")
        if n + 1 > window:
            raise ValueError(f"text segment {i + 1} is {n} tokens: it does not fit the "
                             f"{window}-position window; use shorter sentences")
