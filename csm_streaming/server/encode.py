"""Compressed audio for the OpenAI speech route, encoded chunk by chunk as the speech is made:
FFmpeg's encoders through PyAV (mp3, Ogg Opus, ADTS AAC, FLAC). The first bytes leave with the
first chunk (as soon as the encoder emits a packet); `finish` flushes the encoder's tail."""

from __future__ import annotations

import io

import numpy as np

from csm_streaming.audio import SAMPLE_RATE

# response_format -> (container, codec, codec sample rate, content type)
FORMATS = {
    "mp3": ("mp3", "libmp3lame", SAMPLE_RATE, "audio/mpeg"),
    "opus": ("ogg", "libopus", 48_000, "audio/ogg"),  # Opus runs at 48 kHz
    "aac": ("adts", "aac", SAMPLE_RATE, "audio/aac"),
    "flac": ("flac", "flac", SAMPLE_RATE, "audio/flac"),
}


class StreamEncoder:
    """24 kHz mono float chunks in, the container's bytes out, as they become ready."""

    def __init__(self, fmt: str):
        import av

        container, codec, rate, self.content_type = FORMATS[fmt]
        self._buf = io.BytesIO()
        # Ogg holds a page up to a second by default: 20 ms pages let each chunk leave at once
        options = {"page_duration": "20000"} if container == "ogg" else {}
        self._out = av.open(self._buf, "w", format=container, options=options)
        self._stream = self._out.add_stream(codec, rate=rate)
        self._stream.layout = "mono"
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
        import av

        x = np.ascontiguousarray(np.asarray(chunk, dtype=np.float32).reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, self._pts
        self._pts += x.shape[1]
        for out in self._resampler.resample(frame):
            self._mux(out)
        return self._drain()

    def finish(self) -> bytes:
        for out in self._resampler.resample(None):
            self._mux(out)
        self._mux(None)  # flush the encoder
        self._out.close()  # the trailer (FLAC rewrites its header in place: sent as written)
        return self._drain()
