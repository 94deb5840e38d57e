"""What the engine holds: each stream's progress, and the slots' fixed tensors.

A `Stream` is one request in the engine (its text comes from a text_feed.TextFeed);
`SlotState` holds the tensors the (graphed) frame step reads and writes, one row per slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from csm_streaming.engine.runaway import TailGuard
from csm_streaming.engine.text_feed import TextFeed
from csm_streaming.metrics import StreamMetrics
from csm_streaming.model.sampling import SamplingState
from csm_streaming.request import GenerationRequest


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
