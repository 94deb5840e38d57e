"""OpenAI's response formats as its SDK asks for them: each streamed as it is generated (bytes
before the stream ends), with its content type, decoded by an independent decoder (libsndfile)
where one exists, to the duration that was generated."""

import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import AUTH, LiveServer

MS = 2400  # 30 frames: several chunks


@pytest.fixture(scope="module")
def live(mimi):
    server = LiveServer(max_streams=2)
    yield server
    server.close()


def decode_with_ffmpeg(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as c:
        frames = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
        return np.concatenate(frames), c.streams.audio[0].rate


def decode(fmt: str, data: bytes) -> tuple[np.ndarray, int]:
    """libsndfile (not FFmpeg, which encoded it) where it reads the format: all but ADTS AAC,
    which only FFmpeg reads here."""
    if fmt == "aac":
        return decode_with_ffmpeg(data)
    return sf.read(io.BytesIO(data), dtype="float32")


@pytest.mark.parametrize("fmt, content_type", [("mp3", "audio/mpeg"), ("opus", "audio/ogg"),
                                               ("aac", "audio/aac"), ("flac", "audio/flac")])
def test_each_format_streams_and_decodes_to_the_generated_length(live, fmt, content_type):
    body = {"input": "Formats.", "response_format": fmt, "max_audio_length_ms": MS, "seed": 4}
    parts = []
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", json=body, headers=AUTH,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == content_type
        for part in r.iter_raw():
            parts.append(part)
    if fmt != "flac":  # FLAC is sent whole: its header holds the length libsndfile needs
        assert len(parts) > 2  # sent in pieces as the chunks came, not one body at the end
    audio, rate = decode(fmt, b"".join(parts))
    assert abs(len(audio) / rate - MS / 1000) < 0.1  # encoder padding at most a few frames
    assert np.abs(audio).max() > 0.001
    if fmt != "aac":  # and FFmpeg reads the same
        again, rate_again = decode_with_ffmpeg(b"".join(parts))
        assert rate_again == rate and abs(len(again) - len(audio)) <= rate // 10


def test_mp3_is_the_default_as_openai_and_matches_the_pcm(live):
    body = {"input": "Default.", "max_audio_length_ms": 800, "seed": 2, "top_k": 1}
    mp3 = httpx.post(f"{live.url}/v1/audio/speech", json=body, headers=AUTH, timeout=120)
    pcm = httpx.post(f"{live.url}/v1/audio/speech", headers=AUTH, timeout=120,
                     json={**body, "response_format": "pcm"})
    assert mp3.headers["content-type"] == "audio/mpeg"
    decoded, rate = sf.read(io.BytesIO(mp3.content), dtype="float32")
    reference = np.frombuffer(pcm.content, dtype="<i2").astype(np.float32) / 32768
    assert rate == 24_000 and abs(len(decoded) - len(reference)) < 2400
    # random weights speak noise, which a perceptual coder does not keep sample for sample:
    # compare the loudness, which it keeps
    rms = [float(np.sqrt(np.mean(a**2))) for a in (decoded, reference)]
    assert rms[1] > 0.001 and 0.7 < rms[0] / rms[1] < 1.3, rms


def test_an_unknown_format_names_the_ones_there_are(live):
    r = httpx.post(f"{live.url}/v1/audio/speech", headers=AUTH, timeout=30,
                   json={"input": "Hi.", "response_format": "ogg-vorbis"})
    assert r.status_code == 400 and "mp3, opus, aac, flac, wav, pcm" in r.json()["error"]["message"]


def speech_pcm(live, **extra) -> np.ndarray:
    body = {"input": "Speed.", "response_format": "pcm", "max_audio_length_ms": MS, "seed": 6,
            **extra}
    r = httpx.post(f"{live.url}/v1/audio/speech", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, dtype="<i2").astype(np.float32) / 32768


@pytest.mark.parametrize("speed", [0.5, 2.0, 4.0])
def test_speed_changes_the_duration_by_its_factor(live, speed):
    normal, fast = speech_pcm(live), speech_pcm(live, speed=speed)
    assert len(normal) == MS * 24 and np.abs(fast).max() > 0.001
    assert abs(len(fast) / len(normal) - 1 / speed) < 0.05, (len(fast), len(normal))


def test_speed_keeps_the_pitch():
    # The stretch on its own: a 440 Hz tone twice as fast is still 440 Hz (a resampling speed-up
    # would make it 880 Hz) and half as long, fed in the engine's chunks.
    from csm_streaming.server.encode import Tempo

    tone = np.sin(2 * np.pi * 440 * np.arange(48_000) / 24_000).astype(np.float32)
    tempo = Tempo(2.0)
    out = np.concatenate([tempo.feed(tone[i:i + 1920]) for i in range(0, len(tone), 1920)]
                         + [tempo.finish()])
    peak_hz = np.fft.rfftfreq(len(out), 1 / 24_000)[np.argmax(np.abs(np.fft.rfft(out)))]
    assert abs(peak_hz - 440) < 5 and abs(len(out) / len(tone) - 0.5) < 0.02


def test_speed_streams_in_every_format(live):
    body = {"input": "Fast.", "response_format": "mp3", "max_audio_length_ms": MS, "seed": 4,
            "speed": 2.0}
    with httpx.stream("POST", f"{live.url}/v1/audio/speech", json=body, headers=AUTH,
                      timeout=120) as r:
        assert r.status_code == 200
        parts = list(r.iter_raw())
    audio, rate = decode("mp3", b"".join(parts))
    assert len(parts) > 2 and abs(len(audio) / rate - MS / 2000) < 0.1
