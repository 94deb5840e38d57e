"""The fast path against the plain one, on the tiny random model."""

import pytest
import torch

from conftest import patch_sample_frame, speech_like
from csm_streaming.audio import FRAME_SAMPLES
from csm_streaming.engine.config import StreamingConfig
from csm_streaming.engine.frontend import StreamingGenerator
from csm_streaming.engine.runaway import TailGuard
from csm_streaming.engine.segmenting import split_sentences
from csm_streaming.request import GenerationRequest, Segment


@pytest.fixture(scope="module")
def streamer(tiny_generator):
    return StreamingGenerator(
        tiny_generator, StreamingConfig(enable_compilation=False, max_batch_size=3)
    )


def force_end_at(model, frame_of_end: dict[int, int | list[int]]):
    """Make sample_frame emit the all-zero end frame when a stream's seed reaches a frame index.

    frame_of_end: seed -> frame index (or indices). Pure device ops, like the real step.
    """
    def end_frames(codes, s):
        end = torch.zeros_like(s.frame, dtype=torch.bool)
        for seed, frames in frame_of_end.items():
            for f in ([frames] if isinstance(frames, int) else frames):
                end |= (s.seed == seed) & (s.frame == f)
        return torch.where(end[:, None], torch.zeros_like(codes), codes)

    return patch_sample_frame(model, end_frames)


def test_stream_equals_generate_at_any_topk(device_generator):
    streamer = StreamingGenerator(device_generator, StreamingConfig(max_batch_size=3))
    for topk, temp in ((1, 0.9), (50, 0.9), (2051, 1.3)):
        ref = device_generator.generate("Hello there.", 0, max_audio_length_ms=1600, topk=topk,
                                      temperature=temp, seed=11)
        chunks = list(streamer.generate_streaming("Hello there.", 0, max_audio_length_ms=1600,
                                                  topk=topk, temperature=temp, seed=11))
        out = torch.cat(chunks)
        assert out.shape == ref.shape == (20 * FRAME_SAMPLES,)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_chunks_equal_one_shot_decode_of_the_same_codes(streamer, tiny_generator):
    chunks = list(streamer.generate_streaming("Stream me.", 1, max_audio_length_ms=2000, seed=3))
    stream = streamer.engine.last_stream
    codes = stream.all_codes
    assert codes.shape == (25, 32)
    one_shot = tiny_generator.decode_codes(codes)
    # the stream ends on sound, so the runaway guard fades its last 20 ms (no click)
    one_shot = TailGuard(tiny_generator.tail).end(one_shot)
    torch.testing.assert_close(torch.cat(chunks), one_shot, atol=1e-4, rtol=0)
    # chunk sizes: a small first chunk, then full chunks, the rest at the end
    cfg = streamer.config
    sizes = [c.shape[0] // FRAME_SAMPLES for c in chunks]
    assert sizes[0] == cfg.first_chunk_frames and sizes[1] == cfg.chunk_frames and sum(sizes) == 25


def test_first_chunk_comes_before_the_end(streamer):
    it = streamer.generate_streaming(
        "An utterance long enough to stream.", 0, max_audio_length_ms=4000, seed=1
    )
    first = next(it)
    stream = streamer.engine.last_stream
    assert first.shape[0] == streamer.config.first_chunk_frames * FRAME_SAMPLES
    assert not stream.finished and stream.metrics.frames < 50
    assert stream.metrics.first_audio_s is not None
    rest = list(it)
    assert stream.finished and stream.metrics.frames == 50 and len(rest) >= 2


def test_end_of_speech_mid_chunk(device_generator):
    own_generator = device_generator
    streamer = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=3))
    force_end_at(own_generator.model, {77: 5})
    ref = own_generator.generate_codes("Stop early.", 0, max_audio_length_ms=4000, seed=77)
    chunks = list(streamer.generate_streaming("Stop early.", 0, max_audio_length_ms=4000, seed=77))
    assert ref.shape == (5, 32)
    assert torch.cat(chunks).shape == (5 * FRAME_SAMPLES,)
    assert torch.equal(streamer.engine.last_stream.all_codes.cpu(), ref.cpu())
    assert streamer.metrics.stop_reason == "end of speech"


