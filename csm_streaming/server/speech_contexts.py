"""Streaming-input contexts: a voice agent's LLM writes, CSM speaks, one socket for the call.

The engine under the Cartesia- and ElevenLabs-compatible sockets (cartesia_routes.py,
elevenlabs_routes.py translate messages; nothing here knows either protocol).

A `SpeechContext` is one utterance whose text arrives in pieces. Its text is cut into phrases
as soon as a sentence or clause is complete (engine/segmenting.TextChunker), at a flush, at the
end, or when text has waited `max_buffer_delay_ms`. Its phrases are one engine stream with an
open TextFeed, as a chat reply is: each phrase is conditioned on the context's earlier phrases
(one voice, no gap between them), and the stream shares the batched engine, the queue, the
limits and the metrics with every other client. `cancel` frees its slot at the next chunk and
nothing more is sent for it.

Word timings (`WordTimes`): each phrase's span in the audio is exact (the engine records the
frame at which each phrase ended). Inside a phrase, by default, its duration is shared over its
words in proportion to their length (characters + 1): an estimate, whose word edges can be off
by a few hundred milliseconds inside a long phrase, never across phrases. With an aligner
(`csm-server --word-aligner`, engine/word_align.py) each phrase's audio is aligned to its words
by a CTC recogniser instead: the words' edges where it hears them, to a 20 ms step; a phrase it
cannot align (too short, no letter) keeps the estimate. Either way they are sent once the
phrase's audio has been made (faster than real time: before it has been played).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from csm_streaming.audio import FRAME_MS, SAMPLE_RATE, pcm16
from csm_streaming.engine.segmenting import TextChunker
from csm_streaming.engine.text_feed import TextFeed
from csm_streaming.engine.word_align import share_span
from csm_streaming.request import SamplingParams
from csm_streaming.server.api import ApiError, RequestDraft, shape_error

log = logging.getLogger("csm.server")
MAX_CONTEXTS_PER_SOCKET = 8  # open contexts on one socket; one more is an error for it alone
DEFAULT_BUFFER_DELAY_MS = 3000  # Cartesia's default max_buffer_delay_ms
MAX_BUFFER_DELAY_MS = 5000


@dataclass(frozen=True)
class WordTimes:
    """One phrase's words as the client sent them, with start and end in seconds from the
    context's first sample; the phrase's own span (its words lie within it, gaps between them
    where an aligner heard pauses) and whether they were aligned or estimated."""

    words: list[str]
    start: list[float]
    end: list[float]
    phrase: tuple[float, float] = (0.0, 0.0)
    aligned: bool = False


def word_times(text: str, start_s: float, end_s: float) -> WordTimes:
    """The estimate: a phrase's words over [start_s, end_s], each a share of it as long as the
    word (plus the space after it): every word once, in order, start < end, within the span."""
    words = text.split()
    if not words or end_s <= start_s:
        return WordTimes([], [], [])
    spans = share_span(words, start_s, end_s)
    return WordTimes(words, [round(a, 4) for a, _ in spans], [round(b, 4) for _, b in spans],
                     (start_s, end_s))


def aligned_word_times(aligner, text: str, audio: np.ndarray, start_s: float,
                       end_s: float) -> WordTimes:
    """A phrase's words where `aligner` (word_align.CtcAligner) hears them in `audio` (the
    phrase's samples, from start_s to end_s); the estimate where it cannot align them."""
    words = text.split()
    spans = aligner.align(words, audio) if words and end_s > start_s else None
    if spans is not None:
        start = [round(min(start_s + a, end_s), 4) for a, _ in spans]
        end = [round(min(start_s + b, end_s), 4) for _, b in spans]
        if all(a < b for a, b in zip(start, end)):
            return WordTimes(words, start, end, (start_s, end_s), aligned=True)
    return word_times(text, start_s, end_s)


