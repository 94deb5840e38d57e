"""Continuous batching for the server: one engine thread, many streams, one frame step.

Only the engine thread touches the model. Requests wait in a bounded queue; at every chunk the
thread admits waiting requests into free slots (prefill), drops cancelled streams, and runs one
`StreamEngine.step()` for all active streams. Chunks go back to each request's asyncio queue
with `call_soon_threadsafe`, so the event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from generator import GenerationRequest
from streaming_generator import StreamingGenerator, StreamMetrics

log = logging.getLogger("csm.scheduler")

_END = object()


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit: retry later."""


@dataclass
class Ticket:
    """A request's handle: its chunks arrive on `queue`; `cancel()` frees its slot."""

    id: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    metrics: StreamMetrics | None = None
    submitted: float = field(default_factory=time.perf_counter)
    stream: object = None  # the engine's Stream, set by the engine thread

    def cancel(self):
        self.cancelled.set()

    async def chunks(self):
        """Yield the audio chunks (1-D float32 tensors); raises what the engine raised."""
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()


class Histogram:
    def __init__(self, buckets):
        self.buckets = list(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float):
        self.total += 1
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1


class Metrics:
    """Counters and histograms, written by the engine thread and the handlers; read as text."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # (route, status) -> n
        self.rejected = 0
        self.cancelled = 0
        self.fallbacks = collections.Counter()  # kind -> n
        self.rtf = Histogram([0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 50.0])
        self.ttfa = Histogram([0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0])

    def count_request(self, route: str, status: int):
        with self.lock:
            self.requests[(route, status)] += 1

    def render(self, active: int, queued: int, slots: int) -> str:
        with self.lock:
            lines = ["# HELP csm_requests_total Requests by route and HTTP status.",
                     "# TYPE csm_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'csm_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += ["# TYPE csm_rejected_total counter", f"csm_rejected_total {self.rejected}",
                      "# TYPE csm_cancelled_total counter", f"csm_cancelled_total {self.cancelled}",
                      "# TYPE csm_fallbacks_total counter"]
            for kind, n in sorted(self.fallbacks.items()):
                lines.append(f'csm_fallbacks_total{{kind="{kind}"}} {n}')
            lines += ["# TYPE csm_active_streams gauge", f"csm_active_streams {active}",
                      "# TYPE csm_queue_depth gauge", f"csm_queue_depth {queued}",
                      "# TYPE csm_stream_slots gauge", f"csm_stream_slots {slots}"]
            for name, h, help_ in (("csm_rtf", self.rtf, "Real-time factor of finished streams."),
                                   ("csm_time_to_first_audio_seconds", self.ttfa,
                                    "From request to first audio chunk.")):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
                for b, c in zip(h.buckets, h.counts):
                    lines.append(f'{name}_bucket{{le="{b}"}} {c}')
                lines += [f'{name}_bucket{{le="+Inf"}} {h.total}', f"{name}_sum {h.sum:.6f}",
                          f"{name}_count {h.total}"]
        return "\n".join(lines) + "\n"


class Scheduler:
    def __init__(self, generator: StreamingGenerator, max_queue: int = 32):
        self.generator = generator
        self.engine = generator.engine
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._pending: collections.deque[Ticket] = collections.deque()
        self._live: dict[int, Ticket] = {}  # engine stream id -> ticket
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_id = 0
        self.max_active = self.slots  # lowered when the device runs out of memory
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)

    # -- called from the event loop ---------------------------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout: float = 10):
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def slots(self) -> int:
        return len(self.engine.slots)

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Ticket:
        """Queue a validated request. Raises QueueFull when slots and queue are all taken."""
        with self._lock:
            free = self.slots - len(self._live)
            if len(self._pending) >= self.max_queue + max(0, free):
                self.metrics.rejected += 1
                raise QueueFull(f"{self.slots} streams are running and {len(self._pending)} "
                                "are waiting: retry in a few seconds")
            ticket = Ticket(self._next_id, request, loop)
            self._next_id += 1
            self._pending.append(ticket)
        self._wake.set()
        return ticket

    def retry_after_s(self) -> int:
        """A hint for Retry-After: about one typical stream's length."""
        return 2

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self):
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._admit()
                self._drop_cancelled()
                if not self.engine.active:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                events = self.engine.step()
            except torch.OutOfMemoryError:
                self._narrow()
                continue
            except Exception as e:  # the device failed under every stream: tell them all
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for ev in events:
                ticket = self._live.get(ev.stream.id)
                if ticket is None:
                    continue
                if ev.audio.numel():
                    ticket._put(ev.audio)
                if ev.finished:
                    self._finish(ticket, ev.error)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _narrow(self):
        """Out of device memory: keep the older half of the streams, requeue the newer ones that
        sent nothing yet (the others are told to retry), and admit fewer from now on."""
        live = sorted(self._live.values(), key=lambda t: t.id)
        keep = len(live) // 2
        self.max_active = max(1, keep)
        with self.metrics.lock:
            self.metrics.fallbacks["oom_narrowed_batch"] += 1
        log.warning("out of device memory with %d streams: narrowing to %d", len(live), self.max_active)
        requeue = []
        for t in live[keep:]:
            self.engine.cancel(t.stream)
            del self._live[t.stream.id]
            if t.metrics.frames == 0:
                requeue.append(t)
            else:
                t._put(MemoryError("the server ran out of device memory mid-stream; retry the request"))
        with self._lock:
            self._pending.extendleft(reversed(requeue))

    def _admit(self):
        while self.engine.free_slots and len(self._live) < self.max_active:
            with self._lock:
                if not self._pending:
                    return
                ticket = self._pending.popleft()
            if ticket.cancelled.is_set():
                self.metrics.cancelled += 1
                ticket._put(_END)
                continue
            try:
                stream = self.engine.submit(ticket.request)
            except Exception as e:  # a prompt that does not fit, unreadable context audio...
                ticket._put(e)
                continue
            stream.metrics.started = ticket.submitted  # first audio counts from the request
            ticket.stream, ticket.metrics = stream, stream.metrics
            self._live[stream.id] = ticket

    def _drop_cancelled(self):
        for sid, ticket in list(self._live.items()):
            if ticket.cancelled.is_set():
                self.engine.cancel(ticket.stream)
                del self._live[sid]
                self.metrics.cancelled += 1
                ticket._put(_END)

    def _finish(self, ticket: Ticket, error: Exception | None = None):
        del self._live[ticket.stream.id]
        m = ticket.metrics
        with self.metrics.lock:
            if m.audio_s:
                self.metrics.rtf.observe(m.rtf)
            if m.first_audio_s is not None:
                self.metrics.ttfa.observe(m.first_audio_s)
            for event in m.events:
                if event.startswith("no audio"):
                    self.metrics.fallbacks["empty_output_retry"] += 1
                elif event.startswith("stopped early"):
                    self.metrics.fallbacks["runaway_stopped"] += 1
        ticket._put(error if error is not None else _END)

    def _fail_all(self, error: Exception):
        for sid, ticket in list(self._live.items()):
            self.engine.cancel(ticket.stream)
            ticket._put(error)
        self._live.clear()
        with self._lock:
            pending, self._pending = list(self._pending), collections.deque()
        for ticket in pending:
            ticket._put(error)
