"""The watermark stage, with silentcipher's own classes and random weights (no download)."""

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import speech_like
from csm_streaming.audio import FRAME_SAMPLES, save_audio
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.loader import load_csm_1b
from csm_streaming.engine.reference import Generator
from csm_streaming.model.watermark import (
    CSM_1B_GH_WATERMARK,
    StreamMarker,
    Watermarker,
    WatermarkError,
    build_random_watermarker,
    load_watermark_stage,
    load_watermarker,
    parse_key,
    resolve_key,
    verify,
    watermark,
)
from csm_streaming.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("silentcipher")
    build_random_watermarker(folder)
    return folder


@pytest.fixture(scope="module")
def wm(wm_dir):
    model = load_watermarker("cpu", str(wm_dir))
    watermark(model, speech_like(0.5), 24_000, None)  # first call warms librosa/numba up
    return model


@pytest.fixture(scope="module")
def marked_generator(tiny_generator, wm):
    return Generator(tiny_generator.model, tiny_generator.text_tokenizer, tiny_generator.mimi,
                     watermarker=Watermarker(wm))


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
    torch.testing.assert_close(marked, marked_generator.watermarker.mark(plain))


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
        ref = marked_generator.watermarker.mark(plain[start:start + c.numel()])
        torch.testing.assert_close(c, ref)
        start += c.numel()


def test_batch_streams_are_marked_each(marked_generator, tiny_generator):
    sg = StreamingGenerator(
        marked_generator, StreamingConfig(enable_compilation=False, max_batch_size=2)
    )
    reqs = [GenerationRequest.of("One.", 0, max_audio_length_ms=640, seed=1),
            GenerationRequest.of("Two.", 1, max_audio_length_ms=960, seed=2)]
    got = {0: [], 1: []}
    for i, c in sg.generate_streaming_batch(reqs):
        got[i].append(c)
    for i, r in enumerate(reqs):
        plain = tiny_generator.generate(
            r.text, r.speaker, max_audio_length_ms=r.sampling.max_audio_length_ms,
            seed=r.sampling.seed
        )
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
    assert g.watermarker is None


def test_random_models_mark_with_random_weights_offline(caplog):
    """random:* needs nothing from the network, the watermark stage included (HF_HUB_OFFLINE=1
    in the tests): silentcipher's classes with random weights, said once in the log."""
    import logging

    with caplog.at_level(logging.INFO, logger="csm.watermark"):
        g = load_csm_1b("cpu", "random:tiny")
    assert isinstance(g.watermarker, Watermarker) and g.watermarker.key == CSM_1B_GH_WATERMARK
    assert sum("random weights" in r.message for r in caplog.records) == 1
    plain = speech_like(0.5)
    assert not torch.equal(g.watermarker.mark(plain), plain)
    assert g.default_max_audio_ms == 3000  # random weights never end: short by default
    with pytest.raises(WatermarkError, match="--no-watermark"):  # real weights: whole message
        load_watermark_stage(True, "cpu")


def test_missing_watermark_model_says_how_to_get_it(tmp_path):
    with pytest.raises(WatermarkError) as e:
        load_watermarker("cpu")  # HF_HUB_OFFLINE=1 in the tests: nothing cached, nothing fetched
    assert "HF_HUB_OFFLINE is set" in str(e.value) and str(e.value).endswith("folder.")
    with pytest.raises(WatermarkError, match="not a silentcipher model folder"):
        load_watermarker("cpu", str(tmp_path))  # a wrong folder never falls back to a download


def run_watermark_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "watermarking.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def run_watermark_main(capsys, *args):
    """The same command's main in this process (a process start each costs seconds)."""
    from csm_streaming.verify_watermark import main

    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_watermark_command(tmp_path, wm, wm_dir, capsys):
    path = tmp_path / "speech.wav"
    audio = speech_like(1.0)
    marked_path = tmp_path / "marked.wav"
    save_audio(path, audio, 24_000)
    save_audio(marked_path, watermark(wm, audio, 24_000, None), 24_000)
    r = run_watermark_cli("--audio-path", str(path))  # no model offline: exit 2, one clear line
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr
    assert "--no-watermark" not in r.stderr  # this command has no such flag
    for f in (path, marked_path):  # the command says what verify says, with the same model
        run = run_watermark_cli if f == path else partial(run_watermark_main, capsys)
        r = run("--audio_path", str(f), "--model-dir", str(wm_dir))
        expected = verify(
            wm, audio if f == path else watermark(wm, audio, 24_000, None), 24_000, None
        )
        assert r.returncode == (0 if expected else 1), r.stderr
        assert r.stdout.strip() == f"{f}: {'watermarked' if expected else 'no watermark found'}"
    cli = partial(run_watermark_main, capsys)
    r = cli("--audio-path", str(tmp_path / "missing.wav"), "--model-dir", str(wm_dir))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "notes.txt").write_text("not audio")
    r = cli("--audio-path", str(tmp_path / "notes.txt"), "--model-dir", str(wm_dir))
    assert r.returncode == 2 and "not a readable audio file" in r.stderr
    r = cli("--audio-path", str(path), "--model-dir", str(tmp_path))
    assert r.returncode == 2 and "not a silentcipher model folder" in r.stderr
