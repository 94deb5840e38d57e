"""Audio facts and helpers: CSM's rate and frame, reading, resampling, writing, PCM and WAV bytes.

No torch at import time: the playback, the dashboard and the remote client (a laptop listening to
a rented GPU) use this module without torch installed. Functions that return tensors import it
when called.

Reading is bounded: `read_audio` looks at the header before it decodes, refuses absurd rates,
channel counts and lengths, and decodes in blocks (mixed to mono as it goes when asked), so a
small compressed file cannot expand into gigabytes.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24_000  # Mimi's rate
FRAME_MS = 80  # one Mimi frame, one backbone step
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 1920
_READ_BLOCK = 65_536  # frames decoded at a time


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, too long, or an absurd rate or channel count."""


@dataclass(frozen=True)
class AudioLimits:
    """What `read_audio` accepts. The defaults admit any real recording and nothing absurd."""

    max_seconds: float | None = None  # None: any length
    min_rate: int = 8_000
    max_rate: int = 192_000
    max_channels: int = 8


def _as_numpy(audio) -> np.ndarray:
    """A tensor (any device) or array-like -> float32 NumPy array."""
    if hasattr(audio, "detach"):
        audio = audio.detach().float().cpu().numpy()
    return np.asarray(audio, dtype=np.float32)


def read_audio(source, *, mono: bool = False, limits: AudioLimits = AudioLimits(),
               name: str | None = None) -> tuple[np.ndarray, int]:
    """A file path or the bytes of a file (WAV, FLAC, OGG...) -> (float32 samples, sample rate).

    Returns [channels, samples], or [samples] when `mono` (channels averaged while decoding).
    Raises FileNotFoundError for a missing path and AudioError, naming `name` (or the path), for
    anything unreadable or over `limits`, before decoding more than the limit allows.
    """
    import soundfile as sf

    if isinstance(source, (bytes, bytearray, memoryview)):
        label, handle = name or "audio", io.BytesIO(bytes(source))
    else:
        path = Path(source).expanduser()
        label, handle = name or str(path), str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    try:
        f = sf.SoundFile(handle)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        # libsndfile's words, without its "Error opening <object or path>: " (no reprs, no
        # server paths in a client's message)
        reason = str(e).rsplit(": ", 1)[-1].strip() or "unknown format"
        raise AudioError(
            f"{label} is not a readable audio file (send WAV, FLAC or OGG): {reason}"
        ) from e
    with f:
        rate, channels = f.samplerate, f.channels
        if not limits.min_rate <= rate <= limits.max_rate:
            raise AudioError(f"{label}: a sample rate of {rate} Hz is outside "
                             f"{limits.min_rate}..{limits.max_rate} Hz")
        if not 1 <= channels <= limits.max_channels:
            raise AudioError(
                f"{label}: {channels} channels; at most {limits.max_channels} are accepted"
            )
        max_frames = None if limits.max_seconds is None else int(limits.max_seconds * rate)
        if max_frames is not None and f.frames > max_frames:
            raise AudioError(f"{label} is {f.frames / rate:.1f} s long; the limit is "
                             f"{limits.max_seconds:g} s")
        blocks, total = [], 0
        while True:
            block = f.read(_READ_BLOCK, dtype="float32", always_2d=True)  # [frames, channels]
            if not block.shape[0]:
                break
            total += block.shape[0]
            if max_frames is not None and total > max_frames:  # the header understated the length
                raise AudioError(f"{label} is longer than the limit of {limits.max_seconds:g} s")
            blocks.append(block.mean(axis=1) if mono else block.T.copy())
    if not blocks:
        return np.zeros(0 if mono else (channels, 0), dtype=np.float32), rate
    return np.concatenate(blocks, axis=-1), rate


def resample(x, src: int, dst: int) -> np.ndarray:
    """1-D float32 audio from `src` Hz to `dst` Hz (soxr, high quality); float32 out."""
    x = _as_numpy(x)
    if src == dst:
        return x
    import soxr

    return soxr.resample(x, src, dst, quality="HQ").astype(np.float32)


def to_mono_24k(audio, sample_rate: int):
    """Any [samples] / [channels, samples] / [samples, channels] audio -> float32 mono tensor at
    24 kHz. The channel axis is the shorter one."""
    import torch

    audio = _as_numpy(audio)
    if audio.ndim == 2:
        audio = audio.mean(axis=0 if audio.shape[0] <= audio.shape[1] else 1)
    return torch.from_numpy(np.ascontiguousarray(resample(audio, sample_rate, SAMPLE_RATE)))


def load_audio(source, limits: AudioLimits = AudioLimits()):
    """Upstream's helper: a path or file bytes -> ([channels, samples] float32 tensor, rate)."""
    import torch

    data, rate = read_audio(source, limits=limits)
    return torch.from_numpy(data), rate


def save_audio(path, audio, sample_rate: int = SAMPLE_RATE):
    """Write 1-D float audio (tensor or array) as a float WAV (or by the file's extension:
    FLAC, OGG...). Whole or not at all: a reader never sees half a file under its name."""
    import os

    import soundfile as sf

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    wav = path.suffix.lower() in (".wav", "")
    sf.write(str(tmp), _as_numpy(audio), sample_rate, subtype="FLOAT" if wav else None,
             format="WAV" if not path.suffix else None)
    os.replace(tmp, path)


def pcm16(audio) -> bytes:
    """Float audio in [-1, 1] -> little-endian 16-bit PCM bytes (clipped, rounded)."""
    return (np.clip(_as_numpy(audio), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    """The inverse of `pcm16` (up to rounding): bytes -> float32 samples."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0


def wav_header(n_bytes: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header; n_bytes None = unknown length (streamed), as 0xFFFFFFFF."""
    data = 0xFFFFFFFF if n_bytes is None else n_bytes
    riff = 0xFFFFFFFF if n_bytes is None else 36 + n_bytes
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", data)


def wav_bytes(audio, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A whole 16-bit mono WAV file in memory."""
    body = pcm16(audio)
    return wav_header(len(body), sample_rate) + body
