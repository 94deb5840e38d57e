"""What the engine holds: each stream's text feed and progress, and the slots' fixed tensors.

A `Stream` is one request in the engine; its `TextFeed` says what it speaks, segment by segment;
`SlotState` holds the tensors the (graphed) frame step reads and writes, one row per slot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from csm_streaming.engine.runaway import TailGuard
from csm_streaming.metrics import StreamMetrics
from csm_streaming.model.sampling import SamplingState
from csm_streaming.request import GenerationRequest


class TextFeed:
    """What a stream says, segment by segment. Closed: all known at submit (a text split at
    sentence ends). Open: segments arrive while it speaks (an LLM's reply); `close()` when the
    last has come, `fail(error)` when the producer failed. Thread-safe; `on_push` wakes the
    engine's thread."""

    def __init__(self, segments=(), closed: bool = True, segmented: bool | None = None):
        self._segments = [s for s in segments]
        self._closed = closed
        # Segmented: its pieces were cut by someone else (a list of sentences, an LLM's reply):
        # each segment gets the per-sentence frame cap, even when there is only one, so the
        # same pieces always give the same speech. A closed feed of one segment is a plain
        # text: all of max_audio_length_ms, as the reference loop.
        self.segmented = (not closed) if segmented is None else segmented
        self.stream = None  # the engine's Stream speaking it, once admitted
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.on_push = None

    def push(self, text: str):
        with self._lock:
            if self._closed:
                raise RuntimeError("push to a closed TextFeed")
            self._segments.append(text)
        self._wake()

    def close(self):
        with self._lock:
            self._closed = True
        self._wake()

    def fail(self, error: BaseException):
        with self._lock:
            self.error, self._closed = error, True
        self._wake()

    def _wake(self):
        if self.on_push is not None:
            self.on_push()

    def get(self, i: int) -> str | None:
        with self._lock:
            return self._segments[i] if i < len(self._segments) else None

    def exhausted(self, i: int) -> bool:
        """No segment i will ever come."""
        with self._lock:
            return self._closed and i >= len(self._segments)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def known(self) -> list[str]:
        with self._lock:
            return list(self._segments)


@dataclass
class SlotState:
    """The frame step's fixed tensors, one row per slot: what the captured graph reads and
    writes. Allocated once; a slot is reset by writing its row."""

    last_h: torch.Tensor  # [B, D] backbone state the next frame is sampled from
    pos: torch.Tensor  # [B] int64 next backbone position
    ended: torch.Tensor  # [B] bool: end of speech seen in this segment
    valid: torch.Tensor  # [B] int64 frames before the end, this chunk
    sampling: SamplingState  # [B] temperature, top-k, seed, draw counter
    codes: torch.Tensor  # [B, frames per chunk, 32] this chunk's codes

    @classmethod
    def allocate(cls, batch: int, dim: int, chunk_frames: int, dtype, device) -> SlotState:
        return cls(torch.zeros(batch, dim, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device),
                   torch.ones(batch, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device),
                   SamplingState.empty(batch, device),
                   torch.zeros(batch, chunk_frames, 32, dtype=torch.long, device=device))

    def checkpoint(self) -> tuple[torch.Tensor, ...]:
        """What a chunk changes, copied: restore() rolls a failed chunk back, so that the same
        frames are drawn again (the draws are keyed on seed and counter) and none is lost."""
        return (self.last_h.clone(), self.pos.clone(), self.ended.clone(),
                self.sampling.frame.clone())

    def restore(self, saved: tuple[torch.Tensor, ...]):
        for dst, src in zip((self.last_h, self.pos, self.ended, self.sampling.frame), saved):
            dst.copy_(src)


@dataclass
class Stream:
    """One request in the engine."""

    id: int
    request: GenerationRequest
    slot: int
    feed: TextFeed
    metrics: StreamMetrics
    seed: int
    guard: TailGuard
    state: str = "preparing"  # preparing -> running <-> (preparing | waiting for text) -> finished
    frames_left: int = 0  # frames the whole request may still produce
    segment_index: int = 0
    segment_text: str = ""
    segment_frames: int = 0  # frames kept in the current segment
    segment_limit: int = 0  # frames the current segment may keep (window and budget)
    segment_codes: list[torch.Tensor] = field(default_factory=list)
    prompt_end: int = 0  # cache positions the current segment's prompt fills
    context_rows: list | None = None  # encoded once, at admission
    history: list = field(default_factory=list)  # rows of the segments spoken so far
    codes: list[torch.Tensor] = field(default_factory=list)  # all codes emitted
    kept_frames: int = 0
    segment_ends: list[int] = field(default_factory=list)  # kept_frames as each segment ended
    end_reason: str = ""  # why the last segment ended
    retries: int = 0
    error: BaseException | None = None
    finished: bool = False
    cancelled: bool = False

    @property
    def all_codes(self) -> torch.Tensor:
        return torch.cat(self.codes) if self.codes else torch.zeros(0, 32, dtype=torch.long)


@dataclass
class ChunkEvent:
    stream: Stream
    audio: torch.Tensor  # 1-D float32 on the CPU; may be empty on the last event
    finished: bool
    error: BaseException | None = None  # why the stream ended without finishing its speech