def test_batched_streams_equal_their_solo_runs(device_generator):
    own_generator = device_generator
    streamer = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=3))
    req = GenerationRequest.of
    reqs = [req("First voice here.", 0, max_audio_length_ms=1200, seed=1, top_k=1),
            req("A second, different one.", 1, max_audio_length_ms=2000, seed=2, top_k=30,
                temperature=0.7),
            req("Third.", 2, max_audio_length_ms=800, seed=3, top_k=5, temperature=1.2),
            # more requests than the 3 slots: this one joins when a slot frees up; its k=200
            # makes the shared step draw among 256 candidates, the others' solo runs among 64
            req("Fourth joins late.", 0, (Segment(1, "Earlier.", speech_like(0.4)),),
                max_audio_length_ms=960, seed=4, top_k=200)]
    force_end_at(own_generator.model, {2: 13})  # request 1 ends on its own, mid-chunk
    got = {i: [] for i in range(len(reqs))}
    for i, chunk in streamer.generate_streaming_batch(reqs):
        got[i].append(chunk)
    solo = [own_generator.generate(r.text, r.speaker, r.context, r.sampling.max_audio_length_ms,
                                   r.sampling.temperature, r.sampling.top_k, r.sampling.seed)
            for r in reqs]
    assert solo[1].shape[0] == 13 * FRAME_SAMPLES
    for i, ref in enumerate(solo):
        torch.testing.assert_close(torch.cat(got[i]), ref, atol=1e-4, rtol=0)
    assert streamer.engine.free_slots == 3


def test_caller_stopping_early_frees_the_engine(streamer, tiny_generator):
    it = streamer.generate_streaming("Interrupted speech.", 0, max_audio_length_ms=8000, seed=9)
    next(it)
    it.close()  # the caller stops listening
    assert streamer.engine.free_slots == 3
    assert streamer.engine.last_stream.metrics.stop_reason == "cancelled"
    ref = tiny_generator.generate("Next one.", 0, max_audio_length_ms=800, seed=2)
    out = torch.cat(
        list(streamer.generate_streaming("Next one.", 0, max_audio_length_ms=800, seed=2))
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("frame_batch", [None, 1])  # a chunk per Mimi call, or a frame
def test_long_text_is_spoken_in_segments_without_a_seam(own_generator, frame_batch):
    sg = StreamingGenerator(own_generator, StreamingConfig(max_segment_chars=40,
                                                           frame_batch_size=frame_batch))
    text = "This is the first sentence here. And this one is the second. A third one ends it."
    assert len(split_sentences(text, 40)) == 3
    # A segment's draws start at (frames said so far + its index): the first keeps frames 0..5
    # and ends at draw 6; the second starts at draw 7, keeps 7 frames and ends at draw 14.
    force_end_at(own_generator.model, {5: [6, 14]})
    chunks = list(sg.generate_streaming(text, 0, max_audio_length_ms=6000, seed=5))
    stream = sg.engine.last_stream
    assert stream.metrics.segments == 3 and stream.segment_index == 2
    audio = torch.cat(chunks)
    codes = stream.all_codes
    # the third never ends: it stops at its own cap, twice its 20 characters in frames
    assert codes.shape[0] == 6 + 7 + 40 and "segment frame limit" in stream.metrics.stop_reason
    assert audio.shape[0] == codes.shape[0] * FRAME_SAMPLES
    # one Mimi state across the segments: the stream equals a one-shot decode of all its codes
    one_shot = TailGuard(own_generator.tail).end(own_generator.decode_codes(codes))
    torch.testing.assert_close(audio, one_shot, atol=1e-4, rtol=0)
    assert len(stream.history) == 2  # what was said is the context of what comes next


def test_split_sentences():
    assert split_sentences("Short one. Two.") == ["Short one. Two."]
    text = "One sentence is here. " * 20
    pieces = split_sentences(text, 50)
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces) == " ".join(text.split())
    long = "a clause, " * 40
    assert all(len(p) <= 60 for p in split_sentences(long, 60))


@pytest.mark.parametrize("kwargs, match", [
    ({"chunk_size_ms": 100}, "multiple of 80"), ({"chunk_size_ms": 0}, "multiple of 80"),
    ({"first_chunk_ms": -80}, "multiple of 80"), ({"frame_batch_size": 3}, "must divide"),
    ({"frame_batch_size": 0}, ">= 1"), ({"max_batch_size": 0}, ">= 1"),
    ({"rtf_target": 0}, "rtf_target"), ({"max_seq_len": 4096}, "max_seq_len")])
