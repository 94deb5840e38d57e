"""The fast path: streaming, batched, compiled and CUDA-graphed CSM generation.

    gen = load_streaming_csm_1b(device="auto")
    for chunk in gen.generate_streaming("Hello there.", speaker=0):
        ...  # 1-D float32 tensors at 24 kHz, the first one after a few frames

One `StreamEngine` holds up to `max_batch_size` streams in static cache rows ("slots"). Every
frame step advances all of them at once: the depth decoder samples each stream's 32 codes from
its backbone state, then the backbone reads those codes. The step takes no arguments (all state
lives in static buffers), so it can be compiled and captured in one CUDA graph. The host looks at
the device once per chunk: to see which streams ended and to decode their frames with Mimi, in
its streaming state, so the chunks join without clicks.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from models import MIMI_CODES, SamplingState, prepack_linears, unpack_linears
from generator import (FRAME_MS, FRAME_SAMPLES, MAX_EMPTY_RETRIES, SAMPLE_RATE, DEFAULT_REPO,
                       EmptyOutputError, GenerationRequest, Generator, audio_prompt, draw_seed, is_eos,
                       load_csm_1b,
                       retry_request, validate_request)
from runaway import TailGuard

log = logging.getLogger("csm.streaming")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _env_off(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class StreamingConfig:
    """Capture-time settings of the engine; validated on creation.

    chunk_size_ms: audio per yielded chunk (a multiple of 80 ms). The host looks at the device
        once per chunk, so larger chunks mean fewer syncs and later audio.
    first_chunk_ms: the first chunk of each stream, small so that sound starts early.
    frame_batch_size: frames Mimi decodes per call; divides both chunk sizes.
    max_batch_size: streams that advance together in one frame step (static cache rows).
    rtf_target: the real-time factor the caller wants to hold; playback sizes its prebuffer on it.
    max_seq_len: backbone window (positions); at most the model's 2048.
    """

    chunk_size_ms: int = 320
    first_chunk_ms: int = 160
    frame_batch_size: int = 2
    enable_compilation: bool | None = None  # None: on CUDA only (minutes to build on a CPU)
    enable_cuda_graphs: bool = True
    cpu_weight_prepack: bool = True  # MKL-packed fp32 weights for batched streams on CPU
    rtf_target: float = 0.5
    max_batch_size: int = 1
    max_seq_len: int | None = None
    max_segment_chars: int = 250
    watermark_window_ms: int = 2000  # largest window the stream watermark marks at once

    def __post_init__(self):
        for name in ("chunk_size_ms", "first_chunk_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % FRAME_MS:
                raise ValueError(f"{name} must be a positive multiple of {FRAME_MS} ms (got {v!r})")
        fb = self.frame_batch_size
        if isinstance(fb, bool) or not isinstance(fb, int) or fb < 1:
            raise ValueError(f"frame_batch_size must be an integer >= 1 (got {fb!r})")
        for name in ("chunk_size_ms", "first_chunk_ms"):
            if (getattr(self, name) // FRAME_MS) % fb:
                raise ValueError(f"frame_batch_size ({fb}) must divide {name} in frames "
                                 f"({getattr(self, name) // FRAME_MS})")
        mb = self.max_batch_size
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1 (got {mb!r})")
        if not (isinstance(self.rtf_target, (int, float)) and 0 < self.rtf_target <= 10):
            raise ValueError(f"rtf_target must be in (0, 10] (got {self.rtf_target!r})")
        if self.max_seq_len is not None and not (64 <= self.max_seq_len <= 2048):
            raise ValueError(f"max_seq_len must be in [64, 2048] (got {self.max_seq_len!r})")
        if self.max_segment_chars < 20:
            raise ValueError("max_segment_chars must be at least 20")

    @property
    def chunk_frames(self) -> int:
        return self.chunk_size_ms // FRAME_MS

    @property
    def first_chunk_frames(self) -> int:
        return self.first_chunk_ms // FRAME_MS

    def compile_enabled(self, device: torch.device | None = None) -> bool:
        wanted = self.enable_compilation
        if wanted is None:
            wanted = device is not None and device.type == "cuda"
        return wanted and not _env_off("NO_TORCH_COMPILE")

    def cuda_graphs_enabled(self, device: torch.device) -> bool:
        return self.enable_cuda_graphs and device.type == "cuda" and not _env_off("NO_CUDA_GRAPH")


# ---------------------------------------------------------------------------------------------
# Long text
# ---------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def split_sentences(text: str, max_chars: int = 250) -> list[str]:
    """Split at sentence ends into pieces of at most ~max_chars (a longer sentence stays whole
    unless it has commas to break at). Short text comes back as one piece."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        parts = [sentence]
        if len(sentence) > max_chars:  # break a run-on sentence at commas
            parts, cur = [], ""
            for clause in re.split(r"(?<=,)\s+", sentence):
                if cur and len(cur) + 1 + len(clause) > max_chars:
                    parts.append(cur)
                    cur = clause
                else:
                    cur = f"{cur} {clause}".strip()
            parts.append(cur)
        for part in parts:
            if pieces and len(pieces[-1]) + 1 + len(part) <= max_chars:
                pieces[-1] = f"{pieces[-1]} {part}"
            else:
                pieces.append(part)
    return pieces


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamMetrics:
    """Live numbers of one stream; snapshots go to the dashboard and the server."""

    device: str = "cpu"
    started: float = field(default_factory=time.perf_counter)
    first_audio_s: float | None = None  # time to first audio, from the request
    elapsed_s: float = 0.0
    audio_s: float = 0.0
    frames: int = 0
    chunks: int = 0
    chunk_gen_ms: list[float] = field(default_factory=list)  # generation time of each chunk
    chunk_rtf: list[float] = field(default_factory=list)  # each chunk's own real-time factor
    peak_memory_mb: float = 0.0
    segments: int = 1
    finished: bool = False
    stop_reason: str = ""
    events: list[str] = field(default_factory=list)  # fallbacks and retries, as said in the logs

    @property
    def rtf(self) -> float:
        """Generation time over audio time, overall: below 1 is faster than real time."""
        return self.elapsed_s / self.audio_s if self.audio_s else float("inf")

    @property
    def rtf_now(self) -> float:
        return self.chunk_rtf[-1] if self.chunk_rtf else float("inf")

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict:
        return {"device": self.device, "time_to_first_audio_ms": _ms(self.first_audio_s),
                "elapsed_ms": self.elapsed_s * 1000, "audio_ms": self.audio_s * 1000,
                "rtf": self.rtf if self.audio_s else None, "frames": self.frames,
                "frames_per_s": self.frames_per_s, "chunks": self.chunks,
                "chunk_gen_ms": list(self.chunk_gen_ms), "peak_memory_mb": self.peak_memory_mb,
                "segments": self.segments, "stop_reason": self.stop_reason,
                "events": list(self.events)}


