"""The watermark stage, with silentcipher's own classes and random weights (no download)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import speech_like
from generator import FRAME_SAMPLES, Generator, load_csm_1b
from streaming_generator import StreamingConfig, StreamingGenerator, StreamRequest
from watermarking import (CSM_1B_GH_WATERMARK, StreamMarker, WatermarkError, build_random_watermarker,
                          load_watermarker, parse_key, resolve_key, watermark)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wm(tmp_path_factory):
    marker = build_random_watermarker(tmp_path_factory.mktemp("silentcipher"))
    watermark(marker, speech_like(0.5), 24_000, None)  # first call warms librosa/numba up
    return marker


@pytest.fixture(scope="module")
def marked_generator(tiny_generator, wm):
    return Generator(tiny_generator.model, tiny_generator._text_tokenizer,
                     tiny_generator._audio_tokenizer, watermarker=wm)


def test_mark_keeps_length_rate_and_is_small(wm):
    audio = speech_like(1.5)
    out = watermark(wm, audio, 24_000, CSM_1B_GH_WATERMARK)
    assert out.shape == audio.shape and out.dtype == torch.float32
    diff = out - audio
    assert diff.abs().max() > 0  # something was added
    snr_db = 10 * torch.log10(audio.pow(2).mean() / diff.pow(2).mean())
    assert snr_db > 15, f"the mark should be far below the signal (SNR {snr_db:.1f} dB)"


def test_keys():
    assert resolve_key(None) == CSM_1B_GH_WATERMARK
    assert parse_key("1, 2,3,4,255") == [1, 2, 3, 4, 255]
    with pytest.raises(ValueError, match="five integers"):
        parse_key("1,2,3")
    with pytest.raises(ValueError, match="five integers"):
        parse_key("1,2,3,4,256")


def test_private_key_from_environment(monkeypatch):
    monkeypatch.setenv("CSM_WATERMARK_KEY", "9,8,7,6,5")
    assert resolve_key(None) == [9, 8, 7, 6, 5]


def test_generate_marks_the_whole_utterance(marked_generator, tiny_generator):
    plain = tiny_generator.generate("Mark me.", 0, max_audio_length_ms=800, seed=3)
    marked = marked_generator.generate("Mark me.", 0, max_audio_length_ms=800, seed=3)
    assert marked.shape == plain.shape == (10 * FRAME_SAMPLES,)
    assert not torch.equal(marked, plain)
    torch.testing.assert_close(marked, watermark(marked_generator._watermarker, plain, 24_000, None))


def test_stream_is_marked_in_growing_windows(marked_generator, tiny_generator):
    cfg = StreamingConfig(enable_compilation=False, watermark_window_ms=1280)
    sg = StreamingGenerator(marked_generator, cfg)
    assert sg.watermarked
    chunks = list(sg.generate_streaming("Marked stream.", 0, max_audio_length_ms=3200, seed=4))
    sizes = [c.numel() // FRAME_SAMPLES for c in chunks]
    # first window = the first chunk alone (2 frames); then doubling up to 1280 ms (16 frames)
    assert sizes[0] == cfg.first_chunk_frames
    assert sizes[1] >= 2 * sizes[0] and max(sizes) <= 16 + cfg.chunk_frames
    assert sum(sizes) == 40
    plain = tiny_generator.generate("Marked stream.", 0, max_audio_length_ms=3200, seed=4)
    out = torch.cat(chunks)
    assert out.shape == plain.shape and not torch.equal(out, plain)
    # each window is the mark of the plain audio under it
    start = 0
    for c in chunks:
        ref = watermark(marked_generator._watermarker, plain[start:start + c.numel()], 24_000, None)
        torch.testing.assert_close(c, ref)
        start += c.numel()


def test_batch_streams_are_marked_each(marked_generator, tiny_generator):
    sg = StreamingGenerator(marked_generator, StreamingConfig(enable_compilation=False, max_batch_size=2))
    reqs = [StreamRequest("One.", 0, max_audio_length_ms=640, seed=1),
            StreamRequest("Two.", 1, max_audio_length_ms=960, seed=2)]
    got = {0: [], 1: []}
    for i, c in sg.generate_streaming_batch(reqs):
        got[i].append(c)
    for i, r in enumerate(reqs):
        plain = tiny_generator.generate(r.text, r.speaker, max_audio_length_ms=r.max_audio_length_ms, seed=r.seed)
        out = torch.cat(got[i])
        assert out.shape == plain.shape and not torch.equal(out, plain)


def test_stream_marker_window_schedule():
    class Identity:  # stands for silentcipher: returns the audio, so only the windows matter
        def encode_wav(self, y, sr, key, calc_sdr, message_sdr):
            return y, 0

    m = StreamMarker(Identity(), None, 24_000, max_window_ms=1000)
    sizes = []
    for _ in range(12):
        sizes += [w.numel() for w in m.feed(torch.ones(3840))]  # 160 ms chunks
    sizes += [w.numel() for w in m.flush()]
    assert sizes[0] == 3840  # the first chunk is marked alone
    assert sizes[1] == 2 * 3840 and sizes[2] == 4 * 3840  # then doubling windows
    assert all(s <= 24_000 + 3840 for s in sizes)  # never more than one chunk past the cap
    assert sum(sizes) == 12 * 3840


def test_no_float64_anywhere_in_the_stage(wm):
    """MPS has no float64: the stage must not create a float64 tensor on any device."""
    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    seen.append(getattr(func, "__name__", str(func)))
            return out

    with Watch():
        watermark(wm, speech_like(0.6), 24_000, None)
    assert seen == []


def test_turning_it_off_is_explicit_and_warned():
    with pytest.warns(UserWarning, match="watermarking is off"):
        g = load_csm_1b("cpu", "random:tiny", watermark=False)
    assert g._watermarker is None


def test_missing_watermark_model_says_how_to_get_it_or_turn_it_off():
    with pytest.raises(WatermarkError, match="--no-watermark"):
        load_watermarker("cpu")  # HF_HUB_OFFLINE=1 in the tests: nothing cached, nothing fetched


def test_watermark_command(tmp_path, wm):
    from generator import save_audio

    path = tmp_path / "speech.wav"
    save_audio(path, speech_like(1.0), 24_000)
    r = subprocess.run([sys.executable, str(ROOT / "watermarking.py"), "--audio_path", str(path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--no-watermark" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "watermarking.py"), "--audio_path", str(path),
                        "--model-dir", str(_random_model_dir(tmp_path))],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode in (0, 1), r.stderr  # random weights: found or not, but it ran
    assert "speech.wav:" in r.stdout


def _random_model_dir(tmp_path):
    folder = tmp_path / "sc"
    build_random_watermarker(folder)
    return folder