class HeardAudio:
    """A context's audio (24 kHz) from the first phrase whose words are not yet timed: what an
    aligner reads. `take(a, b)` hands out samples a..b and forgets those before b."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.first = 0  # the sample number of chunks[0][0]

    def add(self, chunk: np.ndarray):
        self.chunks.append(chunk)

    def take(self, a: int, b: int) -> np.ndarray:
        kept = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        out = kept[max(0, a - self.first):max(0, b - self.first)]
        self.chunks, self.first = [kept[max(0, b - self.first):]], max(b, self.first)
        return out


class AudioOut:
    """A context's 24 kHz float chunks -> the client's format: raw PCM (s16le or f32le) at any
    rate 8-48 kHz, resampled as a stream (no click between chunks), or compressed (mp3)."""

    def __init__(self, encoding: str, rate: int, bit_rate: int | None = None):
        if not 8000 <= rate <= 48000:
            raise ApiError(400, f"sample rate {rate} is not supported: use 8000..48000 Hz")
        if encoding not in ("pcm_s16le", "pcm_f32le", "mp3"):
            raise ApiError(400, f"encoding {encoding!r} is not supported: use pcm_s16le, "
                                "pcm_f32le or mp3")
        self.encoding, self.rate = encoding, rate
        self.content_type = "audio/mpeg" if encoding == "mp3" else "audio/pcm"
        self._resampler = self._encoder = None
        if encoding == "mp3":
            from csm_streaming.server.encode import StreamEncoder

            self._encoder = StreamEncoder("mp3", rate=rate, bit_rate=bit_rate)
        elif rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(SAMPLE_RATE, rate, 1, dtype="float32")

    def feed(self, chunk, last: bool = False) -> bytes:
        x = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self._encoder is not None:
            return self._encoder.feed(x) + (self._encoder.finish() if last else b"")
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=last)
        return x.astype("<f4").tobytes() if self.encoding == "pcm_f32le" else pcm16(x)


async def speak_over_http(request, text, voice, out: AudioOut):
    """A whole text in one request (Cartesia's /tts/bytes, ElevenLabs' /text-to-speech): the
    same request, queue and limits as every route; the audio in the client's format as it is
    made, and the stream cancelled when the client leaves."""
    from fastapi.responses import StreamingResponse

    from csm_streaming.server.context import context_of

    server = context_of(request)
    req = await server.request_from(RequestDraft(text, voice))
    agen = server.marked(server.enqueue(req, request.scope))
    first = await server.first_chunk(agen)
    body = server.body(request.scope, agen, first, lambda c: out.feed(c.numpy()),
                       lambda: out.feed(np.zeros(0, np.float32), last=True))
    return StreamingResponse(body, media_type=out.content_type,
                             headers={"X-Sample-Rate": str(out.rate)})


class SpeechContext:
    """One context: text in pieces, phrases to the engine in order, audio and word times out
    through its socket's sink (see ContextSocket)."""

    def __init__(self, socket: ContextSocket, cid: str, voice, out: AudioOut,
                 buffer_delay_ms: float = DEFAULT_BUFFER_DELAY_MS):
        self.socket, self.id, self.voice, self.out = socket, cid, voice, out
        self.buffer_delay_s = min(max(0.0, buffer_delay_ms), MAX_BUFFER_DELAY_MS) / 1000
        self.chunker = TextChunker()
        self.feed: TextFeed | None = None
        self.ticket = None
        self.phrases: list[str] = []
        self.timed = 0  # phrases whose word times were sent (or are being aligned)
        self.aligner = socket.server.aligner  # None: the estimate
        self.heard = HeardAudio() if self.aligner is not None else None
        self._timing: asyncio.Task | None = None  # the last phrase's alignment, sent in order
        self.ended = self.cancelled = False
        self.last_message = time.monotonic()
        self._delay: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        # the delay timer and the socket's messages both speak: one at a time, so the first
        # phrase opens one stream, not two
        self._speaking = asyncio.Lock()

    async def add_text(self, text: str, flush: bool = False):
        """Text for the context; phrases go to the engine as soon as they are complete."""
        if self.ended:
            raise ApiError(400, f"context {self.id!r} has ended: open a new context_id")
        self.last_message = time.monotonic()
        for phrase in self.chunker.feed(text):
            await self._speak(phrase)
        if flush or self.buffer_delay_s == 0:
            await self.flush()
        elif self._delay is None and self.chunker.pending:
            loop = asyncio.get_running_loop()
            self._delay = loop.call_later(self.buffer_delay_s,
                                          lambda: asyncio.ensure_future(self._flush_waiting()))

    async def flush(self):
        """Speak what is waiting now, however short."""
        if self._delay is not None:
            self._delay.cancel()
            self._delay = None
        for phrase in self.chunker.flush():
            await self._speak(phrase)

    async def _flush_waiting(self):
        """The buffer delay ran out: speak what waits. A failure here (the first phrase's
        voice or text) reaches the client as a message would have: an error, the context ends."""
        self._delay = None
        try:
            await self.flush()
        except ApiError as e:
            self.cancel()
            await self.socket.sink.error(self, e.status, e.message)

    async def end(self):
        """No more text: the rest is spoken, then the context is done."""
        await self.flush()
        self.ended = True
        if self.feed is not None:
            self.feed.close()
        else:  # nothing was ever said: done at once
            await self.socket.sink.done(self)
            self.socket.forget(self)

    def cancel(self):
        """Stop now: the slot is freed at the next chunk; nothing more is sent for it."""
        self.cancelled = self.ended = True
        if self._delay is not None:
            self._delay.cancel()
        if self.ticket is not None:
            self.ticket.cancel()
        if self._task is not None:
            self._task.cancel()
        if self._timing is not None:
            self._timing.cancel()
        self.socket.forget(self)

    async def _speak(self, phrase: str):
        async with self._speaking:
            if self.ticket is None:  # the first phrase: the request, its voice, its stream
                s = self.socket
                req = await s.server.request_from(RequestDraft(
                    phrase, self.voice, sampling=s.sampling, phrases=True))
                self.feed = TextFeed(closed=False)
                self.ticket = s.server.enqueue(req, s.scope, self.feed)
                self._task = asyncio.create_task(self._run())
            self.phrases.append(phrase)
            self.feed.push(phrase)

    async def _run(self):
        sink, samples, server = self.socket.sink, 0, self.socket.server
        try:
            async for chunk in server.marked(self.ticket):
                if self.cancelled:
                    return
                samples += chunk.numel()
                if self.heard is not None:
                    self.heard.add(chunk.numpy())
                await sink.audio(self, self.out.feed(chunk.numpy()))
                await self._send_word_times(samples)
            if self.cancelled:
                return
            tail = self.out.feed(np.zeros(0, np.float32), last=True)
            if tail:
                await sink.audio(self, tail)
            await self._send_word_times(samples, final=True)
            if self._timing is not None:
                await self._timing  # the last phrase's words before done
            await sink.done(self)
            server.count(self.socket.scope, 200)  # a context is one request in the metrics
        except asyncio.CancelledError:
            server.count(self.socket.scope, 499)  # cancelled, or the client left
            raise
        except Exception as e:
            if not self.cancelled:
                err = shape_error(e, server.retry_after())
                server.count(self.socket.scope, err.status)
                await sink.error(self, err.status, err.message)
        finally:
            self.socket.forget(self)

    async def _send_word_times(self, samples: int, final: bool = False):
        """The word times of each phrase whose audio has all been sent (the watermark holds
        audio back in windows); at the end, of every phrase, within the audio sent (the
        runaway guard may have trimmed a silent tail)."""
        stream = self.ticket.stream
        ends = list(stream.segment_ends) if stream is not None else []
        audio_s = samples / SAMPLE_RATE
        for i in range(self.timed, min(len(ends), len(self.phrases))):
            end = ends[i] * FRAME_MS / 1000
            if end > audio_s and not final:
                return
            start = ends[i - 1] * FRAME_MS / 1000 if i else 0.0
            start, end = min(start, audio_s), min(end, audio_s)
            self.timed = i + 1
            if self.aligner is None:
                await self._send_words(word_times(self.phrases[i], start, end))
            else:  # off the event loop, in order, while the audio goes on
                audio = self.heard.take(round(start * SAMPLE_RATE), round(end * SAMPLE_RATE))
                self._timing = asyncio.create_task(self._align(
                    self._timing, self.phrases[i], audio, start, end))

    async def _align(self, before: asyncio.Task | None, phrase, audio, start, end):
        try:
            times = await asyncio.to_thread(aligned_word_times, self.aligner, phrase, audio,
                                            start, end)
        except Exception:  # the aligner failed: said in the log, the estimate sent instead
            log.exception("the word aligner failed on %r: estimated word times sent", phrase)
            times = word_times(phrase, start, end)
        if before is not None:
            await before
        await self._send_words(times)

    async def _send_words(self, times: WordTimes):
        if times.words and not self.cancelled:
            await self.socket.sink.words(self, times)


