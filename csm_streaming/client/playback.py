"""Live playback: a preallocated ring buffer fed by the generator, read by the sound card.

No torch here. The producer (the generator's thread) writes float32 samples; the consumer is the
PortAudio callback of a `sounddevice.OutputStream`, which never allocates and never blocks: it
copies what is there into the device buffer and counts an underrun when there is too little.

Playback starts once enough is buffered to finish without a stall, given how fast the generator
runs (its real-time factor, RTF = generation time / audio time):
- RTF < 1 (faster than real time): after the first chunk (plus a small safety margin);
- RTF >= 1: after expected_total * (1 - 1 / RTF) seconds, so the end still comes in time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from csm_streaming.audio import FRAME_SAMPLES, SAMPLE_RATE


class RingBuffer:
    """Single-producer single-consumer float32 ring buffer with a fixed capacity.

    The two sides only ever advance their own counter (monotonic sample counts), so the
    consumer's `read_into` takes no lock and allocates nothing. The producer waits (with a
    timeout) when the buffer is full.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.float32)
        self._written = 0  # total samples written (producer only)
        self._read = 0  # total samples read (consumer only)
        self._space = threading.Event()
        self.closed = False  # producer said it will write no more

    @property
    def available(self) -> int:
        return self._written - self._read

    @property
    def written(self) -> int:
        return self._written

    @property
    def read_total(self) -> int:
        return self._read

    def write(self, samples: np.ndarray, timeout: float | None = None) -> None:
        """Append samples, waiting for space while the buffer is full."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        deadline = None if timeout is None else time.monotonic() + timeout
        i = 0
        while i < samples.size:
            free = self.capacity - self.available
            if free == 0:
                self._space.clear()
                if self.capacity - self.available == 0:  # re-check after clear (no lost wake-up)
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("ring buffer full: the consumer is not reading")
                    self._space.wait(0.05 if left is None else min(0.05, left))
                continue
            n = min(free, samples.size - i)
            start = self._written % self.capacity
            first = min(n, self.capacity - start)
            self._data[start:start + first] = samples[i:i + first]
            self._data[:n - first] = samples[i + first:i + n]
            self._written += n  # publish after the data is in place
            i += n

    def read_into(self, out: np.ndarray) -> int:
        """Copy up to len(out) samples into `out`; return how many. No allocation, no lock."""
        n = min(out.shape[0], self._written - self._read)
        if n:
            start = self._read % self.capacity
            first = min(n, self.capacity - start)
            out[:first] = self._data[start:start + first]
            out[first:n] = self._data[:n - first]
            self._read += n
            self._space.set()
        return n

    def close(self):
        self.closed = True


def choose_prebuffer_s(rtf: float, chunk_s: float, expected_total_s: float,
                       margin_s: float = 0.1) -> float:
    """Seconds of audio to buffer before playback starts so that it never stalls."""
    if not math.isfinite(rtf) or rtf <= 0:
        return expected_total_s  # nothing known: play when it is all there
    if rtf < 1:
        return chunk_s + margin_s
    return min(expected_total_s, max(chunk_s, expected_total_s * (1 - 1 / rtf)) + margin_s)


@dataclass
class PlaybackStats:
    buffered_ms: float
    played_ms: float
    written_ms: float
    underruns: int
    started: bool
    prebuffer_ms: float
    finished: bool


class AudioPlayer:
    """Plays what is written into its ring buffer on a sounddevice OutputStream.

    Use as a context manager; `write` from the producer, `finish` when done, `wait` to drain.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE, capacity_s: float = 120.0,
                 blocksize: int = FRAME_SAMPLES,
                 device=None, prebuffer_s: float = 0.2):
        self.sample_rate = sample_rate
        self.buffer = RingBuffer(int(capacity_s * sample_rate))
        self.blocksize = blocksize
        self.device = device
        self.prebuffer = int(prebuffer_s * sample_rate)
        self.underruns = 0
        self.started = False  # set by the callback once the prebuffer is reached
        self.drained = threading.Event()
        self._stream = None

    # -- producer side --------------------------------------------------------------------------

    def write(self, samples) -> None:
        self.buffer.write(np.asarray(samples, dtype=np.float32).reshape(-1), timeout=60)

    def set_prebuffer_s(self, seconds: float):
        self.prebuffer = int(max(0.0, seconds) * self.sample_rate)

    def finish(self):
        """No more audio will come: play out what is buffered (even below the prebuffer)."""
        self.buffer.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything written has been played. True if drained."""
        return self.drained.wait(timeout)

    def stats(self) -> PlaybackStats:
        sr = self.sample_rate / 1000
        b = self.buffer
        return PlaybackStats(b.available / sr, b.read_total / sr, b.written / sr, self.underruns,
                             self.started, self.prebuffer / sr, self.drained.is_set())

    # -- consumer side: the audio callback ------------------------------------------------------

    def _callback(self, outdata, frames, time_info, status):
        out = outdata[:, 0]
        b = self.buffer
        if not self.started:
            if b.available >= self.prebuffer or (b.closed and b.available > 0):
                self.started = True
            else:
                outdata.fill(0)
                if b.closed and b.available == 0:
                    self.drained.set()
                return
        n = b.read_into(out)
        if n < frames:
            out[n:] = 0
            if b.closed:
                if b.available == 0:
                    self.drained.set()
            else:
                self.underruns += 1  # the generator fell behind the sound card
        if outdata.shape[1] > 1:
            outdata[:, 1:] = outdata[:, :1]

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self):
        import sounddevice as sd

        self._stream = sd.OutputStream(samplerate=self.sample_rate, channels=1, dtype="float32",
                                       blocksize=self.blocksize, device=self.device,
                                       callback=self._callback)
        self._stream.start()
        return self

    def close(self):
        if self._stream is not None:
            try:
                self._stream.stop()
            finally:
                self._stream.close()
                self._stream = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False


def play_stream(chunks: Iterable, sample_rate: int = SAMPLE_RATE, rtf_hint: float = 0.5,
                expected_total_s: float = 10.0, player: AudioPlayer | None = None,
                on_chunk=None) -> Iterator:
    """Play chunks (1-D float arrays or tensors) while passing them on; drain at the end.

    The prebuffer starts from `rtf_hint` and follows the RTF measured on the chunks. Ctrl-C or
    a consumer that stops iterating closes the audio stream at once.
    """
    own = player is None
    player = player or AudioPlayer(sample_rate)
    if own:
        player.start()
    try:
        t_prev = time.perf_counter()
        gen_s = audio_s = 0.0
        for chunk in chunks:
            arr = chunk.detach().cpu().numpy() if hasattr(chunk, "detach") else np.asarray(chunk)
            now = time.perf_counter()
            gen_s += now - t_prev
            t_prev = now
            dur = arr.size / sample_rate
            audio_s += dur
            rtf = gen_s / audio_s if audio_s else rtf_hint
            if not player.started:
                player.set_prebuffer_s(choose_prebuffer_s(rtf, dur, max(expected_total_s, audio_s)))
            player.write(arr)
            if on_chunk is not None:
                on_chunk(player.stats())
            yield chunk
            t_prev = time.perf_counter()  # time spent by the consumer is not generation time
        player.finish()
        while not player.wait(0.1):
            if on_chunk is not None:
                on_chunk(player.stats())
        if on_chunk is not None:
            on_chunk(player.stats())  # the drained state
    finally:
        if own:
            player.close()
