"""Generation that does not let the user down: runaway tails, empty output, fallbacks."""

import asyncio
import random

import pytest
import torch

from conftest import patch_sample_frame, speech_like
from csm_streaming.audio import FRAME_SAMPLES
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.loader import load_csm_1b
from csm_streaming.engine.runaway import TailConfig, TailGuard, frame_dbfs
from csm_streaming.request import EmptyOutputError

SR = 24_000


def frames_of(audio):
    return audio.view(-1, FRAME_SAMPLES)


def distinct_codes(n, start=0):
    return torch.arange(start, start + n)[:, None].repeat(1, 32) % 2048


def feed_in_chunks(guard, audio, codes, chunk=4):
    out, stop = [], None
    for i in range(0, codes.shape[0], chunk):
        o, stop = guard.feed(
            codes[i : i + chunk], audio[i * FRAME_SAMPLES : (i + chunk) * FRAME_SAMPLES]
        )
        out.append(o)
        if stop:
            break
    return torch.cat(out), stop


# -- the detector on synthetic signals -----------------------------------------------------------


def test_speech_then_silence_stops_early_and_trims_the_tail():
    speech = speech_like(0.96)  # 12 frames
    audio = torch.cat([speech, torch.zeros(5 * SR)])  # then 5 s of silence: 62 frames
    codes = distinct_codes(audio.numel() // FRAME_SAMPLES)
    cfg = TailConfig(max_silence_ms=2000, keep_tail_ms=400)
    guard = TailGuard(cfg)
    out, stop = feed_in_chunks(guard, audio, codes)
    assert stop and "silence" in stop
    out = guard.end(out)
    # all the speech, plus 400 ms of the silence; stopped after 2 s of it, not at the 5 s end
    assert out.numel() == speech.numel() + 5 * FRAME_SAMPLES
    assert torch.equal(out[:speech.numel() - FRAME_SAMPLES], speech[:-FRAME_SAMPLES])
    assert guard.trimmed_frames == 25 - 5


def test_a_pause_is_kept_whole_when_speech_comes_back():
    a, b = speech_like(0.48, seed=1), speech_like(0.48, seed=2)
    audio = torch.cat([a, torch.zeros(int(1.2 * SR)), b])  # a 1.2 s pause, under max_silence
    codes = distinct_codes(audio.numel() // FRAME_SAMPLES)
    guard = TailGuard(TailConfig(max_silence_ms=2000, keep_tail_ms=400))
    out, stop = feed_in_chunks(guard, audio, codes)
    assert stop is None and torch.equal(out, audio)  # the held silence was released, in order


def test_a_stuck_frame_stops_the_stream_without_cutting_sound():
    audio = speech_like(3.2)  # loud throughout
    codes = torch.cat([distinct_codes(10), distinct_codes(1, 500).repeat(30, 1)])
    guard = TailGuard(TailConfig(max_repeat_frames=25))
    out, stop = feed_in_chunks(guard, audio, codes)
    assert stop and "same frame" in stop
    n = out.numel() // FRAME_SAMPLES
    assert n == 10 + 25  # stopped at the 25th identical frame, which still goes out (it is sound)
    assert torch.equal(out, audio[:out.numel()])  # nothing loud was removed


@pytest.mark.parametrize("seed", range(5))
def test_trimming_never_removes_non_silent_audio(seed):
    rng = random.Random(seed)
    pieces = []
    for _ in range(40):
        loud = rng.random() < 0.5
        pieces.append(
            speech_like(0.08, seed=rng.randrange(1000)) * 3 if loud else torch.zeros(FRAME_SAMPLES)
        )
    audio = torch.cat(pieces)
    codes = distinct_codes(40)
    guard = TailGuard(TailConfig(max_silence_ms=800, keep_tail_ms=160))
    out, stop = feed_in_chunks(guard, audio, codes, chunk=rng.choice([1, 2, 4]))
    loud_in = [f for f in frames_of(audio) if frame_dbfs(f)[0] >= -50]
    n_out = out.numel() // FRAME_SAMPLES
    loud_out = [f for f in frames_of(out) if frame_dbfs(f)[0] >= -50]
    # what went out is the input's first frames with silent ones removed, loud ones all there
    consumed = frames_of(audio)[: n_out + guard.trimmed_frames + len(guard.held)]
    expected_loud = [f for f in consumed if frame_dbfs(f)[0] >= -50]
    assert len(loud_out) == len(expected_loud) and all(
        torch.equal(a, b) for a, b in zip(loud_out, expected_loud)
    )
    if stop is None:
        assert len(loud_out) == len(loud_in)


def test_end_fades_out_only_when_it_ends_on_sound():
    guard = TailGuard()
    loud = speech_like(0.32) * 3
    faded = guard.end(loud)
    assert faded[-1].abs() < 1e-3 and torch.equal(faded[:-480], loud[:-480])
    quiet = torch.zeros(3840)
    assert torch.equal(guard.end(quiet), quiet)


def test_tail_config_is_checked():
    with pytest.raises(ValueError):
        TailConfig(keep_tail_ms=3000, max_silence_ms=2000)


# -- in generate and generate_streaming ----------------------------------------------------------


def test_stuck_stream_stops_early_in_generate_and_in_the_stream(own_generator):
    stuck = torch.full((32,), 700)

    def stick_after_4(codes, s):
        return torch.where((s.frame >= 4)[:, None], stuck.expand_as(codes), codes)

    patch_sample_frame(own_generator.model, stick_after_4)
    ref = own_generator.generate("Stuck.", 0, max_audio_length_ms=8000, seed=1)
    sg = StreamingGenerator(own_generator, StreamingConfig(enable_compilation=False))
    out = torch.cat(list(sg.generate_streaming("Stuck.", 0, max_audio_length_ms=8000, seed=1)))
    assert "same frame" in own_generator.last_stop_reason and "same frame" in sg.metrics.stop_reason
    frames = ref.numel() // FRAME_SAMPLES
    assert frames == 4 + 25  # stopped at the 25th identical frame, far from the 100-frame limit
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert any(e.kind == "runaway_stopped" and "stopped early" in e.text for e in sg.metrics.events)


def test_empty_output_is_retried_cooler(own_generator):
    def empty_at_first_try(codes, s):  # the end frame first, but only at the original temperature
        end = (s.frame == 0) & (s.temperature > 0.8)
        return torch.where(end[:, None], torch.zeros_like(codes), codes)

    patch_sample_frame(own_generator.model, empty_at_first_try)
    audio = own_generator.generate("Retry me.", 0, max_audio_length_ms=400, seed=2)
    sg = StreamingGenerator(own_generator, StreamingConfig(enable_compilation=False))
    chunks = list(sg.generate_streaming("Retry me.", 0, max_audio_length_ms=400, seed=2))
    assert audio.numel() == 5 * FRAME_SAMPLES
    assert any("no audio: retry 1 with temperature 0.63" in e.text for e in own_generator.events)
    assert [e.kind for e in sg.metrics.events] == ["empty_output_retry"]
    torch.testing.assert_close(torch.cat(chunks), audio, atol=1e-4, rtol=0)


def test_output_empty_on_every_try_is_a_clear_error(own_generator):
    patch_sample_frame(own_generator.model, lambda codes, s: torch.zeros_like(codes))
    with pytest.raises(EmptyOutputError, match="3 tries"):
        own_generator.generate("Nothing.", 0, max_audio_length_ms=400, seed=2)
    sg = StreamingGenerator(own_generator, StreamingConfig(enable_compilation=False))
    with pytest.raises(EmptyOutputError, match="3 tries"):
        list(sg.generate_streaming("Nothing.", 0, max_audio_length_ms=400, seed=2))
    assert sg.engine.free_slots == 1


def test_device_fallback_is_said_not_silent():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_csm_1b("cuda", "random:tiny", watermark=False)
    with pytest.warns(UserWarning):  # the watermark-off warning; the fallback goes to the log
        g = load_csm_1b("cuda", "random:tiny", watermark=False, allow_cpu_fallback=True)
    assert g.device.type == "cpu"
    assert any("falling back to the CPU" in e.text for e in g.events)
    sg = StreamingGenerator(g, StreamingConfig(enable_compilation=False))
    list(sg.generate_streaming("Hi.", 0, max_audio_length_ms=160, seed=1))
    assert any(e.kind == "device_fallback" for e in sg.metrics.events)  # the dashboard shows it


def test_server_narrows_its_batch_when_the_device_runs_out_of_memory(tiny_generator):
    from csm_streaming.request import GenerationRequest
    from csm_streaming.server.engine_thread import EngineThread

    sg = StreamingGenerator(
        tiny_generator, StreamingConfig(enable_compilation=False, max_batch_size=4)
    )
    engine = sg.engine
    original = engine._frame_step
    raised = []

    def oom_once_when_wide(n, *rest):
        if n > 2 and not raised:
            raised.append(n)
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return original(n, *rest)

    engine._frame_step = oom_once_when_wide
    sched = EngineThread(sg, max_queue=8).start()

    async def run_all():
        loop = asyncio.get_running_loop()
        tickets = [
            sched.enqueue(GenerationRequest.of(f"Stream {i}.", 0, max_audio_length_ms=480,
                                              seed=i), loop)
            for i in range(4)
        ]
        results = []
        for t in tickets:
            results.append(torch.cat([c async for c in t.chunks()]))
        return results

    try:
        results = asyncio.run(asyncio.wait_for(run_all(), 120))
    finally:
        sched.stop()
    assert raised == [4]
    assert sched.max_active == 2
    assert all(r.numel() == 6 * FRAME_SAMPLES for r in results)  # every stream still completed
    text = sched.metrics.render().decode()
    assert 'csm_fallbacks_total{kind="oom_narrowed_batch"} 1.0' in text


def test_text_is_normalised_before_tokenising(own_generator):
    a, _ = own_generator.tokenize_text("It costs $5.", 0)
    b, _ = own_generator.tokenize_text("It costs five dollars.", 0)
    assert torch.equal(a, b)
    own_generator.normalize = False
    c, _ = own_generator.tokenize_text("It costs $5.", 0)
    assert not torch.equal(a, c)