def test_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingConfig(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"text": "  "}, "text"), ({"speaker": -1}, "speaker"), ({"speaker": "0"}, "speaker"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": 0}, "temperature"),
    ({"topk": 0}, "top_k"), ({"max_audio_length_ms": 0}, "max_audio_length_ms"),
    ({"context": [Segment(0, "x", torch.zeros(0))]}, r"context\[0\].audio"),
    ({"context": [Segment(0, "x", torch.tensor([0.0, float("nan")]))]}, r"context\[0\].audio")])
def test_bad_input_fails_before_any_work(streamer, kwargs, name):
    args = {"text": "Fine.", "speaker": 0, **kwargs}
    frames_before = streamer.engine.state.sampling.frame.clone()
    with pytest.raises(ValueError, match=name):
        streamer.generate_streaming(**args)
    assert torch.equal(streamer.engine.state.sampling.frame, frames_before)
    assert streamer.engine.free_slots == 3


def test_compiled_step_equals_eager(device_generator, monkeypatch):
    """On a CPU with frozen weights but ATen's kernels: tuning inductor's own kernels for the
    tiny model's shapes costs a minute of a cold start (test_graph_ready checks the settings,
    and the next test their kernels)."""
    from csm_streaming.engine import graphs

    monkeypatch.setattr(graphs, "CPU_COMPILE_OPTIONS",
                        {**graphs.CPU_COMPILE_OPTIONS, "max_autotune": False})
    own_generator = device_generator
    eager = StreamingGenerator(own_generator, StreamingConfig(enable_compilation=False))
    ref = torch.cat(
        list(eager.generate_streaming("Compile me.", 0, max_audio_length_ms=480, seed=4))
    )
    compiled = StreamingGenerator(own_generator, StreamingConfig(enable_compilation=True))
    assert compiled.engine.compiled is not None
    out = torch.cat(
        list(compiled.generate_streaming("Compile me.", 0, max_audio_length_ms=480, seed=4))
    )
    assert torch.equal(compiled.engine.last_stream.all_codes, eager.engine.last_stream.all_codes)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_a_layer_compiled_with_the_cpus_own_kernels_equals_eager():
    """compile_module on a CPU: weights frozen and the product's kernel tuned (inductor's C++
    template or ATen's, whichever timed faster); either gives the eager layer's numbers."""
    from csm_streaming.engine.graphs import compile_module

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 1024, bias=False)
    x = torch.randn(1, 256)
    with torch.inference_mode():
        torch.testing.assert_close(compile_module(layer, torch.device("cpu"))(x), layer(x),
                                   atol=1e-5, rtol=1e-5)


