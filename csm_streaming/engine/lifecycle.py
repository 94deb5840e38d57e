"""What happens to a stream after each chunk, and how a stream leaves its slot.

After its chunk a stream goes on, takes its next segment (its spoken segments become its voice
context), waits for more text, retries an output that ended before any audio, or finishes.
Every way out (finished, failed, cancelled) frees its slot through `release`; a freed or
waiting slot is parked: its row writes at the window's scratch position until it is used again.
"""

from __future__ import annotations

import logging

import torch

from csm_streaming.audio import FRAME_MS
from csm_streaming.engine.prompt_prefill import PromptWork
from csm_streaming.engine.prompt_rows import audio_rows
from csm_streaming.engine.reference import Generator
from csm_streaming.engine.slots import ChunkEvent, SlotState, Stream
from csm_streaming.metrics import EMPTY_RETRY, RUNAWAY_STOP, Event, peak_memory_mb
from csm_streaming.model.sampling import MIMI_CODES
from csm_streaming.request import MAX_EMPTY_RETRIES, EmptyOutputError, retry_request

log = logging.getLogger("csm.engine")


class Lifecycle:
    """A stream's way through its slot, chunk after chunk: its slot's row set and parked, its
    segments, waits and retries, and its end. Shares the engine's slot list and tensors."""

    def __init__(self, generator: Generator, state: SlotState, prompts: PromptWork,
                 slots: list[Stream | None], scratch_pos: int):
        self.gen, self.state, self.prompts = generator, state, prompts
        self.slots, self.scratch_pos = slots, scratch_pos

    # -- the slot's row -------------------------------------------------------------------------

    def park(self, slot: int):
        """The row writes at the scratch position and counts as ended until it runs again."""
        self.state.pos[slot] = self.scratch_pos
        self.state.ended[slot] = True

    def set_sampling(self, stream: Stream):
        s, slot, params = self.state.sampling, stream.slot, stream.request.sampling
        s.temperature[slot] = params.temperature
        s.top_k[slot] = min(params.top_k, MIMI_CODES)
        s.seed[slot] = stream.seed

    # -- ways out -------------------------------------------------------------------------------

    def release(self, stream: Stream):
        """The stream is over: its prompt work dropped, its slot free and parked."""
        stream.finished = stream.metrics.finished = True
        stream.state = "finished"
        self.prompts.drop(stream)
        if self.slots[stream.slot] is stream:
            self.slots[stream.slot] = None
            self.park(stream.slot)

    def fail(self, s: Stream, error: BaseException) -> ChunkEvent:
        s.error = error
        s.metrics.stop_reason = f"error: {error}"
        self.release(s)
        return ChunkEvent(s, torch.zeros(0), True, error)

    def finish(self, s: Stream, out: torch.Tensor, reason: str) -> ChunkEvent:
        s.metrics.stop_reason = reason
        out = s.guard.end(out)
        self.release(s)
        return ChunkEvent(s, out, True, s.error)

    # -- after a chunk --------------------------------------------------------------------------

    def after_chunk(self, s: Stream, codes: torch.Tensor, audio: torch.Tensor,
                    end_frame: bool, clock: tuple[float, float]) -> ChunkEvent:
        """One stream's frames of a chunk (codes [k, 32], audio [k * FRAME_SAMPLES]) recorded,
        then where it goes. end_frame: its end of speech came in this chunk. clock: (the
        chunk's generation seconds, perf_counter now)."""
        out, runaway = self._record(s, codes, audio, clock)
        if runaway:
            s.metrics.events.append(Event(RUNAWAY_STOP, f"stopped early: {runaway}"))
            log.info("stream %d stopped early: %s", s.id, runaway)
            return self.finish(s, out, f"runaway: {runaway}")
        if not (end_frame or s.segment_frames >= s.segment_limit or s.frames_left <= 0):
            return ChunkEvent(s, out, False)
        s.end_reason = ("end of speech" if end_frame else "max_audio_length_ms reached"
                        if s.frames_left <= 0 else
                        "segment frame limit reached (a sentence that did not end)")
        s.segment_ends.append(s.kept_frames)
        if s.frames_left > 0 and not s.feed.exhausted(s.segment_index + 1):
            self._next_segment(s)
            return ChunkEvent(s, out, False)
        if s.metrics.frames == 0 and s.retries < MAX_EMPTY_RETRIES and s.feed.closed:
            self._retry_empty(s)
            return ChunkEvent(s, out, False)
        if s.metrics.frames == 0:
            s.error = EmptyOutputError(s.retries + 1)
        return self.finish(s, out, s.end_reason)

    def _record(self, s: Stream, codes: torch.Tensor, audio: torch.Tensor,
                clock: tuple[float, float]):
        """A chunk's frames of one stream: its codes, metrics and runaway guard."""
        out, runaway = s.guard.feed(codes, audio)
        s.codes.append(codes)
        s.segment_codes.append(codes)
        k = codes.shape[0]
        s.segment_frames += k
        s.kept_frames += k
        s.frames_left -= k
        s.metrics.record_chunk(k, FRAME_MS, *clock)
        s.metrics.peak_memory_mb = peak_memory_mb(self.state.pos.device)
        return out, runaway

    def _next_segment(self, s: Stream):
        """The segment just spoken joins the stream's history (the next one's voice context);
        the stream waits for its next segment's text, or prefills it at once if it is there."""
        t, tm = self.gen.tokenize_text(s.segment_text, s.request.speaker)
        a, am = audio_rows(torch.cat(s.segment_codes))
        s.history.append((torch.cat([t, a]), torch.cat([tm, am])))
        s.segment_index += 1
        self.park(s.slot)
        s.state = "waiting"
        s.metrics.segments = max(s.metrics.segments, s.segment_index + 1)
        if s.feed.get(s.segment_index) is not None:
            self.resume(s)

    def resume(self, s: Stream):
        self.prompts.start(s, front=s.kept_frames > 0)  # before new admissions: it is playing

    def _retry_empty(self, s: Stream):
        """The stream ended before any audio: try again, cooler and narrower, a few times."""
        s.retries += 1
        s.request, text = retry_request(s.request, s.retries)
        s.frames_left = s.request.max_frames
        s.segment_index, s.history, s.kept_frames, s.prompt_end = 0, [], 0, 0
        s.segment_ends.clear()
        log.warning(text)
        s.metrics.events.append(Event(EMPTY_RETRY, text))
        self.park(s.slot)
        self.set_sampling(s)
        self.prompts.start(s, front=True)

    def check_waiting(self, streams: list[Stream]) -> list[ChunkEvent]:
        """Streams waiting for an LLM's next words: go on when they come, end with the
        producer's error, or finish when the text has ended."""
        events = []
        for s in streams:
            if s.state != "waiting":
                continue
            if s.feed.error is not None:
                events.append(self.fail(s, s.feed.error))
            elif s.feed.get(s.segment_index) is not None:
                self.resume(s)
            elif s.feed.exhausted(s.segment_index):
                if s.metrics.frames == 0:
                    s.error = EmptyOutputError(s.retries + 1)
                events.append(self.finish(s, torch.zeros(0), s.end_reason or "end of text"))
        return events

