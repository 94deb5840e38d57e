"""The fast path: streaming, batched, compiled and CUDA-graphed CSM generation.

    gen = load_streaming_csm_1b(device="auto")
    for chunk in gen.generate_streaming("Hello there.", speaker=0):
        ...  # 1-D float32 tensors at 24 kHz, the first one after a few frames

`StreamingGenerator` drives a `StreamEngine` (stream_engine.py) from the caller's thread: one
call at a time (a second caller waits for the first stream to end), the upstream Generator's API
beside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from csm_streaming.audio import FRAME_MS, SAMPLE_RATE
from csm_streaming.engine.admission import check_segments
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.reference import Generator
from csm_streaming.engine.scheduler import StreamEngine
from csm_streaming.engine.slots import ChunkEvent, Stream
from csm_streaming.engine.text_feed import TextFeed
from csm_streaming.metrics import StreamMetrics
from csm_streaming.request import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, GenerationRequest

log = logging.getLogger("csm.streaming")


class StreamingGenerator:
    """Streaming front of the engine, with the upstream Generator's API beside it."""

    def __init__(self, generator: Generator, config: StreamingConfig | None = None):
        self.config = config or StreamingConfig()
        self.generator = generator
        self.sample_rate = SAMPLE_RATE
        self.engine = StreamEngine(generator, self.config)
        self.metrics: StreamMetrics | None = None  # the last (or current) stream's metrics
        self._lock = threading.Lock()
        self.warmup_s = 0.0  # compile and CUDA-graph capture, apart from steady state
        self.warmup_buckets: dict[int, dict] = {}  # per batch bucket: seconds, graph capture

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def needs_warmup(self) -> bool:
        return self.config.compile_enabled(self.device) or self.config.cuda_graphs_enabled(
            self.device
        )

    @property
    def watermarked(self) -> bool:
        return self.generator.watermarker is not None

    def warmup(self, frames: int = 4, all_buckets: bool = False) -> float:
        """Run short throwaway streams so compilation and graph capture happen now, not in a
        request's latency: batch bucket 1, or every bucket (a server). Returns the seconds."""
        t = time.perf_counter()
        buckets = self.engine.buckets if all_buckets else [1]
        with self._lock, torch.inference_mode():
            for n in buckets:
                t_bucket = time.perf_counter()
                streams = [self.engine.submit(GenerationRequest.of(
                    "Warm up.", max_audio_length_ms=frames * FRAME_MS, seed=i)) for i in range(n)]
                while any(not s.finished for s in streams):
                    self.engine.step()
                step = self.engine.step_fn(n)
                self.warmup_buckets[n] = {"seconds": time.perf_counter() - t_bucket,
                                          "graph_capture_s": step.capture_s}
                log.info("warm-up of batch bucket %d: %.1f s (of which CUDA graph capture "
                         "%.2f s)", n, self.warmup_buckets[n]["seconds"], step.capture_s)
        self.warmup_s = time.perf_counter() - t
        log.info("warm-up (compile / CUDA graphs) took %.1f s", self.warmup_s)
        return self.warmup_s

    # upstream API, for convenience: the plain reference loop
    def generate(self, *args, **kwargs) -> torch.Tensor:
        return self.generator.generate(*args, **kwargs)

    def generate_streaming(
        self,
        text: str | list[str],
        speaker: int = 0,
        context=(),
        max_audio_length_ms: float | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
        topk: int = DEFAULT_TOP_K,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield 1-D float32 audio chunks at 24 kHz while the speech is generated (upstream's
        arguments, `topk` spelled as upstream spells it; `stream` takes a GenerationRequest).

        text: a string (long ones are cut at sentence ends) or a list of segments to speak in
        order, each conditioned on the ones before. Arguments are checked here, before anything
        runs; a bad one raises ValueError. To hear it as it comes:
        `csm_streaming.client.playback.play_stream(gen.generate_streaming(...))`.
        """
        segments = [text] if isinstance(text, str) else list(text)
        if not segments or not all(isinstance(t, str) and t.strip() for t in segments):
            raise ValueError("text must be a non-empty string or a list of non-empty strings")
        req = self.generator.upstream_request(" ".join(segments), speaker, context,
                                              max_audio_length_ms, temperature, topk, seed)
        if isinstance(text, str):
            return self.stream(req)
        feed = TextFeed([" ".join(self.generator.prepare_text(t).split()) for t in segments],
                        segmented=True)
        check_segments(self.generator, feed.known, req, self.engine.window, segmented=True)
        return self.stream(req, feed)

    def stream(
        self, req: GenerationRequest, feed: TextFeed | None = None
    ) -> Iterator[torch.Tensor]:
        """The chunks of one request, watermarked when enabled. feed: its text as it comes (an
        open TextFeed for an LLM's reply); default: the request's text at sentence ends, each
        segment checked to fit the window now (a ValueError before anything runs)."""
        req = self.generator.complete(req)
        if feed is None:
            feed = TextFeed(self.engine.plan(req))
        chunks = self._chunks(req, feed)
        if not self.watermarked:
            return chunks
        return self.generator.watermarker.mark_chunks(
            chunks, self.config.watermark_window_ms,
            on_mark=lambda s: self.metrics.add_stage("watermark", s))

    def _chunks(self, req: GenerationRequest, feed: TextFeed | None) -> Iterator[torch.Tensor]:
        with self._lock:  # one thread drives the engine; a second caller waits its turn
            while True:
                sent, stream = False, None
                try:
                    stream = self.engine.submit(req, feed)
                    self.metrics = stream.metrics
                    while not stream.finished:
                        for ev in self._step():
                            if ev.stream is not stream:
                                continue
                            if ev.audio.numel():
                                sent = True
                                yield ev.audio
                            if ev.error is not None:
                                raise ev.error
                    return
                except torch.OutOfMemoryError:
                    if sent or not self._can_fall_back():
                        raise
                    self._fall_back_to_cpu()  # and try again there, from the start
                finally:
                    if stream is not None and not stream.finished:  # the caller stopped early
                        self.engine.cancel(stream)

    def _step(self) -> list[ChunkEvent]:
        events = self.engine.step()
        if not events and self.engine.idle:  # waiting for an LLM's next words
            self.engine.wait(0.05)
        return events

    def _can_fall_back(self) -> bool:
        return self.generator.allow_cpu_fallback and self.device.type != "cpu"

    def _fall_back_to_cpu(self):
        self.generator.fall_back_to_cpu()
        self.engine = StreamEngine(self.generator, self.config)

    def generate_streaming_batch(self, requests: Iterable[GenerationRequest | dict]
                                 ) -> Iterator[tuple[int, torch.Tensor]]:
        """Advance many requests together, one batched frame step for all; yield
        (request index, audio chunk) as chunks come. More requests than slots wait for a free
        slot and join at the next chunk."""
        reqs = [self.generator.complete(GenerationRequest.of(**r) if isinstance(r, dict) else r)
                for r in requests]
        feeds = [TextFeed(self.engine.plan(r)) for r in reqs]
        markers = {}
        if self.watermarked:
            markers = {i: self.generator.watermarker.stream_marker(self.config.watermark_window_ms)
                       for i in range(len(reqs))}
        with self._lock:
            waiting = list(range(len(reqs)))
            index_of: dict[int, int] = {}
            live: list[Stream] = []
            try:
                while waiting or live:
                    while waiting and self.engine.free_slots:
                        i = waiting.pop(0)
                        s = self.engine.submit(reqs[i], feeds[i])
                        index_of[s.id] = i
                        live.append(s)
                    for ev in self._step():
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