def test_warmup_runs_a_throwaway_stream_and_leaves_the_engine_free(tiny_generator):
    sg = StreamingGenerator(tiny_generator, StreamingConfig(enable_compilation=False))
    assert not sg.needs_warmup  # CPU, no compile: nothing to warm
    assert sg.warmup(frames=2) > 0 and sg.engine.free_slots == 1
    wide = StreamingGenerator(
        tiny_generator, StreamingConfig(enable_compilation=False, max_batch_size=5)
    )
    wide.warmup(frames=2, all_buckets=True)
    # one step per bucket, each drawing among 64 candidates (top-k 50)
    assert sorted(wide.engine._steps) == [(1, 64), (2, 64), (4, 64), (5, 64)]
    assert wide.engine.free_slots == 5
    # each bucket's warm-up reported apart (no CUDA graph on a CPU: no capture time)
    assert sorted(wide.warmup_buckets) == [1, 2, 4, 5]
    assert all(b["seconds"] > 0 and b["graph_capture_s"] == 0
               for b in wide.warmup_buckets.values())
    ref = tiny_generator.generate("After warm-up.", 0, max_audio_length_ms=480, seed=3)
    out = torch.cat(
        list(sg.generate_streaming("After warm-up.", 0, max_audio_length_ms=480, seed=3))
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_kill_switch_env(monkeypatch):
    monkeypatch.setenv("NO_TORCH_COMPILE", "1")
    monkeypatch.setenv("NO_CUDA_GRAPH", "1")
    cfg = StreamingConfig(enable_compilation=True, enable_cuda_graphs=True)
    assert not cfg.compile_enabled()
    assert StreamingConfig().compile_enabled(torch.device("cpu")) is False  # auto: CUDA only
    assert not cfg.cuda_graphs_enabled(torch.device("cuda"))
    monkeypatch.delenv("NO_TORCH_COMPILE")
    assert cfg.compile_enabled()


def test_cpu_kernels_give_the_same_numbers_and_the_fastest_is_used(own_generator, monkeypatch):
    """CPU streams use the matrix kernel measured fastest on this CPU (oneDNN or MKL packed):
    the model must compute the same values with each, and come back exactly when restored."""
    from csm_streaming.model import cpu_kernels
    from csm_streaming.model.cpu_kernels import (
        KERNELS,
        measure_kernels,
        restore_linears,
        speed_up_cpu_linears,
    )

    model = own_generator.model
    codes = torch.randint(0, 2048, (4, 32))
    pos = torch.tensor([3, 7, 11, 2])
    caches = model.make_caches(4)
    plain = model.backbone_step(codes, pos, caches)
    weight = model.backbone.layers[0].mlp.w13.weight.clone()
    times = measure_kernels([weight], 4)
    assert "plain" in times and all(t > 0 for t in times.values())
    for name in [k for k in KERNELS if k in times]:  # each kernel this CPU can run
        monkeypatch.setattr(cpu_kernels, "measure_kernels",
                            lambda w, b, name=name: {"plain": 1.0, name: 0.5})
        assert speed_up_cpu_linears(model, 4) == name
        assert all(not isinstance(m, torch.nn.Linear) for m in model.backbone.modules())
        torch.testing.assert_close(model.backbone_step(codes, pos, caches), plain,
                                   atol=1e-5, rtol=1e-5)
        assert restore_linears(model) > 0
        assert torch.equal(model.backbone.layers[0].mlp.w13.weight, weight)  # exactly back
    monkeypatch.setattr(cpu_kernels, "measure_kernels", lambda w, b: {"plain": 1.0, "mkl": 0.97})
    assert speed_up_cpu_linears(model, 4) == "plain"  # 3% is not worth a swap


def step_until_running(eng, *streams):
    for _ in range(50):
        if all(s.state == "running" for s in streams):
            return
        eng.step()
    raise AssertionError("streams never started")


def test_engine_steps_only_the_bucket_of_busy_slots(tiny_generator):

    sg = StreamingGenerator(
        tiny_generator, StreamingConfig(enable_compilation=False, max_batch_size=8)
    )
    eng = sg.engine
    a = eng.submit(GenerationRequest.of("One.", 0, max_audio_length_ms=2400, seed=1))
    step_until_running(eng, a)
    eng.step()
    assert eng.last_bucket == 1
    b = eng.submit(GenerationRequest.of("Two.", 0, max_audio_length_ms=800, seed=2))
    c = eng.submit(GenerationRequest.of("Three.", 0, max_audio_length_ms=800, seed=3))
    step_until_running(eng, b, c)
    eng.step()
    assert (a.slot, b.slot, c.slot) == (0, 1, 2) and eng.last_bucket == 4
    eng.cancel(b)
    eng.cancel(c)
    eng.step()
    assert eng.last_bucket == 1
    while not a.finished:
        eng.step()
    ref = tiny_generator.generate_codes("One.", 0, max_audio_length_ms=2400, seed=1)
    assert torch.equal(a.all_codes, ref)  # joins and leaves around it changed nothing


def test_a_cpu_frame_step_attends_up_to_its_running_streams_only(tiny_generator, monkeypatch):
    """The backbone's frame step is told how far the running rows' positions go (their cache
    is read that far, llama.ATTENTION_BLOCK), not the free slot's scratch position."""

    eng = StreamingGenerator(
        tiny_generator, StreamingConfig(enable_compilation=False, max_batch_size=2)).engine
    a = eng.submit(GenerationRequest.of("Gone.", 0, max_audio_length_ms=800, seed=1))
    b = eng.submit(GenerationRequest.of("Kept.", 0, max_audio_length_ms=2400, seed=2))
    step_until_running(eng, a, b)
    eng.cancel(a)  # slot 0 free (at the scratch position), slot 1 running: bucket 2
    backbone, seen = tiny_generator.model.backbone, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("seen"))
        return type(backbone).forward(backbone, *args, **kwargs)
    monkeypatch.setattr(backbone, "forward", spy)
    start = int(eng.state.pos[b.slot])
    eng.step()
    assert eng.last_bucket == 2 and int(eng.state.pos[0]) == eng.scratch_pos
    assert len(seen) > 1 and seen == list(range(start + 1, start + 1 + len(seen)))


