"""The streaming engine: many streams in static slots, one batched frame step, streaming Mimi.

One `StreamEngine` holds up to `max_batch_size` streams in static cache rows ("slots"). Every
frame step advances all running streams at once: the depth decoder samples each stream's 32
codes from its backbone state, then the backbone reads those codes. The step takes no arguments
(all state lives in `SlotState`'s static tensors), so it can be compiled and captured in one
CUDA graph. The host looks at the device once per chunk: to see which streams ended and to
decode their frames with Mimi, in its streaming state, so the chunks join without clicks.

Prompt work (encoding context audio, prefilling a prompt, the next sentence of a long text) is
done in small resumable units between chunks, at most about one frame step's worth per chunk
while streams are running, so a request with a huge context never stalls the others.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import torch

from csm_streaming.audio import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE
from csm_streaming.engine.admission import plan_segments
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frame_step import FrameStep
from csm_streaming.engine.graphs import CUDAGraphed, compile_frame_parts, shared_copy
from csm_streaming.engine.lifecycle import Lifecycle
from csm_streaming.engine.mimi_decode import decode_chunk, mimi_graphs_off
from csm_streaming.engine.prompt_prefill import PromptWork
from csm_streaming.engine.reference import Generator
from csm_streaming.engine.runaway import TailGuard
from csm_streaming.engine.slots import ChunkEvent, SlotState, Stream
from csm_streaming.engine.text_feed import TextFeed
from csm_streaming.metrics import StreamMetrics
from csm_streaming.model.cpu_kernels import speed_up_cpu_linears
from csm_streaming.model.sampling import candidates_for
from csm_streaming.request import (
    DEFAULT_TOP_K,
    GenerationRequest,
    draw_seed,
)

log = logging.getLogger("csm.engine")

IDLE_PROMPT_SLICE_S = 0.05  # prompt work between two looks for new requests when nothing runs
MAX_PROMPT_BUDGET_S = 1.0  # prompt work lent from running streams' leads, at most, per chunk


class EngineFull(RuntimeError):
    """Every slot holds a stream; try again when one finishes."""


class StreamEngine:
    """Static-slot batched CSM + streaming Mimi. Only one thread may call its methods."""

    def __init__(self, generator: Generator, config: StreamingConfig):
        self.gen, self.config = generator, config
        self.model = m = generator.model
        self.device = dev = generator.device
        b = config.max_batch_size
        self.caches = m.make_caches(b, config.max_seq_len)  # this engine's own
        self.window = self.caches.max_seq
        self.scratch_pos = self.window - 1  # where parked and free rows write during a step
        dtype = next(m.parameters()).dtype
        frames = max(config.chunk_frames, config.first_chunk_frames)
        self.state = SlotState.allocate(b, m.args.backbone.dim, frames, dtype, dev)
        self.state.pos.fill_(self.scratch_pos)
        self.mimi = shared_copy(generator.mimi)  # decoder: streaming, one row per slot
        self.mimi.streaming_forever(b)
        mimi_graphs_off(self.mimi)
        self.encoder = shared_copy(generator.mimi)  # encodes context audio, one slice at a time
        self.slots: list[Stream | None] = [None] * b
        self.last_stream: Stream | None = None
        self._ids = itertools.count()
        self.prompts = PromptWork(generator, self.caches, self.encoder, self.state)
        self.life = Lifecycle(generator, self.state, self.prompts, self.slots, self.scratch_pos)
        self._wake = threading.Event()
        self._arrived = threading.Event()  # set by wake() during a step: cut the chunk short
        self.compiled = None  # the step's compiled parts (graphs.FrameParts), None: eager
        self.cpu_kernel = "plain"  # the matrix kernel measured fastest here (CPU, fp32)
        self._graphs_off = not config.cuda_graphs_enabled(dev)
        self._steps: dict[tuple, CUDAGraphed] = {}  # (bucket, candidates) -> its step
        self.last_bucket = 0
        self.last_mimi_rows = 0  # rows the last chunk's Mimi decode ran
        self.frame_step_s = 0.0  # measured time of one frame step (EMA)
        self.chunk_slack_s = 0.0  # the last whole chunk's audio time minus the time it took
        self.chunk_s = 0.0  # the last whole chunk's time
        if config.compile_enabled(dev):  # None where compiling does not pay
            self.compiled = compile_frame_parts(m, dev, len(self.buckets))
        if self.compiled is None and config.cpu_weight_prepack:
            self.cpu_kernel = speed_up_cpu_linears(m, b)
        self.frame_step = FrameStep(m, self.state, self.caches, self.compiled)

    # -- slots ----------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    @property
    def active(self) -> list[Stream]:
        return [s for s in self.slots if s is not None]

    @property
    def idle(self) -> bool:
        """Nothing to run and no prompt work: the caller may wait (`wait`) for new text."""
        return not self.prompts.pending and not any(s.state == "running" for s in self.active)

    def wake(self):
        """Cut a `wait` short (any thread): a request came, or text for a waiting stream. A
        chunk being made ends at its next frame (once it holds a first chunk's frames), so the
        newcomer waits for one frame of the others, not a whole chunk."""
        self._arrived.set()
        self._wake.set()

    def wait(self, timeout: float):
        """Sleep until `wake` (a text feed got a segment, a request came) or `timeout` seconds."""
        self._wake.wait(timeout)
        self._wake.clear()

    @property
    def buckets(self) -> list[int]:
        """Every batch bucket a step may run (one compiled shape and CUDA graph each)."""
        return sorted({self.bucket(top) for top in range(1, len(self.slots) + 1)})

    def bucket(self, top: int) -> int:
        """Rows a step runs for slots 0..top-1: the smallest power of two covering them, capped
        at max_batch_size (one compiled shape and one CUDA graph per bucket)."""
        return min(1 << max(0, top - 1).bit_length(), len(self.slots))

    # -- admission ------------------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> list[str]:
        """The segments of a request's text, each checked to fit this engine's window
        (admission.plan_segments). Reads no engine state (any thread may call it)."""
        return plan_segments(self.gen, request, self.window, self.config.max_segment_chars)

    def submit(self, request: GenerationRequest, feed: TextFeed | None = None) -> Stream:
        """Admit a request into a free slot; its prompt work starts at the next step. feed: its
        text (default: the request's text at sentence ends). Raises EngineFull. The one way in
        (the server's EngineThread and StreamingGenerator call it); `cancel` the one way out."""
        slot = next((i for i, s in enumerate(self.slots) if s is None), None)
        if slot is None:
            raise EngineFull(f"all {len(self.slots)} stream slots are busy")
        request = self.gen.complete(request)
        if feed is None:
            feed = TextFeed(self.plan(request))
        feed.on_push = self.wake
        stream = Stream(id=next(self._ids), request=request, slot=slot, feed=feed,
                        metrics=StreamMetrics(device=str(self.device), events=[
                            e for e in self.gen.events if e.kind == "device_fallback"]),
                        seed=draw_seed(request.sampling.seed),
                        guard=TailGuard(self.gen.tail, SAMPLE_RATE), frames_left=request.max_frames)
        stream.metrics.segments = len(feed.known)
        self.slots[slot] = self.last_stream = stream
        feed.stream = stream  # the caller finds the stream (its codes) through its feed
        self.life.set_sampling(stream)
        mask = torch.zeros(len(self.slots), dtype=torch.bool, device=self.device)
        mask[slot] = True
        self.mimi.reset_streaming(mask)  # a fresh decoder state for this row alone
        self.prompts.start(stream)
        return stream

    def cancel(self, stream: Stream):
        """Free the stream's slot now (the caller stopped listening, or cancelled)."""
        stream.cancelled = True
        stream.metrics.stop_reason = stream.metrics.stop_reason or "cancelled"
        self.life.release(stream)

    def prepare_all(self) -> list[ChunkEvent]:
        """Finish every pending prompt job now, running no chunk (benchmarks, warm-up)."""
        events = []
        while self.prompts.pending:
            events += [self.life.fail(s, e) for s, e in self.prompts.run(None)]
        return events

    # -- the frame step (graphed) -----------------------------------------------------------------

    def _frame_step(self, n: int, candidates: int | None = None) -> torch.Tensor:
        """Advance the first n slots by one frame (frame_step.FrameStep); no host sync."""
        return self.frame_step(n, candidates, self._positions_seen(self.state.pos[:n]))

    def _positions_seen(self, pos: torch.Tensor) -> int | None:
        """On a CPU: the cache positions the running rows' next step attends to (up to the
        furthest one's), so the backbone's attention reads no more of the window (parked and
        free rows, at the scratch position, get garbage as always; a running row may be there
        too, at the window's end). No sync there. None (the whole window) on a GPU, in a
        captured graph, or with the whole step traced: their shapes are fixed."""
        if self.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        rows = [i for i, s in enumerate(self.slots[:len(pos)]) if s and s.state == "running"]
        return int(pos[rows].max()) + 1 if rows else None

    def step_fn(self, n: int, top_k: int = DEFAULT_TOP_K) -> CUDAGraphed:
        """The (graphed) frame step of bucket n for streams of top-k <= top_k: benchmarks time
        it alone. One step per (bucket, candidate count)."""
        key = (n, candidates_for(top_k))
        if key not in self._steps:
            self._steps[key] = CUDAGraphed(lambda: self._frame_step(*key),
                                           disable=self._graphs_off)
        return self._steps[key]

    # -- one chunk for everyone -----------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[ChunkEvent]:
        """Prompt work within budget, then one chunk for every running stream (one host sync).

        Prompt work comes first so that a request whose prompt is ready (a new one after its
        prefill, a playing one after its next segment's) joins this chunk instead of waiting
        through one chunk of the others: its first audio is a prefill and a first chunk away.
        """
        self._arrived.clear()
        events = self.life.check_waiting(self.active)
        running = any(s.state == "running" for s in self.active)
        # Nothing runs: work in short slices anyway, so new requests are admitted in between.
        budget = self.prompt_budget_s() if running else IDLE_PROMPT_SLICE_S
        if self.prompts.pending:
            lent = self.lendable_lead_s() if running else 0.0
            events += [self.life.fail(s, e) for s, e in self.prompts.run(budget, lent)]
        ready = [s for s in self.active if s.state == "running"]
        return events + (self._chunk(ready) if ready else [])

    def prompt_budget_s(self) -> float:
        """Prompt work allowed between two chunks while streams run: the last whole chunk's
        slack (its audio time minus the time it took), so that every running stream stays
        ahead of real time, and at least `prep_budget_steps` frame steps, so that new requests
        always progress."""
        return max(self.frame_step_s * self.config.prep_budget_steps, self.chunk_slack_s)

    def lendable_lead_s(self) -> float:
        """More prompt work the running streams can lend to newcomers without audio to encode
        (and to playing streams' next segments): when every running stream has sent more audio
        than has played since its first chunk, the least of those leads less the next chunk's
        time, up to MAX_PROMPT_BUDGET_S. Requests that arrive together are then all prefilled
        before the next chunk instead of one chunk of the others apart; a request with context
        audio to encode gets the slack only."""
        now = time.perf_counter()
        leads = [s.metrics.audio_s - (now - s.metrics.started - s.metrics.first_audio_s)
                 if s.metrics.first_audio_s is not None else 0.0
                 for s in self.active if s.state == "running"]
        return max(0.0, min(min(leads, default=0.0) - self.chunk_s, MAX_PROMPT_BUDGET_S))

    def _chunk(self, streams: list[Stream]) -> list[ChunkEvent]:
        """One chunk for the running streams: frame steps -> Mimi decode -> each stream's
        frames delivered (lifecycle.after_chunk)."""
        t0 = time.perf_counter()
        n, valid = self._run_frames(streams)
        t_model = time.perf_counter()
        step_s = (t_model - t0) / n
        self.frame_step_s = (
            step_s if not self.frame_step_s else 0.8 * self.frame_step_s + 0.2 * step_s
        )
        kept = {s.slot: min(valid[s.slot], s.segment_limit - s.segment_frames, s.frames_left)
                for s in streams}
        audio = self._decode(self.state.codes[:, :n], kept)
        for s in streams:  # shared by the batch: each stream sees the whole step's cost
            s.metrics.add_stage("model", t_model - t0)
            s.metrics.add_stage("mimi", time.perf_counter() - t_model)
        host_codes = self.state.codes[:, :n].to("cpu", copy=True)
        now = time.perf_counter()
        events = []
        for s in streams:
            k = kept[s.slot]
            try:
                events.append(self.life.after_chunk(
                    s, host_codes[s.slot, :k], audio[s.slot][:k * FRAME_SAMPLES],
                    end_frame=valid[s.slot] < n, clock=(now - t0, now)))
            except Exception as e:  # one stream's own trouble (its text, its guard): it alone ends
                log.warning("stream %d failed: %s", s.id, e)
                events.append(self.life.fail(s, e))
        if n == self.config.chunk_frames:  # a first chunk or one cut for a newcomer is mostly
            # Mimi's fixed cost per call: its slack would starve the newcomers that shortened it
            self.chunk_s = time.perf_counter() - t0
            self.chunk_slack_s = n * FRAME_MS / 1000 - self.chunk_s
        return events

    def _run_frames(self, streams: list[Stream]) -> tuple[int, list[int]]:
        """The chunk's frame steps for the bucket covering the streams' slots -> (frames run,
        each slot's frames before its end of speech). A first chunk is short (first audio
        soon); a chunk ends early, after a first chunk's frames, when a newcomer waits."""
        cfg, st = self.config, self.state
        n = (cfg.first_chunk_frames if any(s.metrics.chunks == 0 for s in streams)
             else cfg.chunk_frames)
        n = max(1, min(n, max(s.segment_limit - s.segment_frames for s in streams)))
        rows = self.last_bucket = self.bucket(max(s.slot for s in streams) + 1)
        step = self.step_fn(rows, max(s.request.sampling.top_k for s in streams))
        saved = st.checkpoint()
        st.valid.zero_()
        try:
            for f in range(n):
                st.codes[:rows, f].copy_(step())
                if cfg.first_chunk_frames <= f + 1 < n and self._arrived.is_set():
                    n = f + 1  # someone new waits (a host flag, no sync): end the chunk here
                    break
            return n, st.valid.tolist()  # the one sync of the chunk
        except BaseException:
            st.restore(saved)  # e.g. out of memory at frame f: no stream loses frames 0..f-1
            raise

    def _decode(self, codes: torch.Tensor, kept: dict[int, int]) -> list[torch.Tensor]:
        """Mimi-decode the chunk in its streaming state -> per-slot CPU audio (decode_chunk)."""
        audio, self.last_mimi_rows = decode_chunk(self.mimi, codes, kept, len(self.slots),
                                                  self.config.frame_batch_size)
        return audio

