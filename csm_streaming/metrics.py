"""What is measured: per-stream numbers, events (fallbacks, retries, early stops), server metrics.

No torch here: the dashboard, the remote client and the server read these. `StreamMetrics` is
filled by the engine thread for one stream; `ServerMetrics` holds the server's Prometheus
counters and histograms in a registry of its own (prometheus_client), so two servers in one
process (tests, Ray replicas) never mix their numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

# Event kinds: what went differently from the plain path, said in the log, listed per stream and
# counted by the server.
DEVICE_FALLBACK = "device_fallback"  # the device failed or ran out of memory: moved to the CPU
EMPTY_RETRY = "empty_output_retry"  # the model ended before any audio: tried again, cooler
RUNAWAY_STOP = "runaway_stopped"  # silence or a stuck frame after speech: stopped early
OOM_NARROWED = "oom_narrowed_batch"  # the server kept fewer streams after running out of memory


def peak_memory_mb(device) -> float:
    """The process's peak memory: the device's on CUDA, else the resident set (Linux)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Linux: KiB

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class Event:
    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


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
    events: list[Event] = field(default_factory=list)
    # seconds spent per stage: "model" (frame steps), "mimi" (decode), "watermark"
    stage_s: dict[str, float] = field(default_factory=dict)

    def add_stage(self, stage: str, seconds: float):
        self.stage_s[stage] = self.stage_s.get(stage, 0.0) + seconds

    def stages_line(self) -> str:
        """Each stage's cost, e.g. 'model 0.45 s, mimi 0.50 s per second of audio'."""
        if not self.audio_s or not self.stage_s:
            return ""
        parts = [f"{k} {v / self.audio_s:.2f} s" for k, v in self.stage_s.items()]
        return ", ".join(parts) + " per second of audio"

    @property
    def rtf(self) -> float:
        """Generation time over audio time, overall: below 1 is faster than real time."""
        return self.elapsed_s / self.audio_s if self.audio_s else math.inf

    @property
    def rtf_now(self) -> float:
        return self.chunk_rtf[-1] if self.chunk_rtf else math.inf

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s else 0.0

    def record_chunk(self, frames: int, frame_ms: int, gen_s: float, now: float):
        """A chunk of `frames` frames came out after `gen_s` seconds of generation."""
        audio_s = frames * frame_ms / 1000
        self.frames += frames
        self.chunks += 1
        self.audio_s += audio_s
        self.chunk_gen_ms.append(gen_s * 1000)
        self.chunk_rtf.append(gen_s / audio_s if frames else math.inf)
        self.elapsed_s = now - self.started
        if self.first_audio_s is None and frames:
            self.first_audio_s = self.elapsed_s

    def as_dict(self) -> dict:
        return {"device": self.device, "time_to_first_audio_ms": _ms(self.first_audio_s),
                "elapsed_ms": self.elapsed_s * 1000, "audio_ms": self.audio_s * 1000,
                "rtf": self.rtf if self.audio_s else None, "frames": self.frames,
                "frames_per_s": self.frames_per_s, "chunks": self.chunks,
                "chunk_gen_ms": list(self.chunk_gen_ms), "peak_memory_mb": self.peak_memory_mb,
                "segments": self.segments, "stop_reason": self.stop_reason,
                "events": [e.text for e in self.events]}


def _ms(s):
    return None if s is None else s * 1000


# ---------------------------------------------------------------------------------------------
# The server's metrics
# ---------------------------------------------------------------------------------------------

RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 50.0)
SECONDS_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Prometheus counters, histograms and gauges of one server (its own registry).

    `state` returns (active streams, queued requests, slots) when the gauges are read.
    `replica`: a label value added to every series (several engines behind one front).
    """

    def __init__(self, state=lambda: (0, 0, 0), replica: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)
        extra = ["replica"] if replica is not None else []
        self._replica = {"replica": replica} if replica is not None else {}

        def labelled(metric):
            return metric.labels(**self._replica) if extra else metric

        self._requests = Counter("csm_requests", "Requests by route template and outcome.",
                                 ["route", "status", *extra], registry=r)
        self.rejected = labelled(Counter("csm_rejected", "Requests refused: slots and queue full.",
                                         extra, registry=r))
        self.cancelled = labelled(
            Counter("csm_cancelled", "Streams the client left before the end.", extra, registry=r)
        )
        self._fallbacks = Counter("csm_fallbacks", "Fallbacks, retries and early stops by kind.",
                                  ["kind", *extra], registry=r)
        self.rtf = labelled(Histogram("csm_rtf", "Real-time factor of finished streams.", extra,
                                      buckets=RTF_BUCKETS, registry=r))
        self.ttfa = labelled(Histogram("csm_time_to_first_audio_seconds",
                                       "From request to first audio chunk.", extra,
                                       buckets=SECONDS_BUCKETS, registry=r))
        self.llm_wait = labelled(Histogram("csm_chat_llm_wait_seconds",
                                           "Chat: from the user's message to the first speakable "
                                           "text from the LLM.", extra, buckets=SECONDS_BUCKETS,
                                           registry=r))
        for i, (name, doc) in enumerate((("csm_active_streams", "Streams generating now."),
                                         ("csm_queue_depth", "Requests waiting for a slot."),
                                         ("csm_stream_slots", "Streams the engine can hold."))):
            gauge = labelled(Gauge(name, doc, extra, registry=r))
            gauge.set_function(lambda i=i: float(state()[i]))

    def count_request(self, route: str, status: int | str):
        self._requests.labels(route=route, status=str(status), **self._replica).inc()

    def count_event(self, kind: str):
        self._fallbacks.labels(kind=kind, **self._replica).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