def _ms(s):
    return None if s is None else s * 1000


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except Exception:
        return 0.0


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------


class CUDAGraphed:
    """Run `fn()` eagerly for a few warm-up calls, then capture it once and replay the graph.

    `fn` takes no arguments: it reads and writes static buffers. Its outputs are views of the
    graph's static memory: the caller copies them before the next call. disable=True (CPU, MPS,
    NO_CUDA_GRAPH) runs the very same Python eagerly every time.
    """

    def __init__(self, fn, disable: bool, warmup_steps: int = 2):
        self.fn, self.disable, self.warmup_steps = fn, disable, warmup_steps
        self.graph = None
        self.output = None
        self.calls = 0
        self.capture_s = 0.0

    def __call__(self):
        if self.disable:
            return self.fn()
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.warmup_steps:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    out = self.fn()
                torch.cuda.current_stream().wait_stream(stream)
                return out
            t = time.perf_counter()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.fn()  # recorded, not run
            self.capture_s = time.perf_counter() - t
        self.graph.replay()
        return self.output


# ---------------------------------------------------------------------------------------------
# The engine: many streams, one frame step
# ---------------------------------------------------------------------------------------------


class EngineFull(RuntimeError):
    """Every slot holds a stream; try again when one finishes."""


@dataclass
class Stream:
    """One request in the engine. `chunks` is filled by `StreamEngine.step`."""

    id: int
    request: GenerationRequest
    slot: int
    segments: list[str]
    metrics: StreamMetrics
    seed: int
    segment_index: int = 0
    frames_left: int = 0  # frames the whole request may still produce
    segment_frames: int = 0  # frames produced in the current segment
    segment_limit: int = 0  # frames the current segment may produce (window and budget)
    segment_codes: list[torch.Tensor] = field(default_factory=list)  # host [n, 32] pieces
    history: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # spoken segments
    codes: list[torch.Tensor] = field(default_factory=list)  # all codes emitted, for callers/tests
    guard: TailGuard | None = None  # runaway tail: stop early, trim silence
    retries: int = 0  # empty outputs retried
    error: Exception | None = None  # why it ended without audio
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
    error: Exception | None = None  # set when the stream ended without any audio


