"""Prompt work of the engine, in bounded units between chunks.

Each job is a generator that does one unit of work per `next()`: resample one context turn,
Mimi-encode a few frames of it (ENCODE_SLICE_FRAMES), or prefill one block of positions
(prefill_block_size). The engine runs units for about one frame step before every chunk, so a
request with a long text or minutes of context audio delays the running streams by at most
that much per chunk, and runs at full speed when nothing else does.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass

import torch

from csm_streaming.audio import FRAME_SAMPLES, to_mono_24k
from csm_streaming.engine.prompt_rows import audio_rows, encode_slices, fit_prompt
from csm_streaming.engine.reference import Generator
from csm_streaming.engine.slots import SlotState, Stream
from csm_streaming.model.csm import prefill_block_size
from csm_streaming.model.llama import ModelCaches

log = logging.getLogger("csm.engine")

_WAITING = "waiting"  # what a job yields when it did no work (the encoder is busy)


@dataclass
class _Block:
    """A prefill block a job waits to have run: rows [S, 33] at positions start.."""

    tokens: torch.Tensor
    mask: torch.Tensor
    start: int


MIN_SEGMENT_FRAMES = 25  # a sentence may always take 2 s
FRAMES_PER_CHAR = 2.0  # ... or twice a slow speaking rate (12.5 characters a second)


class PromptWork:
    """The prompt jobs of one engine (only the engine's thread uses it).

    Streams already playing (their next segment, a retry) go first: their work is small and
    their listeners are waiting. Then new requests without audio to encode (a few prefill
    blocks each), then those with context audio, in turns, one unit each: a request with minutes
    of context never delays the ones behind it. The encoder has one streaming state: one job at
    a time holds it; the others go on meanwhile.
    """

    def __init__(self, gen: Generator, caches: ModelCaches, encoder, state: SlotState):
        self.gen, self.model, self.caches = gen, gen.model, caches
        self.encoder, self.state, self.device = encoder, state, gen.device
        self.window = caches.max_seq
        self._urgent: collections.deque = collections.deque()  # (stream, generator)
        self._light: collections.deque = collections.deque()  # new, no audio to encode
        self._heavy: collections.deque = collections.deque()  # new, with context audio
        self._encoder_owner: Stream | None = None
        self._parked: dict = {}  # job -> the _Block it waits to have run

    @property
    def pending(self) -> bool:
        return bool(self._urgent or self._light or self._heavy)

    def start(self, s: Stream, front: bool = False):
        """Queue the stream's next prompt: the first one (context, first segment) or the next
        segment's. front: a stream already playing, served before new admissions."""
        s.state = "preparing"
        job = self._first(s) if s.prompt_end == 0 else self._next(s)
        heavy = s.context_rows is None and any(
            seg.codes is None and seg.audio is not None for seg in s.request.context)
        (self._urgent if front else self._heavy if heavy else self._light).append((s, job))

    def drop(self, s: Stream):
        for queue in (self._urgent, self._light, self._heavy):
            for item in [j for j in queue if j[0] is s]:
                queue.remove(item)
                self._parked.pop(item[1], None)
                item[1].close()  # a half-done encode leaves its streaming state cleanly
        if self._encoder_owner is s:
            self._encoder_owner = None

    def run(self, budget_s: float | None, lent_s: float = 0.0) -> list[tuple[Stream, Exception]]:
        """Do units of work for about `budget_s` seconds (at least one), `lent_s` more while
        the work is a playing stream's or a new request's without audio to encode, or, with
        None, until a job finishes. Returns the streams whose prompt failed (their own fault: a
        text too long for the window...) with the error; the others are unaffected.

        A job that reaches a prefill block parks it (no work yet) and the next job in line
        goes on; when the turn comes back to a parked block, the blocks parked in its queue run
        together, one backbone call for several streams (`_run_blocks`): requests that come
        together are prefilled together."""
        failed, t0, units = [], time.perf_counter(), 0
        while self.pending:
            queue = self._urgent or self._light or self._heavy
            stream, job = queue[0]
            if job in self._parked:
                finished = self._run_blocks(queue, failed)
                units += 1
                if finished and budget_s is None:
                    break
            else:
                try:
                    item = next(job)
                    if isinstance(item, _Block):
                        self._parked[job] = item
                    elif item is not _WAITING:
                        units += 1
                    queue.rotate(-1)  # the next unit goes to the next job in line
                except StopIteration:
                    queue.remove((stream, job))
                    if budget_s is None:
                        break
                except Exception as e:
                    self._failed(queue, stream, job, e, failed)
            if budget_s is not None and units:
                limit = budget_s + (lent_s if self._urgent or self._light else 0.0)
                if time.perf_counter() - t0 >= limit:
                    break
        return failed

    def _failed(self, queue, stream: Stream, job, error: Exception, failed: list):
        queue.remove((stream, job))
        self.drop(stream)
        log.warning("stream %d: prompt failed: %s", stream.id, error)
        failed.append((stream, error))

    def _run_blocks(self, queue, failed: list) -> bool:
        """Run the head's parked block with the others parked in its queue, in line order, as
        many as fit in about one block's work (rows x longest block <= prefill_block_size) and
        in the window; send each job its hidden state. Returns whether a job finished."""
        cap = prefill_block_size(self.device)
        group = []
        for stream, job in list(queue):
            block = self._parked.get(job)
            if block is None:
                continue
            longest = max(len(block.tokens), *(len(b.tokens) for _, _, b in group), 0)
            if group and (longest * (len(group) + 1) > cap
                          or any(b.start + longest > self.window for _, _, b in (*group,
                                 (stream, job, block)))):
                continue
            group.append((stream, job, block))
        try:
            h = self.model.prefill_rows([(b.tokens, b.mask, s.slot, b.start)
                                         for s, _, b in group], self.caches)
        except Exception as e:  # the call itself (out of memory...): every stream in it
            for stream, job, _ in group:
                del self._parked[job]
                job.close()
                self._failed(queue, stream, job, e, failed)
            return False
        finished = False
        for (stream, job, _), row in zip(group, h):
            del self._parked[job]
            try:
                item = job.send(row)
                if isinstance(item, _Block):
                    self._parked[job] = item
            except StopIteration:
                queue.remove((stream, job))
                finished = True
            except Exception as e:
                self._failed(queue, stream, job, e, failed)
        if queue and queue[0][1] is group[0][1]:
            queue.rotate(-1)  # the head goes on: the next job in line goes next
        return finished

    # -- the jobs ---------------------------------------------------------------------------------

    def _first(self, s: Stream):
        """Encode the context (once), then prefill the first segment's prompt."""
        if s.context_rows is None:
            s.context_rows = yield from self._encode_context(s)
        if s.feed.get(s.segment_index) is None:  # an LLM's first words have not come yet
            s.state = "waiting"
            return
        text = self._segment_rows(s)
        tokens, mask = fit_prompt(list(s.context_rows), text, self.window, self.reserve(s))
        yield from self._prefill(s, tokens, mask, start=0)

    def _encode_context(self, s: Stream):
        """Rows of the context turns, newest first until the window is full: turns that could
        never fit are not encoded at all (the same ones fit_prompt would drop)."""
        turns, room = [], self.window - 1
        for seg in reversed(s.request.context):
            audio = None
            if seg.codes is None and seg.audio is not None:
                audio = to_mono_24k(seg.audio, seg.sample_rate)
                yield
            frames = (len(seg.codes) if seg.codes is not None else
                      -(-audio.numel() // FRAME_SAMPLES) if audio is not None else -1)
            size = len(self.gen.tokenize_text(seg.text, seg.speaker)[0]) + frames + 1
            if size > room:
                break
            room -= size
            turns.insert(0, (seg, audio))
        if len(turns) < len(s.request.context):
            log.warning("stream %d: context too long for the %d-position window: the %d oldest "
                        "of %d turns are not used", s.id, self.window,
                        len(s.request.context) - len(turns), len(s.request.context))
        rows = []
        for seg, audio in turns:
            codes = None
            if audio is not None:
                codes = yield from self._encode(s, audio)
            rows.append(self.gen.segment_rows(seg, codes))
        return rows

    def _encode(self, s: Stream, audio: torch.Tensor):
        """Mimi codes of one turn, a slice per unit, holding the encoder's streaming state."""
        while self._encoder_owner not in (None, s):
            yield _WAITING  # another request is encoding: its turn first, not a unit of ours
        self._encoder_owner = s
        try:
            pieces = []
            for piece in encode_slices(self.encoder, audio, self.device):
                pieces.append(piece)
                yield
            return torch.cat(pieces) if pieces else torch.zeros(0, 32, dtype=torch.long)
        finally:
            self._encoder_owner = None

    def _next(self, s: Stream):
        """The next segment of a long text or an LLM reply: what was said stays in the cache;
        only the end-of-audio row and the new text are added (or, when the window is full, the
        prompt is rebuilt from the context and what was said, oldest dropped first)."""
        text_t, text_m = self._segment_rows(s)
        eos_t, eos_m = audio_rows(torch.zeros(0, 32, dtype=torch.long))
        start = s.prompt_end + s.segment_frames
        if start + 1 + len(text_t) + self.reserve(s) <= self.window:
            yield from self._prefill(
                s, torch.cat([eos_t, text_t]), torch.cat([eos_m, text_m]), start
            )
        else:
            tokens, mask = fit_prompt(list(s.context_rows) + s.history, (text_t, text_m),
                                      self.window, self.reserve(s))
            yield from self._prefill(s, tokens, mask, start=0)

    def _segment_rows(self, s: Stream):
        s.segment_text = s.feed.get(s.segment_index)
        return self.gen.tokenize_text(s.segment_text, s.request.speaker)

    def reserve(self, s: Stream) -> int:
        """Frames the current segment may take: all that is left for a single closed segment
        (as the reference loop), else a cap by its length that does not depend on what follows,
        so one sentence that never ends cannot starve the rest."""
        if not s.feed.segmented and len(s.feed.known) == 1:
            return s.frames_left
        cap = max(MIN_SEGMENT_FRAMES, math.ceil(FRAMES_PER_CHAR * len(s.segment_text)))
        return min(s.frames_left, cap, self.window // 2)

    def _prefill(self, s: Stream, tokens: torch.Tensor, mask: torch.Tensor, start: int):
        """Prompt rows at positions start.. of the stream's row, one block per unit (yielded as
        a _Block; the runner sends back its last hidden state); then the stream runs. The block
        boundaries are those of CSM.prefill, so the result is the same."""
        block = prefill_block_size(self.device)
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        for b0 in range(0, tokens.shape[0], block):
            h = yield _Block(tokens[b0:b0 + block], mask[b0:b0 + block], start + b0)
        st, slot = self.state, s.slot
        s.prompt_end = start + tokens.shape[0]
        st.last_h[slot] = h
        st.pos[slot] = s.prompt_end
        st.ended[slot] = False
        # The draw counter of a segment depends only on what the stream said before it, never
        # on how chunks fell, so a stream draws the same with or without others beside it.
        st.sampling.frame[slot] = s.kept_frames + s.segment_index
        s.segment_frames, s.segment_codes = 0, []
        s.segment_limit = min(self.reserve(s), self.window - s.prompt_end)
        s.state = "running"
