"""Audio for the OpenAI speech route, chunk by chunk as the speech is made, through FFmpeg
(PyAV): `StreamEncoder` (mp3, Ogg Opus, ADTS AAC, FLAC; the first bytes leave as soon as the
encoder emits a packet, `finish` flushes its tail) and `Tempo` (`speed`, pitch kept)."""

from __future__ import annotations

import io

import numpy as np

from csm_streaming.audio import SAMPLE_RATE, pcm16, wav_header

# response_format -> (container, codec, codec sample rate, content type)
FORMATS = {
    "mp3": ("mp3", "libmp3lame", SAMPLE_RATE, "audio/mpeg"),
    "opus": ("ogg", "libopus", 48_000, "audio/ogg"),  # Opus runs at 48 kHz
    "aac": ("adts", "aac", SAMPLE_RATE, "audio/aac"),
    "flac": ("flac", "flac", SAMPLE_RATE, "audio/flac"),
}


class StreamEncoder:
    """24 kHz mono float chunks in, the container's bytes out, as they become ready."""

    def __init__(self, fmt: str, rate: int | None = None, bit_rate: int | None = None):
        """rate, bit_rate: the codec's (default: the format's rate, FFmpeg's bit rate)."""
        import av

        container, codec, default_rate, self.content_type = FORMATS[fmt]
        rate = rate or default_rate
        self._buf = io.BytesIO()
        # Ogg holds a page up to a second by default: 20 ms pages let each chunk leave at once
        options = {"page_duration": "20000"} if container == "ogg" else {}
        self._out = av.open(self._buf, "w", format=container, options=options)
        self._stream = self._out.add_stream(codec, rate=rate)
        self._stream.layout = "mono"
        if bit_rate:
            self._stream.bit_rate = bit_rate
        ctx = self._stream.codec_context
        self._resampler = av.AudioResampler(format=ctx.format.name if ctx.format else "fltp",
                                            layout="mono", rate=rate)
        self._sent = 0
        self._pts = 0

    def _drain(self) -> bytes:
        data = self._buf.getvalue()[self._sent:]
        self._sent += len(data)
        return data

    def _mux(self, frame) -> None:
        for packet in self._stream.encode(frame):
            self._out.mux(packet)

    def feed(self, chunk) -> bytes:
        if not np.asarray(chunk).size:  # an empty frame makes FFmpeg's resampler fail (ENOMEM)
            return b""
        frame = _audio_frame(chunk, self._pts)
        self._pts += frame.samples
        for out in self._resampler.resample(frame):
            self._mux(out)
        return self._drain()

    def finish(self) -> bytes:
        for out in self._resampler.resample(None):
            self._mux(out)
        self._mux(None)  # flush the encoder
        self._out.close()  # the trailer (FLAC rewrites its header in place: sent as written)
        return self._drain()


class WholeFile:
    """A format sent whole, once the speech is done: FLAC, whose STREAMINFO must hold the
    length for libsndfile (soundfile and everything built on it) to read it; a stream's header
    cannot, as the length is not known when it is sent. Same interface as StreamEncoder."""

    def __init__(self, fmt: str):
        self.fmt, self.content_type = fmt, FORMATS[fmt][3]
        self._chunks: list[np.ndarray] = []

    def feed(self, chunk) -> bytes:
        self._chunks.append(np.asarray(chunk, dtype=np.float32).reshape(-1))
        return b""

    def finish(self) -> bytes:
        enc = StreamEncoder(self.fmt)
        enc.feed(np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32))
        enc.finish()
        return enc._buf.getvalue()  # the header as rewritten at close, with the length


WHOLE_FORMATS = {"flac"}


class PcmEncoder:
    """16-bit PCM (`pcm`), or the same after a WAV header of unknown length (`wav`); the same
    interface as StreamEncoder."""

    def __init__(self, wav: bool):
        self._header = wav_header(None) if wav else b""
        self.content_type = "audio/wav" if wav else "audio/pcm"

    def feed(self, chunk) -> bytes:
        out, self._header = self._header + pcm16(chunk), b""
        return out

    def finish(self) -> bytes:
        out, self._header = self._header, b""  # a stream with no audio is still a WAV
        return out


def encoder_for(fmt: str):
    """The encoder of one of OpenAI's six response formats: feed(chunk) -> bytes ready now,
    finish() -> the rest, content_type."""
    if fmt in ("pcm", "wav"):
        return PcmEncoder(wav=fmt == "wav")
    return WholeFile(fmt) if fmt in WHOLE_FORMATS else StreamEncoder(fmt)


class Tempo:
    """OpenAI's `speed`: FFmpeg's `atempo` filter (WSOLA: the duration changes, the pitch does
    not), streamed: chunks in, stretched chunks out as the filter releases them. atempo takes
    0.5..2 per stage, so 0.25 and 4 are two stages."""

    def __init__(self, speed: float):
        from av.filter import Graph

        self.speed, self._pts = speed, 0
        self._graph = g = Graph()
        node = g.add_abuffer(format="flt", sample_rate=SAMPLE_RATE, layout="mono",
                             time_base=f"1/{SAMPLE_RATE}")
        for factor in _tempo_stages(speed):
            stage = g.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = g.add("abuffersink")
        node.link_to(sink)
        g.configure()

    def feed(self, chunk) -> np.ndarray:
        frame = _audio_frame(chunk, self._pts)
        self._pts += frame.samples
        self._graph.push(frame)
        return self._pull()

    def finish(self) -> np.ndarray:
        self._graph.push(None)
        return self._pull()

    def _pull(self) -> np.ndarray:
        import av

        out = []
        while True:
            try:
                out.append(self._graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                break
        return np.concatenate(out) if out else np.zeros(0, np.float32)


def _audio_frame(chunk, pts: int):
    """A 24 kHz mono float chunk (tensor or array) as a PyAV frame starting at sample `pts`."""
    import av

    x = np.ascontiguousarray(np.asarray(chunk, dtype=np.float32).reshape(1, -1))
    frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
    frame.sample_rate, frame.pts = SAMPLE_RATE, pts
    return frame


def _tempo_stages(speed: float) -> list[float]:
    stages = []
    while speed < 0.5:
        stages.append(0.5)
        speed /= 0.5
    while speed > 2.0:
        stages.append(2.0)
        speed /= 2.0
    return stages + [speed]