def test_mimi_decodes_only_the_rows_that_speak_and_leaves_the_others_as_they_were(mimi):
    """first_rows(mimi, n) narrows Mimi's streaming state to its first n rows: decoding there
    gives what a full-width decode with the other rows masked gives, and rows n.. stay exactly
    as the mask would leave them (later full decodes agree too)."""
    from csm_streaming.engine.graphs import shared_copy
    from csm_streaming.engine.mimi_decode import first_rows

    full, narrow = shared_copy(mimi), shared_copy(mimi)
    for m in (full, narrow):
        m.streaming_forever(4)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for frames in (2, 4, 1, 3):  # chunks of several lengths, rows 0-1 speaking
            codes = torch.randint(0, 2048, (4, 32, frames), generator=g)
            full.set_exec_mask(torch.tensor([True, True, False, False]))
            want = full.decode(codes)[:2]
            with first_rows(narrow, 2):
                got = narrow.decode(codes[:2])
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for m in (full, narrow):  # all four rows again: the same state everywhere
            m.set_exec_mask(torch.ones(4, dtype=torch.bool))
        codes = torch.randint(0, 2048, (4, 32, 2), generator=g)
        torch.testing.assert_close(narrow.decode(codes), full.decode(codes), atol=1e-5, rtol=0)


def test_a_lone_stream_in_a_wide_engine_decodes_one_row(tiny_generator):
    sg = StreamingGenerator(tiny_generator, StreamingConfig(max_batch_size=8))
    out = torch.cat(list(sg.generate_streaming("Alone.", 0, max_audio_length_ms=800, seed=3)))
    assert sg.engine.last_mimi_rows == 1  # not one per slot
    ref = tiny_generator.generate("Alone.", 0, max_audio_length_ms=800, seed=3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_a_batched_prefill_writes_what_each_row_alone_writes(own_generator):
    """Three prompt blocks of different lengths, at different starts and cache rows, in one
    call: each row's last hidden state and its cache entries are those of its own call."""
    model, gen = own_generator.model, own_generator
    rows = [gen.tokenize_text(t, i) for i, t in enumerate(
        ("Short.", "A somewhat longer prompt here.", "Mid length one."))]
    slots, starts = [3, 0, 2], [0, 5, 11]
    alone, together = model.make_caches(4, 64), model.make_caches(4, 64)
    with torch.inference_mode():
        solo = [model.prefill_chunk(t[None], m[None], alone, slot, start)[0]
                for (t, m), slot, start in zip(rows, slots, starts)]
        h = model.prefill_rows([(t, m, slot, start) for (t, m), slot, start
                                in zip(rows, slots, starts)], together)
    assert len({len(t) for t, _ in rows}) == 3 and h.shape == (3, model.args.backbone.dim)
    for i, ((t, _), slot, start) in enumerate(zip(rows, slots, starts)):
        torch.testing.assert_close(h[i], solo[i], atol=1e-5, rtol=1e-5)
        for a, b in zip(alone.backbone, together.backbone):  # the row's own positions
            end = start + len(t)
            torch.testing.assert_close(b.k[slot, :, start:end], a.k[slot, :, start:end],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.v[slot, :, start:end], a.v[slot, :, start:end],
                                       atol=1e-5, rtol=1e-5)
    assert not torch.equal(h[0], h[1])


def test_requests_that_come_together_are_prefilled_in_one_call(own_generator):
    sg = StreamingGenerator(own_generator, StreamingConfig(max_batch_size=4))
    model, calls = own_generator.model, []
    original = model.prefill_rows

    def counted(blocks, caches):
        calls.append(len(blocks))
        return original(blocks, caches)

    model.prefill_rows = counted
    reqs = [GenerationRequest.of(text, i, max_audio_length_ms=480, seed=i + 1, top_k=20)
            for i, text in enumerate(("One.", "Number two is longer.", "Three here."))]
    got = {i: [] for i in range(3)}
    for i, chunk in sg.generate_streaming_batch(reqs):
        got[i].append(chunk)
    assert calls == [3]  # ~10 positions each: one call of three rows (<= 64 positions)
    for i, r in enumerate(reqs):
        solo = own_generator.generate(r.text, r.speaker, (), r.sampling.max_audio_length_ms,
                                      r.sampling.temperature, r.sampling.top_k, r.sampling.seed)
        torch.testing.assert_close(torch.cat(got[i]), solo, atol=1e-4, rtol=0)