class StreamEngine:
    """Static-slot batched CSM + streaming Mimi. Only one thread may call its methods."""

    def __init__(self, generator: Generator, config: StreamingConfig):
        self.gen = generator
        self.config = config
        self.model = generator.model
        # A copy of Mimi of its own: this one lives in streaming mode with one row per slot,
        # while the Generator's stays free for one-shot encode and decode.
        self.mimi = copy.deepcopy(generator._audio_tokenizer)
        self.device = generator.device
        b = config.max_batch_size
        if self.model.max_batch_size != b or (config.max_seq_len and self.model.max_seq_len != config.max_seq_len):
            self.model.setup_caches(b, config.max_seq_len)
        m, dev = self.model, self.device
        dtype = next(m.parameters()).dtype
        self.last_h = torch.zeros(b, m.args.backbone.dim, dtype=dtype, device=dev)  # [B, D]
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)  # next backbone position
        self.ended = torch.ones(b, dtype=torch.bool, device=dev)  # end-of-speech seen
        self.valid = torch.zeros(b, dtype=torch.long, device=dev)  # frames before the end, this chunk
        self.sampling = SamplingState.empty(b, dev)
        self.codes_buf = torch.zeros(b, max(config.chunk_frames, config.first_chunk_frames), 32,
                                     dtype=torch.long, device=dev)
        self.slots: list[Stream | None] = [None] * b
        self._last_stream: Stream | None = None
        self._next_id = 0
        self._backbone = self._decoder = None  # compiled wrappers, or None for eager
        self.prepacked = 0  # Linear layers swapped for MKL-packed ones (CPU, batched)
        self._graphs_off = not config.cuda_graphs_enabled(dev)
        self._steps: dict[int, CUDAGraphed] = {}  # batch bucket -> its (graphed) step
        self.last_bucket = 0
        self.mimi.streaming_forever(b)
        if config.compile_enabled(dev):
            self._compile()
        elif config.cpu_weight_prepack:
            self.prepacked = prepack_linears(self.model, b)

    # -- set-up -------------------------------------------------------------------------------

    def _compile(self):
        """Compile the per-frame shapes of the backbone and depth decoder (prefill stays eager:
        prompt lengths vary). Compile time is spent on the first frames, reported apart."""
        unpack_linears(self.model)
        self._backbone = torch.compile(self.model.backbone, dynamic=False)
        self._decoder = torch.compile(self.model.decoder, dynamic=False)

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    @property
    def active(self) -> list[Stream]:
        return [s for s in self.slots if s is not None]

    # -- admission ----------------------------------------------------------------------------

    @torch.inference_mode()
    def submit(self, request: GenerationRequest) -> Stream:
        """Prefill a validated request into a free slot. Raises EngineFull when none is free."""
        slot = next((i for i, s in enumerate(self.slots) if s is None), None)
        if slot is None:
            raise EngineFull(f"all {len(self.slots)} stream slots are busy")
        text = self.gen.prepare_text(request.text)  # spelled out before it is split at sentences
        stream = Stream(id=self._next_id, request=request, slot=slot,
                        segments=split_sentences(text, self.config.max_segment_chars),
                        metrics=StreamMetrics(device=str(self.device),  # load-time device fallbacks
                                              events=[e for e in self.gen.events if "falling back" in e]),
                        seed=draw_seed(request.seed), frames_left=request.max_frames,
                        guard=TailGuard(self.gen.tail, SAMPLE_RATE))
        stream.metrics.segments = len(stream.segments)
        self._next_id += 1
        self._start(stream)
        self.slots[slot] = stream
        self._last_stream = stream  # for callers that want its codes or metrics afterwards
        return stream

    def _start(self, stream: Stream):
        """Sampling settings, prompt and a fresh codec state for the stream's slot."""
        s, slot, req = self.sampling, stream.slot, stream.request
        s.temperature[slot] = req.temperature
        s.topk[slot] = min(req.topk, MIMI_CODES)
        s.seed[slot] = stream.seed
        s.frame[slot] = 0
        self._prefill_segment(stream)
        self.mimi.reset_streaming(self._slot_mask(slot))

    def _retry_empty(self, stream: Stream) -> bool:
        """The stream ended before any audio: try again, cooler and narrower, a few times."""
        if stream.retries >= MAX_EMPTY_RETRIES:
            return False
        stream.retries += 1
        stream.request, event = retry_request(stream.request, stream.retries)
        stream.frames_left = stream.request.max_frames
        stream.segment_index, stream.history = 0, []
        log.warning(event)
        stream.metrics.events.append(event)
        self._start(stream)
        return True

    def _slot_mask(self, slot: int) -> torch.Tensor:
        mask = torch.zeros(len(self.slots), dtype=torch.bool, device=self.device)
        mask[slot] = True
        return mask

    def _prefill_segment(self, stream: Stream):
        """Put the prompt of the stream's current segment into its cache row."""
        req = stream.request
        text = stream.segments[stream.segment_index]
        seg_req = GenerationRequest(text, req.speaker, req.context, req.max_audio_length_ms,
                                    req.temperature, req.topk, req.seed)
        reserve = stream.frames_left
        if len(stream.segments) > 1:
            # A segment may take twice its share (by characters) of the frames left, so one
            # sentence that never ends cannot starve the ones after it.
            left = stream.segments[stream.segment_index:]
            share = len(text) / sum(len(t) for t in left)
            reserve = min(reserve, max(25, math.ceil(2 * share * stream.frames_left)),
                          self.model.max_seq_len // 2)
        tokens, mask = self.gen.build_prompt(seg_req, reserve_frames=reserve, history=stream.history)
        h = self.model.prefill(tokens[None], mask[None], stream.slot)
        self.last_h[stream.slot] = h[0]
        self.pos[stream.slot] = tokens.shape[0]
        self.ended[stream.slot] = False
        stream.segment_frames = 0
        stream.segment_codes = []
        stream.segment_limit = min(reserve, self.model.max_seq_len - tokens.shape[0])

    def cancel(self, stream: Stream):
        """Free the stream's slot now (the caller stopped listening)."""
        stream.cancelled = stream.finished = True
        stream.metrics.finished = True
        stream.metrics.stop_reason = stream.metrics.stop_reason or "cancelled"
        if self.slots[stream.slot] is stream:
            self.slots[stream.slot] = None
            self.ended[stream.slot] = True

    # -- the frame step (graphed) ---------------------------------------------------------------

    def _frame_step(self, n: int) -> torch.Tensor:
        """Advance the first n slots by one frame. No host sync: graph-capturable per n."""
        m = self.model
        last_h, pos, ended, valid = self.last_h[:n], self.pos[:n], self.ended[:n], self.valid[:n]
        sampling = self.sampling.rows(n)
        codes = m.sample_frame(last_h, sampling, decoder=self._decoder)  # [n, 32]
        sampling.frame.add_(1)
        ended.logical_or_(is_eos(codes))
        valid.add_((~ended).long())
        last_h.copy_(m.backbone_step(codes, pos, backbone=self._backbone))
        pos.add_(1).clamp_(max=m.max_seq_len - 1)
        return codes

    def bucket(self, top: int) -> int:
        """Rows a step runs for slots 0..top-1: the smallest power of two covering them, capped
        at max_batch_size (one compiled shape and one CUDA graph per bucket)."""
        n = 1
        while n < top:
            n *= 2
        return min(n, len(self.slots))

    def _bucket(self) -> int:
        return self.bucket(max(s.slot for s in self.active) + 1)

    def _step_for(self, n: int) -> CUDAGraphed:
        if n not in self._steps:
            self._steps[n] = CUDAGraphed(lambda: self._frame_step(n), disable=self._graphs_off)
        return self._steps[n]

    # -- one chunk for everyone -----------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[ChunkEvent]:
        """Generate one chunk for every active stream; return their audio (one host sync)."""
        streams = self.active
        if not streams:
            return []
        t0 = time.perf_counter()
        first = any(s.metrics.chunks == 0 for s in streams)
        n = self.config.first_chunk_frames if first else self.config.chunk_frames
        n = max(1, min(n, max(s.segment_limit - s.segment_frames for s in streams)))
        rows = self.last_bucket = self._bucket()
        step = self._step_for(rows)
        self.valid.zero_()
        for f in range(n):
            self.codes_buf[:rows, f].copy_(step())
        valid = self.valid.tolist()  # the one sync of the chunk
        codes = self.codes_buf[:, :n]
        return self._emit(streams, codes, valid, n, t0)

    def _emit(self, streams, codes, valid, n, t0) -> list[ChunkEvent]:
        host_codes = codes.to("cpu", copy=True)  # codes_buf is rewritten by the next chunk
        counts = {}
        for s in streams:
            k = min(valid[s.slot], s.segment_limit - s.segment_frames, s.frames_left)
            counts[s.slot] = k
        audio = self._decode(codes, counts)
        now = time.perf_counter()
        events = []
        for s in streams:
            k = counts[s.slot]
            chunk_codes = host_codes[s.slot, :k]
            out, runaway = s.guard.feed(chunk_codes, audio[s.slot][: k * FRAME_SAMPLES])
            s.codes.append(chunk_codes)
            s.segment_codes.append(chunk_codes)
            s.segment_frames += k
            s.frames_left -= k
            ended = valid[s.slot] < n  # the end frame came in this chunk
            m = s.metrics
            m.frames += k
            m.chunks += 1
            m.audio_s += k * FRAME_MS / 1000
            gen_s = now - t0
            m.chunk_gen_ms.append(gen_s * 1000)
            m.chunk_rtf.append(gen_s / (k * FRAME_MS / 1000) if k else float("inf"))
            m.elapsed_s = now - m.started
            if m.first_audio_s is None and k:
                m.first_audio_s = m.elapsed_s
            m.peak_memory_mb = _peak_memory_mb(self.device)
            seg_done = ended or s.segment_frames >= s.segment_limit or s.frames_left <= 0
            if runaway:
                m.events.append(f"stopped early: {runaway}")
                log.info("stream %d stopped early: %s", s.id, runaway)
            elif seg_done and s.segment_index + 1 < len(s.segments) and s.frames_left > 0:
                self._next_segment(s)
                seg_done = False
            if seg_done and not runaway and m.frames == 0 and self._retry_empty(s):
                seg_done = False
            elif runaway or seg_done:
                s.finished = m.finished = True
                m.stop_reason = (f"runaway: {runaway}" if runaway else "end of speech" if ended
                                 else "max_audio_length_ms reached")
                out = s.guard.end(out)
                if m.frames == 0:
                    s.error = EmptyOutputError(s.retries + 1)
                self.slots[s.slot] = None
                self.ended[s.slot] = True
            events.append(ChunkEvent(s, out, s.finished, s.error))
        return events

    def _next_segment(self, s: Stream):
        """Long text: keep what was said as context and go on with the next sentence(s)."""
        seg_codes = torch.cat(s.segment_codes) if s.segment_codes else torch.zeros(0, 32, dtype=torch.long)
        text_t, text_m = self.gen._tokenize_text_segment(s.segments[s.segment_index], s.request.speaker)
        audio_t, audio_m = audio_prompt(seg_codes)
        s.history.append((torch.cat([text_t, audio_t]), torch.cat([text_m, audio_m])))
        s.segment_index += 1
        self._prefill_segment(s)

    def _decode(self, codes: torch.Tensor, counts: dict[int, int]) -> list[torch.Tensor]:
        """Mimi-decode the chunk for all slots in its streaming state -> per-slot CPU audio.

        Frames every stream keeps are decoded in one call for the whole batch; frames past a
        stream's end are decoded only for the streams that keep them (exec mask), so no stream's
        codec state sees frames it will not play.
        """
        b = len(self.slots)
        common = min(counts.values()) if counts else 0
        fb = self.config.frame_batch_size
        pieces: list[torch.Tensor] = []
        mask_all = torch.zeros(b, dtype=torch.bool, device=self.device)
        for slot in counts:
            mask_all[slot] = True
        self.mimi.set_exec_mask(mask_all)
        for start in range(0, common, fb):
            stop = min(start + fb, common)
            pieces.append(self.mimi.decode(codes[:, start:stop].transpose(1, 2)))
        for f in range(common, max(counts.values(), default=0)):
            mask = torch.zeros(b, dtype=torch.bool, device=self.device)
            for slot, k in counts.items():
                mask[slot] = k > f
            self.mimi.set_exec_mask(mask)
            pieces.append(self.mimi.decode(codes[:, f:f + 1].transpose(1, 2)))
        self.mimi.set_exec_mask(torch.ones(b, dtype=torch.bool, device=self.device))
        if not pieces:
            return [torch.zeros(0)] * b
        audio = torch.cat(pieces, dim=-1)[:, 0].float().cpu()  # [B, samples]
        return list(audio)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamRequest:
    """One request of `generate_streaming_batch` (the arguments of `generate_streaming`)."""

    text: str
    speaker: int = 0
    context: tuple = ()
    max_audio_length_ms: float = 90_000
    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None


class StreamingGenerator:
    """Streaming front of the engine, with the upstream Generator's API beside it."""

    def __init__(self, generator: Generator, config: StreamingConfig | None = None):
        self.config = config or StreamingConfig()
        self.generator = generator
        self.sample_rate = SAMPLE_RATE
        self.device = generator.device
        self.engine = StreamEngine(generator, self.config)
        self.metrics: StreamMetrics | None = None  # the last (or current) stream's metrics
        self._lock = threading.Lock()
        self.warmup_s = 0.0  # compile and CUDA-graph capture, apart from steady state

    @property
    def needs_warmup(self) -> bool:
        return self.config.compile_enabled(self.device) or self.config.cuda_graphs_enabled(self.device)

    def warmup(self, frames: int = 4, all_buckets: bool = False) -> float:
        """Run short throwaway streams so compilation and graph capture happen now, not in a
        request's latency: batch bucket 1, or every bucket (a server). Returns the seconds."""
        t = time.perf_counter()
        slots = len(self.engine.slots) if all_buckets else 1
        buckets = sorted({self.engine.bucket(top) for top in range(1, slots + 1)})
        with self._lock, torch.inference_mode():
            for n in buckets:
                streams = [self.engine.submit(validate_request(
                    "Warm up.", 0, max_audio_length_ms=frames * FRAME_MS, seed=i)) for i in range(n)]
                while any(not s.finished for s in streams):
                    self.engine.step()
                for s in streams:
                    if not s.finished:
                        self.engine.cancel(s)
        self.warmup_s = time.perf_counter() - t
        log.info("warm-up (compile / CUDA graphs) took %.1f s", self.warmup_s)
        return self.warmup_s

    # upstream API, for convenience: the plain reference loop
    def generate(self, *args, **kwargs) -> torch.Tensor:
        return self.generator.generate(*args, **kwargs)

    def generate_streaming(self, text: str, speaker: int = 0, context=(),
                           max_audio_length_ms: float = 90_000, temperature: float = 0.9,
                           topk: int = 50, seed: int | None = None,
                           play_audio: bool = False) -> Iterator[torch.Tensor]:
        """Yield 1-D float32 audio chunks at 24 kHz while the speech is generated.

        Arguments are checked here, before anything runs; a bad one raises ValueError.
        play_audio=True also plays the chunks on the default output device as they come.
        """
        req = validate_request(text, speaker, context, max_audio_length_ms, temperature, topk, seed)
        chunks = self._marked(self._stream_one(req))
        if not play_audio:
            return chunks
        from playback import play_stream

        return play_stream(chunks, self.sample_rate, rtf_hint=self.config.rtf_target)

    @property
    def watermarked(self) -> bool:
        return self.generator._watermarker is not None

    def _marked(self, chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The watermark stage of a stream (see watermarking.StreamMarker), when enabled."""
        if not self.watermarked:
            return chunks
        from watermarking import mark_chunks

        return mark_chunks(chunks, self.generator._watermarker, self.generator._watermark_key,
                           self.sample_rate, self.config.watermark_window_ms)

    def _stream_one(self, req: GenerationRequest) -> Iterator[torch.Tensor]:
        with self._lock:  # one thread drives the engine; a second caller waits its turn
            sent = False
            try:
                stream = self.engine.submit(req)
                self.metrics = stream.metrics
                while not stream.finished:
                    for ev in self.engine.step():
                        if ev.stream is not stream:
                            continue
                        if ev.error is not None:
                            raise ev.error
                        if ev.audio.numel():
                            sent = True
                            yield ev.audio
            except torch.OutOfMemoryError:
                if sent or not self.generator.allow_cpu_fallback or self.device.type == "cpu":
                    raise
                self._fall_back_to_cpu()
                yield from self._stream_one(req)
            finally:
                if self.metrics is not None and not self.metrics.finished and self.engine.active:
                    for s in self.engine.active:  # the caller stopped early: free the slot
                        if s.metrics is self.metrics:
                            self.engine.cancel(s)

    def _fall_back_to_cpu(self):
        self.generator.note(f"out of memory on {self.device}: falling back to the CPU (allow_cpu_fallback)")
        self.generator.to_device(torch.device("cpu"))
        self.device = self.generator.device
        self.engine = StreamEngine(self.generator, self.config)

    def generate_streaming_batch(self, requests: Iterable[StreamRequest | dict]
                                 ) -> Iterator[tuple[int, torch.Tensor]]:
        """Advance many requests together, one batched frame step for all; yield
        (request index, audio chunk) as chunks come. More requests than slots wait for a free
        slot and join at the next chunk."""
        reqs = []
        for r in requests:
            r = StreamRequest(**r) if isinstance(r, dict) else r
            reqs.append(validate_request(r.text, r.speaker, r.context, r.max_audio_length_ms,
                                         r.temperature, r.topk, r.seed))
        markers = {}
        if self.watermarked:
            from watermarking import StreamMarker

            markers = {i: StreamMarker(self.generator._watermarker, self.generator._watermark_key,
                                       self.sample_rate, self.config.watermark_window_ms)
                       for i in range(len(reqs))}
        with self._lock:
            waiting = list(enumerate(reqs))
            index_of: dict[int, int] = {}
            live: list[Stream] = []
            try:
                while waiting or live:
                    while waiting and self.engine.free_slots:
                        i, req = waiting.pop(0)
                        s = self.engine.submit(req)
                        index_of[s.id] = i
                        live.append(s)
                    for ev in self.engine.step():
                        i = index_of[ev.stream.id]
                        if ev.error is not None:
                            raise ev.error
                        out = [ev.audio] if not markers else markers[i].feed(ev.audio)
                        if ev.finished:
                            live.remove(ev.stream)
                            out += markers[i].flush() if markers else []
                        for audio in out:
                            if audio.numel():
                                yield i, audio
            finally:
                for s in live:
                    self.engine.cancel(s)


def load_streaming_csm_1b(device: str = "auto", config: StreamingConfig | None = None,
                          model: str = DEFAULT_REPO, mimi: str | None = None, dtype=None,
                          watermark: bool = True, watermark_key=None, allow_cpu_fallback: bool = False,
                          normalize: bool = True) -> StreamingGenerator:
    """Load CSM-1B (same `model` values as `load_csm_1b`, `random:*` included) for streaming."""
    config = config or StreamingConfig()
    gen = load_csm_1b(device=device, model=model, mimi=mimi, dtype=dtype, watermark=watermark,
                      watermark_key=watermark_key, allow_cpu_fallback=allow_cpu_fallback,
                      normalize=normalize)
    sg = StreamingGenerator(gen, config)
    if sg.needs_warmup:  # compiled / graphed: pay for it here, not in the first audio
        sg.warmup()
    return sg
