"""Continuous batching for the server: one engine thread, many streams, one frame step.

Only the engine thread touches the model. Requests wait in a bounded queue; at every chunk the
thread admits waiting requests into free slots, drops cancelled streams, and runs one
`StreamEngine.step()` for all (prompt work for new streams is done there in bounded units).
Chunks go back to each request's asyncio queue with `call_soon_threadsafe`, so the event loop
never waits on the model. A failure that belongs to one request ends that request alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.scheduler import StreamEngine
from csm_streaming.engine.text_feed import TextFeed
from csm_streaming.metrics import OOM_NARROWED, ServerMetrics, StreamMetrics
from csm_streaming.request import GenerationRequest

log = logging.getLogger("csm.engine_thread")

_END = object()
MAX_REQUEUES = 1  # a request put back after an out-of-memory; the next time it is refused


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit: retry later."""


class ShuttingDown(QueueFull):
    """The server is stopping: no new stream, and the running ones end at the grace period."""


class OutOfMemory(MemoryError):
    """The device ran out of memory for this stream; retrying later may work."""


@dataclass
class Ticket:
    """A request's handle: its chunks arrive on `queue`; `cancel()` frees its slot."""

    id: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    feed: TextFeed | None = None  # its text as it comes (chat), else the request's text
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    metrics: StreamMetrics | None = None
    submitted: float = field(default_factory=time.perf_counter)
    stream: object = None  # the engine's Stream, set by the engine thread
    requeues: int = 0

    def cancel(self):
        self.cancelled.set()

    async def chunks(self):
        """Yield the audio chunks (1-D float32 tensors); raises what ended the stream early."""
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


class EngineThread:
    def __init__(self, generator: StreamingGenerator, max_queue: int = 32,
                 replica: str | None = None):
        self.generator = generator
        self.max_queue = max_queue
        self.metrics = ServerMetrics(lambda: (self.active, self.queued, self.slots), replica)
        self._pending: collections.deque[Ticket] = collections.deque()
        self._live: dict[int, Ticket] = {}  # engine stream id -> ticket
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._next_id = 0
        self.draining = False  # shutting down: admits nothing new
        self.max_active = self.slots  # lowered when the device runs out of memory
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)

    @property
    def engine(self) -> StreamEngine:
        return self.generator.engine  # always the current one (a CPU fallback replaces it)

    # -- called from the event loop ---------------------------------------------------------------

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout: float = 10):
        self._stop.set()
        self.engine.wake()
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

    def enqueue(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
               feed: TextFeed | None = None) -> Ticket:
        """Queue a validated request. Raises QueueFull when slots and queue are all taken."""
        with self._lock:
            if self.draining:
                raise ShuttingDown("the server is shutting down: retry in a moment (another "
                                   "replica, or this one once it is back)")
            free = self.slots - len(self._live)
            if len(self._pending) >= self.max_queue + max(0, free):
                self.metrics.rejected.inc()
                raise QueueFull(f"{self.slots} streams are running and {len(self._pending)} "
                                "are waiting: retry in a few seconds")
            ticket = Ticket(self._next_id, request, loop, feed)
            self._next_id += 1
            self._pending.append(ticket)
        self.engine.wake()
        return ticket

    def drain(self):
        """Admit nothing new; running and waiting streams go on (until end_all)."""
        self.draining = True

    def end_all(self, reason: str) -> int:
        """End every running and waiting stream now, each with `reason` as its error (never a
        clean end); returns how many were ended."""
        with self._lock:
            tickets = list(self._pending) + list(self._live.values())
        for ticket in tickets:
            ticket._put(ShuttingDown(reason))
            ticket.cancel()
        self.engine.wake()
        return len(tickets)

    def retry_after_s(self) -> int:
        """A hint for Retry-After: about one typical stream's length."""
        return 2

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self):
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._admit()
                self._drop_cancelled()
                events = self.engine.step() if self._live else []
                if not events and self.engine.idle:
                    self.engine.wait(0.05)
            except torch.OutOfMemoryError:
                self._narrow()
                continue
            except Exception as e:  # the shared step itself failed: no stream can go on
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
        sent nothing yet (once; the others are told to retry), and admit fewer from now on. A
        lone stream that does not fit is refused: nothing smaller can be tried."""
        live = sorted(self._live.values(), key=lambda t: t.id)
        keep = len(live) // 2
        self.max_active = max(1, keep)
        self.metrics.count_event(OOM_NARROWED)
        log.warning(
            "out of device memory with %d streams: narrowing to %d", len(live), self.max_active
        )
        requeue = []
        for t in live[keep:]:
            self.engine.cancel(t.stream)
            del self._live[t.stream.id]
            if len(live) > 1 and t.metrics.frames == 0 and t.requeues < MAX_REQUEUES:
                t.requeues += 1
                requeue.append(t)
            else:
                t._put(OutOfMemory("the server ran out of device memory for this stream; retry "
                                   "later, with a shorter text or less context"))
        with self._lock:
            self._pending.extendleft(reversed(requeue))

    def _admit(self):
        while self.engine.free_slots and len(self._live) < self.max_active:
            with self._lock:
                if not self._pending:
                    return
                ticket = self._pending.popleft()
            if ticket.cancelled.is_set():
                self.metrics.cancelled.inc()
                ticket._put(_END)
                continue
            try:
                stream = self.engine.submit(ticket.request, ticket.feed)
            except Exception as e:  # this request's own problem (a segment too long...)
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
                self.metrics.cancelled.inc()
                ticket._put(_END)

    def _finish(self, ticket: Ticket, error: BaseException | None = None):
        del self._live[ticket.stream.id]
        m = ticket.metrics
        if m.audio_s:
            self.metrics.rtf.observe(m.rtf)
        if m.first_audio_s is not None:
            self.metrics.ttfa.observe(m.first_audio_s)
        for event in m.events:
            self.metrics.count_event(event.kind)
        ticket._put(error if error is not None else _END)

    def _fail_all(self, error: Exception):
        for ticket in list(self._live.values()):
            self.engine.cancel(ticket.stream)
            ticket._put(error)
        self._live.clear()
        with self._lock:
            pending, self._pending = list(self._pending), collections.deque()
        for ticket in pending:
            ticket._put(error)