class ContextSocket:
    """The contexts of one socket. sink: the adapter's async callbacks audio(context, bytes),
    words(context, WordTimes), done(context), error(context or None, status, message)."""

    def __init__(self, server, scope, sink, sampling: SamplingParams | None = None):
        self.server, self.scope, self.sink = server, scope, sink
        self.sampling = sampling or SamplingParams()
        self.contexts: dict[str, SpeechContext] = {}
        self.ended: set[str] = set()  # ids of contexts that ended on this socket
        self._idle = asyncio.create_task(self._close_idle())

    def get(self, cid: str) -> SpeechContext | None:
        return self.contexts.get(cid)

    def open(self, cid: str, voice, out: AudioOut, buffer_delay_ms=DEFAULT_BUFFER_DELAY_MS):
        if len(self.contexts) >= MAX_CONTEXTS_PER_SOCKET:
            raise ApiError(429, f"{MAX_CONTEXTS_PER_SOCKET} contexts are open on this socket: "
                                "end or cancel one first")
        ctx = SpeechContext(self, cid, voice, out, buffer_delay_ms)
        self.contexts[cid] = ctx
        return ctx

    def forget(self, ctx: SpeechContext):
        if self.contexts.get(ctx.id) is ctx:
            del self.contexts[ctx.id]
            self.ended.add(ctx.id)

    def close(self):
        """The socket closed: every context stops."""
        self._idle.cancel()
        for ctx in list(self.contexts.values()):
            ctx.cancel()

    async def _close_idle(self):
        """A context that gets no message for the idle timeout and never ended is closed with
        an error (a client that forgot `continue: false` holds no slot for ever)."""
        timeout = self.server.settings.context_idle_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for ctx in list(self.contexts.values()):
                if not ctx.ended and now - ctx.last_message > timeout:
                    ctx.cancel()
                    await self.sink.error(ctx, 408, f"context {ctx.id!r} got no text for "
                                                    f"{timeout:g} s and was not ended: closed")
